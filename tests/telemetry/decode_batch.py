#!/usr/bin/env python3
"""Independent decoder for texture-agent telemetry payloads.

Built from docs/PROTOCOL.md sections 14.1 (batch message), 14.3 (sequence
numbers and epochs) and 14.9 (compact encoding) only. Reads one payload (raw
bytes) from stdin and prints the JSON batch of 14.1 (gatewayId, epoch, points)
as one line of JSON on stdout, exit 0. On malformed input it prints one line
naming the problem on stderr and exits 1.

First bytes (14.1): 0x7B a JSON batch; 0x03 a compact body as is, 0x04 a
compact body as raw DEFLATE; 0x01 and 0x02 the same for the first version of
the compact encoding, whose body has no epoch: its batch is printed with no
epoch member (epoch 0, from a gateway before epochs). An epoch that is present
is an unsigned 64-bit integer; 0 marks points stored before the gateway had
epochs (14.1, 14.3).

Standard library only.
"""

import json
import sys
import zlib

U64_MASK = (1 << 64) - 1
MAX_INFLATED = 16 * 1024 * 1024  # 14.9: a decoder may refuse a body beyond 16 MiB
BODY_KINDS_RESERVED = ("seq", "ts", "deviceId")


class DecodeError(Exception):
    pass


def to_i64(u):
    """Interpret the low 64 bits of u as two's complement signed."""
    u &= U64_MASK
    return u - (1 << 64) if u >= (1 << 63) else u


class Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def left(self):
        return len(self.data) - self.pos

    def byte(self, what):
        if self.pos >= len(self.data):
            raise DecodeError("truncated: missing byte for %s at body offset %d" % (what, self.pos))
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uvarint(self, what):
        start = self.pos
        result = 0
        for i in range(10):
            if self.pos >= len(self.data):
                raise DecodeError("truncated varint for %s at body offset %d" % (what, start))
            b = self.data[self.pos]
            self.pos += 1
            if i == 9 and b > 0x01:
                # the 10th byte carries bit 63 only; anything more overflows 64 bits
                # (or, with the high bit set, makes the varint longer than 10 bytes)
                raise DecodeError("varint for %s at body offset %d overflows 64 bits" % (what, start))
            result |= (b & 0x7F) << (7 * i)
            if b & 0x80 == 0:
                return result
        raise DecodeError("varint for %s at body offset %d longer than 10 bytes" % (what, start))

    def svarint(self, what):
        u = self.uvarint(what)
        return to_i64((u >> 1) ^ (-(u & 1)))

    def count(self, what):
        """A uvarint count that must not exceed the bytes left."""
        at = self.pos
        c = self.uvarint(what)
        if c > self.left():
            raise DecodeError("%s %d at body offset %d exceeds the %d bytes left" % (what, c, at, self.left()))
        return c

    def raw(self, length, what):
        if length > self.left():
            raise DecodeError("truncated %s at body offset %d: length %d, %d bytes left"
                              % (what, self.pos, length, self.left()))
        b = self.data[self.pos:self.pos + length]
        self.pos += length
        return b

    def utf8(self, length, what):
        at = self.pos
        b = self.raw(length, what)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("%s at body offset %d is not valid UTF-8" % (what, at))

    def string(self, what):
        length = self.count(what + " length")
        return self.utf8(length, what)


def _reject_constant(name):
    raise DecodeError("non-standard JSON constant %s" % name)


def parse_json_text(text, what):
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except DecodeError as e:
        raise DecodeError("%s: %s" % (what, e))
    except RecursionError:
        raise DecodeError("%s: JSON nested too deeply" % what)
    except ValueError as e:
        raise DecodeError("%s: invalid JSON (%s)" % (what, str(e).splitlines()[0]))


def text_column(r, n, what):
    cells = []
    prev = None
    for i in range(n):
        at = r.pos
        v = r.uvarint(what + " text cell length")
        if v == 0:
            if i == 0:
                raise DecodeError("%s: text cell 0 (same as before) in the first cell at body offset %d"
                                  % (what, at))
            cells.append(prev)
        else:
            prev = r.utf8(v - 1, what + " text")
            cells.append(prev)
    return cells


