//! Fair dispatch decisions, as plain data and functions: how much of the
//! dispatch window each tier gets (by weight, with a guaranteed minimum
//! share, and work-conserving), and how a tier's share is split across its
//! tenants, max-min fair on tasks in flight, within each tenant's in-flight
//! quota and dispatch-rate token bucket.

use std::collections::HashMap;
use std::time::Instant;

use uuid::Uuid;
use ward_store::{ActiveTenant, Pick, TierSpec};

/// Why a tenant with ready work got nothing this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Throttle {
    /// Its in-flight tasks reached `inflight_max`.
    Inflight,
    /// Its dispatch-rate tokens ran out.
    Rate,
}

impl Throttle {
    pub fn as_str(self) -> &'static str {
        match self {
            Throttle::Inflight => "inflight",
            Throttle::Rate => "rate",
        }
    }
}

/// The window each tier with work may fill: first each busy tier's
/// guaranteed `min_share_percent` of the whole, then the rest by weight
/// among the busy tiers (rounding remainders to the heaviest). Idle tiers
/// get nothing, so their share goes to the others (work-conserving).
pub fn tier_windows(tiers: &[TierSpec], busy: &[&str], window_max: i64) -> HashMap<String, i64> {
    let mut busy_tiers: Vec<&TierSpec> = tiers
        .iter()
        .filter(|tier| busy.contains(&tier.name.as_str()))
        .collect();
    busy_tiers.sort_by_key(|tier| std::cmp::Reverse(tier.weight));
    let floors: Vec<i64> = busy_tiers
        .iter()
        .map(|tier| (window_max * i64::from(tier.min_share_percent.clamp(0, 100)) + 99) / 100)
        .collect();
    let reserved: i64 = floors.iter().sum();
    let rest = (window_max - reserved).max(0);
    let weight_sum: i64 = busy_tiers
        .iter()
        .map(|tier| i64::from(tier.weight.max(1)))
        .sum();
    let mut windows: Vec<i64> = busy_tiers
        .iter()
        .zip(&floors)
        .map(|(tier, floor)| floor + rest * i64::from(tier.weight.max(1)) / weight_sum.max(1))
        .collect();
    let given: i64 = windows.iter().sum();
    if let Some(heaviest) = windows.first_mut() {
        *heaviest += (window_max - given).max(0);
    }
    busy_tiers
        .iter()
        .zip(windows)
        .map(|(tier, window)| (tier.name.clone(), window.max(1)))
        .collect()
}

/// A tenant's dispatch-rate token bucket (burst: one second's worth).
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    pub tokens: f64,
    pub refilled_at: Instant,
}

impl Bucket {
    pub fn full(rate_per_s: i32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate_per_s.max(1)),
            refilled_at: now,
        }
    }

    pub fn refill(&mut self, rate_per_s: i32, now: Instant) {
        let rate = f64::from(rate_per_s.max(1));
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + rate * elapsed).min(rate);
        self.refilled_at = now;
    }
}

/// Per-tenant fairness state that outlives one round; bounded by the
/// number of tenants with ready work (entries of inactive tenants are dropped).
#[derive(Debug, Default)]
pub struct Ledger {
    pub buckets: HashMap<Uuid, Bucket>,
    /// When a tenant last got a task, as a sequence number of allocations
    /// (ties in tasks in flight go to the least recently served).
    pub last_served: HashMap<Uuid, u64>,
    pub sequence: u64,
}

impl Ledger {
    /// Forgets a tenant whose ready work ran out.
    pub fn drained(&mut self, tenant_id: Uuid) {
        self.last_served.remove(&tenant_id);
    }

    /// Drops state of tenants no longer active, keeping memory bounded.
    pub fn retain(&mut self, active: &std::collections::HashSet<Uuid>) {
        self.last_served.retain(|tenant, _| active.contains(tenant));
        self.buckets.retain(|tenant, _| active.contains(tenant));
    }
}

