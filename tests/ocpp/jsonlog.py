"""The JSON-lines log and clock shared by charge_point.py and central_system.py.

Each line is one JSON object with `t` (Unix seconds, float) and `event`, flushed as it is
written, so a test reading the file while the script runs sees whole lines only (a line still
being written has no newline yet). Decimals (what the ocpp library's schema validation turns
numbers into) are logged as JSON numbers, bytes as hex, anything else by repr.
"""

import datetime
import decimal
import json
import time


def now_iso():
    """Now, as OCPP timestamps are written: RFC 3339 UTC with a Z, whole seconds."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_default(value):
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


class Log:
    def __init__(self, path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, event, **fields):
        line = {"t": time.time(), "event": event}
        line.update(fields)
        self.file.write(json.dumps(line, default=json_default) + "\n")
        self.file.flush()
