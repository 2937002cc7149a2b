//! The decisions, as pure functions over a view of the state: is a campaign
//! eligible, who receives it next, has a client had it already. No I/O here
//! beyond the [`StateView`] reads, so all of it is tested without Kafka or
//! Postgres.

use std::collections::BTreeMap;
use std::sync::Arc;

use promo_fanout_state::{Campaign, Origin, Progress, Store, StoreError};
use uuid::Uuid;

use crate::action::Action;

/// (restaurant, campaign): a campaign's identity.
pub type CampaignKey = (Uuid, Uuid);

pub fn key_of(c: &Campaign) -> CampaignKey {
    (c.action.restaurant_id, c.action.adv_campaign_id)
}

/// Where a campaign stands at processing time `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// `now < start`: kept and fanned out when it starts.
    Scheduled,
    /// `start <= now <= end - margin`.
    Eligible,
    /// `now > end - margin`, or a window that closes before it opens.
    Expired,
}

pub fn timing(start: i64, end: i64, now: i64, margin: i64) -> Timing {
    let last = end.saturating_sub(margin);
    if now > last || start > last {
        Timing::Expired
    } else if now < start {
        Timing::Scheduled
    } else {
        Timing::Eligible
    }
}

pub fn campaign_timing(c: &Campaign, now: i64, margin: i64) -> Timing {
    timing(
        c.action.adv_campaign_datetime_start,
        c.action.adv_campaign_datetime_end,
        now,
        margin,
    )
}

/// Whether `c` has subscribers left to notify now: eligible, fan-out not done.
pub fn awaits_fan_out(c: &Campaign, now: i64, margin: i64) -> bool {
    c.progress != Progress::Done && campaign_timing(c, now, margin) == Timing::Eligible
}

/// A repeated or updated action takes its new content and times; how far the
/// fan-out has got is kept, so nobody is notified twice.
pub fn merge(existing: Option<&Campaign>, arrival: &Arrival) -> Campaign {
    Campaign {
        action: arrival.action.clone(),
        progress: existing.map_or(Progress::NotStarted, |c| c.progress),
        origin: Some(arrival.origin),
    }
}

/// A valid action as it arrived, and the input message that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub action: Action,
    pub origin: Origin,
}

/// The reads the decisions need: the mirror and the sent set.
pub trait StateView {
    /// Distinct subscribers of `restaurant` in client order, after `after`.
    fn subscribers_after(
        &self,
        restaurant: Uuid,
        after: Option<Uuid>,
    ) -> Box<dyn Iterator<Item = Result<Uuid, StoreError>> + '_>;

    /// Whether each client has been notified of the campaign already.
    fn sent_flags(
        &self,
        restaurant: Uuid,
        campaign: Uuid,
        clients: &[Uuid],
    ) -> Result<Vec<bool>, StoreError>;

    /// Whether the client is subscribed to the restaurant now.
    fn is_subscribed(&self, restaurant: Uuid, client: Uuid) -> Result<bool, StoreError>;
}

impl StateView for Store {
    fn subscribers_after(
        &self,
        restaurant: Uuid,
        after: Option<Uuid>,
    ) -> Box<dyn Iterator<Item = Result<Uuid, StoreError>> + '_> {
        Box::new(self.subscribers(restaurant, after))
    }

    fn sent_flags(
        &self,
        restaurant: Uuid,
        campaign: Uuid,
        clients: &[Uuid],
    ) -> Result<Vec<bool>, StoreError> {
        Store::sent_flags(self, restaurant, campaign, clients)
    }

    fn is_subscribed(&self, restaurant: Uuid, client: Uuid) -> Result<bool, StoreError> {
        Store::is_subscribed(self, restaurant, client)
    }
}

/// One bounded step of a campaign's fan-out.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Subscribers scanned in this step that have not had the campaign.
    pub recipients: Vec<Uuid>,
    /// Progress once this step is committed.
    pub progress: Progress,
}

