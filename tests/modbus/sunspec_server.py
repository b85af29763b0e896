#!/usr/bin/env python3
"""A real Modbus TCP server (pymodbus) that looks like a SunSpec device, for integration tests.

Usage:
    python sunspec_server.py --spec SPEC.json --port-file PATH [--port N] [--log PATH]
    python sunspec_server.py --spec SPEC.json --port-file PATH --serial DEVICE [--log PATH]

The server binds 127.0.0.1, port N (default 0: the kernel picks a free one). Once it accepts
connections it writes the bound port number to PATH (written to PATH.tmp, then renamed, so a
reader never sees a half-written number) and serves until killed (SIGTERM or SIGKILL; no state
is kept, so there is nothing to shut down cleanly). The register maps are built from the
official SunSpec model definitions that pysunspec2 ships (sunspec2/models/json/model_<N>.json),
so offsets and lengths are the standard's, not ours.

With --serial DEVICE the server speaks Modbus RTU instead, on the serial device DEVICE (in the
tests one end of a socat pty pair; testkit's SunSpecServer::start_serial), every unit of the SPEC
on that one bus. Baud rate and parity are pyserial's defaults (meaningless on a pty). Once the
device is open and served, the port file is written as above, holding DEVICE's path (not a port
number). single_client means nothing on a bus and is ignored.

SPEC format (JSON):

    {"units": {"1": {"base": 40000,
                     "models": [{"id": 1, "points": {"Mn": "Texture", "SN": "INV-0001"}},
                                {"id": 103, "points": {"W": 4520, "W_SF": -1}},
                                {"id": 123, "points": {}},
                                {"id": 803, "points": {}, "repeats": [{"StrSoC": 80}, {}]},
                                {"id": 802, "points": {}, "length": 10}],
                     "raw": {"40070": [1, 2]},
                     "read_only": [40100],
                     "end_marker": true}},
     "delay_ms": 0,
     "single_client": false}

- units: Modbus unit id (a string key, as JSON needs) -> one register map each.
- base (default 40000): where "SunS" (0x5375 0x6E53) is written; the models follow it, then the
  end marker 0xFFFF 0x0000 unless end_marker is false.
- models: in order. Each is written as its id, its length L (the definition's size minus the 2
  registers of ID and L) and its top-level points in definition order. "length" overrides L
  (to make a device that lies about a model's length; the registers written stay the
  definition's). "repeats" appends instances of the model's one top-level repeating group (for
  example 803's "string" group); L covers them, and the group's count point (803's NStr) is
  set to their number unless "points" gives it.
- points: name -> RAW register value, as the device stores it (before scale factors): an
  integer (negative ones in two's complement, 32/64-bit ones high word first), a float for
  float32, a string for string points (UTF-8, NUL-padded to the point's size, two bytes per
  register, big-endian), or a list of register values written as they are. Points not given
  hold SunSpec's "not implemented" value for their type (see NOT_IMPLEMENTED below).
- raw: address -> list of registers, written last (over anything the models wrote).
- read_only: addresses a write may not touch (see writes below).
- busy_file: a path; while a file exists there, every read of this unit is answered with
  exception 6 (SERVER DEVICE BUSY), as a device busy with its own work answers. A test creates
  and removes the file to make the device busy and back, with no restart.
- delay_ms: every response is delayed this long (a slow device).
- single_client: while one TCP client is connected, further connections are accepted and closed
  at once, as single-client inverters do.

Reads (function 3, holding registers, and 4, input registers; both see the same map) of any
address the map does not define get exception 2 (ILLEGAL DATA ADDRESS), as real devices answer
for unmapped registers. Writes (functions 6 and 16) change the map, so later reads see them; a
write that touches any read_only address is answered with exception 4 (SLAVE DEVICE FAILURE) and
changes nothing (4 rather than 2, so a driver can tell "refused" from "no such register").

Every request is logged as one JSON line (to --log PATH, or to stderr without it):
    {"conn": 1, "unit": 1, "function": 3, "address": 40000, "count": 2,
     "start": 1764700000.123, "end": 1764700000.124, "exception": null}
start and end are time.time() when handling began and just before the response was sent (the
line is written first, so once a client has a response its line is in the log); a test can
check from them that a client never had two requests outstanding at once.

Over RTU (--serial) request lines carry "conn": 0 (one bus, no connections), and two more kinds
of line are written:
    {"event": "overlap", "at": 1764700000.125, "bytes": 8,
     "during": {"unit": 1, "function": 3, "address": 40000}}
when bytes arrive on the bus (`at`: time.time() when the server read them) while a request is
outstanding: after the last byte of a complete request frame was read and before the whole
response has been written to the device. A client that waits for each response never causes
one; one that sends a new request (even one byte of it) early always does, delay_ms or not, as
long as the server has not finished answering. `during` is the request being answered.
    {"event": "unanswered: unknown unit", "unit": 9, "request": {"function": 3,
     "address": 40000}, "time": ...}
for a request to a unit id the SPEC does not have: it gets no answer at all, as on a real RS-485
bus where no such device exists (see defect 3). A frame pymodbus cannot decode (an unknown
function code) is logged as {"event": "undecodable request", ...} and not answered either.

How overlaps are seen: the RTU handler replaces pymodbus' data_received, so it timestamps each
chunk of raw bytes the serial transport reads from the device before any framing, and it feeds
the framer itself, decoding every complete frame in the buffer (pymodbus decodes only the first,
defect 1). Frames go into a queue answered strictly one after another by one task (pymodbus'
handler would answer the latest frame for each, defect 2), and a response counts as written only
once pymodbus' serial transport, which otherwise writes later from the event loop, has handed it
to the device (the handler flushes it at once and waits until its buffer is empty).

Known defects of pymodbus 3.16.1's server (reproduced), and how the harness copes:
1. Two requests in one TCP segment: only the first is answered.
2. A second request arriving while the first is being processed (e.g. during delay_ms): both
   responses carry the second request's transaction id.
3. A request for a unit id the server does not configure is answered with an exception
   (4, SLAVE DEVICE FAILURE, with pymodbus' own datastores; 11, GATEWAY TARGET FAILED TO
   RESPOND, with this script's) rather than with silence as a real device would.
4. Over RTU the same three in their serial forms, and worse: a chunk read from the device that
   holds two frames is decoded as the first frame alone and the rest is thrown away
   (FramerRTU.decode returns the whole buffer's length as the length it used, not the frame's;
   on a CRC error it throws away the whole buffer too); while one frame is being answered a
   second replaces it (handle_request reads the handler's last_pdu after its await); an unknown
   unit id gets exception 11 unless ignore_missing_devices is set; and ModbusProtocol.send
   empties the receive buffer, so the part of the next request received before a response goes
   out is thrown away (over TCP as well). --serial mode has its own handler (RtuHandler), with
   its own receive buffer and a fixed decode (fixed_rtu_decode), that decodes every frame,
   answers them in order and stays silent for unknown units, so none of these reaches a test
   over RTU.
The agent's client never pipelines requests (it waits for each response before sending the
next), so 1 and 2 never arise with a correct client; the request log's start/end lets a test
prove that. Every unit id a test uses is configured in its SPEC, so 3 never arises either.
"""

