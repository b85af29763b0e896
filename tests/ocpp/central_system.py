#!/usr/bin/env python3
"""A minimal OCPP 1.6J central system (the `ocpp` package over a `websockets` server), used only to
prove tests/ocpp/charge_point.py and testkit::ocpp: the agent is the central system the real tests
run the charge point against.

Usage:
    python central_system.py --spec SPEC.json --port-file PATH --log PATH

It listens on 127.0.0.1 on an ephemeral port and, once listening, writes the port number to PATH
(PATH.tmp, then renamed). SPEC:

    {"path": "ocpp",                          # charge points connect to ws://127.0.0.1:PORT/ocpp/<id>
     "charge_points": {"CP1": "secret",       # id -> its Basic auth password (user = id); null: none
                       "CP2": null},
     "heartbeat_interval": 300,               # the interval its BootNotification result gives
     "silent": ["Authorize"]}                 # actions it never answers (a backend that hangs)

A connection is refused (before the WebSocket handshake completes) with HTTP 404 for a path or id
it does not know, 401 for a missing or wrong Basic password, and 400 when the client does not offer
the ocpp1.6 subprotocol (websockets' own answer too; OCPP-J 1.6 4.1.2 would have a 101 without the
header and a close, which the charge point also logs). It answers BootNotification (Accepted),
Heartbeat, StatusNotification, Authorize (Accepted), StartTransaction (transaction ids from 1),
StopTransaction and MeterValues.

Control (stdin, JSON lines):
    {"op": "call", "cp": "CP1", "action": "RemoteStartTransaction", "payload": {...}, "ref": R}
        a CALL to that charge point (payload camelCase); its outcome line carries the raw answer
    {"op": "send_raw", "cp": "CP1", "text": "..."}   a text frame exactly as given
    {"op": "close", "cp": "CP1", "code": 1000, "reason": ""}

Log lines (each with "t" and "event"):
    {"event": "refused", "path", "status", "why"}
    {"event": "connected", "cp", "subprotocol"}
    {"event": "frame", "dir": "sent" | "received", "cp", "text": RAW}   every text frame, as on the wire
    {"event": "closed", "cp", "code", "reason"}
    {"event": "op", "ref", "outcome": "result" | "error" | "timeout" | "not_connected" | "failed",
     "frame": RAW answer}
"""

import argparse
import asyncio
import base64
import json
import os
import sys
import uuid

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from ocpp.charge_point import camel_to_snake_case
from ocpp.routing import on
from ocpp.v16 import ChargePoint
from ocpp.v16 import call as v16_call
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

from jsonlog import Log, now_iso  # tests/ocpp/jsonlog.py


class LoggedConnection:
    """What the library reads and writes through: every frame is logged raw first."""

    def __init__(self, cs, cp_id, ws):
        self.cs, self.cp_id, self.ws = cs, cp_id, ws

    async def recv(self):
        while True:
            text = await self.ws.recv()
            self.cs.log.write("frame", dir="received", cp=self.cp_id, text=text)
            if not self.silenced(text):
                break
        try:
            msg = json.loads(text)
            if isinstance(msg, list) and msg and msg[0] in (3, 4) and msg[1] in self.cs.pending:
                self.cs.pending[msg[1]].set_result(text)
        except (ValueError, TypeError, IndexError, asyncio.InvalidStateError):
            pass
        return text

    def silenced(self, text):
        try:
            msg = json.loads(text)
            return msg[0] == 2 and msg[2] in self.cs.spec.get("silent", [])
        except (ValueError, TypeError, IndexError, KeyError):
            return False

    async def send(self, text):
        self.cs.log.write("frame", dir="sent", cp=self.cp_id, text=text)
        await self.ws.send(text)


class CentralChargePoint(ChargePoint):
    transactions = 0

    @on(Action.boot_notification)
    def on_boot(self, **kwargs):
        return call_result.BootNotification(current_time=now_iso(), interval=self.interval,
                                            status="Accepted")

    @on(Action.heartbeat)
    def on_heartbeat(self, **kwargs):
        return call_result.Heartbeat(current_time=now_iso())

    @on(Action.status_notification)
    def on_status(self, **kwargs):
        return call_result.StatusNotification()

    @on(Action.authorize)
    def on_authorize(self, **kwargs):
        return call_result.Authorize(id_tag_info={"status": "Accepted"})

    @on(Action.start_transaction)
    def on_start(self, **kwargs):
        CentralChargePoint.transactions += 1
        return call_result.StartTransaction(transaction_id=CentralChargePoint.transactions,
                                            id_tag_info={"status": "Accepted"})

    @on(Action.stop_transaction)
    def on_stop(self, **kwargs):
        return call_result.StopTransaction()

    @on(Action.meter_values)
    def on_meter_values(self, **kwargs):
        return call_result.MeterValues()