/// Scans at most `limit` subscribers past the campaign's progress and keeps
/// those not yet notified. Work per call is bounded by `limit`, however many
/// subscribers the restaurant has.
pub fn next_chunk<V: StateView + ?Sized>(
    view: &V,
    campaign: &Campaign,
    limit: usize,
) -> Result<Chunk, StoreError> {
    let after = match campaign.progress {
        Progress::Done => {
            return Ok(Chunk {
                recipients: Vec::new(),
                progress: Progress::Done,
            })
        }
        Progress::NotStarted => None,
        Progress::After(c) => Some(c),
    };
    let scanned = view
        .subscribers_after(campaign.action.restaurant_id, after)
        .take(limit.max(1))
        .collect::<Result<Vec<Uuid>, _>>()?;
    let progress = match scanned.last() {
        Some(last) if scanned.len() == limit.max(1) => Progress::After(*last),
        _ => Progress::Done,
    };
    let a = &campaign.action;
    let sent = view.sent_flags(a.restaurant_id, a.adv_campaign_id, &scanned)?;
    let recipients = scanned
        .into_iter()
        .zip(sent)
        .filter_map(|(c, sent)| (!sent).then_some(c))
        .collect();
    Ok(Chunk {
        recipients,
        progress,
    })
}

/// One notification to make: the campaign as stored, the client, and when it
/// was produced.
#[derive(Debug, Clone)]
pub struct Notification {
    pub campaign: Arc<Campaign>,
    pub client_id: Uuid,
    pub trigger_datetime_created: i64,
}

/// What a batch's input did, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub eligible: u64,
    pub scheduled: u64,
    pub expired: u64,
    pub updated: u64,
}

/// Everything one batch decided: campaign changes and notifications. Applied to
/// the sinks and the store by the checkpoint, never partly.
#[derive(Debug, Default)]
pub struct Plan {
    pub puts: BTreeMap<CampaignKey, Arc<Campaign>>,
    pub deletes: Vec<CampaignKey>,
    pub notifications: Vec<Notification>,
    pub tally: Tally,
    /// Where the next batch's fan-out starts, so that one hot campaign does
    /// not starve the others.
    pub next_turn: Option<CampaignKey>,
}

/// The campaigns a planner knows: shared with the batches in flight, never
/// copied.
pub type Campaigns = BTreeMap<CampaignKey, Arc<Campaign>>;

/// The decisions' parameters.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Unix seconds at processing time.
    pub now: i64,
    /// Seconds before the end at which a campaign stops being eligible.
    pub margin: i64,
    /// Seconds after the end at which a campaign and its sent set are dropped.
    pub retention: i64,
    /// Notifications per batch at most.
    pub budget: usize,
}

/// Decides a batch: merges the actions into the campaigns, then walks the
/// eligible campaigns (starting at `turn`) for at most `rules.budget`
/// notifications.
pub fn plan<V: StateView + ?Sized>(
    view: &V,
    campaigns: &Campaigns,
    arrivals: &[Arrival],
    rules: Rules,
    turn: Option<CampaignKey>,
) -> Result<Plan, StoreError> {
    let mut plan = Plan::default();
    for arrival in arrivals {
        plan.take(campaigns, arrival, &rules);
    }
    // Every known campaign, with this batch's changes over the stored ones,
    // in key order starting at `turn`.
    let mut all: BTreeMap<CampaignKey, &Arc<Campaign>> =
        campaigns.iter().map(|(k, v)| (*k, v)).collect();
    for (k, v) in &plan.puts {
        all.insert(*k, v);
    }
    let (before, from): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(k, _)| turn.is_some_and(|t| *k <= t));
    let order: Vec<(CampaignKey, Arc<Campaign>)> = from
        .into_iter()
        .chain(before)
        .map(|(k, c)| (k, c.clone()))
        .collect();

    let mut budget = rules.budget;
    for (key, campaign) in order {
        match campaign_timing(&campaign, rules.now, rules.margin) {
            Timing::Eligible if campaign.progress != Progress::Done && budget > 0 => {
                let chunk = next_chunk(view, &campaign, budget)?;
                budget = budget.saturating_sub(chunk.recipients.len().max(1));
                plan.fan_out(key, &campaign, chunk, rules.now);
            }
            Timing::Expired
                if rules.now
                    > campaign
                        .action
                        .adv_campaign_datetime_end
                        .saturating_add(rules.retention) =>
            {
                plan.puts.remove(&key);
                plan.deletes.push(key);
            }
            _ => {}
        }
    }
    Ok(plan)
}

