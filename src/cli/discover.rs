//! `texture-agent discover`: for an installer commissioning a gateway, what SunSpec devices
//! answer on a Modbus TCP endpoint or on an RS-485 bus, with their models, identity and
//! current readings.
//!
//! It needs no configuration and changes nothing on the devices: it only reads. It exits 0 when
//! at least one unit showed the SunSpec marker, 1 otherwise, with a message naming each unit
//! tried and why it gave nothing, and 2 for a bad argument. It opens the link the way the
//! daemon does ([`Link`]), so a serial port the service holds is refused, not shared.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use super::printable;
use crate::drivers::modbus::discover::{discover, DiscoverError, Discovered};
use crate::drivers::modbus::driver::{endpoint, DEFAULT_BAUD};
use crate::drivers::modbus::link::{Link, LinkSettings, Target};
use crate::drivers::modbus::serial::{check_baud, check_stop_bits, Parity, SerialSettings};
use crate::drivers::sunspec::points::{PointType, Value as PointValue};

/// What `discover` was asked.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DiscoverArgs {
    /// The Modbus TCP device or gateway: HOST or HOST:PORT (port 502 if left out).
    #[arg(
        long,
        value_name = "HOST[:PORT]",
        conflicts_with = "serial",
        required_unless_present = "serial"
    )]
    tcp: Option<String>,
    /// The serial port of an RS-485 bus (Modbus RTU), such as /dev/ttyUSB0.
    #[arg(long, value_name = "PATH")]
    serial: Option<PathBuf>,
    /// The bus's baud rate (with --serial).
    #[arg(long, value_name = "RATE", default_value_t = DEFAULT_BAUD, requires = "serial")]
    baud: u32,
    /// The bus's parity: none, even or odd (with --serial).
    #[arg(
        long,
        value_name = "PARITY",
        default_value = "none",
        requires = "serial"
    )]
    parity: String,
    /// 1 or 2 (with --serial).
    #[arg(long, value_name = "BITS", default_value_t = 1, requires = "serial")]
    stop_bits: u8,
    /// Unit ids to try: one (1), a range (1-10), or a list of both (1,3,10-12).
    #[arg(long, value_name = "IDS", default_value = "1")]
    units: String,
    /// The SunSpec base address, if the device uses another than 40000, 0 or 50000.
    #[arg(long, value_name = "ADDRESS")]
    base: Option<u16>,
    /// How long to wait for each answer, milliseconds (the slowest devices need 1000 or more).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    timeout_ms: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn discover_command(args: &DiscoverArgs) -> ExitCode {
    let (target, units) = match parse(args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let Some(runtime) = super::runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    let settings = LinkSettings {
        timeout: Duration::from_millis(args.timeout_ms),
        ..LinkSettings::default()
    };
    let name = target.describe();
    let results = runtime.block_on(async {
        let mut link = Link::new(target, settings);
        let mut results = Vec::new();
        for unit in units {
            let result = discover(&mut link, unit, args.base).await;
            // An endpoint that refuses the connection (or a port that cannot be opened) will
            // refuse the next unit too; a unit that times out says nothing about the others.
            let dead = matches!(&result, Err(DiscoverError::Link(e)) if e.is_unreachable());
            results.push((unit, result));
            if dead {
                break;
            }
        }
        results
    });
    let found = results.iter().any(|(_, r)| r.is_ok());
    if args.json {
        println!("{}", to_json(&name, &results));
    } else {
        print_text(&name, &results);
    }
    if found {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: no SunSpec device answered at {name}");
        ExitCode::FAILURE
    }
}

/// The link and unit ids, or a message naming the bad argument.
fn parse(args: &DiscoverArgs) -> Result<(Target, Vec<u8>), String> {
    if !(1..=60_000).contains(&args.timeout_ms) {
        return Err(format!(
            "--timeout-ms {}: must be from 1 to 60000",
            args.timeout_ms
        ));
    }
    let units = parse_units(&args.units)?;
    let target = match (&args.tcp, &args.serial) {
        (Some(tcp), _) => {
            // The same grammar as a sunspec driver's `tcp`, so what discover accepts, the
            // configuration does.
            let (host, port) = endpoint(tcp).map_err(|e| format!("--tcp {e}"))?;
            Target::Tcp { host, port }
        }
        (None, Some(path)) => {
            check_baud(args.baud).map_err(|e| format!("--baud {e}"))?;
            check_stop_bits(args.stop_bits).map_err(|e| format!("--stop-bits: {e}"))?;
            if let Some(u) = units.iter().find(|&&u| u > 247) {
                return Err(format!(
                    "--units {}: {u} is reserved on a serial bus (unit ids are 1 to 247)",
                    args.units
                ));
            }
            Target::Serial(SerialSettings {
                path: path.clone(),
                baud: args.baud,
                parity: Parity::parse(&args.parity).map_err(|e| format!("--parity {e}"))?,
                stop_bits: args.stop_bits,
            })
        }
        (None, None) => return Err("give --tcp HOST[:PORT] or --serial PATH".into()),
    };
    Ok((target, units))
}

