#!/usr/bin/env python3
"""A real OCPP 1.6J charge point (the mobilityhouse `ocpp` package over `websockets`), for tests.

Usage:
    python charge_point.py --spec SPEC.json --ready-file PATH --log PATH

The charge point connects to the central system under test (the agent) as a WebSocket client,
answers its CALLs as the SPEC says, and sends its own CALLs when told to on stdin, one JSON
object a line. Everything it sees or does goes to the log, one JSON object a line, flushed per
line. Once the first connection attempt is over (connected, refused by HTTP status, or failed),
it writes the ready file (PATH.tmp, then renamed, so a reader never sees half of it):
    {"state": "connected" | "refused" | "handshake_failed" | "connect_failed" | "idle", "conn": 1}
("idle" when the SPEC says "connect": false). It runs until stdin closes (it then closes the
connection, code 1001, and exits 0) or it is killed.

SPEC format (JSON; only url and id are required):

    {"url": "ws://127.0.0.1:PORT/ocpp/CP1",   # the whole URL, id included: the script adds nothing
     "ca_file": "/path/ca.pem",               # wss:// only: the CA to trust (default: the system's)
     "id": "CP1",                             # the charge point id (Basic auth user, logs)
     "password": "secret",                    # HTTP Basic, OCPP security profile 1; absent/null: no header
     "auth_user": "CP1",                      # the Basic user, default id (a test may lie)
     "subprotocols": ["ocpp1.6"],             # offered; [] offers none (no header at all)
     "connectors": 1,
     "vendor": "Texture", "model": "SimCharger",
     "serial": null, "firmware": null,        # chargePointSerialNumber, firmwareVersion when set
     "connect": true,                         # false: start idle, wait for {"op": "connect"}
     "boot_on_connect": false,                # send BootNotification after each connect
     "heartbeat": "boot",                     # "boot": every interval the BootNotification result
                                              # gives (after an Accepted boot); a number: every N s;
                                              # "off": never (a charger gone silent)
     "reconnect_ms": null,                    # N: after a close this side did not ask for, retry every N ms
     "call_timeout_s": 10,                    # how long a control op's CALL waits for its answer
     "ping_interval_s": null,                 # WebSocket pings (websockets' keepalive); null: none
     "max_size": 16777216,                    # largest frame accepted from the central system
     "answers": {"RemoteStartTransaction": {"status": "Accepted", "delay_ms": 0}, ...}}

answers: action -> how to answer that CALL from the central system. For RemoteStartTransaction,
RemoteStopTransaction, SetChargingProfile, ClearChargingProfile, ChangeAvailability and
TriggerMessage (default {"status": "Accepted"} each):
    {"status": S}                    CALLRESULT {"status": S}; S is sent as given, valid or not
    {"error": CODE, "description": D, "details": {...}}   CALLERROR with that code
    {"silent": true}                 no answer at all (a charger that hangs)
    {"raw": TEXT}                    TEXT as the whole answer frame, sent as it is
plus "delay_ms" (before answering; for status answers) and "then": [control ops, run after a status
answer is sent; e.g. a RemoteStartTransaction answered Accepted then {"op": "start_transaction", ...}]. A TriggerMessage
answered Accepted is followed, as a real charger does, by the message it asks for
(BootNotification, Heartbeat, StatusNotification with the connector's last status, default
Available; others are only answered) unless its answer has "follow_up": false. Any other 1.6 action
is answered CALLERROR NotSupported; an action 1.6 does not have, NotImplemented.

Control ops (stdin, one JSON object a line). Every line gets a sequence number, counted from 1 in
the order read, and exactly one outcome line in the log carrying it ("seq"), with "ref" copied
from the op when given. Ops run one after another in that order; a CALL op waits for its answer,
its timeout or the connection's close before the next op runs, unless it has "nowait": true.
    {"op": "boot"}                             BootNotification from the SPEC (payload: override)
    {"op": "heartbeat"}
    {"op": "status", "connector": 1, "status": "Preparing", "error_code": "NoError", "info": null}
    {"op": "authorize", "id_tag": "TAG"}
    {"op": "start_transaction", "connector": 1, "id_tag": "TAG", "meter_start": 0,
     "reservation_id": null, "timestamp": null}
    {"op": "meter_values", "connector": 1, "transaction_id": N,
     "sampled": [{"measurand": "Power.Active.Import", "value": "7200", "unit": "W",
                  "phase": null, "context": null, "location": null}], "timestamp": null}
    {"op": "stop_transaction", "transaction_id": N, "meter_stop": 0, "reason": null,
     "id_tag": null, "timestamp": null}
    {"op": "call", "action": "DataTransfer", "payload": {...}}   any 1.6 CALL, payload in camelCase
    {"op": "send_raw", "text": "..."}          a text frame, exactly these characters, bypassing the library
    {"op": "disconnect", "code": 1000, "reason": "", "abrupt": false}   abrupt: drop TCP, no close frame
    {"op": "connect"} / {"op": "reconnect"}    (re)connect, closing the current connection first
    {"op": "set_answer", "action": "RemoteStartTransaction", "answer": {...}}
timestamp defaults to now (UTC, ISO 8601 with Z); transaction_id defaults to the transaction the
last StartTransaction on that connector (meter_values) or on any connector (stop_transaction)
got. Any CALL op takes "timeout" (seconds, default call_timeout_s) and "payload" (merged over the
payload the op builds, camelCase, so a test can send any field).

Log lines (all carry "t", time.time(), and "event"):
    {"event": "connecting", "conn": N, "url", "subprotocols"}
    {"event": "connected", "conn": N, "subprotocol": "ocpp1.6" | null}   (null: server chose none)
    {"event": "refused", "conn": N, "status": 401, "body": "..."}       HTTP status instead of 101
    {"event": "handshake_failed", "conn": N, "error": "..."}   e.g. a subprotocol we did not offer
    {"event": "connect_failed", "conn": N, "error": "..."}     TCP refused, timeout
    {"event": "closed", "conn": N, "code": 1000 | 1006 | null, "reason": "...", "local": bool}
        code/reason as received in the central system's close frame (1006: none arrived);
        local: this side closed (a disconnect op or stdin's end)
    {"event": "frame", "dir": "sent" | "received", "conn": N, "text": RAW}
        every text frame, exactly as on the wire (JSON-escaped in the line, so decoding it gives the
        same characters); a received one also carries "kind" (call | result | error | malformed),
        "unique_id", "action" (for a result or error: the action of the CALL it answers) and
        "violations": a list of strings, empty when the frame is a valid OCPP-J 1.6 message whose
        payload validates against the 1.6 schema. A binary frame has "binary_hex" instead of text.
        A sent frame is logged just before it is handed to the socket; if that fails a
        {"event": "send_failed", "conn", "error"} line follows.
    {"event": "op", "seq": N, "ref": ..., "op": "boot", "outcome": O, ...}
        O is one of: result (with "unique_id", "frame": the raw answer, "payload", "violations"),
        error (the same, plus "error_code", "error_description", "error_details"), timeout,
        closed (the connection closed before an answer), not_connected, invalid_request (the
        library refused to build or validate the CALL: "error"), sent (send_raw), done
        (disconnect, set_answer), connected | refused | handshake_failed | connect_failed
        (connect), failed (a control line that is not an op: "error"). CALL outcomes also carry
        "library": "ok" or the exception ocpp's call() raised for the same answer.
    {"event": "internal_error", "error": "traceback"}   a bug in this script; tests should fail on it
    {"event": "exit", "why": "..."}

Known defects of ocpp 2.1.0 (reproduced), and why none of them can hide a fault of the agent:
1. Malformed JSON from the peer is dropped silently, with no CALLERROR. Every received frame is
   logged raw before the library sees it, with "kind": "malformed" and a violation, and tests
   assert on the log's raw frames, never on what the library parsed; malformed frames are not
   handed to the library at all.
2. NotImplemented and NotSupported are swapped against the OCPP-J 1.6 table (4.2.3): the library
   answers NotImplemented for a known action it has no handler for, NotSupported for an unknown
   one. This script answers those CALLs itself, before the library: NotSupported for a 1.6 action
   it does not implement, NotImplemented for an action 1.6 does not know (violation "unknown
   action"). An agent's CALLERROR is checked against the 1.6 table (violation otherwise).
3. Schema errors are answered FormatViolation (2.0.1's name), not 1.6's FormationViolation. This
   script validates every received CALL against the 1.6 schema itself and answers a failing one
   with the 1.6 code (OccurenceConstraintViolation for a missing field, TypeConstraintViolation
   for a wrong type, PropertyConstraintViolation for a bad value, FormationViolation otherwise),
   so the library never answers one; the agent's own CALLERRORs with FormatViolation are flagged
   as a violation. The handlers are registered with skip_schema_validation, so the statuses sent
   are exactly those configured.
4. call() waits its whole timeout on a connection that is already closed (its send fails or its
   queue never fills). Every CALL op races call() against the connection's close and against its
   own timeout, and its outcome is decided by the raw answer frame (matched by unique id), never
   by call()'s return; call()'s verdict is only reported in "library".
5. Handlers receive Decimal numbers (validate_payload re-parses SetChargingProfile and
   RemoteStartTransaction with parse_float=Decimal), and its JSON encoder writes a Decimal with
   one decimal place when sending (Decimal("6.55") goes out as 6.5, Decimal("16") as 16.0). Payloads in the log are parsed from the raw text with the standard
   json module (numbers stay JSON numbers, exact); handlers' arguments are never logged, and any
   Decimal that reaches the log is written as a JSON number (integral ones as integers).
Found here besides: call() builds its dataclass from snake_case names and turns them back into
camelCase (a field the library's dataclass lacks is refused: outcome invalid_request); a response
whose unique id matches no pending CALL is only logged by the library (here: violation "answers
no CALL this charge point sent"); and websockets' client accepts a 101 without any
Sec-WebSocket-Protocol although it offered ocpp1.6, so "connected" carries "subprotocol": null and
a test must check it.
"""

