//! Value encoding: one format-version byte, then bincode.
//!
//! The version byte lets a later build read (or refuse, clearly) values an earlier
//! build wrote, instead of misreading them.

use serde::{de::DeserializeOwned, Serialize};

use crate::StoreError;

/// The format every value written by this build carries.
pub(crate) const VALUE_FORMAT: u8 = 1;

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![VALUE_FORMAT];
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .expect("encoding into a Vec cannot fail");
    out
}

pub(crate) fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        table,
        key: hex(key),
        reason,
    };
    match bytes.split_first() {
        Some((&VALUE_FORMAT, body)) => {
            bincode::serde::decode_from_slice(body, bincode::config::standard())
                .map(|(value, _)| value)
                .map_err(|e| corrupt(e.to_string()))
        }
        Some((other, _)) => Err(corrupt(format!(
            "value format {other}, this build reads {VALUE_FORMAT}"
        ))),
        None => Err(corrupt("empty value".into())),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
