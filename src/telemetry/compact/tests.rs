//! The compact encoding against the JSON batch it stands for: random batches of every point
//! kind, encoded both ways, must decode to the same batch; and hostile bytes are refused with
//! an error, never a panic.

use super::*;
use crate::model::device::*;
use crate::telemetry::points;

/// A number with at most three decimals (the rounding of 14.4 is tested in `points`).
fn thousandths(rng: &mut fastrand::Rng, range: i64) -> f64 {
    rng.i64(-range * 1000..=range * 1000) as f64 / 1000.0
}

fn pick<T: Copy>(rng: &mut fastrand::Rng, from: &[T]) -> T {
    from[rng.usize(..from.len())]
}

/// A member that is there half the time: `range` as for [`thousandths`], `abs` for one that
/// cannot be negative.
fn maybe(rng: &mut fastrand::Rng, range: i64, abs: bool) -> Option<f64> {
    let x = thousandths(rng, range);
    rng.bool().then_some(if abs { x.abs() } else { x })
}

fn random_state(rng: &mut fastrand::Rng) -> DeviceState {
    let charging = [
        ChargingState::Charging,
        ChargingState::Discharging,
        ChargingState::Idle,
        ChargingState::Unknown,
    ];
    let grid = [
        GridStatus::Importing,
        GridStatus::Exporting,
        GridStatus::Idle,
        GridStatus::Unknown,
    ];
    let temperature = |rng: &mut fastrand::Rng| Temperature {
        value: thousandths(rng, 40),
        unit: if rng.bool() {
            TemperatureUnit::Celsius
        } else {
            TemperatureUnit::Fahrenheit
        },
    };
    match rng.u8(0..5) {
        0 => DeviceState::Battery(BatteryState {
            charge: maybe(rng, 20_000, true),
            charge_percentage: thousandths(rng, 100).abs(),
            charging_state: pick(rng, &charging),
            charge_rate: maybe(rng, 5_000, false),
            backup_reserve: maybe(rng, 100, true),
            grid_status: pick(rng, &grid),
            grid_power: maybe(rng, 10_000, false),
            strategy: rng
                .bool()
                .then(|| pick(rng, &["self-consumption", "backup", "tou", "é ünïcode"]).into()),
        }),
        1 => DeviceState::Charger(ChargerState {
            charging_state: pick(rng, &charging),
            is_plugged_in: rng.bool(),
            charger_voltage: thousandths(rng, 250).abs(),
            charger_current: thousandths(rng, 32).abs(),
            charger_wattage: thousandths(rng, 22_000).abs(),
        }),
        2 => DeviceState::Inverter(InverterState {
            power: thousandths(rng, 10_000).abs(),
            grid_status: pick(rng, &grid),
            grid_power: maybe(rng, 10_000, false),
        }),
        3 => DeviceState::Thermostat(ThermostatState {
            ambient_temperature: temperature(rng),
            heat_target: temperature(rng),
            cool_target: temperature(rng),
            operating_mode: pick(
                rng,
                &[
                    ThermostatMode::Off,
                    ThermostatMode::Heat,
                    ThermostatMode::Cool,
                    ThermostatMode::Auto,
                    ThermostatMode::Eco,
                ],
            ),
            fan_mode: pick(
                rng,
                &[FanMode::Auto, FanMode::On, FanMode::Off, FanMode::Circulate],
            ),
        }),
        _ => DeviceState::Vehicle(VehicleState {
            charge_percentage: thousandths(rng, 100).abs(),
            charge_limit: thousandths(rng, 100).abs(),
            range: thousandths(rng, 600).abs(),
            charging_state: pick(rng, &charging),
            is_plugged_in: rng.bool(),
            charger_voltage: thousandths(rng, 250).abs(),
            charger_current: thousandths(rng, 32).abs(),
            charger_wattage: thousandths(rng, 22_000).abs(),
        }),
    }
}

fn random_health(rng: &mut fastrand::Rng) -> GatewayHealth {
    GatewayHealth {
        uptime_secs: rng.u64(..1 << 40),
        load1: thousandths(rng, 4).abs(),
        mem_available_kib: rng.u64(..),
        disk_free_bytes: rng.u64(..1 << 50),
        link_reconnects: rng.u64(..10),
        outbox_depth: rng.u64(..1000),
        outbox_bytes: rng.u64(..1 << 30),
        points_dropped: 0,
        drivers: (0..rng.usize(..3))
            .map(|i| DriverHealth {
                name: format!("driver-{i}"),
                running: rng.bool(),
                restarts: rng.u64(..5),
                malformed_lines: rng.u64(..5),
                oversized_lines: 0,
                samples: rng.u64(..100_000),
            })
            .collect(),
        reporting: rng.bool().then(|| ReportingHealth {
            heartbeat_secs: 300,
            samples_unchanged: rng.u64(..1000),
        }),
        data_usage: rng.bool().then(|| DataUsageHealth {
            month: "2026-12".into(),
            sent_bytes: rng.u64(..1 << 40),
            received_bytes: rng.u64(..1 << 40),
            budget_bytes: rng.bool().then_some(50 << 20),
            step: pick(rng, &["normal", "saving", "strict", "exhausted"]).into(),
        }),
    }
}

