//! The command catalog's contract, slug by slug: a valid input is accepted and normalised; every
//! kind of invalid input is refused naming the field; and each slug's published JSON Schema
//! agrees, checked by a small hand-written schema evaluator (no schema crate is a dependency).

use serde_json::{json, Map, Value};
use texture_agent::inbound::commands::catalog::{
    available_commands, validate, Slug, ValidationError, PERCENT_STRING_PATTERN,
};
use texture_agent::model::device::DeviceType;
use texture_agent_testkit::regex::Regex;
use texture_agent_testkit::schema::schema_refusal;

fn object(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().expect("inputs are objects")
}

/// (slug, input, the normalised input validation must produce).
fn valid_examples() -> Vec<(Slug, Value, Value)> {
    use Slug::*;
    vec![
        (
            BatterySetReserve,
            json!({"chargePercentage": 20}),
            json!({"chargePercentage": 20}),
        ),
        (
            BatterySetReserve,
            json!({"chargePercentage": 0}),
            json!({"chargePercentage": 0}),
        ),
        (
            BatterySetReserve,
            json!({"chargePercentage": 99.5}),
            json!({"chargePercentage": 99.5}),
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "charge"}),
            json!({"operatingMode": "charge", "enableGridInteraction": false}),
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "discharge", "minimumBatteryReserve": 20,
                   "maximumBatteryReserve": 20, "enableGridInteraction": true,
                   "executionPriority": 100}),
            json!({"operatingMode": "discharge", "minimumBatteryReserve": 20,
                   "maximumBatteryReserve": 20, "enableGridInteraction": true,
                   "executionPriority": 100}),
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "reset", "executionPriority": 7.0}),
            json!({"operatingMode": "reset", "enableGridInteraction": false,
                   "executionPriority": 7}),
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "heat", "heatTarget": 21.5}),
            json!({"operatingMode": "heat", "heatTarget": 21.5, "unit": "C"}),
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "cool", "coolTarget": 35, "unit": "C"}),
            json!({"operatingMode": "cool", "coolTarget": 35, "unit": "C"}),
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "auto", "heatTarget": 5, "coolTarget": 25}),
            json!({"operatingMode": "auto", "heatTarget": 5, "coolTarget": 25, "unit": "C"}),
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "auto", "heatTarget": 68, "coolTarget": 95, "unit": "F"}),
            json!({"operatingMode": "auto", "heatTarget": 20.0, "coolTarget": 35.0,
                   "unit": "C"}),
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "off"}),
            json!({"operatingMode": "off"}),
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "eco", "unit": "F"}),
            json!({"operatingMode": "eco"}),
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "off", "heatTarget": 18, "coolTarget": 26}),
            json!({"operatingMode": "off", "heatTarget": 18, "coolTarget": 26, "unit": "C"}),
        ),
        (
            ThermostatSetFanMode,
            json!({"fanMode": "circulate"}),
            json!({"fanMode": "circulate"}),
        ),
        (
            ChargerSetOperatingMode,
            json!({"operatingMode": "start-charging"}),
            json!({"operatingMode": "start-charging"}),
        ),
        (
            VehicleSetOperatingMode,
            json!({"operatingMode": "stop-charging"}),
            json!({"operatingMode": "stop-charging"}),
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": "80"}),
            json!({"chargeLimit": 80}),
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": "80.5"}),
            json!({"chargeLimit": 80.5}),
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": "100.0"}),
            json!({"chargeLimit": 100}),
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": 90}),
            json!({"chargeLimit": 90}),
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": 0.5}),
            json!({"chargeLimit": 0.5}),
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"currentLimit": 16}),
            json!({"currentLimit": 16}),
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"powerLimit": 0}),
            json!({"powerLimit": 0}),
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"currentLimit": 80, "powerLimit": 50000, "holdSecs": 86400}),
            json!({"currentLimit": 80, "powerLimit": 50000}),
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"currentLimit": 12.5, "powerLimit": 2875.5}),
            json!({"currentLimit": 12.5, "powerLimit": 2875.5}),
        ),
        (
            InverterSetExportLimit,
            json!({"exportLimit": 0}),
            json!({"exportLimit": 0}),
        ),
        (
            InverterSetExportLimit,
            json!({"exportLimit": 100000, "holdSecs": 1}),
            json!({"exportLimit": 100000}),
        ),
        (
            InverterSetExportLimit,
            json!({"exportLimit": 3680.5}),
            json!({"exportLimit": 3680.5}),
        ),
        // holdSecs on any device slug, taken out of the normalised input (5.0 counts as 5).
        (
            BatterySetReserve,
            json!({"chargePercentage": 20, "holdSecs": 3600}),
            json!({"chargePercentage": 20}),
        ),
        (
            ThermostatSetFanMode,
            json!({"fanMode": "on", "holdSecs": 5.0}),
            json!({"fanMode": "on"}),
        ),
        (AgentPing, json!({}), json!({})),
        (AgentGetState, json!({}), json!({})),
        (AgentUnpair, json!({}), json!({})),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Invalid {
    /// A value of the wrong JSON type.
    WrongType,
    /// The right type, outside the allowed values (a range or an enum).
    OutOfRange,
    UnknownField,
    MissingRequired,
    /// A rule between two fields that JSON Schema cannot state (field ordering).
    Ordering,
}