impl Plan {
    /// Merges one arrival into the campaigns as this plan leaves them.
    fn take(&mut self, campaigns: &Campaigns, arrival: &Arrival, rules: &Rules) {
        let a = &arrival.action;
        let key = (a.restaurant_id, a.adv_campaign_id);
        let existing = self.puts.get(&key).or_else(|| campaigns.get(&key));
        let t = timing(
            a.adv_campaign_datetime_start,
            a.adv_campaign_datetime_end,
            rules.now,
            rules.margin,
        );
        match (existing, t) {
            (None, Timing::Expired) => self.tally.expired += 1,
            (Some(_), _) => self.tally.updated += 1,
            (None, Timing::Scheduled) => self.tally.scheduled += 1,
            (None, _) => self.tally.eligible += 1,
        }
        if existing.is_some() || t != Timing::Expired {
            let merged = merge(existing.map(|c| &**c), arrival);
            self.puts.insert(key, Arc::new(merged));
        }
    }

    /// One chunk of a campaign's fan-out: its notifications, and the
    /// campaign with its progress moved on.
    fn fan_out(&mut self, key: CampaignKey, campaign: &Campaign, chunk: Chunk, now: i64) {
        let moved = Arc::new(Campaign {
            progress: chunk.progress,
            ..campaign.clone()
        });
        self.notifications
            .extend(chunk.recipients.into_iter().map(|client_id| Notification {
                campaign: moved.clone(),
                client_id,
                trigger_datetime_created: now,
            }));
        self.puts.insert(key, moved);
        self.next_turn = Some(key);
    }
}

/// Late subscribers: clients the mirror saw subscribe (`markers`: restaurant,
/// client, marker) after the fan-out of a campaign had passed their place in
/// it. Each still subscribed gets every eligible campaign of the restaurant
/// whose fan-out is past them and that they have not had (neither recorded
/// in the sent set nor `in_flight`); campaigns whose fan-out has yet to
/// reach them will reach them anyway.
pub fn late<V: StateView + ?Sized>(
    view: &V,
    campaigns: &Campaigns,
    markers: &[(Uuid, Uuid, u64)],
    rules: &Rules,
    in_flight: impl Fn(&CampaignKey, Uuid) -> bool,
) -> Result<Vec<Notification>, StoreError> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (r, c, _) in markers {
        if !seen.insert((*r, *c)) || !view.is_subscribed(*r, *c)? {
            continue;
        }
        for ((_, k), campaign) in campaigns.range((*r, Uuid::nil())..=(*r, Uuid::max())) {
            let passed = match campaign.progress {
                Progress::Done => true,
                Progress::After(last) => *c <= last,
                Progress::NotStarted => false,
            };
            if !passed
                || campaign_timing(campaign, rules.now, rules.margin) != Timing::Eligible
                || in_flight(&(*r, *k), *c)
                || view.sent_flags(*r, *k, &[*c])?[0]
            {
                continue;
            }
            out.push(Notification {
                campaign: campaign.clone(),
                client_id: *c,
                trigger_datetime_created: rules.now,
            });
        }
    }
    Ok(out)
}

impl Plan {
    /// Whether committing this plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty() && self.notifications.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The state as plain collections.
    #[derive(Default)]
    struct Memory {
        subs: BTreeSet<(Uuid, Uuid)>,
        sent: BTreeSet<(Uuid, Uuid, Uuid)>,
    }

    impl StateView for Memory {
        fn subscribers_after(
            &self,
            restaurant: Uuid,
            after: Option<Uuid>,
        ) -> Box<dyn Iterator<Item = Result<Uuid, StoreError>> + '_> {
            Box::new(
                self.subs
                    .iter()
                    .filter(move |(r, c)| *r == restaurant && after.is_none_or(|a| *c > a))
                    .map(|(_, c)| Ok(*c)),
            )
        }

        fn sent_flags(&self, r: Uuid, k: Uuid, clients: &[Uuid]) -> Result<Vec<bool>, StoreError> {
            Ok(clients
                .iter()
                .map(|c| self.sent.contains(&(r, k, *c)))
                .collect())
        }