import argparse
import asyncio
import base64
import decimal
import json
import os
import ssl
import sys
import time
import traceback
import uuid

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ocpp.charge_point import camel_to_snake_case
from ocpp.messages import get_validator
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint as LibChargePoint
from ocpp.v16 import call as v16_call
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

from jsonlog import Log, now_iso  # tests/ocpp/jsonlog.py

# The OCPP-J 1.6 error codes (4.2.3). 2.0.1's FormatViolation and the correctly spelled
# OccurrenceConstraintViolation are not among them.
ERROR_CODES_16 = {
    "NotImplemented", "NotSupported", "InternalError", "ProtocolError", "SecurityError",
    "FormationViolation", "PropertyConstraintViolation", "OccurenceConstraintViolation",
    "TypeConstraintViolation", "GenericError",
}

# The CALLs from the central system that this charge point answers as the SPEC says.
ANSWERED = [
    "RemoteStartTransaction", "RemoteStopTransaction", "SetChargingProfile",
    "ClearChargingProfile", "ChangeAvailability", "TriggerMessage",
]

KNOWN_16_ACTIONS = {a.value for a in Action}


def schema_violation(message_type, action, payload):
    """None when payload validates against 1.6's schema for (message_type, action); else
    (1.6 error code, message). Unknown actions have no schema: ("NotImplemented", ...)."""
    try:
        validator = get_validator(message_type, action, "1.6", parse_float=decimal.Decimal)
    except (OSError, ValueError):
        return ("NotImplemented", f"no 1.6 schema for {action}")
    # Decimal, as the library does for the schemas with multipleOf: 0.1 is not a float's 0.1.
    exact = json.loads(json.dumps(payload), parse_float=decimal.Decimal)
    errors = sorted(validator.iter_errors(exact), key=lambda e: list(e.path))
    if not errors:
        return None
    e = errors[0]
    code = {
        "required": "OccurenceConstraintViolation",
        "type": "TypeConstraintViolation",
        "enum": "PropertyConstraintViolation",
        "maxLength": "PropertyConstraintViolation",
        "minimum": "PropertyConstraintViolation",
        "maximum": "PropertyConstraintViolation",
        "multipleOf": "PropertyConstraintViolation",
        "format": "PropertyConstraintViolation",
    }.get(e.validator, "FormationViolation")
    where = "/".join(str(p) for p in e.path)
    return (code, f"{where or '(payload)'}: {e.message}")


