//! Value encoding: one format-version byte, then bincode.
//!
//! The version byte lets a later build read (or refuse, clearly) values an earlier
//! build wrote, instead of misreading them.

use serde::{de::DeserializeOwned, Serialize};

use crate::records::CampaignV1;
use crate::{Campaign, StoreError};

/// The format every value written by this build carries, campaigns aside.
pub(crate) const VALUE_FORMAT: u8 = 1;

/// Campaigns gained their origin in format 2; a format 1 campaign is read as
/// one of unknown origin.
pub(crate) const CAMPAIGN_FORMAT: u8 = 2;

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_as(VALUE_FORMAT, value)
}

pub(crate) fn encode_campaign(campaign: &Campaign) -> Vec<u8> {
    encode_as(CAMPAIGN_FORMAT, campaign)
}

fn encode_as<T: Serialize>(format: u8, value: &T) -> Vec<u8> {
    let mut out = vec![format];
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .expect("encoding into a Vec cannot fail");
    out
}

pub(crate) fn decode_campaign(key: &[u8], bytes: &[u8]) -> Result<Campaign, StoreError> {
    const TABLE: &str = "campaigns";
    match bytes.split_first() {
        Some((&CAMPAIGN_FORMAT, body)) => decode_body(TABLE, key, body),
        Some((&VALUE_FORMAT, body)) => decode_body::<CampaignV1>(TABLE, key, body).map(Into::into),
        Some((other, _)) => Err(corrupt(
            TABLE,
            key,
            format!("value format {other}, this build reads {VALUE_FORMAT} and {CAMPAIGN_FORMAT}"),
        )),
        None => Err(corrupt(TABLE, key, "empty value".into())),
    }
}

fn decode_body<T: DeserializeOwned>(
    table: &'static str,
    key: &[u8],
    body: &[u8],
) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map(|(value, _)| value)
        .map_err(|e| corrupt(table, key, e.to_string()))
}

fn corrupt(table: &'static str, key: &[u8], reason: String) -> StoreError {
    StoreError::Corrupt {
        table,
        key: hex(key),
        reason,
    }
}

pub(crate) fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&VALUE_FORMAT, body)) => decode_body(table, key, body),
        Some((other, _)) => Err(corrupt(
            table,
            key,
            format!("value format {other}, this build reads {VALUE_FORMAT}"),
        )),
        None => Err(corrupt(table, key, "empty value".into())),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, Origin, Progress};
    use uuid::Uuid;

    fn campaign(origin: Option<Origin>) -> Campaign {
        Campaign {
            action: Action {
                restaurant_id: Uuid::from_u128(1),
                adv_campaign_id: Uuid::from_u128(2),
                adv_campaign_content: "two for one".into(),
                adv_campaign_owner: None,
                adv_campaign_owner_contact: Some("ivan@example.com".into()),
                adv_campaign_datetime_start: 100,
                adv_campaign_datetime_end: 200,
                datetime_created: 90,
            },
            progress: Progress::After(Uuid::from_u128(7)),
            origin,
        }
    }

    #[test]
    fn a_campaign_round_trips_with_its_origin() {
        let c = campaign(Some(Origin {
            partition: 2,
            offset: 99,
        }));
        assert_eq!(decode_campaign(b"k", &encode_campaign(&c)).unwrap(), c);
    }

    #[test]
    fn a_format_1_campaign_reads_as_one_of_unknown_origin() {
        let c = campaign(None);
        // What format 1 wrote: the action's fields, then the progress.
        let old = encode_as(VALUE_FORMAT, &(&c.action, c.progress));
        assert_eq!(decode_campaign(b"k", &old).unwrap(), c);
    }

    #[test]
    fn an_unknown_format_is_refused_by_name() {
        let mut bytes = encode_campaign(&campaign(None));
        bytes[0] = 9;
        let err = decode_campaign(b"k", &bytes).unwrap_err().to_string();
        assert!(err.contains("value format 9"), "{err}");
    }
}