/// Splits `capacity` of `tier` across its active tenants, max-min fair on
/// tasks in flight: each next task goes to the tenant with the fewest in
/// flight (counting this round's), ties to the least recently served, each
/// within its `inflight_max` and its dispatch-rate tokens. A tenant with
/// nothing in flight is therefore served before one with a backlog running,
/// and equally backlogged tenants take turns. Returns the picks and the
/// tenants throttled this round.
pub fn split_tier(
    tier: &str,
    tenants: &[ActiveTenant],
    inflight: &HashMap<(String, Uuid), i64>,
    capacity: i64,
    ledger: &mut Ledger,
    now: Instant,
) -> (Vec<Pick>, Vec<(Uuid, Throttle)>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    let mut throttled = Vec::new();
    if capacity <= 0 || tenants.is_empty() {
        return (Vec::new(), throttled);
    }
    // (fewest in flight, least recently served, tenant index)
    let mut heap = BinaryHeap::with_capacity(tenants.len());
    let mut room: Vec<(i64, f64)> = Vec::with_capacity(tenants.len());
    for (index, tenant) in tenants.iter().enumerate() {
        let in_flight = inflight
            .get(&(tier.to_owned(), tenant.tenant_id))
            .copied()
            .unwrap_or(0);
        let headroom = i64::from(tenant.inflight_max) - in_flight;
        let bucket = ledger
            .buckets
            .entry(tenant.tenant_id)
            .or_insert_with(|| Bucket::full(tenant.dispatch_rate_per_s, now));
        bucket.refill(tenant.dispatch_rate_per_s, now);
        room.push((headroom, bucket.tokens));
        if headroom <= 0 {
            throttled.push((tenant.tenant_id, Throttle::Inflight));
        } else if bucket.tokens < 1.0 {
            throttled.push((tenant.tenant_id, Throttle::Rate));
        } else {
            let served = ledger
                .last_served
                .get(&tenant.tenant_id)
                .copied()
                .unwrap_or(0);
            heap.push(Reverse((in_flight, served, index)));
        }
    }
    let mut counts = vec![0i64; tenants.len()];
    let mut left = capacity;
    while left > 0 {
        let Some(Reverse((load, _, index))) = heap.pop() else {
            break;
        };
        let (headroom, tokens) = &mut room[index];
        counts[index] += 1;
        *headroom -= 1;
        *tokens -= 1.0;
        left -= 1;
        ledger.sequence += 1;
        ledger
            .last_served
            .insert(tenants[index].tenant_id, ledger.sequence);
        if *headroom > 0 && *tokens >= 1.0 {
            heap.push(Reverse((load + 1, ledger.sequence, index)));
        }
    }
    let mut picks = Vec::new();
    for (index, count) in counts.into_iter().enumerate() {
        if count > 0 {
            let tenant_id = tenants[index].tenant_id;
            if let Some(bucket) = ledger.buckets.get_mut(&tenant_id) {
                bucket.tokens -= count as f64;
            }
            picks.push(Pick {
                tenant_id,
                tier: tier.to_owned(),
                count,
            });
        }
    }
    (picks, throttled)
}

