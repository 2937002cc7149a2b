//! The state store as its users see it: what is committed is read back, survives
//! a reopen, and a store that is not ours is refused with a clear error.

use promo_fanout_state::{
    Action, Campaign, Commit, Entry, Identity, MirrorMode, MirrorPosition, Origin, Progress, Store,
    StoreError, Subscription, Table,
};
use uuid::Uuid;

fn identity() -> Identity {
    Identity {
        group_id: "g".into(),
        input_topic: "t".into(),
    }
}

fn campaign(r: u128, k: u128) -> Campaign {
    Campaign {
        action: Action {
            restaurant_id: Uuid::from_u128(r),
            adv_campaign_id: Uuid::from_u128(k),
            adv_campaign_content: "two for one".into(),
            adv_campaign_owner: Some("Ivan".into()),
            adv_campaign_owner_contact: None,
            adv_campaign_datetime_start: 100,
            adv_campaign_datetime_end: 200,
            datetime_created: 90,
        },
        progress: Progress::After(Uuid::from_u128(7)),
        origin: Some(Origin {
            partition: 3,
            offset: 41,
        }),
    }
}

fn sub(row_id: i64, r: u128, c: u128) -> Subscription {
    Subscription {
        row_id,
        restaurant_id: Uuid::from_u128(r),
        client_id: Uuid::from_u128(c),
    }
}

#[test]
fn committed_state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), &identity()).unwrap();
        let mut c = Commit::new();
        c.put_campaign(&campaign(1, 2));
        c.mark_sent(
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            Uuid::from_u128(3),
            200,
        );
        c.set_input_position(0, 42);
        c.set_input_position(3, 7);
        c.put_subscription(&sub(5, 1, 3));
        c.set_mirror_position(&MirrorPosition {
            mode: MirrorMode::Refresh,
            snapshot_complete: true,
            lsn: None,
            slot: None,
            catch_up_until: None,
            synced_at: 11,
        });
        store.commit(c).unwrap();
    }
    let store = Store::open(dir.path(), &identity()).unwrap();
    assert_eq!(store.campaigns().unwrap(), vec![campaign(1, 2)]);
    assert!(store
        .is_sent(Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3))
        .unwrap());
    assert!(!store
        .is_sent(Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(4))
        .unwrap());
    let positions = store.input_positions().unwrap();
    assert_eq!(
        positions.into_iter().collect::<Vec<_>>(),
        vec![(0, 42), (3, 7)]
    );
    assert_eq!(store.subscription_row(5).unwrap(), Some(sub(5, 1, 3)));
    assert!(store.mirror_position().unwrap().unwrap().snapshot_complete);
}

#[test]
fn subscribers_are_distinct_ordered_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &identity()).unwrap();
    let mut c = Commit::new();
    // Client 3 stands in two rows; restaurant 2 and u128::MAX are neighbours
    // that must not leak into restaurant 1's scan.
    for s in [
        sub(1, 1, 5),
        sub(2, 1, 3),
        sub(3, 1, 3),
        sub(4, 1, 9),
        sub(5, 2, 4),
        sub(6, 0, 1),
        sub(7, u128::MAX, 8),
    ] {
        c.put_subscription(&s);
    }
    store.commit(c).unwrap();
    let r1 = Uuid::from_u128(1);
    let all: Vec<Uuid> = store.subscribers(r1, None).map(Result::unwrap).collect();
    assert_eq!(all, [3u128, 5, 9].map(Uuid::from_u128));
    let rest: Vec<Uuid> = store
        .subscribers(r1, Some(Uuid::from_u128(3)))
        .map(Result::unwrap)
        .collect();
    assert_eq!(rest, [5u128, 9].map(Uuid::from_u128));
    let max: Vec<Uuid> = store
        .subscribers(Uuid::max(), None)
        .map(Result::unwrap)
        .collect();
    assert_eq!(max, vec![Uuid::from_u128(8)]);

    // Deleting one of client 3's two rows keeps it subscribed; both, not.
    let mut c = Commit::new();
    c.delete_subscription(&sub(2, 1, 3));
    store.commit(c).unwrap();
    assert!(store.is_subscribed(r1, Uuid::from_u128(3)).unwrap());
    let mut c = Commit::new();
    c.delete_subscription(&sub(3, 1, 3));
    store.commit(c).unwrap();
    assert!(!store.is_subscribed(r1, Uuid::from_u128(3)).unwrap());
    let rows: Vec<i64> = store
        .subscription_rows()
        .map(|r| r.unwrap().row_id)
        .collect();
    assert_eq!(rows, vec![1, 4, 5, 6, 7]);
}

