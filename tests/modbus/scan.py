#!/usr/bin/env python3
"""Scan a SunSpec device with pysunspec2's own Modbus TCP client and print what it found.

Usage: python scan.py --port N --unit U [--unit U ...]

Prints one JSON object: {"<unit>": {"models": [ids in device order],
                                    "points": {"<model id>": {"<point>": {"value": raw,
                                                                          "cvalue": scaled}}}}}
Only each model's top-level points are listed. A not-implemented point is null in both, as
pysunspec2 reports it. This is the reference client: tests/sunspec_harness.rs uses it to prove
the test server serves SunSpec that an independent implementation accepts.
"""

import argparse
import json

from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP


def scan(port, unit):
    device = SunSpecModbusClientDeviceTCP(slave_id=unit, ipaddr="127.0.0.1", ipport=port, timeout=5)
    try:
        device.scan()  # finds "SunS", walks the model chain and reads every model in full
        found = {"models": [], "points": {}}
        # device.models is keyed both by id and by name; the id keys are ints.
        for model_id, instances in device.models.items():
            if not isinstance(model_id, int):
                continue
            found["models"].append(model_id)
            model = instances[0]
            found["points"][str(model_id)] = {
                name: {"value": point.value, "cvalue": point.cvalue}
                for name, point in model.points.items()
            }
        # The insertion order of device.models is not promised; sort by address to be sure.
        found["models"].sort(key=lambda mid: device.models[mid][0].model_addr)
        return found
    finally:
        device.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unit", type=int, action="append", required=True)
    args = parser.parse_args()
    print(json.dumps({str(u): scan(args.port, u) for u in args.unit}))


if __name__ == "__main__":
    main()