import argparse
import asyncio
import json
import os
import struct
import sys
import time
import traceback

import sunspec2
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.pdu import ExceptionResponse
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerRTU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler

MODELS_DIR = os.path.join(os.path.dirname(sunspec2.__file__), "models", "json")

# SunSpec "not implemented" values, as registers, by point type (sizes are the types' own;
# string, ipv6addr and eui48 take the point's size from the definition and are all zeros).
NOT_IMPLEMENTED = {
    "uint16": [0xFFFF],
    "enum16": [0xFFFF],
    "bitfield16": [0xFFFF],
    "int16": [0x8000],
    "sunssf": [0x8000],
    "pad": [0x8000],
    "acc16": [0],
    "count": [0],  # a repeat count: "none" is 0, not 0xFFFF (65535 repeats)
    "uint32": [0xFFFF, 0xFFFF],
    "enum32": [0xFFFF, 0xFFFF],
    "bitfield32": [0xFFFF, 0xFFFF],
    "int32": [0x8000, 0x0000],
    "acc32": [0, 0],
    "ipaddr": [0, 0],
    "float32": [0x7FC0, 0x0000],
    "uint64": [0xFFFF] * 4,
    "int64": [0x8000, 0, 0, 0],
    "acc64": [0] * 4,
}


def load_model(model_id):
    """The official definition of SunSpec model `model_id` (its top-level group)."""
    path = os.path.join(MODELS_DIR, "model_%d.json" % model_id)
    with open(path) as f:
        return json.load(f)["group"]