#[test]
fn deleting_a_campaign_forgets_only_its_sent_set() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &identity()).unwrap();
    let (r, k, other) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
    let mut c = Commit::new();
    c.put_campaign(&campaign(1, 2));
    c.put_campaign(&campaign(1, 3));
    for client in [Uuid::nil(), Uuid::from_u128(5), Uuid::max()] {
        c.mark_sent(r, k, client, 1);
        c.mark_sent(r, other, client, 1);
    }
    store.commit(c).unwrap();
    let mut c = Commit::new();
    c.delete_campaign(r, k);
    store.commit(c).unwrap();
    assert_eq!(store.campaigns().unwrap(), vec![campaign(1, 3)]);
    let clients = [Uuid::nil(), Uuid::from_u128(5), Uuid::max()];
    assert_eq!(store.sent_flags(r, k, &clients).unwrap(), [false; 3]);
    assert_eq!(store.sent_flags(r, other, &clients).unwrap(), [true; 3]);
}

#[test]
fn a_store_of_another_pipeline_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), &identity()).unwrap());
    let other = Identity {
        group_id: "other".into(),
        input_topic: "t".into(),
    };
    let err = Store::open(dir.path(), &other).err().unwrap();
    assert!(matches!(err, StoreError::ForeignStore { .. }), "{err}");
    assert!(err.to_string().contains("\"other\""), "{err}");
}

#[test]
fn a_store_of_another_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), &identity()).unwrap());
    {
        // Write a future schema version the way a newer build would.
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(false);
        let cfs = ["subscriptions", "campaigns", "sent", "positions", "meta"];
        let db = rocksdb::DB::open_cf(&opts, dir.path(), cfs).unwrap();
        let mut v = vec![1u8];
        v.extend(bincode::serde::encode_to_vec(99u32, bincode::config::standard()).unwrap());
        db.put_cf(db.cf_handle("meta").unwrap(), b"schema_version", v)
            .unwrap();
    }
    let err = Store::open(dir.path(), &identity()).err().unwrap();
    assert!(
        matches!(err, StoreError::SchemaVersion { found: 99, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("with an empty --state-dir"),
        "{err}"
    );
}

#[test]
fn a_directory_that_is_not_a_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("CURRENT"), b"garbage\n").unwrap();
    let err = Store::open(dir.path(), &identity()).err().unwrap();
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
}

#[test]
fn a_secondary_reads_what_the_primary_commits_while_it_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let primary = Store::open(dir.path(), &identity()).unwrap();
    let mut c = Commit::new();
    c.put_campaign(&campaign(1, 2));
    c.set_input_position(1, 10);
    primary.commit(c).unwrap();

    let secondary = Store::open_secondary(dir.path(), scratch.path()).unwrap();
    let tables: Vec<&str> = Table::ALL
        .iter()
        .flat_map(|t| secondary.dump(*t).map(|e| e.unwrap()))
        .map(|e| match e {
            Entry::Subscriptions(_) => "subscriptions",
            Entry::Campaigns(_) => "campaigns",
            Entry::Sent { .. } => "sent",
            Entry::Positions(_) => "positions",
            Entry::Meta(_) => "meta",
        })
        .collect();
    assert_eq!(tables, ["campaigns", "positions", "meta", "meta"]);
}

#[test]
fn late_subscribers_are_listed_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &identity()).unwrap();
    let (r, c1, c2) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
    let mut c = Commit::new();
    c.put_subscription(&sub(7, 1, 2));
    c.mark_late(r, c2, 9);
    c.mark_late(r, c1, 5);
    c.mark_late(r, c1, 8);
    store.commit(c).unwrap();
    assert_eq!(
        store.late_subscribers(10).unwrap(),
        vec![(r, c1, 5), (r, c1, 8), (r, c2, 9)]
    );
    assert_eq!(store.late_subscribers(1).unwrap(), vec![(r, c1, 5)]);
    let mut c = Commit::new();
    c.clear_late(r, c1, 5);
    store.commit(c).unwrap();
    // A newer marker of the same pair survives the older one's clearing.
    assert_eq!(
        store.late_subscribers(10).unwrap(),
        vec![(r, c1, 8), (r, c2, 9)]
    );
    // The markers live beside the mirror but are not subscriptions.
    assert_eq!(store.subscription_rows().count(), 1);
}