use Invalid::*;

/// (slug, input, kind of invalidity, the field the refusal must name).
fn invalid_examples() -> Vec<(Slug, Value, Invalid, &'static str)> {
    use Slug::*;
    let mut cases = vec![
        (
            BatterySetReserve,
            json!({"chargePercentage": "50"}),
            WrongType,
            "chargePercentage",
        ),
        (
            BatterySetReserve,
            json!({"chargePercentage": true}),
            WrongType,
            "chargePercentage",
        ),
        (
            BatterySetReserve,
            json!({"chargePercentage": null}),
            WrongType,
            "chargePercentage",
        ),
        (
            BatterySetReserve,
            json!({"chargePercentage": [50]}),
            WrongType,
            "chargePercentage",
        ),
        (
            BatterySetReserve,
            json!({"chargePercentage": 150}),
            OutOfRange,
            "chargePercentage",
        ),
        (
            BatterySetReserve,
            json!({"chargePercentage": -0.1}),
            OutOfRange,
            "chargePercentage",
        ),
        (
            BatterySetReserve,
            json!({"chargePercentage": 50, "foo": 1}),
            UnknownField,
            "foo",
        ),
        (
            BatterySetReserve,
            json!({}),
            MissingRequired,
            "chargePercentage",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": 1}),
            WrongType,
            "operatingMode",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "fly"}),
            OutOfRange,
            "operatingMode",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "Charge"}),
            OutOfRange,
            "operatingMode",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "enableGridInteraction": "yes"}),
            WrongType,
            "enableGridInteraction",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "enableGridInteraction": 0}),
            WrongType,
            "enableGridInteraction",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "executionPriority": "high"}),
            WrongType,
            "executionPriority",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "executionPriority": "5"}),
            WrongType,
            "executionPriority",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "executionPriority": 1.5}),
            WrongType,
            "executionPriority",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "executionPriority": 101}),
            OutOfRange,
            "executionPriority",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "minimumBatteryReserve": 120}),
            OutOfRange,
            "minimumBatteryReserve",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "maximumBatteryReserve": false}),
            WrongType,
            "maximumBatteryReserve",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "maximumBatteryReserve": -5}),
            OutOfRange,
            "maximumBatteryReserve",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "minimumBatteryReserve": 80,
                   "maximumBatteryReserve": 20}),
            Ordering,
            "minimumBatteryReserve",
        ),
        (
            BatterySetOperatingMode,
            json!({"operatingMode": "idle", "mode": 1}),
            UnknownField,
            "mode",
        ),
        (
            BatterySetOperatingMode,
            json!({"enableGridInteraction": true}),
            MissingRequired,
            "operatingMode",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": null}),
            WrongType,
            "operatingMode",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "dry"}),
            OutOfRange,
            "operatingMode",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "heat", "heatTarget": "20"}),
            WrongType,
            "heatTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "cool", "coolTarget": true}),
            WrongType,
            "coolTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "heat", "heatTarget": 40}),
            OutOfRange,
            "heatTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "cool", "coolTarget": 4.9}),
            OutOfRange,
            "coolTarget",
        ),
        // °F sent without the unit: 68 is refused, never read as 68 °C.
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "heat", "heatTarget": 68}),
            OutOfRange,
            "heatTarget",
        ),
        // °C sent as °F: 20 °F is out of range too.
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "heat", "heatTarget": 20, "unit": "F"}),
            OutOfRange,
            "heatTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "off", "coolTarget": 96, "unit": "F"}),
            OutOfRange,
            "coolTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "heat", "heatTarget": 20, "unit": "K"}),
            OutOfRange,
            "unit",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "heat", "heatTarget": 20, "unit": 1}),
            WrongType,
            "unit",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "auto", "heatTarget": 24, "coolTarget": 22}),
            Ordering,
            "heatTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "eco", "heatTarget": 22, "coolTarget": 22}),
            Ordering,
            "heatTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({}),
            MissingRequired,
            "operatingMode",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "heat"}),
            MissingRequired,
            "heatTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "cool", "heatTarget": 20}),
            MissingRequired,
            "coolTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "auto", "heatTarget": 20}),
            MissingRequired,
            "coolTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "auto", "coolTarget": 25}),
            MissingRequired,
            "heatTarget",
        ),
        (
            ThermostatSetOperatingMode,
            json!({"operatingMode": "off", "targetTemperature": 20}),
            UnknownField,
            "targetTemperature",
        ),
        (
            ThermostatSetFanMode,
            json!({"fanMode": 1}),
            WrongType,
            "fanMode",
        ),
        (
            ThermostatSetFanMode,
            json!({"fanMode": "turbo"}),
            OutOfRange,
            "fanMode",
        ),
        (ThermostatSetFanMode, json!({}), MissingRequired, "fanMode"),
        (
            ThermostatSetFanMode,
            json!({"fanMode": "on", "speed": 3}),
            UnknownField,
            "speed",
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": true}),
            WrongType,
            "chargeLimit",
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": null}),
            WrongType,
            "chargeLimit",
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": {"value": 80}}),
            WrongType,
            "chargeLimit",
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": 150}),
            OutOfRange,
            "chargeLimit",
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": "150"}),
            OutOfRange,
            "chargeLimit",
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": "-5"}),
            OutOfRange,
            "chargeLimit",
        ),
        (
            VehicleSetChargeLimit,
            json!({}),
            MissingRequired,
            "chargeLimit",
        ),
        (
            VehicleSetChargeLimit,
            json!({"chargeLimit": 80, "limit": 80}),
            UnknownField,
            "limit",
        ),
        (
            ChargerSetChargeRateLimit,
            json!({}),
            MissingRequired,
            "currentLimit",
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"holdSecs": 60}),
            MissingRequired,
            "currentLimit",
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"currentLimit": "16"}),
            WrongType,
            "currentLimit",
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"powerLimit": null}),
            WrongType,
            "powerLimit",
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"currentLimit": 80.1}),
            OutOfRange,
            "currentLimit",
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"currentLimit": -1}),
            OutOfRange,
            "currentLimit",
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"powerLimit": 50001}),
            OutOfRange,
            "powerLimit",
        ),
        (
            ChargerSetChargeRateLimit,
            json!({"currentLimit": 16, "current": 16}),
            UnknownField,
            "current",
        ),
        (
            InverterSetExportLimit,
            json!({"exportLimit": "3000"}),
            WrongType,
            "exportLimit",
        ),
        (
            InverterSetExportLimit,
            json!({"exportLimit": 100000.5}),
            OutOfRange,
            "exportLimit",
        ),
        (
            InverterSetExportLimit,
            json!({"exportLimit": -0.5}),
            OutOfRange,
            "exportLimit",
        ),
        (
            InverterSetExportLimit,
            json!({"holdSecs": 60}),
            MissingRequired,
            "exportLimit",
        ),
        (
            InverterSetExportLimit,
            json!({"exportLimit": 0, "importLimit": 0}),
            UnknownField,
            "importLimit",
        ),
        (AgentPing, json!({"holdSecs": 60}), UnknownField, "holdSecs"),
        (AgentPing, json!({"x": 1}), UnknownField, "x"),
        (
            AgentGetState,
            json!({"deviceId": "bat-1"}),
            UnknownField,
            "deviceId",
        ),
        (AgentUnpair, json!({"force": true}), UnknownField, "force"),
    ];
    // Strings that are not plain decimal numbers, NaN-like ones included.
    for s in [
        "abc", "NaN", "nan", "inf", "Infinity", "8e1", " 80", "80 ", "", "0x50", "080",
    ] {
        cases.push((
            VehicleSetChargeLimit,
            json!({"chargeLimit": s}),
            WrongType,
            "chargeLimit",
        ));
    }
    // holdSecs, on every device slug alike: an integer from 1 to 86400.
    for slug in Slug::ALL.into_iter().filter(|s| s.device_type().is_some()) {
        let valid = valid_examples()
            .into_iter()
            .find(|(s, ..)| *s == slug)
            .map(|(_, input, _)| input)
            .unwrap();
        let with = |secs: Value| {
            let mut input = valid.clone();
            input["holdSecs"] = secs;
            input
        };
        cases.extend([
            (slug, with(json!(0)), OutOfRange, "holdSecs"),
            (slug, with(json!(86401)), OutOfRange, "holdSecs"),
            (slug, with(json!(1.5)), WrongType, "holdSecs"),
            (slug, with(json!("60")), WrongType, "holdSecs"),
            (slug, with(json!(null)), WrongType, "holdSecs"),
        ]);
    }
    // Both start/stop slugs take the same input.
    for slug in [ChargerSetOperatingMode, VehicleSetOperatingMode] {
        cases.extend([
            (
                slug,
                json!({"operatingMode": true}),
                WrongType,
                "operatingMode",
            ),
            (
                slug,
                json!({"operatingMode": "charge"}),
                OutOfRange,
                "operatingMode",
            ),
            (slug, json!({}), MissingRequired, "operatingMode"),
            (
                slug,
                json!({"operatingMode": "stop-charging", "deviceId": "ev"}),
                UnknownField,
                "deviceId",
            ),
        ]);
    }
    cases
}

