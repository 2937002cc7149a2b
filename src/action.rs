//! The input: a restaurant's action as it arrives on the input topic, decoded
//! and validated. Anything that fails here is bad input for the DLQ, with a
//! reason naming the field.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// A validated action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Action {
    pub restaurant_id: Uuid,
    pub adv_campaign_id: Uuid,
    pub adv_campaign_content: String,
    pub adv_campaign_owner: Option<String>,
    pub adv_campaign_owner_contact: Option<String>,
    pub adv_campaign_datetime_start: i64,
    pub adv_campaign_datetime_end: i64,
    pub datetime_created: i64,
}

/// Why a message is bad input; the text goes into the DLQ's `error` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// The fast path: a borrowing parse of a well-formed message.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    restaurant_id: Cow<'a, str>,
    #[serde(borrow)]
    adv_campaign_id: Cow<'a, str>,
    #[serde(borrow)]
    adv_campaign_content: Cow<'a, str>,
    #[serde(borrow, default)]
    adv_campaign_owner: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    adv_campaign_owner_contact: Option<Cow<'a, str>>,
    adv_campaign_datetime_start: i64,
    adv_campaign_datetime_end: i64,
    datetime_created: i64,
}

const REQUIRED_TIMES: [&str; 3] = [
    "adv_campaign_datetime_start",
    "adv_campaign_datetime_end",
    "datetime_created",
];

