//! The input: a restaurant's action as it arrives on the input topic, decoded
//! and validated. Anything that fails here is bad input for the DLQ, with a
//! reason naming the field; anything that passes can be stored by both sinks
//! (Postgres `text` and `timestamptz`, a push message the producer may send).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

pub use promo_fanout_state::Action;

/// Why a message is bad input; the text goes into the DLQ's `error` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

const REQUIRED_TIMES: [&str; 3] = [
    "adv_campaign_datetime_start",
    "adv_campaign_datetime_end",
    "datetime_created",
];

/// The earliest Unix second Postgres `timestamptz` holds: 4714-11-24
/// 00:00:00 UTC BC (Julian day 0). chrono reaches further back.
pub const EARLIEST_TIME: i64 = -210_866_803_200;

/// The latest Unix second both sinks hold: chrono's end (262142 AD), which
/// comes before Postgres's (294276 AD).
pub fn latest_time() -> i64 {
    DateTime::<Utc>::MAX_UTC.timestamp()
}

/// What a decoded action must fit in, beyond its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Input values over this many bytes are bad input (`max-message-bytes`).
    pub max_message_bytes: usize,
    /// The largest push message the producer may send: its
    /// `message.max.bytes` less room for the key and the record's framing.
    pub max_push_bytes: usize,
}

impl Limits {
    /// What librdkafka adds to a value before it compares it with
    /// `message.max.bytes`: the key (a client id, 36 bytes) and the record
    /// and batch framing, with room to spare.
    pub const PUSH_OVERHEAD: usize = 1024;

    /// The limits for `max-message-bytes` and a producer `message.max.bytes`.
    pub fn new(max_message_bytes: usize, producer_max_bytes: usize) -> Limits {
        Limits {
            max_message_bytes,
            max_push_bytes: producer_max_bytes.saturating_sub(Self::PUSH_OVERHEAD),
        }
    }
}

/// Decodes and validates one input value.
pub fn decode(value: Option<&[u8]>, limits: &Limits) -> Result<Action, Invalid> {
    let bytes = value.ok_or_else(|| Invalid("value: missing (null message value)".into()))?;
    let max_bytes = limits.max_message_bytes;
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
    let action = match serde_json::from_str::<Action>(text) {
        Ok(action) => action,
        // The typed parse names no field in most of its errors: diagnose from
        // the generic form instead.
        Err(_) => return Err(diagnose(text)),
    };
    validate(&action)?;
    let push = crate::sinks::push_message_len(&action);
    if push > limits.max_push_bytes {
        return Err(Invalid(format!(
            "adv_campaign_content: its push message would be {push} bytes, over the {} bytes \
             the producer may send (kafka.message.max.bytes less {} for the record)",
            limits.max_push_bytes + Limits::PUSH_OVERHEAD,
            Limits::PUSH_OVERHEAD
        )));
    }
    Ok(action)
}

/// What the shape alone does not say: the rules of SPEC §1 and what the
/// sinks can store.
fn validate(w: &Action) -> Result<(), Invalid> {
    if w.adv_campaign_content.trim().is_empty() {
        return Err(Invalid("adv_campaign_content: must not be empty".into()));
    }
    storable_text("adv_campaign_content", Some(&w.adv_campaign_content))?;
    storable_text("adv_campaign_owner", w.adv_campaign_owner.as_deref())?;
    storable_text(
        "adv_campaign_owner_contact",
        w.adv_campaign_owner_contact.as_deref(),
    )?;
    storable_time("adv_campaign_datetime_start", w.adv_campaign_datetime_start)?;
    storable_time("adv_campaign_datetime_end", w.adv_campaign_datetime_end)?;
    storable_time("datetime_created", w.datetime_created)?;
    if w.adv_campaign_datetime_start > w.adv_campaign_datetime_end {
        return Err(Invalid(format!(
            "adv_campaign_datetime_start: {} is after adv_campaign_datetime_end {}",
            w.adv_campaign_datetime_start, w.adv_campaign_datetime_end
        )));
    }
    Ok(())
}

/// Postgres `text` cannot hold U+0000, and would refuse the whole batch.
fn storable_text(field: &str, text: Option<&str>) -> Result<(), Invalid> {
    match text.and_then(|t| t.find('\0')) {
        Some(at) => Err(Invalid(format!(
            "{field}: contains U+0000 (NUL) at byte {at}, which Postgres text cannot store"
        ))),
        None => Ok(()),
    }
}