/// A batch as the outbox would hand it over: mostly states of a few devices, with health,
/// availability and safety points between them; `seq` increasing with random gaps, `ts`
/// wandering (the clock may be set back).
fn random_records(rng: &mut fastrand::Rng) -> Vec<Record> {
    let mut seq = rng.u64(1..1 << 40);
    let mut ts = rng.u64(1_700_000_000_000..1_800_000_000_000);
    let devices = ["bat-1", "pv-1", "ev-1", "thermo.kitchen_2"];
    (0..rng.usize(1..120))
        .map(|_| {
            seq += rng.u64(1..3);
            ts = ts.wrapping_add_signed(rng.i64(-2_000..60_000));
            let device = pick(rng, &devices);
            let payload = match rng.u8(0..20) {
                0 => points::encode_health(ts, "gw-1", &random_health(rng)),
                1 => points::encode_availability(
                    ts,
                    &crate::drivers::Availability {
                        device_id: device.into(),
                        online: rng.bool(),
                        reason: rng.bool().then(|| "no answer within 1000 ms".into()),
                    },
                ),
                2 => points::encode_safety(
                    ts,
                    &crate::model::safety::SafetyPoint {
                        device_id: device.into(),
                        event: crate::model::safety::SafetyEvent::HoldExpired {
                            deadline: ts / 1000,
                            command: "battery:set-reserve".into(),
                        },
                    },
                ),
                _ => {
                    let mut out = Vec::new();
                    points::encode_state(ts, device, &random_state(rng), &mut out);
                    out
                }
            };
            Record {
                epoch: 1,
                seq,
                payload,
            }
        })
        .collect()
}

#[test]
fn random_batches_decode_to_the_json_batch_with_and_without_deflate() {
    for seed in 0..200 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let records = random_records(&mut rng);
        let json: Value = serde_json::from_slice(&points::batch_message("gw-1", &records)).unwrap();
        let plain_body = encode("gw-1", &records, false).unwrap().len() - 1;
        for deflate in [false, true] {
            let compact = encode("gw-1", &records, deflate).unwrap();
            assert!(
                !deflate || compact[0] == DEFLATED || plain_body < MIN_DEFLATE,
                "seed {seed}: a body of {plain_body} bytes is not smaller deflated"
            );
            let decoded = decode(&compact).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(decoded, json, "seed {seed}, deflate {deflate}");
        }
        // The states themselves come back, typed.
        for (point, record) in json["points"].as_array().unwrap().iter().zip(&records) {
            if let Some(state) = point.get("state") {
                let typed: DeviceState = serde_json::from_value(state.clone()).unwrap();
                let mut again = Vec::new();
                points::encode_state(
                    point["ts"].as_u64().unwrap(),
                    point["deviceId"].as_str().unwrap(),
                    &typed,
                    &mut again,
                );
                assert_eq!(again, record.payload, "seed {seed}");
            }
        }
    }
}

#[test]
fn a_battery_minute_is_a_few_bytes_a_point() {
    let mut device = crate::drivers::simulated::SimDevice::new(DeviceType::Battery, 1);
    let mut ts = 1_795_786_201_123;
    let records: Vec<Record> = (1..=60)
        .map(|seq| {
            ts += 1000 + seq % 3;
            let mut payload = Vec::new();
            points::encode_state(ts, "bat-1", device.step(1.0, 43_200), &mut payload);
            Record {
                epoch: 1,
                seq,
                payload,
            }
        })
        .collect();
    let json_batch = points::batch_message("gw-0001", &records);
    let json = json_batch.len();
    assert_eq!(
        decode(&encode("gw-0001", &records, true).unwrap()).unwrap(),
        serde_json::from_slice::<Value>(&json_batch).unwrap(),
        "tenths survive the trip"
    );
    let plain = encode("gw-0001", &records, false).unwrap().len();
    let deflated = encode("gw-0001", &records, true).unwrap().len();
    // Not a speed goal, a format property: columns of deltas are an order of magnitude
    // smaller than JSON, and DEFLATE takes the repeats out of what is left.
    assert!(plain * 10 < json, "json {json} B, compact {plain} B");
    assert!(
        deflated * 2 < plain,
        "compact {plain} B, deflated {deflated} B"
    );
}