#[test]
fn every_slug_accepts_a_valid_example_and_normalises_it() {
    for (slug, input, normalised) in valid_examples() {
        let validated = validate(slug.as_str(), &object(&input))
            .unwrap_or_else(|e| panic!("{slug} refused {input}: {e}"));
        assert_eq!(validated.slug, slug);
        assert_eq!(Value::Object(validated.input), normalised, "{slug} {input}");
    }
    for slug in Slug::ALL {
        assert!(
            valid_examples().iter().any(|(s, ..)| *s == slug),
            "no valid example for {slug}"
        );
    }
}

#[test]
fn hold_secs_is_handed_back_beside_the_input_never_in_it() {
    for (slug, input, _) in valid_examples() {
        let validated = validate(slug.as_str(), &object(&input)).unwrap();
        let sent = input.get("holdSecs").and_then(Value::as_f64);
        assert_eq!(
            validated.hold_secs.map(|s| s as f64),
            sent,
            "{slug} {input}"
        );
        assert!(!validated.input.contains_key("holdSecs"), "{slug} {input}");
    }
}

#[test]
fn charge_limit_string_is_normalised_to_a_number() {
    let input = object(&json!({"chargeLimit": "80"}));
    let validated = validate("vehicle:set-charge-limit", &input).unwrap();
    assert_eq!(validated.input["chargeLimit"], json!(80));
    assert!(validated.input["chargeLimit"].is_u64());
}