def encode_point(pdef, value):
    """The registers for one point: `value` raw as the device stores it, or None."""
    size = pdef["size"]
    ptype = pdef["type"]
    if value is None:
        regs = NOT_IMPLEMENTED.get(ptype, [0] * size)
    elif isinstance(value, list):
        regs = value
    elif ptype == "string":
        data = value.encode("utf-8")
        if len(data) > size * 2:
            raise ValueError("%s: %r is longer than %d bytes" % (pdef["name"], value, size * 2))
        data = data.ljust(size * 2, b"\0")
        regs = list(struct.unpack(">%dH" % size, data))
    elif ptype == "float32":
        regs = list(struct.unpack(">2H", struct.pack(">f", float(value))))
    else:
        # Integers of any width: two's complement over size*16 bits, high word first.
        bits = size * 16
        v = int(value)
        if not -(1 << (bits - 1)) <= v < (1 << bits):
            raise ValueError("%s: %d does not fit %d bits" % (pdef["name"], v, bits))
        v &= (1 << bits) - 1
        regs = [(v >> (16 * (size - 1 - i))) & 0xFFFF for i in range(size)]
    if len(regs) != size:
        raise ValueError("%s: %d registers for a point of size %d" % (pdef["name"], len(regs), size))
    return regs


def encode_points(pdefs, values, skip=()):
    """Registers for a run of point definitions, with `values` by name."""
    unknown = set(values) - {p["name"] for p in pdefs}
    if unknown:
        raise ValueError("no such points: %s" % sorted(unknown))
    regs = []
    for pdef in pdefs:
        if pdef["name"] in skip:
            continue
        regs += encode_point(pdef, values.get(pdef["name"]))
    return regs


def encode_model(entry):
    """ID, L and the points of one model entry of the SPEC."""
    model_id = entry["id"]
    group = load_model(model_id)
    points = dict(entry.get("points", {}))
    repeats = entry.get("repeats", [])
    if repeats:
        groups = group.get("groups", [])
        if len(groups) != 1 or groups[0].get("groups"):
            raise ValueError("model %d: repeats need exactly one flat top-level group" % model_id)
        rgroup = groups[0]
        count = rgroup.get("count")
        if isinstance(count, str) and count not in points:
            points[count] = len(repeats)
    # ID and L are written here, not from the definition's points.
    body = encode_points(group["points"], points, skip=("ID", "L"))
    for values in repeats:
        body += encode_points(rgroup["points"], values)
    length = entry.get("length", len(body))
    return [model_id, length] + body


def build_map(unit):
    """The register map of one unit: address -> value."""
    base = unit.get("base", 40000)
    regs = [0x5375, 0x6E53]  # "SunS"
    for entry in unit.get("models", []):
        regs += encode_model(entry)
    if unit.get("end_marker", True):
        regs += [0xFFFF, 0x0000]
    registers = {base + i: v for i, v in enumerate(regs)}
    for addr, values in unit.get("raw", {}).items():
        for i, v in enumerate(values):
            registers[int(addr) + i] = v & 0xFFFF
    return registers


class SunSpecContext(ModbusServerContext):
    """One register map per unit id, shared by holding and input registers.

    pymodbus 3.16 routes requests to `context.async_getValues/async_setValues` when the context
    is an "old simulator" one; we declare ourselves such and implement both directly, which is
    far smaller than its SimDevice configuration and lets us refuse read-only writes.
    """

    def __init__(self, units):  # pylint: disable=super-init-not-called
        # Not calling super().__init__: it only wraps pymodbus' own datastores (and warns).
        self.old_simulator = True
        self.simdevices = []
        self.maps = {int(uid): build_map(unit) for uid, unit in units.items()}
        self.read_only = {int(uid): set(unit.get("read_only", [])) for uid, unit in units.items()}
        self.busy_file = {int(uid): unit.get("busy_file") for uid, unit in units.items()}

    def _map(self, device_id):
        if device_id not in self.maps:
            raise NoSuchIdException("unit %d is not configured" % device_id)
        return self.maps[device_id]

    async def async_getValues(self, device_id, func_code, address, count=1):
        registers = self._map(device_id)
        if func_code not in (3, 4, 6, 16, 23):
            return ExcCodes.ILLEGAL_FUNCTION
        busy = self.busy_file[device_id]
        if busy is not None and os.path.exists(busy):
            return ExcCodes.DEVICE_BUSY
        addrs = range(address, address + count)
        if any(a not in registers for a in addrs):
            return ExcCodes.ILLEGAL_ADDRESS
        return [registers[a] for a in addrs]

    async def async_setValues(self, device_id, func_code, address, values):
        registers = self._map(device_id)
        if func_code not in (6, 16, 23):
            return ExcCodes.ILLEGAL_FUNCTION
        addrs = range(address, address + len(values))
        if any(a not in registers for a in addrs):
            return ExcCodes.ILLEGAL_ADDRESS
        if any(a in self.read_only[device_id] for a in addrs):
            return ExcCodes.DEVICE_FAILURE
        for a, v in zip(addrs, values):
            registers[a] = v
        return None

    def device_ids(self):
        return list(self.maps)