#[test]
fn hostile_bytes_are_refused_with_an_error() {
    let mut rng = fastrand::Rng::with_seed(7);
    let good = encode("gw-1", &random_records(&mut rng), false).unwrap();
    for cut in 0..good.len() {
        assert!(decode(&good[..cut]).is_err(), "cut at {cut} decoded");
    }
    for _ in 0..2_000 {
        let mut bytes = good.clone();
        let at = rng.usize(1..bytes.len());
        bytes[at] = rng.u8(..);
        let _ = decode(&bytes);
    }
    let noise: Vec<u8> = (0..512).map(|_| rng.u8(..)).collect();
    for first in [PLAIN, DEFLATED] {
        let mut bytes = vec![first];
        bytes.extend_from_slice(&noise);
        assert!(decode(&bytes).is_err());
    }
    assert_eq!(
        decode(&[0x07, 1, 2]).unwrap_err().to_string(),
        "telemetry batch: unknown encoding byte 0x07"
    );
    assert!(decode(b"").is_err());
    // A huge count is refused before anything is allocated for it, in either body.
    for (first, epoch) in [(PLAIN, Some(9)), (PLAIN_V1, None)] {
        let mut bytes = vec![first];
        put_str(&mut bytes, "gw");
        if let Some(epoch) = epoch {
            put_uvarint(&mut bytes, epoch);
        }
        put_uvarint(&mut bytes, u64::MAX);
        assert!(decode(&bytes)
            .unwrap_err()
            .to_string()
            .contains("exceeds the bytes left"));
    }
}

#[test]
fn a_batch_states_its_epoch_and_one_from_before_epochs_decodes_without_one() {
    let records = example_records();
    for deflate in [false, true] {
        let batch = decode(&encode("gw-0001", &records, deflate).unwrap()).unwrap();
        assert_eq!(batch["epoch"], 7, "deflate {deflate}");
        assert_eq!(batch["points"][1]["seq"], 1043);
    }
    let json: Value = serde_json::from_slice(&points::batch_message("gw-0001", &records)).unwrap();
    assert_eq!(json["epoch"], 7);
    // A body of the first version is the same without the epoch.
    let v2 = encode("gw-0001", &records, false).unwrap();
    let mut v1 = vec![PLAIN_V1];
    put_str(&mut v1, "gw-0001");
    let epoch_at = 1 + 1 + "gw-0001".len();
    assert_eq!(v2[epoch_at], 7);
    v1.extend_from_slice(&v2[epoch_at + 1..]);
    let old = decode(&v1).unwrap();
    assert_eq!(old.get("epoch"), None);
    assert_eq!(old["points"], json["points"]);
    let mut deflated = vec![DEFLATED_V1];
    deflated.extend(miniz_oxide::deflate::compress_to_vec(&v1[1..], 6));
    assert_eq!(decode(&deflated).unwrap(), old);
}

#[test]
fn a_point_the_encoder_cannot_read_is_an_error_not_a_guess() {
    let records = [Record {
        epoch: 1,
        seq: 1,
        payload: br#"{"ts":1,"deviceId":"bat-1","state":{},"health":{}}"#.to_vec(),
    }];
    assert!(encode("gw", &records, true).is_err());
}

/// The two points of PROTOCOL 14.9's worked example.
fn example_records() -> Vec<Record> {
    let state = |percentage: f64, rate: f64| {
        serde_json::from_value::<DeviceState>(serde_json::json!({
            "type": "battery", "chargePercentage": percentage, "chargingState": "discharging",
            "chargeRate": rate, "gridStatus": "idle"
        }))
        .unwrap()
    };
    let mut first = Vec::new();
    points::encode_state(1_795_786_201_123, "bat-1", &state(60.0, 612.4), &mut first);
    let mut second = Vec::new();
    points::encode_state(1_795_786_202_125, "bat-1", &state(59.9, 598.0), &mut second);
    vec![
        Record {
            epoch: 7,
            seq: 1042,
            payload: first,
        },
        Record {
            epoch: 7,
            seq: 1043,
            payload: second,
        },
    ]
}