        fn is_subscribed(&self, r: Uuid, c: Uuid) -> Result<bool, StoreError> {
            Ok(self.subs.contains(&(r, c)))
        }
    }

    fn u(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn action(r: u128, k: u128, start: i64, end: i64) -> Arrival {
        Arrival {
            action: Action {
                restaurant_id: u(r),
                adv_campaign_id: u(k),
                adv_campaign_content: "deal".into(),
                adv_campaign_owner: None,
                adv_campaign_owner_contact: None,
                adv_campaign_datetime_start: start,
                adv_campaign_datetime_end: end,
                datetime_created: start,
            },
            origin: Origin {
                partition: 0,
                offset: k as i64,
            },
        }
    }

    fn rules(now: i64) -> Rules {
        Rules {
            now,
            margin: 600,
            retention: 3600,
            budget: 100,
        }
    }

    #[test]
    fn timing_follows_the_window_and_the_margin() {
        assert_eq!(timing(100, 2000, 50, 600), Timing::Scheduled);
        assert_eq!(timing(100, 2000, 100, 600), Timing::Eligible);
        assert_eq!(timing(100, 2000, 1400, 600), Timing::Eligible);
        assert_eq!(timing(100, 2000, 1401, 600), Timing::Expired);
        assert_eq!(timing(100, 2000, 2000, 0), Timing::Eligible);
        assert_eq!(timing(100, 2000, 2001, 0), Timing::Expired);
        // Opens after it closes: it can never fire.
        assert_eq!(timing(1500, 2000, 50, 600), Timing::Expired);
    }

    #[test]
    fn an_eligible_action_reaches_every_distinct_subscriber_once() {
        let mut m = Memory::default();
        m.subs.extend([(u(1), u(10)), (u(1), u(11)), (u(2), u(10))]);
        let p = plan(
            &m,
            &BTreeMap::new(),
            &[action(1, 5, 0, 10_000)],
            rules(100),
            None,
        )
        .unwrap();
        let clients: Vec<Uuid> = p.notifications.iter().map(|n| n.client_id).collect();
        assert_eq!(clients, vec![u(10), u(11)]);
        assert_eq!(p.puts[&(u(1), u(5))].progress, Progress::Done);
        assert_eq!(p.tally.eligible, 1);
    }

    #[test]
    fn expired_and_scheduled_actions_notify_nobody() {
        let mut m = Memory::default();
        m.subs.insert((u(1), u(10)));
        let actions = [action(1, 5, 0, 500), action(1, 6, 1000, 10_000)];
        let p = plan(&m, &BTreeMap::new(), &actions, rules(100), None).unwrap();
        assert!(p.notifications.is_empty());
        assert_eq!(p.tally.expired, 1);
        assert_eq!(p.tally.scheduled, 1);
        // The expired one is not kept; the scheduled one is, unstarted.
        assert_eq!(p.puts.len(), 1);
        assert_eq!(p.puts[&(u(1), u(6))].progress, Progress::NotStarted);
    }

    #[test]
    fn a_scheduled_campaign_fires_once_it_starts() {
        let mut m = Memory::default();
        m.subs.insert((u(1), u(10)));
        let p = plan(
            &m,
            &BTreeMap::new(),
            &[action(1, 6, 1000, 10_000)],
            rules(100),
            None,
        )
        .unwrap();
        let stored = p.puts.clone();
        let later = plan(&m, &stored, &[], rules(1000), None).unwrap();
        assert_eq!(later.notifications.len(), 1);
        assert_eq!(later.notifications[0].trigger_datetime_created, 1000);
    }

    #[test]
    fn a_repeated_action_notifies_nobody_again() {
        let mut m = Memory::default();
        m.subs.insert((u(1), u(10)));
        let first = plan(
            &m,
            &BTreeMap::new(),
            &[action(1, 5, 0, 10_000)],
            rules(100),
            None,
        )
        .unwrap();
        m.sent.insert((u(1), u(5), u(10)));
        let mut updated = action(1, 5, 0, 20_000);
        updated.action.adv_campaign_content = "now two for one".into();
        updated.origin = Origin {
            partition: 2,
            offset: 77,
        };
        let again = plan(&m, &first.puts, &[updated.clone()], rules(200), None).unwrap();
        assert!(again.notifications.is_empty());
        assert_eq!(again.tally.updated, 1);
        let stored = &again.puts[&(u(1), u(5))];
        assert_eq!(stored.action, updated.action);
        // The campaign comes from the latest message that carried it.
        assert_eq!(stored.origin, Some(updated.origin));
    }

    #[test]
    fn a_large_fan_out_goes_in_bounded_chunks_that_resume() {
        let mut m = Memory::default();
        m.subs.extend((0..250).map(|c| (u(1), u(1000 + c))));
        let mut stored = BTreeMap::new();
        let mut seen = Vec::new();
        let mut actions = vec![action(1, 5, 0, 10_000)];
        for _ in 0..4 {
            let p = plan(&m, &stored, &actions, rules(100), None).unwrap();
            assert!(p.notifications.len() <= 100);
            for n in &p.notifications {
                m.sent.insert((u(1), u(5), n.client_id));
                seen.push(n.client_id);
            }
            stored.extend(p.puts);
            actions.clear();
        }
        assert_eq!(seen.len(), 250);
        assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 250);
        assert_eq!(stored[&(u(1), u(5))].progress, Progress::Done);
    }

    #[test]
    fn clients_already_sent_are_skipped_within_a_chunk() {
        let mut m = Memory::default();
        m.subs.extend([(u(1), u(10)), (u(1), u(11)), (u(1), u(12))]);
        m.sent.insert((u(1), u(5), u(11)));
        let c = merge(None, &action(1, 5, 0, 10_000));
        let chunk = next_chunk(&m, &c, 10).unwrap();
        assert_eq!(chunk.recipients, vec![u(10), u(12)]);
        assert_eq!(chunk.progress, Progress::Done);
    }

    #[test]
    fn the_budget_is_shared_fairly_between_campaigns() {
        let mut m = Memory::default();
        m.subs.extend((0..300).map(|c| (u(1), u(1000 + c))));
        m.subs.extend((0..300).map(|c| (u(2), u(1000 + c))));
        let actions = [action(1, 5, 0, 10_000), action(2, 6, 0, 10_000)];
        let first = plan(&m, &BTreeMap::new(), &actions, rules(100), None).unwrap();
        assert!(first
            .notifications
            .iter()
            .all(|n| n.campaign.action.restaurant_id == u(1)));
        let second = plan(&m, &first.puts, &[], rules(100), first.next_turn).unwrap();
        assert!(second
            .notifications
            .iter()
            .all(|n| n.campaign.action.restaurant_id == u(2)));
    }

    #[test]
    fn a_campaign_long_past_its_end_is_dropped() {
        let m = Memory::default();
        let mut stored = BTreeMap::new();
        let c = merge(None, &action(1, 5, 0, 1000));
        stored.insert(key_of(&c), Arc::new(c));
        let soon = plan(&m, &stored, &[], rules(2000), None).unwrap();
        assert!(soon.deletes.is_empty());
        let late = plan(&m, &stored, &[], rules(1000 + 3601), None).unwrap();
        assert_eq!(late.deletes, vec![(u(1), u(5))]);
    }

    #[test]
    fn a_late_subscriber_gets_the_campaigns_the_fan_out_has_passed() {
        let mut view = Memory::default();
        let now = 1_000_000;
        let live = |k: u128, progress| Campaign {
            progress,
            ..merge(None, &action(1, k, now - 60, now + 3600))
        };
        let mut campaigns = BTreeMap::new();
        for c in [
            live(10, Progress::Done),
            live(11, Progress::After(u(5))),
            live(12, Progress::After(u(9))),
            live(13, Progress::NotStarted),
        ] {
            campaigns.insert(key_of(&c), Arc::new(c));
        }
        let over = Campaign {
            progress: Progress::Done,
            ..merge(None, &action(1, 14, now - 7200, now - 60))
        };
        campaigns.insert(key_of(&over), Arc::new(over));
        view.subs.insert((u(1), u(7)));
        view.sent.insert((u(1), u(12), u(7)));
        let markers = [(u(1), u(7), 3), (u(1), u(7), 4), (u(1), u(8), 5)];
        let got = late(&view, &campaigns, &markers, &rules(now), |_, _| false).unwrap();
        let got: Vec<(Uuid, Uuid)> = got
            .iter()
            .map(|n| (n.campaign.action.adv_campaign_id, n.client_id))
            .collect();
        // 10 is done; 11 passed 5 < 7 so its scan will reach 7; 12 was sent;
        // 13 has not started; 14 is over; client 8 unsubscribed again.
        assert_eq!(got, vec![(u(10), u(7))]);
        // A batch in flight notifies (10, 7) already.
        let in_flight = |k: &CampaignKey, c: Uuid| *k == (u(1), u(10)) && c == u(7);
        let got = late(&view, &campaigns, &markers, &rules(now), in_flight).unwrap();
        assert!(got.is_empty());
    }
}