def decode_series(r, sidx, points):
    device_id = r.string("series %d deviceId" % sidx)
    kind = r.string("series %d kind" % sidx)
    if kind in BODY_KINDS_RESERVED:
        raise DecodeError("series %d kind %r collides with a point member" % (sidx, kind))
    at = r.pos
    n = r.count("series %d point count" % sidx)
    if n < 1:
        raise DecodeError("series %d has n = 0 points at body offset %d" % (sidx, at))
    member_count = r.count("series %d member count" % sidx)
    members = []  # (path tuple, type)
    for m in range(member_count):
        what = "series %d member %d" % (sidx, m)
        at = r.pos
        depth = r.count(what + " path depth")
        if depth < 1:
            raise DecodeError("%s: path depth 0 at body offset %d" % (what, at))
        path = tuple(r.string("%s name %d" % (what, k)) for k in range(depth))
        at = r.pos
        t = r.byte(what + " type")
        if t > 4:
            raise DecodeError("%s: bad type byte %d at body offset %d" % (what, t, at))
        members.append((path, t))

    # The paths must describe a tree of leaves: no duplicates, no leaf that is a
    # prefix of another leaf's path.
    paths = set(p for p, _ in members)
    if len(paths) != len(members):
        raise DecodeError("series %d: two members with the same path" % sidx)
    for p in paths:
        for k in range(1, len(p)):
            if p[:k] in paths:
                raise DecodeError("series %d: member path %s is inside leaf %s"
                                  % (sidx, list(p), list(p[:k])))

    # seq column
    seqs = []
    s = r.uvarint("series %d seq" % sidx)
    seqs.append(s)
    for i in range(1, n):
        at = r.pos
        inc = r.uvarint("series %d seq increase" % sidx)
        if inc < 1:
            raise DecodeError("series %d: seq not increasing (increase 0 at body offset %d)" % (sidx, at))
        s = s + inc
        if s > U64_MASK:
            raise DecodeError("series %d: seq not increasing (wraps past 2^64 at body offset %d)"
                              % (sidx, at))
        seqs.append(s)

    # ts column
    tss = []
    t = r.uvarint("series %d ts" % sidx)
    tss.append(t)
    for i in range(1, n):
        d = r.svarint("series %d ts difference" % sidx)
        t = (t + d) & U64_MASK
        tss.append(t)

    # member columns
    columns = []
    for m, (path, typ) in enumerate(members):
        what = "series %d member %s" % (sidx, ".".join(path))
        if typ == 0:
            at = r.pos
            dec = r.byte(what + " decimals")
            if dec > 3:
                raise DecodeError("%s: %d decimals (more than 3) at body offset %d" % (what, dec, at))
            scale = 10 ** dec
            cells = []
            v = 0
            for i in range(n):
                x = r.svarint(what + " cell")
                v = x if i == 0 else to_i64(v + x)
                cells.append(float(v / scale))
        elif typ == 1:
            cells = []
            v = 0
            for i in range(n):
                x = r.svarint(what + " cell")
                v = x if i == 0 else to_i64(v + x)
                cells.append(v)
        elif typ == 2:
            cells = []
            for i in range(n):
                at = r.pos
                b = r.byte(what + " boolean")
                if b > 1:
                    raise DecodeError("%s: bad boolean byte %d at body offset %d" % (what, b, at))
                cells.append(b == 1)
        elif typ == 3:
            cells = text_column(r, n, what)
        else:  # typ == 4
            texts = text_column(r, n, what)
            cells = [parse_json_text(x, what + " JSON cell") for x in texts]
        columns.append(cells)

    for i in range(n):
        body = {}
        for (path, _), cells in zip(members, columns):
            obj = body
            for name in path[:-1]:
                nxt = obj.get(name)
                if nxt is None:
                    nxt = {}
                    obj[name] = nxt
                obj = nxt
            obj[path[-1]] = cells[i]
        points.append({"seq": seqs[i], "ts": tss[i], "deviceId": device_id, kind: body})


def check_increasing(points):
    for a, b in zip(points, points[1:]):
        if b["seq"] <= a["seq"]:
            raise DecodeError("seq not increasing: %d followed by %d" % (a["seq"], b["seq"]))


