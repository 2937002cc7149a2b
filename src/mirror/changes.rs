//! The change feed's messages turned into changes of the mirror, and applied.
//!
//! [`Pending`] gathers what the feed sends (transactions of row changes, in
//! commit order) until it is applied; [`apply`] turns what was gathered into
//! one store commit with the mirror's next position. A transaction too large
//! to hold is applied in parts as it arrives: its end LSN is written only with
//! its last part, and replaying a part after a crash changes nothing twice
//! (rows are put and deleted by row id; a late marker is keyed by the
//! transaction's commit LSN).

use std::collections::HashMap;

use promo_fanout_state::{Commit, MirrorPosition, Store, StoreError, Subscription};
use uuid::Uuid;

use crate::infra::retry::Failure;
use crate::mirror::pgoutput::{self, Message, Tuple, Value};

/// The source table.
pub const TABLE: &str = "subscribers_restaurants";

/// One change to the source table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Upsert(Subscription),
    Delete(i64),
    Truncate,
}

/// A transaction's changes, or the part of them received so far.
#[derive(Debug)]
pub struct Txn {
    /// The LSN of its commit record (pgoutput's `final_lsn`): known from its
    /// first message on, and unique.
    pub commit_lsn: u64,
    /// The end of its commit record, once the commit has been received: what
    /// the mirror's position moves to.
    pub end_lsn: Option<u64>,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub changes: Vec<Change>,
}

/// Which columns of the source table hold what.
#[derive(Debug, Clone, Copy)]
struct Layout {
    id: usize,
    restaurant: usize,
    client: usize,
}

/// What the feed sent and the mirror has not applied yet: whole
/// transactions, then maybe the beginning of one still arriving.
#[derive(Debug, Default)]
pub struct Pending {
    txns: Vec<Txn>,
    changes: usize,
    /// The relations described so far; `None` for tables other than ours (a
    /// publication may hold more).
    relations: HashMap<u32, Option<Layout>>,
}

impl Pending {
    /// Changes and transactions held: what bounds the memory they take.
    pub fn len(&self) -> usize {
        self.changes + self.txns.len()
    }

    /// Nothing held, not even the start of a transaction.
    pub fn is_empty(&self) -> bool {
        self.txns.is_empty()
    }

    /// Whether a whole transaction is held.
    pub fn has_commit(&self) -> bool {
        self.txns.iter().any(|t| t.end_lsn.is_some())
    }

    pub fn begin(&mut self, commit_lsn: u64, commit_time: i64) -> Result<(), Failure> {
        if self.open().is_some() {
            return Err(Failure::Feed("a transaction began inside another".into()));
        }
        self.txns.push(Txn {
            commit_lsn,
            end_lsn: None,
            commit_time,
            changes: Vec::new(),
        });
        Ok(())
    }

    pub fn commit(&mut self, end_lsn: u64) -> Result<(), Failure> {
        let txn = self
            .open()
            .ok_or_else(|| Failure::Feed("commit without begin".into()))?;
        txn.end_lsn = Some(end_lsn);
        Ok(())
    }

    /// One `pgoutput` message of the transaction under way.
    pub fn receive(&mut self, message: Message) -> Result<(), Failure> {
        match message {
            Message::Relation {
                oid, name, columns, ..
            } => {
                self.relations.insert(oid, layout(&name, &columns)?);
            }
            Message::Begin { .. } | Message::Commit { .. } => {
                return Err(Failure::Feed("a transaction boundary inside data".into()))
            }
            Message::Other(_) => {}
            row => {
                let found = changes(row, &self.relations)?;
                let n = found.len();
                self.open()
                    .ok_or_else(|| Failure::Feed("a change outside a transaction".into()))?
                    .changes
                    .extend(found);
                self.changes += n;
            }
        }
        Ok(())
    }

    /// Everything held, to be applied; a transaction still arriving stays,
    /// without the changes taken.
    pub fn take(&mut self) -> Vec<Txn> {
        let txns = std::mem::take(&mut self.txns);
        if let Some(open) = txns.last().filter(|t| t.end_lsn.is_none()) {
            self.txns.push(Txn {
                commit_lsn: open.commit_lsn,
                end_lsn: None,
                commit_time: open.commit_time,
                changes: Vec::new(),
            });
        }
        self.changes = 0;
        txns
    }