#[test]
fn grid_interaction_defaults_to_false() {
    let input = object(&json!({"operatingMode": "charge"}));
    let validated = validate("battery:set-operating-mode", &input).unwrap();
    assert_eq!(validated.input["enableGridInteraction"], json!(false));
}

#[test]
fn every_invalid_example_is_refused_naming_its_field() {
    for (slug, input, kind, field) in invalid_examples() {
        let ValidationError {
            field: named,
            message,
        } = validate(slug.as_str(), &object(&input))
            .expect_err(&format!("{slug} accepted {input} ({kind:?})"));
        assert_eq!(named.as_deref(), Some(field), "{slug} {input}: {message}");
        assert!(
            message.contains(field),
            "{slug} {input}: message {message:?} does not name {field}"
        );
    }
}

#[test]
fn every_slug_has_an_invalid_example_of_each_kind_that_applies() {
    let cases = invalid_examples();
    for slug in Slug::ALL {
        let schema = slug.input_schema();
        let has_fields = !schema["properties"].as_object().unwrap().is_empty();
        let mut kinds = vec![UnknownField];
        if has_fields {
            kinds.push(WrongType);
        }
        if schema.get("required").is_some() {
            kinds.push(MissingRequired);
        }
        if schema.to_string().contains("\"maximum\"") || schema.to_string().contains("\"enum\"") {
            kinds.push(OutOfRange);
        }
        for kind in kinds {
            assert!(
                cases.iter().any(|(s, _, k, _)| *s == slug && *k == kind),
                "{slug} has no {kind:?} example"
            );
        }
    }
}

