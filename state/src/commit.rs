//! One atomic commit: every change a step of the pipeline makes, applied in a
//! single synced RocksDB write batch by [`Store::commit`](crate::Store::commit).

use uuid::Uuid;

use crate::{codec, keys, store::Table, Campaign, MirrorPosition, Ownership, Subscription};

pub(crate) enum Op {
    Put(Table, Vec<u8>, Vec<u8>),
    Delete(Table, Vec<u8>),
    DeleteRange(Table, Vec<u8>, Vec<u8>),
}

/// Changes to apply together or not at all. Building one touches no disk.
#[derive(Default)]
pub struct Commit {
    pub(crate) ops: Vec<Op>,
}

impl Commit {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn put_campaign(&mut self, campaign: &Campaign) {
        self.ops.push(Op::Put(
            Table::Campaigns,
            keys::campaign(
                campaign.action.restaurant_id,
                campaign.action.adv_campaign_id,
            )
            .to_vec(),
            codec::encode_campaign(campaign),
        ));
    }

    /// Forgets a campaign and its sent set, once it can no longer fire.
    pub fn delete_campaign(&mut self, restaurant: Uuid, campaign: Uuid) {
        self.ops.push(Op::Delete(
            Table::Campaigns,
            keys::campaign(restaurant, campaign).to_vec(),
        ));
        let (lo, hi) = keys::sent_range(restaurant, campaign);
        self.ops
            .push(Op::DeleteRange(Table::Sent, lo.to_vec(), hi.to_vec()));
    }

    /// Records that `client` has been notified of the campaign; `expires_at`
    /// (Unix seconds) is when the entry may be dropped.
    pub fn mark_sent(&mut self, restaurant: Uuid, campaign: Uuid, client: Uuid, expires_at: i64) {
        self.ops.push(Op::Put(
            Table::Sent,
            keys::sent(restaurant, campaign, client).to_vec(),
            codec::encode(&expires_at),
        ));
    }

    /// The next offset to read from an input partition.
    pub fn set_input_position(&mut self, partition: i32, next_offset: i64) {
        self.ops.push(Op::Put(
            Table::Positions,
            keys::input_position(partition).to_vec(),
            codec::encode(&next_offset),
        ));
    }

    /// The hold on `partition` this store's state of it is now.
    pub fn set_ownership(&mut self, partition: i32, ownership: Ownership) {
        self.ops.push(Op::Put(
            Table::Positions,
            keys::ownership(partition).to_vec(),
            codec::encode(&ownership),
        ));
    }

    /// The store's state of `partition` is no longer exactly a durable one.
    pub fn forget_ownership(&mut self, partition: i32) {
        self.ops.push(Op::Delete(
            Table::Positions,
            keys::ownership(partition).to_vec(),
        ));
    }

    /// Forgets the input position of `partition` and the hold on it, before
    /// its state is restored.
    pub fn release_partition(&mut self, partition: i32) {
        self.ops.push(Op::Delete(
            Table::Positions,
            keys::input_position(partition).to_vec(),
        ));
        self.ops.push(Op::Delete(
            Table::Positions,
            keys::ownership(partition).to_vec(),
        ));
    }

    pub fn put_subscription(&mut self, row: &Subscription) {
        self.ops.push(Op::Put(
            Table::Subscriptions,
            keys::sub_by_restaurant(row.restaurant_id, row.client_id, row.row_id).to_vec(),
            codec::encode(&()),
        ));
        self.ops.push(Op::Put(
            Table::Subscriptions,
            keys::sub_by_row(row.row_id).to_vec(),
            codec::encode(&(row.restaurant_id, row.client_id)),
        ));
    }

    pub fn delete_subscription(&mut self, row: &Subscription) {
        self.ops.push(Op::Delete(
            Table::Subscriptions,
            keys::sub_by_restaurant(row.restaurant_id, row.client_id, row.row_id).to_vec(),
        ));
        self.ops.push(Op::Delete(
            Table::Subscriptions,
            keys::sub_by_row(row.row_id).to_vec(),
        ));
    }

    /// Records that `client` subscribed to `restaurant` while campaigns may
    /// be under way: the pipeline tells it of those its fan-out has passed.
    /// `seq` tells markers of the same pair apart (the change's LSN).
    pub fn mark_late(&mut self, restaurant: Uuid, client: Uuid, seq: u64) {
        self.ops.push(Op::Put(
            Table::Subscriptions,
            keys::sub_late(restaurant, client, seq).to_vec(),
            codec::encode(&()),
        ));
    }

    /// The late subscriber has been handled.
    pub fn clear_late(&mut self, restaurant: Uuid, client: Uuid, seq: u64) {
        self.ops.push(Op::Delete(
            Table::Subscriptions,
            keys::sub_late(restaurant, client, seq).to_vec(),
        ));
    }

    /// Empties the mirror, for a truncate of the source or a fresh snapshot.
    pub fn clear_subscriptions(&mut self) {
        self.ops.push(Op::DeleteRange(
            Table::Subscriptions,
            vec![0x00],
            vec![0xff; 64],
        ));
    }

    pub fn set_mirror_position(&mut self, position: &MirrorPosition) {
        self.ops.push(Op::Put(
            Table::Positions,
            vec![keys::MIRROR_POSITION],
            codec::encode(position),
        ));
    }
}