/// Unix seconds both Postgres `timestamptz` and chrono can represent.
fn storable_time(field: &str, secs: i64) -> Result<(), Invalid> {
    let latest = latest_time();
    if (EARLIEST_TIME..=latest).contains(&secs) {
        return Ok(());
    }
    Err(Invalid(format!(
        "{field}: {secs} is outside the storable range of Unix seconds \
         {EARLIEST_TIME} (4714-11-24 BC) to {latest} (262142-12-31 AD)"
    )))
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
    for field in ["restaurant_id", "adv_campaign_id"] {
        if let Some(Value::String(s)) = map.get(field) {
            if Uuid::parse_str(s).is_err() {
                return Invalid(format!("{field}: invalid UUID {s:?}"));
            }
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
                // 1.7e9 or 1700000000.0: a whole number, written as a float.
                let hint = match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < i64::MAX as f64 => {
                        " (write it without a decimal point or exponent)"
                    }
                    Some(f) if f.fract() == 0.0 => " (out of range)",
                    _ => "",
                };
                return Invalid(format!(
                    "{field}: expected an integer (Unix seconds), got {n}{hint}"
                ));
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
    match serde_json::from_str::<Action>(text) {
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

    /// The defaults: `max-message-bytes` and librdkafka's `message.max.bytes`.
    const LIMITS: Limits = Limits {
        max_message_bytes: 256 * 1024,
        max_push_bytes: 1_000_000 - Limits::PUSH_OVERHEAD,
    };

    fn decode_value(v: &Value) -> Result<Action, Invalid> {
        decode(Some(v.to_string().as_bytes()), &LIMITS)
    }

    fn small(max_message_bytes: usize) -> Limits {
        Limits {
            max_message_bytes,
            ..LIMITS
        }
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
                "adv_campaign_datetime_end: expected an integer (Unix seconds), got 1.5",
            ),
            (
                with("datetime_created", 1.7e9.into()),
                "datetime_created: expected an integer (Unix seconds), got 1700000000.0 (write \
                 it without a decimal point or exponent)",
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
        assert!(decode(Some(b"\xff\xfe"), &small(100))
            .unwrap_err()
            .0
            .contains("UTF-8"));
        assert!(decode(Some(b"{\"a\":"), &small(100))
            .unwrap_err()
            .0
            .contains("not valid JSON"));
        assert!(decode(None, &small(100)).unwrap_err().0.contains("missing"));
        let big = vec![b' '; 101];
        assert!(decode(Some(&big), &small(100))
            .unwrap_err()
            .0
            .contains("over the 100-byte limit"));
    }

    #[test]
    fn a_duplicated_key_is_refused_by_name() {
        // Every field present and valid, one of them twice: only the
        // duplicate can be what is wrong.
        let text = valid().to_string();
        let dup = text.replacen('{', &format!(r#"{{"restaurant_id":"{R}","#), 1);
        let err = decode(Some(dup.as_bytes()), &LIMITS).unwrap_err().0;
        assert!(err.contains("duplicate field `restaurant_id`"), "{err}");
    }

    #[test]
    fn text_postgres_cannot_store_is_refused() {
        for field in [
            "adv_campaign_content",
            "adv_campaign_owner",
            "adv_campaign_owner_contact",
        ] {
            let err = decode_value(&with(field, "free\u{0}coffee".into()))
                .unwrap_err()
                .0;
            assert!(
                err.starts_with(&format!("{field}: contains U+0000 (NUL) at byte 4")),
                "{err}"
            );
        }
        // The JSON escape decodes to the same character.
        let escaped = valid()
            .to_string()
            .replace("first coffee free", r"first\u0000coffee");
        let err = decode(Some(escaped.as_bytes()), &LIMITS).unwrap_err().0;
        assert!(
            err.starts_with("adv_campaign_content: contains U+0000"),
            "{err}"
        );
    }

    #[test]
    fn times_outside_what_both_sinks_hold_are_refused() {
        let latest = latest_time();
        assert!(DateTime::from_timestamp(EARLIEST_TIME, 0).is_some());
        assert!(DateTime::from_timestamp(latest, 0).is_some());
        assert!(DateTime::from_timestamp(latest + 1, 0).is_none());
        for field in REQUIRED_TIMES {
            for secs in [
                EARLIEST_TIME - 1,
                latest + 1,
                i64::MIN,
                i64::MAX,
                -(1 << 62),
            ] {
                let mut v = valid();
                // Keep start <= end so that only the range can be the reason.
                v["adv_campaign_datetime_start"] = EARLIEST_TIME.into();
                v["adv_campaign_datetime_end"] = latest.into();
                v[field] = secs.into();
                let err = decode_value(&v).unwrap_err().0;
                assert!(
                    err.starts_with(&format!("{field}: {secs} is outside the storable range")),
                    "{field} = {secs}: {err}"
                );
            }
        }
        // The ends themselves are storable.
        let mut v = valid();
        v["adv_campaign_datetime_start"] = EARLIEST_TIME.into();
        v["adv_campaign_datetime_end"] = latest.into();
        v["datetime_created"] = EARLIEST_TIME.into();
        assert!(decode_value(&v).is_ok());
    }

    #[test]
    fn an_action_whose_push_message_is_too_large_is_refused() {
        let limits = Limits::new(4 << 20, 1_000_000);
        let content = "x".repeat(1_000_000);
        let v = with("adv_campaign_content", content.into());
        let err = decode(Some(v.to_string().as_bytes()), &limits)
            .unwrap_err()
            .0;
        assert!(
            err.starts_with("adv_campaign_content: its push message would be"),
            "{err}"
        );
        // Just under the limit passes: the check measures the real message.
        let a = decode_value(&valid()).unwrap();
        let exact = Limits {
            max_message_bytes: 1 << 20,
            max_push_bytes: crate::sinks::push_message_len(&a),
        };
        assert!(decode(Some(valid().to_string().as_bytes()), &exact).is_ok());
        let under = Limits {
            max_push_bytes: exact.max_push_bytes - 1,
            ..exact
        };
        assert!(decode(Some(valid().to_string().as_bytes()), &under).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(Some(&bytes), &LIMITS);
        }

        #[test]
        fn mutated_valid_json_never_panics(cut in 0usize..400, byte in any::<u8>()) {
            let mut bytes = valid().to_string().into_bytes();
            let at = cut % bytes.len();
            bytes[at] = byte;
            let _ = decode(Some(&bytes), &LIMITS);
            bytes.truncate(at);
            let _ = decode(Some(&bytes), &LIMITS);
        }
    }
}
