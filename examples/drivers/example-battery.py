#!/usr/bin/env python3
"""An example texture-agent driver: one simulated home battery, `bat-ext-1`.

A driver is any program that speaks JSON lines (docs/PROTOCOL.md, "Driver protocol"):

  stdout, driver -> agent
    {"type":"state","deviceId":"bat-ext-1","state":{"type":"battery",...}}
    {"type":"result","commandId":"c1","ok":true,"result":{...}}
    {"type":"result","commandId":"c1","ok":false,"error":"reason"}
  stdin, agent -> driver
    {"type":"command","commandId":"c1","deviceId":"bat-ext-1","slug":"battery:set-reserve",
     "input":{"chargePercentage":20}}
    {"type":"cancel","commandId":"c1"}

stderr is free text; the agent copies it into its log. When stdin closes, the agent is done
with us and we exit. The agent restarts a driver that exits, so crashing is safe, if rude.

Configure it in agent.toml:

  [[drivers]]
  kind = "process"
  name = "example-battery"
  command = ["python3", "examples/drivers/example-battery.py"]

Environment: EXAMPLE_INTERVAL_SECS, seconds between state reports (default 2).
Standard library only, so it runs on any gateway with python3.
"""

import json
import os
import sys
import threading

DEVICE_ID = "bat-ext-1"
CAPACITY_WH = 13500.0
INTERVAL_SECS = float(os.environ.get("EXAMPLE_INTERVAL_SECS", "2"))

# The battery, with the platform's field names. Two threads touch it (the reporter and the
# command reader), so every access holds `lock`. The same lock keeps their stdout lines from
# interleaving.
lock = threading.Lock()
battery = {
    "type": "battery",
    "charge": 9450.0,
    "chargePercentage": 70.0,
    "chargingState": "discharging",
    "chargeRate": 600.0,  # W, positive = discharging
    "backupReserve": 20.0,
    "gridStatus": "idle",
    "gridPower": 0.0,  # W, positive = importing
    "strategy": "self-consumption",
}


def send(message):
    """Writes one protocol line. Must be called with `lock` held."""
    sys.stdout.write(json.dumps(message) + "\n")
    # A pipe is block-buffered: without the flush the agent would see nothing for minutes.
    sys.stdout.flush()


def report_state():
    send({"type": "state", "deviceId": DEVICE_ID, "state": dict(battery)})


def simulate(seconds):
    """Discharges the battery down to its backup reserve, then idles."""
    if battery["chargePercentage"] <= battery["backupReserve"]:
        battery["chargingState"] = "idle"
        battery["chargeRate"] = 0.0
        return
    battery["chargingState"] = "discharging"
    battery["chargeRate"] = 600.0
    battery["charge"] = max(0.0, battery["charge"] - 600.0 * seconds / 3600.0)
    battery["chargePercentage"] = round(100.0 * battery["charge"] / CAPACITY_WH, 2)


def reporter(stop):
    while not stop.wait(INTERVAL_SECS):
        with lock:
            simulate(INTERVAL_SECS)
            report_state()


def set_reserve(command_input):
    percentage = command_input.get("chargePercentage")
    # bool is a subclass of int in Python; `true` is not a percentage.
    if isinstance(percentage, bool) or not isinstance(percentage, (int, float)):
        raise ValueError("chargePercentage must be a number")
    if not 0 <= percentage <= 100:
        raise ValueError("chargePercentage must be between 0 and 100")
    battery["backupReserve"] = float(percentage)
    return {"backupReserve": battery["backupReserve"]}


# One function per command slug; adding a command means adding an entry here.
COMMANDS = {
    "battery:set-reserve": set_reserve,
}


def handle(message):
    kind = message.get("type")
    if kind == "cancel":
        return  # Our commands finish at once, so there is never anything to cancel.
    if kind != "command":
        print(f"ignoring message of type {kind!r}", file=sys.stderr, flush=True)
        return

    command_id = message.get("commandId")
    slug = message.get("slug")
    handler = COMMANDS.get(slug)
    with lock:
        if message.get("deviceId") != DEVICE_ID:
            send({"type": "result", "commandId": command_id, "ok": False,
                  "error": f"unknown device {message.get('deviceId')!r}"})
        elif handler is None:
            send({"type": "result", "commandId": command_id, "ok": False,
                  "error": f"unsupported command {slug!r}"})
        else:
            try:
                result = handler(message.get("input") or {})
            except ValueError as error:
                send({"type": "result", "commandId": command_id, "ok": False,
                      "error": str(error)})
            else:
                send({"type": "result", "commandId": command_id, "ok": True,
                      "result": result})
                # Report the change now rather than at the next tick.
                report_state()


def main():
    print(f"example battery driver for {DEVICE_ID}, reporting every {INTERVAL_SECS}s",
          file=sys.stderr, flush=True)
    with lock:
        report_state()
    stop = threading.Event()
    threading.Thread(target=reporter, args=(stop,), daemon=True).start()

    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            print("ignoring a line that is not JSON", file=sys.stderr, flush=True)
            continue
        if isinstance(message, dict):
            handle(message)
    stop.set()  # stdin closed: the agent no longer needs us.


if __name__ == "__main__":
    main()