#[test]
fn unknown_slug_is_refused_without_a_field() {
    for slug in ["battery:explode", "", "Battery:set-reserve", "agent:ping "] {
        let err = validate(slug, &Map::new()).unwrap_err();
        assert_eq!(err.field, None);
        assert_eq!(err.message, format!("unknown command slug `{slug}`"));
    }
}

#[test]
fn normalised_input_validates_again_unchanged() {
    for (slug, input, _) in valid_examples() {
        let once = validate(slug.as_str(), &object(&input)).unwrap();
        let twice = validate(slug.as_str(), &once.input).unwrap();
        assert_eq!(
            (once.slug, &once.input),
            (twice.slug, &twice.input),
            "{slug} {input}"
        );
        assert_eq!(
            twice.hold_secs, None,
            "holdSecs is not in the normalised input"
        );
    }
}

#[test]
fn every_schema_is_a_closed_object_of_known_members() {
    for slug in Slug::ALL {
        let schema = slug.input_schema();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        assert_eq!(schema["type"], "object", "{slug}");
        assert_eq!(schema["additionalProperties"], false, "{slug}");
        let properties = schema["properties"].as_object().unwrap();
        for name in schema["required"].as_array().into_iter().flatten() {
            assert!(
                properties.contains_key(name.as_str().unwrap()),
                "{slug}: {name}"
            );
        }
        assert_eq!(schema["description"], slug.description());
    }
}

#[test]
fn every_schema_accepts_the_valid_examples_and_their_normalised_form() {
    for (slug, input, normalised) in valid_examples() {
        let schema = slug.input_schema();
        assert_eq!(schema_refusal(&schema, &input), None, "{slug} {input}");
        assert_eq!(
            schema_refusal(&schema, &normalised),
            None,
            "{slug} {normalised}"
        );
    }
}