class SimChargePoint(LibChargePoint):
    """The library's 1.6 charge point; every frame it sends goes through Sim.send_text (logged),
    and it sees only the received frames Sim hands it (well-formed, schema-valid CALLs and the
    answers to its own CALLs)."""

    def __init__(self, sim, conn):
        super().__init__(sim.spec["id"], None, response_timeout=3600)
        self.sim = sim
        self.conn = conn

    async def _send(self, message):
        await self.sim.send_text(self.conn, message)

    async def answer(self, action, kwargs):
        return await self.sim.answer(action, kwargs)

    @on(Action.remote_start_transaction, skip_schema_validation=True)
    async def on_remote_start(self, **kwargs):
        return call_result.RemoteStartTransaction(**await self.answer("RemoteStartTransaction", kwargs))

    @on(Action.remote_stop_transaction, skip_schema_validation=True)
    async def on_remote_stop(self, **kwargs):
        return call_result.RemoteStopTransaction(**await self.answer("RemoteStopTransaction", kwargs))

    @on(Action.set_charging_profile, skip_schema_validation=True)
    async def on_set_profile(self, **kwargs):
        return call_result.SetChargingProfile(**await self.answer("SetChargingProfile", kwargs))

    @on(Action.clear_charging_profile, skip_schema_validation=True)
    async def on_clear_profile(self, **kwargs):
        return call_result.ClearChargingProfile(**await self.answer("ClearChargingProfile", kwargs))

    @on(Action.change_availability, skip_schema_validation=True)
    async def on_change_availability(self, **kwargs):
        return call_result.ChangeAvailability(**await self.answer("ChangeAvailability", kwargs))

    @on(Action.trigger_message, skip_schema_validation=True)
    async def on_trigger(self, **kwargs):
        return call_result.TriggerMessage(**await self.answer("TriggerMessage", kwargs))

    @after(Action.remote_start_transaction)
    def after_remote_start(self, **kwargs):
        self.sim.after_answer("RemoteStartTransaction", kwargs)

    @after(Action.remote_stop_transaction)
    def after_remote_stop(self, **kwargs):
        self.sim.after_answer("RemoteStopTransaction", kwargs)

    @after(Action.set_charging_profile)
    def after_set_profile(self, **kwargs):
        self.sim.after_answer("SetChargingProfile", kwargs)

    @after(Action.clear_charging_profile)
    def after_clear_profile(self, **kwargs):
        self.sim.after_answer("ClearChargingProfile", kwargs)

    @after(Action.change_availability)
    def after_change_availability(self, **kwargs):
        self.sim.after_answer("ChangeAvailability", kwargs)

    @after(Action.trigger_message)
    def after_trigger(self, **kwargs):
        self.sim.after_answer("TriggerMessage", kwargs)