/// Decodes and validates one input value.
pub fn decode(value: Option<&[u8]>, max_bytes: usize) -> Result<Action, Invalid> {
    let bytes = value.ok_or_else(|| Invalid("value: missing (null message value)".into()))?;
    if bytes.len() > max_bytes {
        return Err(Invalid(format!(
            "value: {} bytes, over the {max_bytes}-byte limit",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Invalid(format!(
            "value: not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    match serde_json::from_str::<Wire>(text) {
        Ok(wire) => validate(wire),
        // The typed parse names no field in most of its errors: diagnose from
        // the generic form instead.
        Err(_) => Err(diagnose(text)),
    }
}

fn validate(w: Wire<'_>) -> Result<Action, Invalid> {
    let restaurant_id = parse_uuid("restaurant_id", &w.restaurant_id)?;
    let adv_campaign_id = parse_uuid("adv_campaign_id", &w.adv_campaign_id)?;
    if w.adv_campaign_content.trim().is_empty() {
        return Err(Invalid("adv_campaign_content: must not be empty".into()));
    }
    if w.adv_campaign_datetime_start > w.adv_campaign_datetime_end {
        return Err(Invalid(format!(
            "adv_campaign_datetime_start: {} is after adv_campaign_datetime_end {}",
            w.adv_campaign_datetime_start, w.adv_campaign_datetime_end
        )));
    }
    Ok(Action {
        restaurant_id,
        adv_campaign_id,
        adv_campaign_content: w.adv_campaign_content.into_owned(),
        adv_campaign_owner: w.adv_campaign_owner.map(Cow::into_owned),
        adv_campaign_owner_contact: w.adv_campaign_owner_contact.map(Cow::into_owned),
        adv_campaign_datetime_start: w.adv_campaign_datetime_start,
        adv_campaign_datetime_end: w.adv_campaign_datetime_end,
        datetime_created: w.datetime_created,
    })
}

fn parse_uuid(field: &str, s: &str) -> Result<Uuid, Invalid> {
    Uuid::parse_str(s).map_err(|_| Invalid(format!("{field}: invalid UUID {s:?}")))
}

/// Finds the first thing wrong with a message the typed parse refused.
fn diagnose(text: &str) -> Invalid {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Invalid(format!("value: not valid JSON ({e})")),
    };
    let Value::Object(map) = value else {
        return Invalid(format!(
            "value: expected a JSON object, got {}",
            kind(&value)
        ));
    };
    for field in ["restaurant_id", "adv_campaign_id", "adv_campaign_content"] {
        if let Err(e) = required_string(&map, field) {
            return e;
        }
    }
    for field in ["adv_campaign_owner", "adv_campaign_owner_contact"] {
        match map.get(field) {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(other) => {
                return Invalid(format!(
                    "{field}: expected a string or null, got {}",
                    kind(other)
                ))
            }
        }
    }
    for field in REQUIRED_TIMES {
        match map.get(field) {
            None | Some(Value::Null) => return Invalid(format!("{field}: missing")),
            Some(Value::Number(n)) if n.as_i64().is_some() => {}
            Some(Value::Number(n)) => {
                return Invalid(format!("{field}: expected whole Unix seconds, got {n}"))
            }
            Some(other) => {
                return Invalid(format!(
                    "{field}: expected an integer (Unix seconds), got {}",
                    kind(other)
                ))
            }
        }
    }
    // Shapes are right yet the typed parse failed: a duplicated key, most likely.
    match serde_json::from_str::<Wire>(text) {
        Err(e) => Invalid(format!("value: {e}")),
        Ok(_) => Invalid("value: rejected by the decoder".into()),
    }
}

fn required_string(map: &Map<String, Value>, field: &str) -> Result<(), Invalid> {
    match map.get(field) {
        None | Some(Value::Null) => Err(Invalid(format!("{field}: missing"))),
        Some(Value::String(_)) => Ok(()),
        Some(other) => Err(Invalid(format!(
            "{field}: expected a string, got {}",
            kind(other)
        ))),
    }
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {:?}", truncate(s)),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const R: &str = "0d8f9a6c-7c5b-4f1e-9d59-2b8f4c1e7a10";
    const K: &str = "5b7e1c2a-3d4f-4a6b-8c9d-0e1f2a3b4c5d";

    fn valid() -> Value {
        serde_json::json!({
            "restaurant_id": R,
            "adv_campaign_id": K,
            "adv_campaign_content": "first coffee free",
            "adv_campaign_owner": "Ivan",
            "adv_campaign_owner_contact": "ivan@example.com",
            "adv_campaign_datetime_start": 1_700_000_000,
            "adv_campaign_datetime_end": 1_700_003_600,
            "datetime_created": 1_699_999_000,
            "extra": {"ignored": true}
        })
    }

    fn decode_value(v: &Value) -> Result<Action, Invalid> {
        decode(Some(v.to_string().as_bytes()), 256 * 1024)
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = valid();
        v[field] = value;
        v
    }

    fn without(field: &str) -> Value {
        let mut v = valid();
        v.as_object_mut().unwrap().remove(field);
        v
    }

    #[test]
    fn a_valid_action_decodes_and_extra_fields_are_ignored() {
        let a = decode_value(&valid()).unwrap();
        assert_eq!(a.restaurant_id, Uuid::parse_str(R).unwrap());
        assert_eq!(a.adv_campaign_owner.as_deref(), Some("Ivan"));
        assert_eq!(a.adv_campaign_datetime_end, 1_700_003_600);
    }

    #[test]
    fn optional_fields_may_be_absent_or_null() {
        let a = decode_value(&without("adv_campaign_owner")).unwrap();
        assert_eq!(a.adv_campaign_owner, None);
        let a = decode_value(&with("adv_campaign_owner_contact", Value::Null)).unwrap();
        assert_eq!(a.adv_campaign_owner_contact, None);
    }

    #[test]
    fn each_kind_of_bad_input_names_its_field() {
        let cases: Vec<(Value, &str)> = vec![
            (
                with("adv_campaign_id", "12-x".into()),
                "adv_campaign_id: invalid UUID \"12-x\"",
            ),
            (without("restaurant_id"), "restaurant_id: missing"),
            (
                with("restaurant_id", 5.into()),
                "restaurant_id: expected a string, got number 5",
            ),
            (
                with("adv_campaign_content", "".into()),
                "adv_campaign_content: must not be empty",
            ),
            (without("datetime_created"), "datetime_created: missing"),
            (
                with("adv_campaign_datetime_start", "soon".into()),
                "adv_campaign_datetime_start: expected an integer",
            ),
            (
                with("adv_campaign_datetime_end", 1.5.into()),
                "adv_campaign_datetime_end: expected whole Unix seconds",
            ),
            (
                with("adv_campaign_datetime_start", 1_800_000_000.into()),
                "adv_campaign_datetime_start: 1800000000 is after",
            ),
            (
                with("adv_campaign_owner", 7.into()),
                "adv_campaign_owner: expected a string or null",
            ),
            (
                serde_json::json!([1, 2]),
                "value: expected a JSON object, got an array",
            ),
        ];
        for (input, expected) in cases {
            let err = decode_value(&input).unwrap_err().0;
            assert!(
                err.starts_with(expected),
                "{err:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn bytes_that_are_not_json_text_are_refused() {
        assert!(decode(Some(b"\xff\xfe"), 100)
            .unwrap_err()
            .0
            .contains("UTF-8"));
        assert!(decode(Some(b"{\"a\":"), 100)
            .unwrap_err()
            .0
            .contains("not valid JSON"));
        assert!(decode(None, 100).unwrap_err().0.contains("missing"));
        let big = vec![b' '; 101];
        assert!(decode(Some(&big), 100)
            .unwrap_err()
            .0
            .contains("over the 100-byte limit"));
        let dup = format!(r#"{{"restaurant_id":"{R}","restaurant_id":"{R}"}}"#);
        assert!(decode(Some(dup.as_bytes()), 1000).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(Some(&bytes), 256 * 1024);
        }

        #[test]
        fn mutated_valid_json_never_panics(cut in 0usize..400, byte in any::<u8>()) {
            let mut bytes = valid().to_string().into_bytes();
            let at = cut % bytes.len();
            bytes[at] = byte;
            let _ = decode(Some(&bytes), 256 * 1024);
            bytes.truncate(at);
            let _ = decode(Some(&bytes), 256 * 1024);
        }
    }
}