class CentralSystem:
    def __init__(self, spec, log):
        self.spec, self.log = spec, log
        self.connected = {}  # id -> (websocket, charge point)
        self.pending = {}

    def refuse(self, connection, request, status, why):
        self.log.write("refused", path=request.path, status=status, why=why)
        response = connection.respond(status, why + "\n")
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Basic realm="ocpp"'
        return response

    def process_request(self, connection, request):
        prefix = "/" + self.spec.get("path", "ocpp") + "/"
        cp_id = request.path[len(prefix):] if request.path.startswith(prefix) else None
        if not cp_id or cp_id not in self.spec["charge_points"]:
            return self.refuse(connection, request, 404, "unknown charge point")
        password = self.spec["charge_points"][cp_id]
        if password is not None:
            expected = "Basic " + base64.b64encode(f"{cp_id}:{password}".encode()).decode()
            if request.headers.get("Authorization") != expected:
                return self.refuse(connection, request, 401, "wrong or missing Basic credentials")
        offered = ",".join(request.headers.get_all("Sec-WebSocket-Protocol"))
        if "ocpp1.6" not in [p.strip() for p in offered.split(",")]:
            return self.refuse(connection, request, 400, "ocpp1.6 subprotocol not offered")
        return None

    async def handler(self, ws):
        cp_id = ws.request.path.rsplit("/", 1)[1]
        self.log.write("connected", cp=cp_id, subprotocol=ws.subprotocol)
        cp = CentralChargePoint(cp_id, LoggedConnection(self, cp_id, ws), response_timeout=30)
        cp.interval = self.spec.get("heartbeat_interval", 300)
        self.connected[cp_id] = (ws, cp)
        try:
            await cp.start()
        except ConnectionClosed:
            pass
        finally:
            if self.connected.get(cp_id, (None,))[0] is ws:
                del self.connected[cp_id]
            await ws.wait_closed()
            self.log.write("closed", cp=cp_id, code=ws.close_code, reason=ws.close_reason or "")

    async def op(self, op):
        entry = self.connected.get(op.get("cp"))
        if entry is None:
            return {"outcome": "not_connected"}
        ws, cp = entry
        if op["op"] == "close":
            await ws.close(op.get("code", 1000), op.get("reason", ""))
            return {"outcome": "done"}
        if op["op"] == "send_raw":
            await cp._connection.send(op["text"])
            return {"outcome": "sent"}
        if op["op"] != "call":
            return {"outcome": "failed", "error": f"unknown op {op['op']!r}"}
        request = getattr(v16_call, op["action"])(**camel_to_snake_case(op.get("payload", {})))
        unique_id = str(uuid.uuid4())
        answered = asyncio.get_running_loop().create_future()
        self.pending[unique_id] = answered
        library = asyncio.ensure_future(cp.call(request, suppress=False, unique_id=unique_id))
        library.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            text = await asyncio.wait_for(answered, op.get("timeout", 10))
        except asyncio.TimeoutError:
            return {"outcome": "timeout", "unique_id": unique_id}
        finally:
            self.pending.pop(unique_id, None)
        return {"outcome": "result" if text.startswith("[3") else "error", "unique_id": unique_id,
                "frame": text}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    with open(args.spec, encoding="utf-8") as f:
        spec = json.load(f)
    cs = CentralSystem(spec, Log(args.log))
    async with serve(cs.handler, "127.0.0.1", 0, subprotocols=["ocpp1.6"],
                     process_request=cs.process_request, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(args.port_file + ".tmp", args.port_file)
        reader = asyncio.StreamReader(limit=2**27)
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip():
                op = json.loads(line)
                try:
                    result = await cs.op(op)
                except Exception as e:  # a bad control line is the test's bug: say so, go on
                    result = {"outcome": "failed", "error": f"{type(e).__name__}: {e}"}
                cs.log.write("op", ref=op.get("ref"), **result)


if __name__ == "__main__":
    asyncio.run(main())
