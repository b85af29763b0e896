//! The SunSpec test harness itself (testkit::modbus, tests/modbus/sunspec_server.py): that its
//! servers serve SunSpec an independent client (pysunspec2's own) accepts, with the values,
//! scale factors and "not implemented" markers a test asked for; that writes behave as the SPEC
//! says; and that single-client mode refuses a second connection. The agent's driver tests rely
//! on all of this, so it is proven here rather than assumed.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use texture_agent_testkit::modbus::modbus_script_dir;
use texture_agent_testkit::{pyenv_python, sunspec_model_json, SunSpecServer};

/// The registers a list of point definitions takes.
fn points_size(points: &Value) -> u16 {
    points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["size"].as_u64().unwrap() as u16)
        .sum()
}

/// Where `name` sits in a list of point definitions, in registers from the first.
fn offset_in(points: &Value, name: &str) -> u16 {
    let points = points.as_array().unwrap();
    let index = points
        .iter()
        .position(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no point {name}"));
    points_size(&Value::Array(points[..index].to_vec()))
}

/// The registers of model `id`'s fixed part, ID and L included, from the official definition.
fn model_size(id: u16) -> u16 {
    points_size(&sunspec_model_json(id)["group"]["points"])
}

/// Where `point` sits in model `id`, counted from the model's ID register.
fn point_offset(id: u16, point: &str) -> u16 {
    offset_in(&sunspec_model_json(id)["group"]["points"], point)
}

/// Runs tests/modbus/scan.py (pysunspec2's client) against `port` for `units`.
fn scan(port: u16, units: &[u8]) -> Value {
    let mut cmd = Command::new(pyenv_python());
    cmd.arg(modbus_script_dir().join("scan.py"))
        .arg("--port")
        .arg(port.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    for unit in units {
        cmd.arg("--unit").arg(unit.to_string());
    }
    let out = cmd.output().expect("run scan.py");
    assert!(
        out.status.success(),
        "scan.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("scan.py prints JSON")
}

/// Asserts that no two requests on the same connection overlapped in time.
fn assert_no_overlap(server: &SunSpecServer) {
    let requests = server.requests();
    assert!(!requests.is_empty(), "the server logged no requests");
    for pair in requests.windows(2) {
        if pair[0]["conn"] == pair[1]["conn"] {
            assert!(
                pair[0]["end"].as_f64().unwrap() <= pair[1]["start"].as_f64().unwrap(),
                "overlapping requests: {pair:?}"
            );
        }
    }
}

#[test]
fn pysunspec2_scans_the_models_and_values_the_spec_gives() {
    let dir = tempfile::tempdir().unwrap();
    let spec = json!({"units": {
        "1": {"models": [
            {"id": 1, "points": {"Mn": "Texture", "Md": "TX-3P", "SN": "INV-0001"}},
            {"id": 103, "points": {"W": 4520, "W_SF": -1, "A": 123, "A_SF": -2,
                                   "WH": 123_456_789, "WH_SF": 0}},
            {"id": 123, "points": {}}]},
        "2": {"models": [
            {"id": 1, "points": {"Mn": "Texture", "SN": "BAT-0002"}},
            {"id": 802, "points": {"SoC": 655, "SoC_SF": -1, "W": -1500, "W_SF": 0}}]}}});
    let server = SunSpecServer::start(dir.path(), &spec);
    let found = scan(server.port, &[1, 2]);

    assert_eq!(found["1"]["models"], json!([1, 103, 123]), "{found}");
    assert_eq!(found["2"]["models"], json!([1, 802]), "{found}");
    let point = |unit: &str, model: &str, name: &str| found[unit]["points"][model][name].clone();

    // L as the standard defines it, cross-checked against the definition itself.
    for (unit, model) in [("1", 1), ("1", 103), ("1", 123), ("2", 802)] {
        assert_eq!(
            point(unit, &model.to_string(), "L")["value"],
            json!(model_size(model) - 2),
            "model {model} length"
        );
    }
    assert_eq!(point("1", "1", "Mn")["value"], "Texture");
    assert_eq!(point("1", "1", "Md")["value"], "TX-3P");
    assert_eq!(point("1", "1", "SN")["value"], "INV-0001");
    assert_eq!(point("2", "1", "SN")["value"], "BAT-0002");
    // Raw values with their scale factors applied by the reference client.
    assert_eq!(point("1", "103", "W")["value"], 4520);
    assert_eq!(point("1", "103", "W")["cvalue"], 452.0);
    assert_eq!(point("1", "103", "A")["cvalue"], 1.23);
    assert_eq!(point("1", "103", "WH")["cvalue"], 123_456_789);
    assert_eq!(point("2", "802", "SoC")["cvalue"], 65.5);
    assert_eq!(point("2", "802", "W")["cvalue"], -1500);
    // Points the spec leaves out read as not implemented, whatever their type.
    for name in ["PhVphA", "Hz", "Evt1", "TmpCab", "St"] {
        assert_eq!(point("1", "103", name)["value"], Value::Null, "{name}");
    }
    assert_eq!(point("1", "1", "Opt")["value"], Value::Null);
    assert_eq!(point("1", "123", "WMaxLimPct")["value"], Value::Null);
    // pysunspec2 waits for each response, so the log must show no overlap; it also proves
    // the log's timestamps are there and ordered.
    assert_no_overlap(&server);
}

/// One Modbus TCP transaction with a hand-built MBAP frame; returns the response PDU.
fn transact(stream: &mut TcpStream, tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&tid.to_be_bytes());
    frame.extend_from_slice(&0u16.to_be_bytes()); // protocol id: Modbus
    frame.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
    frame.push(unit);
    frame.extend_from_slice(pdu);
    stream.write_all(&frame).unwrap();
    let mut header = [0u8; 7];
    stream.read_exact(&mut header).unwrap();
    assert_eq!(
        u16::from_be_bytes([header[0], header[1]]),
        tid,
        "transaction id"
    );
    assert_eq!(header[6], unit, "unit id");
    let len = u16::from_be_bytes([header[4], header[5]]) as usize;
    let mut body = vec![0u8; len - 1];
    stream.read_exact(&mut body).unwrap();
    body
}

fn read_holding(stream: &mut TcpStream, unit: u8, addr: u16, count: u16) -> Vec<u16> {
    let mut pdu = vec![3];
    pdu.extend_from_slice(&addr.to_be_bytes());
    pdu.extend_from_slice(&count.to_be_bytes());
    let resp = transact(stream, 1, unit, &pdu);
    assert_eq!(resp[0], 3, "read {addr}: {resp:?}");
    assert_eq!(resp[1] as u16, count * 2);
    resp[2..]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

fn write_multiple(stream: &mut TcpStream, unit: u8, addr: u16, values: &[u16]) -> Vec<u8> {
    let mut pdu = vec![16];
    pdu.extend_from_slice(&addr.to_be_bytes());
    pdu.extend_from_slice(&(values.len() as u16).to_be_bytes());
    pdu.push(values.len() as u8 * 2);
    for v in values {
        pdu.extend_from_slice(&v.to_be_bytes());
    }
    transact(stream, 2, unit, &pdu)
}

fn write_single(stream: &mut TcpStream, unit: u8, addr: u16, value: u16) -> Vec<u8> {
    let mut pdu = vec![6];
    pdu.extend_from_slice(&addr.to_be_bytes());
    pdu.extend_from_slice(&value.to_be_bytes());
    transact(stream, 3, unit, &pdu)
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

#[test]
fn writes_change_the_map_except_read_only_registers() {
    let dir = tempfile::tempdir().unwrap();
    // Model 123 (controls) follows models 1 and 103 at the standard base.
    let m123 = 40_002 + model_size(1) + model_size(103);
    let conn = m123 + point_offset(123, "Conn");
    let limit = m123 + point_offset(123, "WMaxLimPct");
    let enable = m123 + point_offset(123, "WMaxLim_Ena");
    let spec = json!({"units": {"1": {
        "models": [{"id": 1, "points": {}}, {"id": 103, "points": {}},
                   {"id": 123, "points": {"WMaxLimPct": 100}}],
        "read_only": [limit]}}});
    let mut server = SunSpecServer::start(dir.path(), &spec);
    let mut s = connect(server.port);
    assert_eq!(
        read_holding(&mut s, 1, m123, 1),
        [123],
        "model 123 is where we think"
    );

    // Exception 4 for a write touching a read-only register, and nothing changes (not even the
    // writable register the same request covered).
    assert_eq!(write_multiple(&mut s, 1, conn, &[1, 50, 0]), [0x90, 4]);
    assert_eq!(write_single(&mut s, 1, limit, 50), [0x86, 4]);
    assert_eq!(read_holding(&mut s, 1, conn, 2), [0xFFFF, 100]);

    // Ordinary writes are read back, by holding and by input register reads.
    assert_eq!(
        write_single(&mut s, 1, enable, 1),
        [6, (enable >> 8) as u8, enable as u8, 0, 1]
    );
    assert_eq!(read_holding(&mut s, 1, enable, 1), [1]);
    let window = m123 + point_offset(123, "WMaxLimPct_WinTms");
    assert_eq!(write_multiple(&mut s, 1, window, &[30, 60])[0], 16);
    assert_eq!(read_holding(&mut s, 1, window, 2), [30, 60]);
    let mut pdu = vec![4];
    pdu.extend_from_slice(&window.to_be_bytes());
    pdu.extend_from_slice(&2u16.to_be_bytes());
    assert_eq!(transact(&mut s, 9, 1, &pdu), [4, 4, 0, 30, 0, 60]);

    // Unmapped registers are an illegal data address.
    assert_eq!(transact(&mut s, 10, 1, &[3, 0, 100, 0, 1]), [0x83, 2]);

    // The log records what was refused.
    let refused: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r["exception"] == 4)
        .map(|r| {
            (
                r["function"].clone(),
                r["address"].clone(),
                r["count"].clone(),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [
            (json!(16), json!(conn), json!(3)),
            (json!(6), json!(limit), json!(1))
        ]
    );

    // A restart is a reboot: same port, the writes gone.
    drop(s);
    server.restart();
    let mut s = connect(server.port);
    assert_eq!(read_holding(&mut s, 1, window, 2), [0xFFFF, 0xFFFF]);
}

/// Whether the server closed `stream` (EOF or reset) within 5 s rather than answering.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let _ = stream.write_all(&[0, 1, 0, 0, 0, 6, 1, 3, 0x9c, 0x40, 0, 2]);
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => true,
        Err(e) => panic!("neither an answer nor a close: {e}"),
    }
}

#[test]
fn single_client_refuses_a_second_connection_while_one_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let spec = json!({"units": {"1": {"models": [{"id": 1, "points": {}}]}},
                      "single_client": true});
    let server = SunSpecServer::start(dir.path(), &spec);

    let mut first = connect(server.port);
    // An answered request proves the server has registered the first connection.
    assert_eq!(read_holding(&mut first, 1, 40_000, 2), [0x5375, 0x6E53]);
    let mut second = connect(server.port);
    assert!(closed_by_server(&mut second), "second client was served");
    // The first is unaffected.
    assert_eq!(read_holding(&mut first, 1, 40_000, 2), [0x5375, 0x6E53]);

    // Once the first leaves, a new client is served (after the server has seen the close).
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut next = connect(server.port);
        if !closed_by_server(&mut next) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no client served after the first left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server
        .request_log()
        .iter()
        .any(|r| r["event"] == "refused: single client"));

    // Without single_client, two clients are served at once.
    let spec = json!({"units": {"1": {"models": [{"id": 1, "points": {}}]}}});
    let server = SunSpecServer::start(dir.path(), &spec);
    let mut a = connect(server.port);
    let mut b = connect(server.port);
    assert_eq!(read_holding(&mut a, 1, 40_000, 1), [0x5375]);
    assert_eq!(read_holding(&mut b, 1, 40_000, 1), [0x5375]);
}

#[test]
fn delay_length_override_repeats_raw_and_end_marker() {
    let dir = tempfile::tempdir().unwrap();
    let m803 = 40_002 + model_size(1);
    // 803's repeating "string" group, from the definition.
    let group = &sunspec_model_json(803)["group"]["groups"][0];
    assert_eq!(group["count"], "NStr");
    let group_size = points_size(&group["points"]);
    let spec = json!({"units": {"3": {
        "base": 50_000,
        "models": [{"id": 1, "points": {}, "length": 10},
                   {"id": 803, "points": {}, "repeats": [{"StrSoC": 80}, {"StrSoC": 81}]}],
        "raw": {"50000": [0x1234]},
        "end_marker": false}},
        "delay_ms": 300});
    let server = SunSpecServer::start(dir.path(), &spec);
    let mut s = connect(server.port);
    let m803 = m803 - 40_000 + 50_000;

    let started = Instant::now();
    assert_eq!(
        read_holding(&mut s, 3, 50_000, 2),
        [0x1234, 0x6E53],
        "raw over SunS"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not delayed"
    );
    let logged = server.requests();
    let last = logged.last().unwrap();
    assert!(last["end"].as_f64().unwrap() - last["start"].as_f64().unwrap() >= 0.3);

    // The wrong length is written as asked; the registers stay the definition's.
    assert_eq!(read_holding(&mut s, 3, 50_002, 2), [1, 10]);
    // 803: L covers the fixed part and both repeats; NStr counts them.
    let strsoc = m803 + model_size(803) + offset_in(&group["points"], "StrSoC");
    assert_eq!(
        read_holding(&mut s, 3, m803, 3),
        [803, model_size(803) - 2 + 2 * group_size, 2]
    );
    assert_eq!(read_holding(&mut s, 3, strsoc, 1), [80]);
    assert_eq!(read_holding(&mut s, 3, strsoc + group_size, 1), [81]);
    // No end marker: the map simply ends after the last repeat.
    let end = m803 + model_size(803) + 2 * group_size;
    assert_eq!(
        transact(&mut s, 4, 3, &[3, (end >> 8) as u8, end as u8, 0, 1]),
        [0x83, 2]
    );
}

// ---- Modbus RTU on a simulated RS-485 bus (SunSpecServer::start_serial) ----

/// The Modbus RTU CRC (poly 0xA001 reflected, init 0xFFFF), sent low byte first.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &b in bytes {
        crc ^= b as u16;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// An RTU frame: unit, PDU, CRC.
fn rtu_frame(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut frame = vec![unit];
    frame.extend_from_slice(pdu);
    frame.extend_from_slice(&crc16(&frame).to_le_bytes());
    frame
}

fn rtu_read_holding(unit: u8, addr: u16, count: u16) -> Vec<u8> {
    let mut pdu = vec![3];
    pdu.extend_from_slice(&addr.to_be_bytes());
    pdu.extend_from_slice(&count.to_be_bytes());
    rtu_frame(unit, &pdu)
}

/// The agent's end of a bus, opened as the agent would (not as our controlling terminal).
struct BusEnd(std::fs::File);

impl BusEnd {
    fn open(server: &SunSpecServer) -> BusEnd {
        use std::os::unix::fs::OpenOptionsExt;
        let path = server.serial_path().expect("a serial server");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        BusEnd(file)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    /// Reads until `want` bytes have come or `timeout` has passed; returns what came.
    fn receive(&mut self, want: usize, timeout: Duration) -> Vec<u8> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on a descriptor we own.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
            assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
            if n == 0 {
                continue;
            }
            let mut buf = [0u8; 256];
            let len = self.0.read(&mut buf[..want - got.len()]).unwrap();
            got.extend_from_slice(&buf[..len]);
        }
        got
    }

    /// The registers of a read-holding-registers response from `unit`, CRC checked.
    fn registers(&mut self, unit: u8, count: u16) -> Vec<u16> {
        let want = 5 + 2 * count as usize;
        let resp = self.receive(want, Duration::from_secs(5));
        assert_eq!(resp.len(), want, "short or no response: {resp:02x?}");
        assert_eq!(resp[..3], [unit, 3, count as u8 * 2], "{resp:02x?}");
        let crc = crc16(&resp[..want - 2]).to_le_bytes();
        assert_eq!(resp[want - 2..], crc, "CRC of {resp:02x?}");
        resp[3..want - 2]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    /// One read transaction, waiting for its response.
    fn read(&mut self, unit: u8, addr: u16, count: u16) -> Vec<u16> {
        self.send(&rtu_read_holding(unit, addr, count));
        self.registers(unit, count)
    }
}

#[test]
fn rtu_crc_matches_the_standards_example() {
    // Modbus over serial line, 6.2.2: 01 03 00 00 00 01 has CRC 0x0A84, sent 84 0A.
    assert_eq!(
        rtu_frame(1, &[3, 0, 0, 0, 1]),
        [1, 3, 0, 0, 0, 1, 0x84, 0x0A]
    );
}

#[test]
fn rtu_units_on_one_bus_each_answer_their_own_map() {
    let dir = tempfile::tempdir().unwrap();
    let spec = json!({"units": {
        "1": {"models": [{"id": 1, "points": {"SN": "INV-0001"}}, {"id": 103, "points": {}}]},
        "2": {"base": 50_000,
              "models": [{"id": 1, "points": {"SN": "BAT-0002"}}, {"id": 802, "points": {}}]}}});
    let server = SunSpecServer::start_serial(dir.path(), &spec);
    assert_eq!(server.port, 0);
    let mut bus = BusEnd::open(&server);

    for (unit, base, models, sn) in [
        (1u8, 40_000u16, vec![1u16, 103], "INV-0001"),
        (2, 50_000, vec![1, 802], "BAT-0002"),
    ] {
        assert_eq!(bus.read(unit, base, 2), [0x5375, 0x6E53], "unit {unit}");
        // Walk the model chain to the end marker.
        let mut found = Vec::new();
        let mut at = base + 2;
        loop {
            let header = bus.read(unit, at, 2);
            if header == [0xFFFF, 0] {
                break;
            }
            assert_eq!(
                header[1],
                model_size(header[0]) - 2,
                "unit {unit}: {header:?}"
            );
            found.push(header[0]);
            at += 2 + header[1];
        }
        assert_eq!(found, models, "unit {unit}");
        let at_sn = base + 2 + point_offset(1, "SN");
        let regs = bus.read(unit, at_sn, 2);
        let text: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
        assert_eq!(text, sn.as_bytes()[..4], "unit {unit} serial number");
    }
    // Unit 1 has no map at 50000: an exception, from unit 1 alone.
    bus.send(&rtu_read_holding(1, 50_000, 1));
    let resp = bus.receive(5, Duration::from_secs(5));
    assert_eq!(resp[..3], [1, 0x83, 2], "{resp:02x?}");
    assert_eq!(resp[3..], crc16(&resp[..3]).to_le_bytes());

    let logged = server.requests();
    assert!(logged.iter().all(|r| r["conn"] == 0), "{logged:?}");
    assert!(logged
        .iter()
        .any(|r| r["unit"] == 2 && r["address"] == 50_000));
    assert!(server.overlaps().is_empty());
    // A TCP server has no bus.
    assert!(SunSpecServer::start(dir.path(), &spec)
        .serial_path()
        .is_none());
}

#[test]
fn rtu_unknown_unit_and_dead_server_are_silent() {
    let dir = tempfile::tempdir().unwrap();
    let spec = json!({"units": {"1": {"models": [{"id": 1, "points": {}}]}}});
    let mut server = SunSpecServer::start_serial(dir.path(), &spec);
    let mut bus = BusEnd::open(&server);

    bus.send(&rtu_read_holding(9, 40_000, 2));
    let heard = bus.receive(1, Duration::from_millis(500));
    assert!(heard.is_empty(), "unit 9 does not exist, yet: {heard:02x?}");
    // The bus is not confused by it: unit 1 answers the next request.
    assert_eq!(bus.read(1, 40_000, 2), [0x5375, 0x6E53]);
    let log = server.request_log();
    let silent: Vec<_> = log
        .iter()
        .filter(|r| r["event"] == "unanswered: unknown unit")
        .collect();
    assert_eq!(silent.len(), 1, "{log:?}");
    assert_eq!(silent[0]["unit"], 9);
    assert_eq!(
        silent[0]["request"],
        json!({"function": 3, "address": 40_000})
    );
    assert!(server.requests().iter().all(|r| r["unit"] == 1));

    // A killed server is a device without power: the bus stays open, silent.
    server.kill();
    bus.send(&rtu_read_holding(1, 40_000, 2));
    let heard = bus.receive(1, Duration::from_millis(500));
    assert!(heard.is_empty(), "a dead device answered: {heard:02x?}");
    // Back on the same bus, with the agent's end still open.
    server.restart();
    assert_eq!(bus.read(1, 40_000, 2), [0x5375, 0x6E53]);
}

#[test]
fn rtu_client_that_waits_for_each_response_never_overlaps() {
    let dir = tempfile::tempdir().unwrap();
    let spec = json!({"units": {"1": {"models": [{"id": 1, "points": {}}]},
                                "2": {"models": [{"id": 1, "points": {}}]}},
                      "delay_ms": 100});
    let server = SunSpecServer::start_serial(dir.path(), &spec);
    let mut bus = BusEnd::open(&server);
    let started = Instant::now();
    for i in 0..10u16 {
        let unit = 1 + (i % 2) as u8;
        assert_eq!(
            bus.read(unit, 40_000 + i % 2, 1),
            [[0x5375, 0x6E53][i as usize % 2]]
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "not delayed"
    );
    // Each line is written before its response, so all ten are in the log now, and an overlap
    // would have been logged when its bytes arrived, before the response.
    assert_eq!(server.requests().len(), 10);
    assert_eq!(server.overlaps(), Vec::<Value>::new());
}

#[test]
fn rtu_pipelining_client_is_caught_overlapping() {
    let dir = tempfile::tempdir().unwrap();
    let spec = json!({"units": {"1": {"models": [{"id": 1, "points": {}}]},
                                "2": {"base": 50_000, "models": [{"id": 1, "points": {}}]}},
                      "delay_ms": 200});
    let server = SunSpecServer::start_serial(dir.path(), &spec);
    let mut bus = BusEnd::open(&server);

    // Request 2 right behind request 1, without waiting: both are answered, in order, and the
    // overlap is logged during request 1.
    bus.send(&rtu_read_holding(1, 40_000, 2));
    bus.send(&rtu_read_holding(2, 50_000, 2));
    assert_eq!(bus.registers(1, 2), [0x5375, 0x6E53]);
    assert_eq!(bus.registers(2, 2), [0x5375, 0x6E53]);
    let overlaps = server.overlaps();
    assert!(!overlaps.is_empty(), "{:?}", server.request_log());
    assert_eq!(
        overlaps[0]["during"],
        json!({"unit": 1, "function": 3, "address": 40_000})
    );
    assert!(overlaps[0]["at"].as_f64().is_some());

    // One early byte is enough: the first byte of the next request before the response.
    let before = server.overlaps().len();
    let next = rtu_read_holding(1, 40_002, 2);
    bus.send(&rtu_read_holding(2, 50_000, 2));
    bus.send(&next[..1]);
    assert_eq!(bus.registers(2, 2), [0x5375, 0x6E53]);
    bus.send(&next[1..]);
    assert_eq!(bus.registers(1, 2), [1, model_size(1) - 2]);
    let overlaps = server.overlaps();
    assert_eq!(overlaps.len(), before + 1, "{overlaps:?}");
    assert_eq!(overlaps[before]["during"]["unit"], 2);
    assert_eq!(overlaps[before]["bytes"], 1);
    assert_eq!(server.requests().len(), 4);
}