class Handler(ServerRequestHandler):
    """One client connection: adds the delay, the request log and single-client refusal."""

    next_conn = 1

    def __init__(self, owner, *args):
        super().__init__(owner, *args)
        self.conn = Handler.next_conn
        Handler.next_conn += 1
        self.current = None  # (request PDU, start time) while its response is being sent

    def callback_connected(self):
        super().callback_connected()
        # The listener has already registered us; anyone else registered is an earlier client.
        others = [c for c in self.server.active_connections.values() if c is not self]
        if self.server.single_client and others:
            log_line({"conn": self.conn, "event": "refused: single client", "time": time.time()})
            self.close()

    async def handle_request(self):
        pdu = self.last_pdu
        if not pdu:
            return
        start = time.time()
        if self.server.delay:
            await asyncio.sleep(self.server.delay)
        # server_send logs the request. Nothing between here and its call yields to the event
        # loop (the datastore's coroutines never suspend), so no other request can slip in.
        self.current = (pdu, start)
        await super().handle_request()

    def server_send(self, pdu, addr):
        # The log line is written before the response goes out, so a client that has the
        # response can rely on finding the line in the log.
        request, start = self.current or (None, time.time())
        self.current = None
        if request is not None:
            # Function 6 writes one register (its PDU's count attribute is a meaningless 0).
            count = 1 if request.function_code == 6 else getattr(request, "count", None)
            log_line({
                "conn": self.conn,
                "unit": request.dev_id,
                "function": request.function_code,
                "address": getattr(request, "address", None),
                "count": count,
                "start": start,
                "end": time.time(),
                "exception": int(pdu.exception_code) if isinstance(pdu, ExceptionResponse) else None,
            })
        else:  # a frame pymodbus could not decode, answered before any handle_request
            log_line({"conn": self.conn, "event": "undecodable request", "time": start})
        super().server_send(pdu, addr)


def fixed_rtu_decode(framer, data):
    """pymodbus 3.16.1's FramerRTU.decode, but returning the length of the frame it found (it
    returns len(data), which swallows any frame after the first), and on a CRC error skipping
    one byte to resynchronise (it drops the whole buffer)."""
    data_len = len(data)
    for used_len in range(data_len):
        if data_len - used_len < framer.MIN_SIZE:
            return used_len, 0, 0, framer.EMPTY
        dev_id = int(data[used_len])
        if not (pdu_class := framer.decoder.lookupPduClass(data[used_len:])):
            continue
        if not (size := pdu_class.calculateRtuFrameSize(data[used_len:])):
            return used_len, dev_id, 0, framer.EMPTY
        if data_len < used_len + size:
            return used_len, dev_id, 0, framer.EMPTY
        crc_start = used_len + size - 2
        crc = data[crc_start:crc_start + 2]
        if not FramerRTU.check_CRC(data[used_len:crc_start], (crc[0] << 8) + crc[1]):
            return used_len + 1, 0, 0, framer.EMPTY
        return used_len + size, dev_id, 0, data[used_len + 1:crc_start]
    return data_len, 0, 0, framer.EMPTY