    fn open(&mut self) -> Option<&mut Txn> {
        self.txns.last_mut().filter(|t| t.end_lsn.is_none())
    }
}

/// Where the source table keeps its columns; `None` for another table.
fn layout(name: &str, columns: &[pgoutput::Column]) -> Result<Option<Layout>, Failure> {
    if name != TABLE {
        return Ok(None);
    }
    let find = |col: &str| {
        columns
            .iter()
            .position(|c| c.name == col)
            .ok_or_else(|| Failure::Feed(format!("{TABLE} has no column {col}")))
    };
    Ok(Some(Layout {
        id: find("id")?,
        restaurant: find("restaurant_id")?,
        client: find("client_id")?,
    }))
}

/// The changes to the source table one row message makes.
fn changes(
    message: Message,
    relations: &HashMap<u32, Option<Layout>>,
) -> Result<Vec<Change>, Failure> {
    Ok(match message {
        Message::Insert { relation, new }
        | Message::Update {
            relation,
            new,
            old: None,
        } => match layout_of(relations, relation)? {
            Some(l) => vec![Change::Upsert(row(&l, &new)?)],
            None => vec![],
        },
        Message::Update {
            relation,
            new,
            old: Some(old),
        } => match layout_of(relations, relation)? {
            Some(l) => {
                let new = row(&l, &new)?;
                let old_id = row_id(&l, &old)?;
                let moved = (old_id != new.row_id).then_some(Change::Delete(old_id));
                moved.into_iter().chain([Change::Upsert(new)]).collect()
            }
            None => vec![],
        },
        Message::Delete { relation, old } => match layout_of(relations, relation)? {
            Some(l) => vec![Change::Delete(row_id(&l, &old)?)],
            None => vec![],
        },
        Message::Truncate { relations: rels } => {
            let mut ours = false;
            for r in rels {
                ours |= layout_of(relations, r)?.is_some();
            }
            if ours {
                vec![Change::Truncate]
            } else {
                vec![]
            }
        }
        _ => vec![],
    })
}

fn layout_of(
    relations: &HashMap<u32, Option<Layout>>,
    oid: u32,
) -> Result<Option<Layout>, Failure> {
    relations
        .get(&oid)
        .copied()
        .ok_or_else(|| Failure::Feed(format!("change to relation {oid} before its description")))
}

fn text<'a>(tuple: &'a Tuple, at: usize, what: &str) -> Result<&'a str, Failure> {
    match tuple.get(at) {
        Some(Value::Text(t)) => Ok(t),
        other => Err(Failure::Feed(format!(
            "{TABLE}.{what}: expected a value, got {other:?}"
        ))),
    }
}

fn row_id(l: &Layout, tuple: &Tuple) -> Result<i64, Failure> {
    let t = text(tuple, l.id, "id")?;
    t.parse()
        .map_err(|_| Failure::Feed(format!("{TABLE}.id: {t:?} is not an integer")))
}

fn row(l: &Layout, tuple: &Tuple) -> Result<Subscription, Failure> {
    let uuid = |at: usize, what: &str| -> Result<Uuid, Failure> {
        let t = text(tuple, at, what)?;
        Uuid::parse_str(t)
            .map_err(|_| Failure::Feed(format!("{TABLE}.{what}: {t:?} is not a uuid")))
    };
    Ok(Subscription {
        row_id: row_id(l, tuple)?,
        restaurant_id: uuid(l.restaurant, "restaurant_id")?,
        client_id: uuid(l.client, "client_id")?,
    })
}

/// The mirror's rows as one commit leaves them so far: the commit's own
/// changes first, then (unless it truncates) the store.
struct Rows<'a> {
    store: &'a Store,
    commit: Commit,
    touched: HashMap<i64, Option<(Uuid, Uuid)>>,
    truncated: bool,
}