class Conn:
    """One WebSocket connection: its number, the socket, its charge point, its close."""

    def __init__(self, number, ws):
        self.number = number
        self.ws = ws
        self.cp = None
        self.closed = asyncio.Event()
        self.local_close = False
        self.tasks = set()


class Sim:
    def __init__(self, spec, log):
        self.spec = spec
        self.log = log
        self.conn = None
        self.conn_count = 0
        self.answers = {a: {"status": "Accepted"} for a in ANSWERED}
        self.answers.update(spec.get("answers", {}))
        self.sent_ids = set()  # unique ids of every CALL sent
        self.pending = {}  # unique id -> (action, future of the raw answer)
        self.raw_ids = set()  # unique ids of CALLs sent by send_raw
        self.transactions = {}  # connector -> transaction id
        self.last_transaction = None
        self.last_status = {}
        self.queue = asyncio.Queue()
        self.heartbeat_task = None
        self.reconnect_task = None

    # ---- connection ----

    async def connect(self):
        if self.conn is not None:
            await self.disconnect({"code": 1000, "reason": "reconnect"})
        self.conn_count += 1
        number = self.conn_count
        spec = self.spec
        offered = spec.get("subprotocols", ["ocpp1.6"])
        headers = {}
        if spec.get("password") is not None:
            user = spec.get("auth_user", spec["id"])
            token = base64.b64encode(f"{user}:{spec['password']}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        self.log.write("connecting", conn=number, url=spec["url"], subprotocols=offered)
        context = None
        if spec["url"].startswith("wss://"):
            context = ssl.create_default_context(cafile=spec.get("ca_file"))
        try:
            ws = await ws_connect(
                spec["url"],
                ssl=context,
                subprotocols=offered or None,
                additional_headers=headers,
                ping_interval=spec.get("ping_interval_s"),
                max_size=spec.get("max_size", 16 * 2**20),
                open_timeout=10,
                close_timeout=5,
            )
        except InvalidStatus as e:
            body = e.response.body.decode("utf-8", "replace")[:1000] if e.response.body else ""
            self.log.write("refused", conn=number, status=e.response.status_code, body=body)
            return "refused"
        except InvalidHandshake as e:
            self.log.write("handshake_failed", conn=number, error=f"{type(e).__name__}: {e}")
            return "handshake_failed"
        except (OSError, asyncio.TimeoutError) as e:
            self.log.write("connect_failed", conn=number, error=f"{type(e).__name__}: {e}")
            return "connect_failed"
        conn = Conn(number, ws)
        conn.cp = SimChargePoint(self, conn)
        self.conn = conn
        self.log.write("connected", conn=number, subprotocol=ws.subprotocol)
        self.spawn(self.read_loop(conn))
        if spec.get("boot_on_connect"):
            self.queue.put_nowait((None, {"op": "boot", "ref": "boot_on_connect"}))
        return "connected"

    async def read_loop(self, conn):
        try:
            async for message in conn.ws:
                self.on_frame(conn, message)
        except ConnectionClosed:
            pass
        finally:
            # close_code is None until the closing handshake (or the TCP close) is over.
            try:
                await asyncio.wait_for(conn.ws.wait_closed(), 10)
            except asyncio.TimeoutError:
                pass
            self.log.write("closed", conn=conn.number, code=conn.ws.close_code,
                           reason=conn.ws.close_reason or "", local=conn.local_close)
            conn.closed.set()
            for task in list(conn.tasks):
                task.cancel()
            if self.conn is conn:
                self.conn = None
                if self.heartbeat_task:
                    self.heartbeat_task.cancel()
                    self.heartbeat_task = None
                if not conn.local_close and self.spec.get("reconnect_ms") is not None:
                    self.reconnect_task = self.spawn(self.reconnect_loop())

    async def reconnect_loop(self):
        while self.conn is None:
            await asyncio.sleep(self.spec["reconnect_ms"] / 1000)
            if self.conn is None and await self.connect() == "connected":
                return

    async def disconnect(self, op):
        conn = self.conn
        if conn is None:
            return "not_connected"
        conn.local_close = True
        if self.reconnect_task:
            self.reconnect_task.cancel()
        if op.get("abrupt"):
            conn.ws.transport.abort()
        else:
            await conn.ws.close(op.get("code", 1000), op.get("reason", ""))
        await conn.closed.wait()
        return "done"

    def spawn(self, coro, conn=None):
        task = asyncio.get_running_loop().create_task(self.guard(coro))
        if conn is not None:
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
        return task

    async def guard(self, coro):
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.write("internal_error", error=traceback.format_exc())
            print(traceback.format_exc(), file=sys.stderr, flush=True)

    async def send_text(self, conn, text):
        try:
            msg = json.loads(text)
            if isinstance(msg, list) and len(msg) > 1 and msg[0] == 2 and isinstance(msg[1], str):
                self.sent_ids.add(msg[1])
        except ValueError:
            pass
        self.log.write("frame", dir="sent", conn=conn.number, text=text)
        try:
            await conn.ws.send(text)
        except ConnectionClosed as e:
            self.log.write("send_failed", conn=conn.number, error=f"{type(e).__name__}: {e}")
            raise

    # ---- received frames ----

    def on_frame(self, conn, message):
        if isinstance(message, bytes):
            self.log.write("frame", dir="received", conn=conn.number, binary_hex=message.hex(),
                           kind="malformed", unique_id=None, action=None,
                           violations=["binary frame (OCPP-J uses text frames)"])
            return
        line = {"dir": "received", "conn": conn.number, "text": message, "kind": "malformed",
                "unique_id": None, "action": None}
        violations = []
        forward = False
        answer_now = None
        try:
            msg = json.loads(message)
        except ValueError as e:
            msg = None
            violations.append(f"not JSON: {e}")
        if msg is not None:
            shape = None
            if not isinstance(msg, list) or not msg or msg[0] not in (2, 3, 4):
                shape = "not an OCPP-J message: a JSON array starting with 2, 3 or 4"
            elif not isinstance(msg[1] if len(msg) > 1 else None, str):
                shape = "no string unique id"
            elif msg[0] == 2 and not (len(msg) == 4 and isinstance(msg[2], str)
                                      and isinstance(msg[3], dict)):
                shape = "a CALL is [2, id, action, {payload}]"
            elif msg[0] == 3 and not (len(msg) == 3 and isinstance(msg[2], dict)):
                shape = "a CALLRESULT is [3, id, {payload}]"
            elif msg[0] == 4 and not (len(msg) == 5 and all(isinstance(x, str) for x in msg[2:4])
                                      and isinstance(msg[4], dict)):
                shape = "a CALLERROR is [4, id, code, description, {details}]"
            if shape:
                violations.append(shape)
                if isinstance(msg, list) and len(msg) > 1 and isinstance(msg[1], str):
                    line["unique_id"] = msg[1]
            else:
                line["kind"] = {2: "call", 3: "result", 4: "error"}[msg[0]]
                line["unique_id"] = msg[1]
                if msg[0] == 2:
                    answer_now, forward = self.check_call(msg, violations)
                    line["action"] = msg[2]
                else:
                    forward = self.check_answer(msg, line, violations)
        line["violations"] = violations
        self.log.write("frame", **line)
        if answer_now is not None:
            self.spawn(self.send_text(conn, answer_now), conn)
        elif forward:
            self.spawn(conn.cp.route_message(message), conn)

    def check_call(self, msg, violations):
        """(an answer this script sends itself, or None; whether the library handles it)."""
        _, unique_id, action, payload = msg
        if action not in KNOWN_16_ACTIONS:
            violations.append(f"unknown action {action!r}")
            return self.call_error(unique_id, "NotImplemented", f"{action} is not an OCPP 1.6 action"), False
        bad = schema_violation(2, action, payload)
        if bad:
            violations.append(f"schema: {bad[0]}: {bad[1]}")
            return self.call_error(unique_id, bad[0], bad[1]), False
        if action not in ANSWERED:
            return self.call_error(unique_id, "NotSupported", f"this charge point does not implement {action}"), False
        answer = self.answers.get(action, {})
        if "error" in answer:
            return self.call_error(unique_id, answer["error"], answer.get("description", ""),
                                   answer.get("details", {})), False
        if answer.get("silent"):
            return None, False
        if "raw" in answer:
            return answer["raw"], False
        return None, True

    def call_error(self, unique_id, code, description, details=None):
        return json.dumps([4, unique_id, code, description, details or {}], separators=(",", ":"))

    def check_answer(self, msg, line, violations):
        unique_id = msg[1]
        if msg[0] == 4 and msg[2] not in ERROR_CODES_16:
            violations.append(f"error code {msg[2]!r} is not in the OCPP-J 1.6 table")
        entry = self.pending.get(unique_id)
        if entry is None:
            if unique_id not in self.raw_ids:
                violations.append("answers no CALL this charge point sent")
            return False
        action, future = entry
        line["action"] = action
        if msg[0] == 3:
            bad = schema_violation(3, action, msg[2])
            if bad:
                violations.append(f"schema: {bad[0]}: {bad[1]}")
        if not future.done():
            future.set_result((msg, line["text"], list(violations)))
        return True

    # ---- answering the central system ----

    async def answer(self, action, kwargs):
        answer = self.answers.get(action, {})
        if answer.get("delay_ms"):
            await asyncio.sleep(answer["delay_ms"] / 1000)
        return {"status": answer.get("status", "Accepted")}

    def after_answer(self, action, kwargs):
        answer = self.answers.get(action, {})
        for op in answer.get("then", []):
            self.queue.put_nowait((None, op))
        if (action == "TriggerMessage" and answer.get("status", "Accepted") == "Accepted"
                and answer.get("follow_up", True)):
            requested = kwargs.get("requested_message")
            connector = kwargs.get("connector_id")
            ref = "trigger"
            if requested == "BootNotification":
                self.queue.put_nowait((None, {"op": "boot", "ref": ref}))
            elif requested == "Heartbeat":
                self.queue.put_nowait((None, {"op": "heartbeat", "ref": ref}))
            elif requested == "StatusNotification":
                connectors = [connector] if connector is not None else range(0, self.connectors() + 1)
                for c in connectors:
                    self.queue.put_nowait((None, {"op": "status", "connector": int(c), "ref": ref,
                                                  "status": self.last_status.get(int(c), "Available")}))

    def connectors(self):
        return int(self.spec.get("connectors", 1))

    # ---- control ops ----

    async def run_ops(self):
        while True:
            seq, op = await self.queue.get()
            if isinstance(op, dict) and op.get("nowait"):
                self.spawn(self.run_op(seq, op))
            else:
                await self.guard(self.run_op(seq, op))

    async def run_op(self, seq, op):
        base = {"seq": seq, "ref": op.get("ref") if isinstance(op, dict) else None,
                "op": op.get("op") if isinstance(op, dict) else None}
        try:
            result = await self.op(op)
        except OpError as e:
            result = {"outcome": "failed", "error": str(e)}
        self.log.write("op", **base, **result)

    async def op(self, op):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise OpError(f"not an op: {op!r}")
        name = op["op"]
        handler = getattr(self, "op_" + name, None)
        if handler is None:
            raise OpError(f"unknown op {name!r}")
        return await handler(op)

    async def op_connect(self, op):
        return {"outcome": await self.connect(), "conn": self.conn_count}

    op_reconnect = op_connect

    async def op_disconnect(self, op):
        return {"outcome": await self.disconnect(op)}

    async def op_set_answer(self, op):
        self.answers[op["action"]] = op["answer"]
        return {"outcome": "done"}

    async def op_send_raw(self, op):
        conn = self.conn
        if conn is None:
            return {"outcome": "not_connected"}
        text = op["text"]
        try:
            msg = json.loads(text)
            if isinstance(msg, list) and len(msg) > 1 and msg[0] == 2 and isinstance(msg[1], str):
                self.raw_ids.add(msg[1])
        except ValueError:
            pass
        try:
            await self.send_text(conn, text)
        except ConnectionClosed:
            return {"outcome": "closed"}
        return {"outcome": "sent", "conn": conn.number}

    async def op_boot(self, op):
        payload = {"chargePointVendor": self.spec.get("vendor", "Texture"),
                   "chargePointModel": self.spec.get("model", "SimCharger")}
        if self.spec.get("serial"):
            payload["chargePointSerialNumber"] = self.spec["serial"]
        if self.spec.get("firmware"):
            payload["firmwareVersion"] = self.spec["firmware"]
        result = await self.call(op, "BootNotification", payload)
        if result["outcome"] == "result" and result["payload"].get("status") == "Accepted":
            self.start_heartbeat(result["payload"].get("interval"))
        return result

    async def op_heartbeat(self, op):
        return await self.call(op, "Heartbeat", {})

    async def op_status(self, op):
        connector = op.get("connector", 0)
        payload = {"connectorId": connector, "status": op["status"],
                   "errorCode": op.get("error_code", "NoError"), "timestamp": op.get("timestamp") or now_iso()}
        if op.get("info") is not None:
            payload["info"] = op["info"]
        self.last_status[connector] = op["status"]
        return await self.call(op, "StatusNotification", payload)

    async def op_authorize(self, op):
        return await self.call(op, "Authorize", {"idTag": op["id_tag"]})

    async def op_start_transaction(self, op):
        connector = op.get("connector", 1)
        payload = {"connectorId": connector, "idTag": op["id_tag"],
                   "meterStart": op.get("meter_start", 0), "timestamp": op.get("timestamp") or now_iso()}
        if op.get("reservation_id") is not None:
            payload["reservationId"] = op["reservation_id"]
        result = await self.call(op, "StartTransaction", payload)
        if result["outcome"] == "result" and "transactionId" in result["payload"]:
            self.transactions[connector] = result["payload"]["transactionId"]
            self.last_transaction = result["payload"]["transactionId"]
        return result

    async def op_meter_values(self, op):
        connector = op.get("connector", 1)
        sampled = []
        for s in op.get("sampled", []):
            value = {"value": str(s["value"])}
            for key in ("measurand", "unit", "phase", "context", "location", "format"):
                if s.get(key) is not None:
                    value[key] = s[key]
            sampled.append(value)
        payload = {"connectorId": connector,
                   "meterValue": [{"timestamp": op.get("timestamp") or now_iso(), "sampledValue": sampled}]}
        transaction = op.get("transaction_id", self.transactions.get(connector))
        if transaction is not None:
            payload["transactionId"] = transaction
        return await self.call(op, "MeterValues", payload)

    async def op_stop_transaction(self, op):
        transaction = op.get("transaction_id", self.last_transaction)
        payload = {"transactionId": transaction, "meterStop": op.get("meter_stop", 0),
                   "timestamp": op.get("timestamp") or now_iso()}
        for key, field in (("reason", "reason"), ("id_tag", "idTag")):
            if op.get(key) is not None:
                payload[field] = op[key]
        result = await self.call(op, "StopTransaction", payload)
        if result["outcome"] == "result":
            self.transactions = {c: t for c, t in self.transactions.items() if t != transaction}
        return result

    async def op_call(self, op):
        return await self.call(op, op["action"], {})

    async def call(self, op, action, payload):
        """Sends a CALL through the library's call(), raced against the answer frame, the
        connection's close and the op's timeout; the outcome is the raw answer."""
        payload = dict(payload)
        payload.update(op.get("payload", {}))
        conn = self.conn
        if conn is None:
            return {"outcome": "not_connected"}
        cls = getattr(v16_call, action, None)
        if cls is None:
            return {"outcome": "invalid_request", "error": f"ocpp.v16.call has no {action}"}
        try:
            request = cls(**camel_to_snake_case(payload))
        except TypeError as e:
            return {"outcome": "invalid_request", "error": f"{type(e).__name__}: {e}"}
        unique_id = str(uuid.uuid4())
        answered = asyncio.get_running_loop().create_future()
        self.pending[unique_id] = (action, answered)
        timeout = op.get("timeout", self.spec.get("call_timeout_s", 10))
        library = self.spawn_raw(conn.cp.call(request, suppress=False, unique_id=unique_id))
        closed = asyncio.ensure_future(conn.closed.wait())
        try:
            done, _ = await asyncio.wait({answered, library, closed}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if answered in done:
                msg, raw, violations = answered.result()
                try:
                    await asyncio.wait_for(asyncio.shield(library), 2)
                except BaseException:
                    pass
                result = {"outcome": "result" if msg[0] == 3 else "error", "unique_id": unique_id,
                          "frame": raw, "violations": violations, "library": verdict(library)}
                if msg[0] == 3:
                    result["payload"] = msg[2]
                else:
                    result.update(error_code=msg[2], error_description=msg[3], error_details=msg[4])
                return result
            if library in done and not self.was_sent(unique_id):
                return {"outcome": "invalid_request", "unique_id": unique_id, "error": verdict(library)}
            if closed in done or (library in done and conn.closed.is_set()):
                return {"outcome": "closed", "unique_id": unique_id}
            if library in done:
                # The library gave up (its send failed) without an answer and without a close.
                return {"outcome": "closed" if conn.ws.close_code else "failed", "unique_id": unique_id,
                        "error": verdict(library)}
            return {"outcome": "timeout", "unique_id": unique_id, "timeout_s": timeout}
        finally:
            self.pending.pop(unique_id, None)
            closed.cancel()
            if not library.done():
                library.cancel()

    def spawn_raw(self, coro):
        task = asyncio.ensure_future(coro)
        # Retrieved here so an exception is never reported as "never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    def was_sent(self, unique_id):
        # call() validates before sending: an id never handed to send_text means the library
        # refused the request, not that the connection went.
        return unique_id in self.sent_ids

    def start_heartbeat(self, boot_interval):
        mode = self.spec.get("heartbeat", "boot")
        if self.heartbeat_task:
            self.heartbeat_task.cancel()
            self.heartbeat_task = None
        interval = boot_interval if mode == "boot" else mode
        if mode == "off" or not isinstance(interval, (int, float)) or interval <= 0:
            return
        self.heartbeat_task = self.spawn(self.heartbeat_loop(float(interval)))

    async def heartbeat_loop(self, interval):
        while True:
            await asyncio.sleep(interval)
            self.queue.put_nowait((None, {"op": "heartbeat", "ref": "auto"}))


class OpError(Exception):
    pass


def verdict(task):
    if not task.done():
        return "pending"
    if task.cancelled():
        return "cancelled"
    e = task.exception()
    return "ok" if e is None else f"{type(e).__name__}: {e}"


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    with open(args.spec, encoding="utf-8") as f:
        spec = json.load(f)
    log = Log(args.log)
    sim = Sim(spec, log)
    state = await sim.connect() if spec.get("connect", True) else "idle"
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"state": state, "conn": sim.conn_count}, f)
    os.replace(tmp, args.ready_file)

    ops = asyncio.get_running_loop().create_task(sim.run_ops())
    reader = asyncio.StreamReader(limit=2**27)
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    seq = 0
    while True:
        line = await reader.readline()
        if not line:
            break
        if not line.strip():
            continue
        seq += 1
        try:
            op = json.loads(line)
        except ValueError as e:
            log.write("op", seq=seq, ref=None, op=None, outcome="failed", error=f"not JSON: {e}")
            continue
        sim.queue.put_nowait((seq, op))
    log.write("exit", why="stdin closed")
    ops.cancel()
    if sim.conn is not None:
        await sim.disconnect({"code": 1001, "reason": "charge point stopping"})


if __name__ == "__main__":
    asyncio.run(main())