/// `1`, `1-10`, `1,3,10-12`: unit ids from 1 to 255, each once, in the order given.
fn parse_units(text: &str) -> Result<Vec<u8>, String> {
    let bad = |part: &str, why: &str| format!("--units {text}: {part:?} {why}");
    let id = |part: &str, s: &str| -> Result<u8, String> {
        match s.trim().parse::<u16>() {
            Ok(n @ 1..=255) => Ok(n as u8),
            _ => Err(bad(part, "is not a unit id from 1 to 255")),
        }
    };
    let mut units = Vec::new();
    for part in text.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (id(part, lo)?, id(part, hi)?),
            None => {
                let one = id(part, part)?;
                (one, one)
            }
        };
        if lo > hi {
            return Err(bad(part, "runs backwards"));
        }
        for unit in lo..=hi {
            if !units.contains(&unit) {
                units.push(unit);
            }
        }
    }
    Ok(units)
}

/// One point as `discover` shows it.
struct Reading {
    name: &'static str,
    /// Scaled; `None` where the device has not implemented the point.
    value: Option<PointValue>,
    unit: &'static str,
}

/// Every known point of every block but the common model's, by model id. Scale factors are
/// not listed: they are already applied.
fn readings(found: &Discovered) -> Vec<(u16, Vec<Reading>)> {
    found
        .blocks
        .iter()
        .filter(|b| b.header.id != 1)
        .filter_map(|b| {
            let def = b.header.def()?;
            let points = def
                .points
                .iter()
                .filter(|p| p.ty != PointType::Sunssf)
                .map(|p| Reading {
                    name: p.name,
                    value: match b.raw(p.name) {
                        Some(PointValue::Text(t)) => Some(PointValue::Text(t)),
                        _ => b.number(p.name).map(PointValue::Number),
                    },
                    unit: p.unit,
                })
                .collect();
            Some((b.header.id, points))
        })
        .collect()
}

fn print_text(addr: &str, results: &[(u8, Result<Discovered, DiscoverError>)]) {
    for (unit, result) in results {
        let found = match result {
            Ok(found) => found,
            Err(error) => {
                println!(
                    "unit {unit} at {addr}: nothing: {}",
                    printable(&error.to_string())
                );
                continue;
            }
        };
        println!(
            "unit {unit} at {addr}: SunSpec device, marker at {}",
            found.base
        );
        let c = &found.common;
        let or = |v: &Option<String>| printable(v.as_deref().unwrap_or("(not given)")).into_owned();
        println!(
            "  manufacturer {}, model {}, version {}, serial {}",
            or(&c.manufacturer),
            or(&c.model),
            or(&c.version),
            or(&c.serial)
        );
        let readings = readings(found);
        for m in &found.models {
            let name = m.def().map_or("not known to the agent", |d| d.name);
            println!(
                "  model {} ({name}) at {}, length {}",
                m.id, m.address, m.length
            );
            if let Some((_, points)) = readings.iter().find(|(id, _)| *id == m.id) {
                let shown: Vec<String> = points
                    .iter()
                    .map(|r| {
                        let value = match &r.value {
                            None => return format!("{} not implemented", r.name),
                            Some(PointValue::Number(n)) => n.to_string(),
                            Some(PointValue::Text(t)) => printable(t).into_owned(),
                        };
                        match r.unit {
                            "" => format!("{} = {value}", r.name),
                            unit => format!("{} = {value} {unit}", r.name),
                        }
                    })
                    .collect();
                println!("    {}", shown.join(", "));
            }
        }
        for problem in &found.problems {
            println!("  problem: {}", printable(problem));
        }
    }
}

fn to_json(addr: &str, results: &[(u8, Result<Discovered, DiscoverError>)]) -> Value {
    let mut units = Vec::new();
    let mut errors = Vec::new();
    for (unit, result) in results {
        let found = match result {
            Ok(found) => found,
            Err(error) => {
                errors.push(json!({"unit": unit, "error": error.to_string()}));
                continue;
            }
        };
        let readings = readings(found);
        let models: Vec<Value> = found
            .models
            .iter()
            .map(|m| {
                let points: serde_json::Map<String, Value> = readings
                    .iter()
                    .find(|(id, _)| *id == m.id)
                    .map(|(_, points)| {
                        points
                            .iter()
                            .map(|r| {
                                let value = match &r.value {
                                    None => Value::Null,
                                    Some(PointValue::Number(n)) => {
                                        json!({"value": n, "unit": r.unit})
                                    }
                                    Some(PointValue::Text(t)) => {
                                        json!({"value": t, "unit": r.unit})
                                    }
                                };
                                (r.name.to_owned(), value)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                json!({
                    "id": m.id,
                    "name": m.def().map(|d| d.name),
                    "address": m.address,
                    "length": m.length,
                    "points": points,
                })
            })
            .collect();
        let c = &found.common;
        units.push(json!({
            "unit": unit,
            "base": found.base,
            "manufacturer": c.manufacturer,
            "model": c.model,
            "version": c.version,
            "serial": c.serial,
            "models": models,
            "problems": found.problems,
        }));
    }
    json!({"endpoint": addr, "units": units, "errors": errors})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_lists_take_ids_ranges_and_both_and_name_a_bad_part() {
        assert_eq!(parse_units("1"), Ok(vec![1]));
        assert_eq!(parse_units("1-3,7,2"), Ok(vec![1, 2, 3, 7]));
        assert_eq!(parse_units(" 10 - 11 "), Ok(vec![10, 11]));
        assert_eq!(
            parse_units("1,0"),
            Err("--units 1,0: \"0\" is not a unit id from 1 to 255".into())
        );
        assert_eq!(
            parse_units("5-3"),
            Err("--units 5-3: \"5-3\" runs backwards".into())
        );
        assert_eq!(
            parse_units("1,x"),
            Err("--units 1,x: \"x\" is not a unit id from 1 to 255".into())
        );
        assert!(parse_units("256").is_err());
    }
}