impl Rows<'_> {
    fn current(&self, row: i64) -> Result<Option<(Uuid, Uuid)>, StoreError> {
        match self.touched.get(&row) {
            Some(v) => Ok(*v),
            None if self.truncated => Ok(None),
            None => Ok(self
                .store
                .subscription_row(row)?
                .map(|s| (s.restaurant_id, s.client_id))),
        }
    }

    /// Applies one change; an upsert of a late subscriber also marks it
    /// (keyed by `late`, the transaction's commit LSN).
    fn change(&mut self, change: &Change, late: Option<u64>) -> Result<(), StoreError> {
        match change {
            Change::Upsert(new) => {
                let old = self.current(new.row_id)?;
                if old == Some((new.restaurant_id, new.client_id)) {
                    return Ok(());
                }
                self.remove(new.row_id, old);
                self.commit.put_subscription(new);
                if let Some(seq) = late {
                    self.commit.mark_late(new.restaurant_id, new.client_id, seq);
                }
                self.touched
                    .insert(new.row_id, Some((new.restaurant_id, new.client_id)));
            }
            Change::Delete(id) => {
                let old = self.current(*id)?;
                self.remove(*id, old);
                self.touched.insert(*id, None);
            }
            Change::Truncate => {
                self.commit.clear_subscriptions();
                self.touched.clear();
                self.truncated = true;
            }
        }
        Ok(())
    }

    fn remove(&mut self, row_id: i64, old: Option<(Uuid, Uuid)>) {
        if let Some((restaurant_id, client_id)) = old {
            self.commit.delete_subscription(&Subscription {
                row_id,
                restaurant_id,
                client_id,
            });
        }
    }
}