def decode_compact(body, has_epoch):
    r = Reader(body)
    gateway_id = r.string("gatewayId")
    epoch = None
    if has_epoch:
        # 0 is allowed: points stored before the gateway had epochs (14.1, 14.3).
        epoch = r.uvarint("epoch")
    series_count = r.count("series count")
    points = []
    for sidx in range(series_count):
        decode_series(r, sidx, points)
    if r.left():
        raise DecodeError("%d trailing bytes after the last series at body offset %d" % (r.left(), r.pos))
    if not points:
        raise DecodeError("batch has no points (series count 0)")
    points.sort(key=lambda p: p["seq"])
    for a, b in zip(points, points[1:]):
        if a["seq"] == b["seq"]:
            raise DecodeError("duplicate seq %d in two series" % a["seq"])
    if epoch is None:
        return {"gatewayId": gateway_id, "points": points}
    return {"gatewayId": gateway_id, "epoch": epoch, "points": points}


def is_u64(x):
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= U64_MASK


def decode_json(data):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError("JSON batch is not valid UTF-8 (byte %d)" % e.start)
    obj = parse_json_text(text, "JSON batch")
    if not isinstance(obj, dict):
        raise DecodeError("JSON batch is not an object")
    if not isinstance(obj.get("gatewayId"), str):
        raise DecodeError("JSON batch: gatewayId missing or not a string")
    if "epoch" in obj:
        epoch = obj["epoch"]
        if not is_u64(epoch):
            raise DecodeError("JSON batch: epoch %s is not an integer from 0 to 2^64 - 1"
                              % json.dumps(epoch)[:40])
    pts = obj.get("points")
    if not isinstance(pts, list):
        raise DecodeError("JSON batch: points missing or not an array")
    if not pts:
        raise DecodeError("JSON batch: points is empty")
    for i, p in enumerate(pts):
        if not isinstance(p, dict):
            raise DecodeError("JSON batch: point %d is not an object" % i)
        for k in ("seq", "ts"):
            if not is_u64(p.get(k)):
                raise DecodeError("JSON batch: point %d: %s missing or not an unsigned 64-bit integer"
                                  % (i, k))
        if not isinstance(p.get("deviceId"), str):
            raise DecodeError("JSON batch: point %d: deviceId missing or not a string" % i)
    check_increasing(pts)
    return obj


def inflate(raw):
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(raw, MAX_INFLATED + 1)
    except zlib.error as e:
        raise DecodeError("bad DEFLATE body: %s" % e)
    if len(out) > MAX_INFLATED:
        raise DecodeError("DEFLATE body inflates beyond 16 MiB")
    if not d.eof:
        raise DecodeError("bad DEFLATE body: truncated stream")
    if d.unused_data:
        raise DecodeError("%d trailing bytes after the DEFLATE stream" % len(d.unused_data))
    return out


def decode(data):
    if not data:
        raise DecodeError("empty payload")
    first = data[0]
    if first == 0x7B:
        return decode_json(data)
    if first == 0x03:
        return decode_compact(data[1:], True)
    if first == 0x04:
        return decode_compact(inflate(data[1:]), True)
    if first == 0x01:  # first version, before epochs: no epoch in the body
        return decode_compact(data[1:], False)
    if first == 0x02:
        return decode_compact(inflate(data[1:]), False)
    raise DecodeError("unknown first byte 0x%02x" % first)


def dump(obj):
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate from a \uXXXX escape: keep it escaped (same parsed JSON)
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    except ValueError:
        raise DecodeError("a number is out of range (not finite)")
    except RecursionError:
        raise DecodeError("batch nested too deeply to print")


def fail(msg):
    msg = " ".join(str(msg).split())
    sys.stderr.write("decode_batch: %s\n" % msg)
    sys.stderr.flush()
    sys.exit(1)


def main():
    data = sys.stdin.buffer.read()
    try:
        out = dump(decode(data))
    except DecodeError as e:
        fail(e)
    except RecursionError:
        fail("input nested too deeply")
    except MemoryError:
        fail("out of memory while decoding")
    except Exception as e:  # last resort: never a traceback
        fail("malformed input (%s: %s)" % (type(e).__name__, e))
    sys.stdout.buffer.write(out + b"\n")
    sys.stdout.flush()
    sys.exit(0)


if __name__ == "__main__":
    main()