class RtuHandler(Handler):
    """The one "connection" of a serial bus: overlap detection, in-order answers, silence for
    unknown units (see the docstring's RTU section)."""

    def __init__(self, owner, *args):
        super().__init__(owner, *args)
        self.conn = 0
        self.framer.decode = lambda data: fixed_rtu_decode(self.framer, data)
        self.rx = b""  # bytes of a request not yet complete (not pymodbus' recv_buffer: defect 4)
        self.pending = []  # decoded requests not yet completely answered, oldest first
        self.queue = asyncio.Queue()
        self.worker = None

    def callback_connected(self):
        ServerRequestHandler.callback_connected(self)
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self.answer_all())
        self.server.connected.set()

    def callback_disconnected(self, exc):
        super().callback_disconnected(exc)
        self.server.connected.clear()

    def data_received(self, data):
        at = time.time()
        if self.pending:
            self.log_overlap(at, len(data), self.pending[0])
        self.rx += data
        while self.rx:
            try:
                used, pdu = self.framer.handleFrame(self.rx, 0, 0)
            except ModbusIOException:
                log_line({"conn": 0, "event": "undecodable request", "time": at})
                self.rx = b""
                break
            self.rx = self.rx[used:]
            if pdu is None:
                if used:
                    continue  # skipped garbage; look again
                break
            if pdu.dev_id not in self.server.context.maps:
                log_line({"conn": 0, "event": "unanswered: unknown unit", "unit": pdu.dev_id,
                          "request": {"function": pdu.function_code,
                                      "address": getattr(pdu, "address", None)},
                          "time": at})
                continue
            if self.rx:
                # Bytes of the next request came in the same read as the end of this one: the
                # client sent them before it could have had this one's answer.
                self.log_overlap(at, len(self.rx), pdu)
            self.pending.append(pdu)
            self.queue.put_nowait(pdu)

    def log_overlap(self, at, nbytes, pdu):
        log_line({"conn": 0, "event": "overlap", "at": at, "bytes": nbytes,
                  "during": {"unit": pdu.dev_id, "function": pdu.function_code,
                             "address": getattr(pdu, "address", None)}})

    def callback_data(self, data, addr=None):
        # Never called: data_received above does the framing.
        raise AssertionError("RtuHandler.callback_data")

    async def answer_all(self):
        try:
            while True:
                await self.answer(await self.queue.get())
        except asyncio.CancelledError:
            raise
        except BaseException:
            # A dead worker would leave the bus silent for good: say why, and die loudly.
            traceback.print_exc()
            os._exit(70)

    async def answer(self, pdu):
        """Answers one request; it is outstanding until the device has the whole response."""
        start = time.time()
        if self.server.delay:
            await asyncio.sleep(self.server.delay)
        try:
            response = await pdu.datastore_update(self.server.context, pdu.dev_id)
        except Exception:  # pylint: disable=broad-except
            response = ExceptionResponse(pdu.function_code, ExcCodes.DEVICE_FAILURE)
        response.transaction_id = 0
        response.dev_id = pdu.dev_id
        self.current = (pdu, start)
        self.server_send(response, None)
        # pymodbus' serial transport writes from the event loop later; hand it over now and
        # count the request outstanding until the device has all of it.
        transport = self.transport
        if transport is not None and hasattr(transport, "intern_write_ready"):
            transport.intern_write_ready()
            while transport.get_write_buffer_size():
                await asyncio.sleep(0.001)
        self.pending.remove(pdu)


class RtuServer(ModbusSerialServer):
    def __init__(self, context, device, delay):
        super().__init__(context, port=device, reconnect_delay=0.1)
        self.delay = delay
        self.single_client = False
        self.connected = asyncio.Event()

    def callback_new_connection(self):
        return RtuHandler(self, self.trace_packet, self.trace_pdu, self.trace_connect)


class Server(ModbusTcpServer):
    def __init__(self, context, port, delay, single_client):
        super().__init__(context, address=("127.0.0.1", port))
        self.delay = delay
        self.single_client = single_client

    def callback_new_connection(self):
        return Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)


LOG = sys.stderr


def log_line(record):
    LOG.write(json.dumps(record) + "\n")
    LOG.flush()


async def serve(args):
    with open(args.spec) as f:
        spec = json.load(f)
    context = SunSpecContext(spec["units"])
    if args.serial:
        server = RtuServer(context, args.serial, spec.get("delay_ms", 0) / 1000.0)
        await server.serve_forever(background=True)
        try:
            await asyncio.wait_for(server.connected.wait(), 10)
        except asyncio.TimeoutError:
            raise SystemExit("could not open %s" % args.serial) from None
        write_port_file(args.port_file, args.serial)
        await server.serving
        return
    server = Server(
        context,
        args.port,
        spec.get("delay_ms", 0) / 1000.0,
        spec.get("single_client", False),
    )
    await server.serve_forever(background=True)
    if not server.transport:
        raise SystemExit("could not listen on 127.0.0.1:%d" % args.port)
    port = server.transport.sockets[0].getsockname()[1]
    write_port_file(args.port_file, str(port))
    await server.serving


def write_port_file(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.rename(tmp, path)


def main():
    global LOG
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--serial", help="serve Modbus RTU on this serial device, not TCP")
    parser.add_argument("--log")
    args = parser.parse_args()
    if args.log:
        LOG = open(args.log, "a", buffering=1)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