/// The hex of the fenced block after `marker` in PROTOCOL.md (comments after `;` ignored).
fn doc_hex(marker: &str) -> Vec<u8> {
    let doc = include_str!("../../../docs/PROTOCOL.md");
    let start = doc
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} in PROTOCOL.md"));
    let block = &doc[start..];
    let block = &block[block.find("```").expect("a block") + 3..];
    let block = &block[block.find('\n').unwrap() + 1..block.find("\n```").unwrap()];
    let hex: String = block
        .lines()
        .map(|l| l.split(';').next().unwrap())
        .collect::<String>()
        .split_whitespace()
        .collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn the_worked_example_in_protocol_md_is_what_the_encoder_writes() {
    let records = example_records();
    let plain = encode("gw-0001", &records, false).unwrap();
    let hex: Vec<String> = plain.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        doc_hex("<!-- example 14.9 plain -->"),
        plain,
        "PROTOCOL.md 14.9 is out of date; the encoder writes {}",
        hex.join(" ")
    );
    let json: Value = serde_json::from_slice(&points::batch_message("gw-0001", &records)).unwrap();
    assert_eq!(decode(&plain).unwrap(), json);
    // Another DEFLATE implementation may write other bytes for the same body, so the
    // deflated example is checked by what it decodes to.
    assert_eq!(
        decode(&doc_hex("<!-- example 14.9 deflated -->")).unwrap(),
        json
    );
    assert_eq!(
        decode(&encode("gw-0001", &records, true).unwrap()).unwrap(),
        json
    );
}

/// Runs the independent decoder, written in Python from PROTOCOL.md alone
/// (`tests/telemetry/decode_batch.py`), on `payload`: its JSON, or `None` when it refuses.
fn python_decode(payload: &[u8]) -> Option<Value> {
    use std::io::Write;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/telemetry/decode_batch.py"
    );
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("Traceback"), "{stderr}");
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("the decoder prints JSON"))
}

/// The specification is exact enough that a decoder written from it alone, in another
/// language, reads what the gateway writes, in every mode, and refuses what this one refuses.
#[test]
fn an_independent_decoder_built_from_protocol_md_agrees() {
    for seed in 0..12 {
        let mut rng = fastrand::Rng::with_seed(1_000 + seed);
        let records = random_records(&mut rng);
        let json = points::batch_message("gw-1", &records);
        let expected: Value = serde_json::from_slice(&json).unwrap();
        let plain = encode("gw-1", &records, false).unwrap();
        let deflated = encode("gw-1", &records, true).unwrap();
        for payload in [&json, &plain, &deflated] {
            assert_eq!(
                python_decode(payload).as_ref(),
                Some(&expected),
                "seed {seed}"
            );
        }
    }
    let good = encode("gw-1", &example_records(), false).unwrap();
    for cut in (1..good.len()).step_by(11) {
        assert_eq!(python_decode(&good[..cut]), None, "cut at {cut}");
        assert!(decode(&good[..cut]).is_err());
    }
}

#[test]
fn a_deflated_capabilities_message_decodes_to_its_json_and_is_far_smaller() {
    let registry = crate::drivers::DriverRegistry::default();
    let json = crate::inbound::commands::capabilities("gw-1", &registry);
    let packed = deflate_json(&json);
    assert_eq!(packed[0], DEFLATED_JSON);
    assert_eq!(
        decode_capabilities(&packed).unwrap(),
        serde_json::from_slice::<Value>(&json).unwrap()
    );
    assert_eq!(
        decode_capabilities(&json).unwrap(),
        serde_json::from_slice::<Value>(&json).unwrap()
    );
    assert!(
        packed.len() * 2 < json.len(),
        "{} of {}",
        packed.len(),
        json.len()
    );
    assert!(decode_capabilities(&[0x01, b'{', b'}']).is_err());
}

#[test]
fn a_deflate_bomb_of_empty_points_is_refused_before_it_is_built() {
    let mut body = Vec::new();
    put_str(&mut body, "gw");
    put_uvarint(&mut body, 1);
    put_uvarint(&mut body, 1);
    put_str(&mut body, "bat-1");
    put_str(&mut body, "state");
    put_uvarint(&mut body, 70_000);
    put_uvarint(&mut body, 0);
    put_uvarint(&mut body, 1);
    body.extend(std::iter::repeat_n(1u8, 69_999));
    put_uvarint(&mut body, 1);
    body.extend(std::iter::repeat_n(0u8, 69_999));
    let mut payload = vec![DEFLATED];
    payload.extend(miniz_oxide::deflate::compress_to_vec(&body, 9));
    assert!(payload.len() < 1_000, "{} bytes", payload.len());
    let error = decode(&payload).unwrap_err().to_string();
    assert!(error.contains("more than 65536 points"), "{error}");
}