/// Jain's fairness index of shares: 1 when equal, 1/n when one takes all.
pub fn jain_index(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let sum_of_squares: f64 = shares.iter().map(|share| share * share).sum();
    if shares.is_empty() || sum_of_squares == 0.0 {
        return 1.0;
    }
    sum * sum / (shares.len() as f64 * sum_of_squares)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(name: &str, weight: i32, min_share_percent: i32) -> TierSpec {
        TierSpec {
            name: name.into(),
            weight,
            min_share_percent,
        }
    }

    fn tenant(n: u128, inflight_max: i32, rate: i32) -> ActiveTenant {
        ActiveTenant {
            tenant_id: Uuid::from_u128(n),
            inflight_max,
            dispatch_rate_per_s: rate,
        }
    }

    #[test]
    fn windows_follow_weights_with_a_floor_and_conserve_work() {
        let tiers = [
            tier("gold", 6, 10),
            tier("silver", 3, 10),
            tier("bronze", 1, 15),
        ];
        let all = tier_windows(&tiers, &["gold", "silver", "bronze"], 1000);
        // Floors 100 + 100 + 150; the other 650 by weight 6:3:1.
        assert_eq!((all["gold"], all["silver"], all["bronze"]), (490, 295, 215));
        assert_eq!(all.values().sum::<i64>(), 1000);
        let alone = tier_windows(&tiers, &["bronze"], 1000);
        assert_eq!(
            alone["bronze"], 1000,
            "an idle tier's share goes to the others"
        );
        assert!(!alone.contains_key("gold"));
    }

    #[test]
    fn equal_tenants_share_equally_over_rounds() {
        let tenants: Vec<ActiveTenant> = (0..7).map(|n| tenant(n, 1000, 100_000)).collect();
        let mut ledger = Ledger::default();
        let mut got: HashMap<Uuid, i64> = HashMap::new();
        let now = Instant::now();
        for round in 0..70 {
            let (picks, throttled) = split_tier(
                "gold",
                &tenants,
                &HashMap::new(),
                3,
                &mut ledger,
                now + std::time::Duration::from_millis(round),
            );
            assert!(throttled.is_empty());
            assert!(picks.iter().map(|pick| pick.count).sum::<i64>() <= 3);
            for pick in picks {
                *got.entry(pick.tenant_id).or_default() += pick.count;
            }
        }
        let shares: Vec<f64> = got.values().map(|&count| count as f64).collect();
        assert_eq!(shares.len(), 7);
        assert!(jain_index(&shares) > 0.99, "{got:?}");
    }

    #[test]
    fn quotas_throttle_without_starving_others() {
        let busy = tenant(1, 2, 100_000);
        let quiet = tenant(2, 100, 100_000);
        let slow = tenant(3, 100, 1);
        let mut inflight = HashMap::new();
        inflight.insert(("gold".to_owned(), busy.tenant_id), 2);
        let mut ledger = Ledger::default();
        let now = Instant::now();
        let (picks, throttled) = split_tier(
            "gold",
            &[busy, quiet, slow],
            &inflight,
            30,
            &mut ledger,
            now,
        );
        assert_eq!(throttled, [(busy.tenant_id, Throttle::Inflight)]);
        let count_of = |id: Uuid| {
            picks
                .iter()
                .filter(|p| p.tenant_id == id)
                .map(|p| p.count)
                .sum::<i64>()
        };
        assert_eq!(count_of(slow.tenant_id), 1, "one token per second");
        assert_eq!(
            count_of(quiet.tenant_id),
            29,
            "work-conserving: the rest goes to who can take it"
        );
        let (_, throttled) = split_tier("gold", &[slow], &HashMap::new(), 30, &mut ledger, now);
        assert_eq!(throttled, [(slow.tenant_id, Throttle::Rate)]);
    }

    #[test]
    fn a_tenant_with_nothing_in_flight_goes_first() {
        let noisy = tenant(1, 100, 100_000);
        let quiet = tenant(2, 100, 100_000);
        let mut inflight = HashMap::new();
        inflight.insert(("gold".to_owned(), noisy.tenant_id), 5);
        let mut ledger = Ledger::default();
        let (picks, _) = split_tier(
            "gold",
            &[noisy, quiet],
            &inflight,
            1,
            &mut ledger,
            Instant::now(),
        );
        assert_eq!(
            picks,
            [Pick {
                tenant_id: quiet.tenant_id,
                tier: "gold".into(),
                count: 1
            }]
        );
    }

    #[test]
    fn jain() {
        assert!((jain_index(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-9);
        assert!((jain_index(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-9);
    }
}
