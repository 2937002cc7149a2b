//! Fixed-width binary keys, so that prefix scans come back in a useful order.
//!
//! UUIDs are their 16 bytes; signed integers are big-endian with the sign bit
//! flipped, so byte order equals numeric order.

use uuid::Uuid;

/// `subscriptions`: one key per source row, ordered by restaurant then client.
pub(crate) const SUB_BY_RESTAURANT: u8 = 0x01;
/// `subscriptions`: row id → (restaurant, client), what a row-level delete needs.
pub(crate) const SUB_BY_ROW: u8 = 0x02;
/// `subscriptions`: a client who subscribed while the mirror followed the
/// change feed, waiting to be told of campaigns already under way.
pub(crate) const SUB_LATE: u8 = 0x03;
/// `campaigns`: one key per campaign, ordered by restaurant.
pub(crate) const CAMPAIGN: u8 = 0x01;
/// `positions`: the next offset to read, per input partition.
pub(crate) const INPUT_POSITION: u8 = 0x01;
/// `positions`: where the subscription mirror stands.
pub(crate) const MIRROR_POSITION: u8 = 0x02;
/// `positions`: which hold on an input partition this store's state is of.
pub(crate) const OWNERSHIP: u8 = 0x03;
/// `meta` keys.
pub(crate) const META_SCHEMA_VERSION: &[u8] = b"schema_version";
pub(crate) const META_IDENTITY: &[u8] = b"identity";
pub(crate) const META_INSTANCE: &[u8] = b"instance";

pub(crate) fn ordered_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

pub(crate) fn from_ordered_i64(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(a) ^ (1 << 63)) as i64
}

pub(crate) fn ordered_i32(v: i32) -> [u8; 4] {
    ((v as u32) ^ (1 << 31)).to_be_bytes()
}

pub(crate) fn from_ordered_i32(b: &[u8]) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    (u32::from_be_bytes(a) ^ (1 << 31)) as i32
}

pub(crate) fn uuid_at(b: &[u8], at: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Uuid::from_bytes(a)
}

/// `[0x01][restaurant][client][row id]`
pub(crate) fn sub_by_restaurant(restaurant: Uuid, client: Uuid, row: i64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = SUB_BY_RESTAURANT;
    k[1..17].copy_from_slice(restaurant.as_bytes());
    k[17..33].copy_from_slice(client.as_bytes());
    k[33..41].copy_from_slice(&ordered_i64(row));
    k
}

/// `[0x01][restaurant]`, or with a client: `[0x01][restaurant][client]`.
pub(crate) fn sub_prefix(restaurant: Uuid, client: Option<Uuid>) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(SUB_BY_RESTAURANT);
    k.extend_from_slice(restaurant.as_bytes());
    if let Some(c) = client {
        k.extend_from_slice(c.as_bytes());
    }
    k
}

/// `[0x02][row id]`
pub(crate) fn sub_by_row(row: i64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = SUB_BY_ROW;
    k[1..9].copy_from_slice(&ordered_i64(row));
    k
}

/// `[0x03][restaurant][client][seq]`: one marker per change that made the
/// subscription, so clearing one never clears a newer one.
pub(crate) fn sub_late(restaurant: Uuid, client: Uuid, seq: u64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = SUB_LATE;
    k[1..17].copy_from_slice(restaurant.as_bytes());
    k[17..33].copy_from_slice(client.as_bytes());
    k[33..41].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// `[0x01][restaurant][campaign]`
pub(crate) fn campaign(restaurant: Uuid, campaign: Uuid) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = CAMPAIGN;
    k[1..17].copy_from_slice(restaurant.as_bytes());
    k[17..33].copy_from_slice(campaign.as_bytes());
    k
}

/// `[restaurant][campaign][client]`
pub(crate) fn sent(restaurant: Uuid, campaign: Uuid, client: Uuid) -> [u8; 48] {
    let mut k = [0u8; 48];
    k[0..16].copy_from_slice(restaurant.as_bytes());
    k[16..32].copy_from_slice(campaign.as_bytes());
    k[32..48].copy_from_slice(client.as_bytes());
    k
}

/// The half-open range of every `sent` key of one campaign.
pub(crate) fn sent_range(restaurant: Uuid, campaign: Uuid) -> ([u8; 48], [u8; 48]) {
    (
        sent(restaurant, campaign, Uuid::nil()),
        next_prefix(&sent(restaurant, campaign, Uuid::max())),
    )
}

/// `[0x01][partition]`
/// `[0x03][partition]`
pub(crate) fn ownership(partition: i32) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0] = OWNERSHIP;
    k[1..5].copy_from_slice(&ordered_i32(partition));
    k
}

pub(crate) fn input_position(partition: i32) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0] = INPUT_POSITION;
    k[1..5].copy_from_slice(&ordered_i32(partition));
    k
}

/// The smallest key greater than every key that starts with `prefix`,
/// padded to the prefix's width.
pub(crate) fn next_prefix<const N: usize>(prefix: &[u8; N]) -> [u8; N] {
    let mut k = *prefix;
    for b in k.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return k;
        }
    }
    [0xff; N]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_sort_as_bytes() {
        let values = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        let keys: Vec<_> = values.iter().map(|v| ordered_i64(*v)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        for v in values {
            assert_eq!(from_ordered_i64(&ordered_i64(v)), v);
        }
        for v in [i32::MIN, -1, 0, 3, i32::MAX] {
            assert_eq!(from_ordered_i32(&ordered_i32(v)), v);
        }
    }

    #[test]
    fn sent_range_covers_exactly_one_campaign() {
        let r = Uuid::from_u128(1);
        let k = Uuid::from_u128(2);
        let (lo, hi) = sent_range(r, k);
        assert!(sent(r, k, Uuid::nil()) >= lo);
        assert!(sent(r, k, Uuid::max()) < hi);
        assert!(sent(r, Uuid::from_u128(3), Uuid::nil()) >= hi);
        assert!(sent(r, Uuid::from_u128(1), Uuid::max()) < lo);
    }
}