#[test]
fn every_schema_refuses_the_invalid_examples_it_can_express() {
    for (slug, input, kind, _) in invalid_examples() {
        let schema = slug.input_schema();
        if kind == Ordering {
            // JSON Schema cannot compare two members; the description states the rule.
            let description = schema["description"].as_str().unwrap();
            let names: Vec<&str> = input
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            for name in names
                .iter()
                .filter(|n| n.ends_with("Target") || n.ends_with("Reserve"))
            {
                assert!(description.contains(name), "{slug}: {description}");
            }
            continue;
        }
        assert!(
            schema_refusal(&schema, &input).is_some(),
            "{slug}'s schema accepts {input} ({kind:?})"
        );
    }
}

/// The schema's `pattern` and the validator accept exactly the same strings: every string of
/// up to five characters over an alphabet that exercises each part of the grammar.
#[test]
fn charge_limit_strings_follow_the_schema_pattern() {
    let pattern = Regex::parse(PERCENT_STRING_PATTERN);
    let alphabet: Vec<char> = "0159.-e ".chars().collect();
    let mut strings = vec![String::new()];
    let mut frontier = vec![String::new()];
    for _ in 0..5 {
        frontier = frontier
            .iter()
            .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
            .collect();
        strings.extend(frontier.iter().cloned());
    }
    strings.extend(
        [
            "100", "100.0", "100.000", "100.5", "101", "99.99", "NaN", "inf",
        ]
        .map(String::from),
    );
    let (mut accepted, mut refused) = (0, 0);
    for s in strings {
        let by_validator = validate(
            "vehicle:set-charge-limit",
            &object(&json!({"chargeLimit": s})),
        )
        .is_ok();
        assert_eq!(by_validator, pattern.matches(&s), "{s:?}");
        if by_validator {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    assert!(accepted > 100 && refused > 1000, "{accepted} {refused}");
}

#[test]
fn battery_lists_exactly_the_battery_commands() {
    let slugs: Vec<&str> = available_commands(DeviceType::Battery)
        .iter()
        .map(|c| c.slug)
        .collect();
    assert_eq!(slugs, ["battery:set-reserve", "battery:set-operating-mode"]);
}

#[test]
fn each_device_type_lists_its_own_slugs_and_no_agent_builtins() {
    for device_type in [
        DeviceType::Battery,
        DeviceType::Charger,
        DeviceType::Inverter,
        DeviceType::Thermostat,
        DeviceType::Vehicle,
    ] {
        let listed = available_commands(device_type);
        let prefix = format!(
            "{}:",
            serde_json::to_value(device_type).unwrap().as_str().unwrap()
        );
        let expected: Vec<&str> = Slug::ALL
            .iter()
            .map(|s| s.as_str())
            .filter(|s| s.starts_with(&prefix))
            .collect();
        let slugs: Vec<&str> = listed.iter().map(|c| c.slug).collect();
        assert_eq!(slugs, expected, "{device_type:?}");
        for command in listed {
            let slug = Slug::parse(command.slug).unwrap();
            assert_eq!(command.description, slug.description());
            assert_eq!(command.input_schema, slug.input_schema());
        }
    }
}

#[test]
fn available_commands_use_the_platforms_field_names() {
    let listed = serde_json::to_value(available_commands(DeviceType::Vehicle)).unwrap();
    let first = &listed[0];
    assert_eq!(first["slug"], "vehicle:set-operating-mode");
    assert!(first["description"].is_string());
    assert_eq!(first["inputSchema"]["type"], "object");
    assert_eq!(first.as_object().unwrap().len(), 3);
}

#[test]
fn the_test_regex_matcher_reads_patterns_as_intended() {
    let r = Regex::parse(r"^(ab|c)+x?[0-9]*$");
    for yes in ["ab", "c", "abcab", "cx", "ab12", "cx9"] {
        assert!(r.matches(yes), "{yes}");
    }
    for no in ["", "a", "x", "abx x", "b", "cxx", "9"] {
        assert!(!r.matches(no), "{no}");
    }
}
