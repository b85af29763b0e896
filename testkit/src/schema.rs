//! A small JSON Schema evaluator: the keywords the catalog's schemas use, nothing more. The
//! catalog tests check that the schemas the agent advertises refuse exactly what its validator
//! refuses.

use serde_json::{json, Value};

use crate::regex::Regex;

/// Why `value` fails `schema`, or `None` when it passes. Panics on a keyword it does not know,
/// so a schema that grows a new keyword cannot pass unchecked.
pub fn schema_refusal(schema: &Value, value: &Value) -> Option<String> {
    let schema = schema.as_object().expect("schemas are objects here");
    let fail = |why: String| Some(format!("{why} (value {value})"));
    for (keyword, rule) in schema {
        match keyword.as_str() {
            "$schema" | "title" | "description" | "default" => {}
            // Read together with `if`.
            "then" | "else" => {}
            "type" => {
                let ok = match rule.as_str().unwrap() {
                    "object" => value.is_object(),
                    "number" => value.is_number(),
                    "integer" => value.as_f64().is_some_and(|x| x.fract() == 0.0),
                    "string" => value.is_string(),
                    "boolean" => value.is_boolean(),
                    other => panic!("type {other}"),
                };
                if !ok {
                    return fail(format!("not of type {rule}"));
                }
            }
            "enum" if !rule.as_array().unwrap().contains(value) => {
                return fail(format!("not in {rule}"))
            }
            "const" if rule != value => return fail(format!("not {rule}")),
            "enum" | "const" => {}
            "minimum" | "maximum" => {
                let (Some(x), Some(bound)) = (value.as_f64(), rule.as_f64()) else {
                    continue; // applies to numbers only
                };
                if (keyword == "minimum" && x < bound) || (keyword == "maximum" && x > bound) {
                    return fail(format!("{keyword} {rule}"));
                }
            }
            "pattern" => {
                if let Some(s) = value.as_str() {
                    if !Regex::parse(rule.as_str().unwrap()).matches(s) {
                        return fail(format!("does not match {rule}"));
                    }
                }
            }
            "required" => {
                let Some(members) = value.as_object() else {
                    continue;
                };
                for name in rule.as_array().unwrap() {
                    if !members.contains_key(name.as_str().unwrap()) {
                        return fail(format!("{name} is required"));
                    }
                }
            }
            "properties" => {
                let Some(members) = value.as_object() else {
                    continue;
                };
                for (name, sub) in rule.as_object().unwrap() {
                    if let Some(why) = members.get(name).and_then(|m| schema_refusal(sub, m)) {
                        return fail(format!("{name}: {why}"));
                    }
                }
            }
            "additionalProperties" => {
                assert_eq!(rule, &json!(false), "only closed objects are supported");
                let known = schema.get("properties").and_then(Value::as_object);
                for name in value.as_object().into_iter().flat_map(|m| m.keys()) {
                    if !known.is_some_and(|k| k.contains_key(name)) {
                        return fail(format!("{name} is not allowed"));
                    }
                }
            }
            "allOf" => {
                for sub in rule.as_array().unwrap() {
                    if let Some(why) = schema_refusal(sub, value) {
                        return Some(why);
                    }
                }
            }
            "anyOf" => {
                let subs = rule.as_array().unwrap();
                if subs.iter().all(|sub| schema_refusal(sub, value).is_some()) {
                    return fail(format!("matches none of {rule}"));
                }
            }
            "if" => {
                let branch = if schema_refusal(rule, value).is_none() {
                    "then"
                } else {
                    "else"
                };
                if let Some(why) = schema.get(branch).and_then(|s| schema_refusal(s, value)) {
                    return Some(why);
                }
            }
            other => panic!("the test's schema evaluator does not know `{other}`"),
        }
    }
    None
}