/// Applies transactions (the last maybe only in part) to the mirror as one
/// commit, with the new position: the end of the last whole transaction.
/// Transactions the position already covers were applied before a crash:
/// skipped.
pub fn apply(
    store: &Store,
    txns: &[Txn],
    position: &MirrorPosition,
) -> Result<(Commit, MirrorPosition), StoreError> {
    let mut rows = Rows {
        store,
        commit: Commit::new(),
        touched: HashMap::new(),
        truncated: false,
    };
    let mut next = position.clone();
    for txn in txns {
        // A commit record that starts before the position ends before it.
        if position.lsn.is_some_and(|done| txn.commit_lsn < done) {
            continue;
        }
        // Changes the snapshot already held (before an exact hand-off, the
        // stream could start below it) notify nobody.
        let late = position
            .catch_up_until
            .is_none_or(|until| txn.commit_lsn >= until)
            .then_some(txn.commit_lsn);
        for change in &txn.changes {
            rows.change(change, late)?;
        }
        if let Some(end) = txn.end_lsn {
            next.lsn = Some(end);
        }
    }
    next.synced_at = crate::infra::clock::now();
    let mut commit = rows.commit;
    commit.set_mirror_position(&next);
    Ok((commit, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::pgoutput::Column;
    use promo_fanout_state::MirrorMode;

    fn rel() -> Message {
        Message::Relation {
            oid: 1,
            namespace: "public".into(),
            name: TABLE.into(),
            columns: ["id", "client_id", "restaurant_id"]
                .iter()
                .map(|n| Column {
                    name: n.to_string(),
                    type_oid: 0,
                })
                .collect(),
        }
    }

    fn t(id: i64, c: u128, r: u128) -> Tuple {
        vec![
            Value::Text(id.to_string()),
            Value::Text(Uuid::from_u128(c).to_string()),
            Value::Text(Uuid::from_u128(r).to_string()),
        ]
    }

    fn sub(id: i64, c: u128, r: u128) -> Subscription {
        Subscription {
            row_id: id,
            restaurant_id: Uuid::from_u128(r),
            client_id: Uuid::from_u128(c),
        }
    }

    #[test]
    fn changes_of_the_source_table_are_gathered_in_order() {
        let mut pending = Pending::default();
        pending.receive(rel()).unwrap();
        pending
            .receive(Message::Relation {
                oid: 2,
                namespace: "public".into(),
                name: "other".into(),
                columns: vec![],
            })
            .unwrap();
        pending.begin(9, 0).unwrap();
        for m in [
            Message::Insert {
                relation: 1,
                new: t(1, 5, 6),
            },
            Message::Insert {
                relation: 2,
                new: vec![],
            },
            Message::Update {
                relation: 1,
                old: Some(t(1, 0, 0)),
                new: t(2, 5, 7),
            },
            Message::Delete {
                relation: 1,
                old: t(2, 0, 0),
            },
            Message::Truncate {
                relations: vec![2, 1],
            },
        ] {
            pending.receive(m).unwrap();
        }
        assert!(!pending.has_commit());
        pending.commit(10).unwrap();
        assert!(pending.has_commit());
        assert_eq!(pending.len(), 5 + 1);
        let txns = pending.take();
        assert!(pending.is_empty());
        assert_eq!(txns.len(), 1);
        assert_eq!((txns[0].commit_lsn, txns[0].end_lsn), (9, Some(10)));
        assert_eq!(
            txns[0].changes,
            vec![
                Change::Upsert(sub(1, 5, 6)),
                Change::Delete(1),
                Change::Upsert(sub(2, 5, 7)),
                Change::Delete(2),
                Change::Truncate,
            ]
        );
    }

    #[test]
    fn a_transaction_taken_in_parts_keeps_its_place() {
        let mut pending = Pending::default();
        pending.receive(rel()).unwrap();
        pending.begin(7, 0).unwrap();
        let insert = |id| Message::Insert {
            relation: 1,
            new: t(id, 1, 2),
        };
        pending.receive(insert(1)).unwrap();
        let first = pending.take();
        assert_eq!((first[0].end_lsn, first[0].changes.len()), (None, 1));
        assert!(!pending.is_empty(), "the transaction is still under way");
        pending.receive(insert(2)).unwrap();
        pending.commit(8).unwrap();
        let rest = pending.take();
        assert_eq!((rest[0].commit_lsn, rest[0].end_lsn), (7, Some(8)));
        assert_eq!(rest[0].changes, vec![Change::Upsert(sub(2, 1, 2))]);
    }

    #[test]
    fn a_change_before_its_relation_or_outside_a_transaction_is_an_error() {
        let mut pending = Pending::default();
        pending.begin(5, 0).unwrap();
        let insert = Message::Insert {
            relation: 9,
            new: vec![],
        };
        assert!(pending.receive(insert.clone()).is_err());
        let mut outside = Pending::default();
        outside.receive(rel()).unwrap();
        let ours = Message::Insert {
            relation: 1,
            new: t(1, 1, 1),
        };
        assert!(outside.receive(ours).is_err());
        assert!(outside.commit(3).is_err());
    }

    #[test]
    fn replays_are_idempotent_and_catch_up_notifies_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            &promo_fanout_state::Identity {
                group_id: "g".into(),
                input_topic: "t".into(),
            },
        )
        .unwrap();
        let txns = vec![
            Txn {
                commit_lsn: 9,
                end_lsn: Some(10),
                commit_time: 0,
                changes: vec![Change::Upsert(sub(1, 1, 9)), Change::Upsert(sub(2, 2, 9))],
            },
            Txn {
                commit_lsn: 19,
                end_lsn: Some(20),
                commit_time: 0,
                changes: vec![Change::Delete(1), Change::Upsert(sub(3, 3, 9))],
            },
        ];
        let start = MirrorPosition {
            mode: MirrorMode::Cdc,
            snapshot_complete: true,
            lsn: Some(5),
            slot: Some("s".into()),
            catch_up_until: Some(15),
            synced_at: 0,
        };
        let (commit, next) = apply(&store, &txns, &start).unwrap();
        store.commit(commit).unwrap();
        assert_eq!(next.lsn, Some(20));
        let rows: Vec<i64> = store
            .subscription_rows()
            .map(|s| s.unwrap().row_id)
            .collect();
        assert_eq!(rows, vec![2, 3]);
        // Only the transaction past the snapshot marks a late subscriber.
        let late = store.late_subscribers(10).unwrap();
        assert_eq!(late, vec![(Uuid::from_u128(9), Uuid::from_u128(3), 19)]);

        // The same feed again, as after a crash before the slot moved.
        let (commit, again) = apply(&store, &txns, &start).unwrap();
        store.commit(commit).unwrap();
        assert_eq!(again.lsn, Some(20));
        let rows: Vec<i64> = store
            .subscription_rows()
            .map(|s| s.unwrap().row_id)
            .collect();
        assert_eq!(rows, vec![2, 3]);
        assert_eq!(store.late_subscribers(10).unwrap().len(), 1);

        // Transactions the position covers are skipped.
        let (commit, same) = apply(&store, &txns[..1], &next).unwrap();
        assert_eq!(same.lsn, Some(20));
        store.commit(commit).unwrap();
        assert_eq!(store.subscription_rows().count(), 2);
    }
}
