//! Fair dispatch decisions, as plain data and functions: how much of the
//! dispatch window each tier gets (by weight, with a guaranteed minimum
//! share, and work-conserving), and how a tier's share is split across its
//! tenants by deficit round-robin within each tenant's in-flight quota and
//! dispatch-rate token bucket.

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

/// The window each tier with work may fill: weights among the tiers that
/// have work, each at least its `min_share_percent` of the whole.
pub fn tier_windows(tiers: &[TierSpec], busy: &[&str], window_max: i64) -> HashMap<String, i64> {
    let busy_tiers: Vec<&TierSpec> = tiers
        .iter()
        .filter(|tier| busy.contains(&tier.name.as_str()))
        .collect();
    let weight_sum: i64 = busy_tiers
        .iter()
        .map(|tier| i64::from(tier.weight.max(1)))
        .sum();
    busy_tiers
        .iter()
        .map(|tier| {
            let by_weight = window_max * i64::from(tier.weight.max(1)) / weight_sum.max(1);
            let floor = window_max * i64::from(tier.min_share_percent.clamp(0, 100)) / 100;
            (tier.name.clone(), by_weight.max(floor).max(1))
        })
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
/// number of tenants with ready work (entries of drained tenants are dropped).
#[derive(Debug, Default)]
pub struct Ledger {
    pub deficit: HashMap<Uuid, f64>,
    pub buckets: HashMap<Uuid, Bucket>,
    /// Where the next round starts in each tier's tenant list.
    pub cursor: HashMap<String, usize>,
}

impl Ledger {
    /// Forgets a tenant whose ready work ran out (deficit round-robin resets
    /// the deficit of an empty queue).
    pub fn drained(&mut self, tenant_id: Uuid) {
        self.deficit.remove(&tenant_id);
    }

    /// Drops state of tenants no longer active, keeping memory bounded.
    pub fn retain(&mut self, active: &std::collections::HashSet<Uuid>) {
        self.deficit.retain(|tenant, _| active.contains(tenant));
        self.buckets.retain(|tenant, _| active.contains(tenant));
    }
}

/// Splits `capacity` of `tier` across its active tenants. Returns the picks
/// and the tenants throttled this round.
pub fn split_tier(
    tier: &str,
    tenants: &[ActiveTenant],
    inflight: &HashMap<(String, Uuid), i64>,
    capacity: i64,
    ledger: &mut Ledger,
    now: Instant,
) -> (Vec<Pick>, Vec<(Uuid, Throttle)>) {
    let mut picks = Vec::new();
    let mut throttled = Vec::new();
    if capacity <= 0 || tenants.is_empty() {
        return (picks, throttled);
    }
    let mut eligible: Vec<(&ActiveTenant, i64)> = Vec::with_capacity(tenants.len());
    for tenant in tenants {
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
        if headroom <= 0 {
            throttled.push((tenant.tenant_id, Throttle::Inflight));
        } else if bucket.tokens < 1.0 {
            throttled.push((tenant.tenant_id, Throttle::Rate));
        } else {
            eligible.push((tenant, headroom));
        }
    }
    if eligible.is_empty() {
        return (picks, throttled);
    }
    let quantum = capacity as f64 / eligible.len() as f64;
    let start = ledger.cursor.get(tier).copied().unwrap_or(0) % eligible.len();
    ledger.cursor.insert(tier.to_owned(), start + 1);
    let mut left = capacity;
    for offset in 0..eligible.len() {
        if left <= 0 {
            break;
        }
        let (tenant, headroom) = eligible[(start + offset) % eligible.len()];
        let deficit = ledger.deficit.entry(tenant.tenant_id).or_insert(0.0);
        *deficit = (*deficit + quantum).min(capacity as f64);
        let bucket = ledger
            .buckets
            .get_mut(&tenant.tenant_id)
            .expect("bucket made above");
        let take = (deficit.floor() as i64)
            .min(headroom)
            .min(bucket.tokens.floor() as i64)
            .min(left);
        if take >= 1 {
            *deficit -= take as f64;
            bucket.tokens -= take as f64;
            left -= take;
            picks.push(Pick {
                tenant_id: tenant.tenant_id,
                tier: tier.to_owned(),
                count: take,
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
        assert_eq!((all["gold"], all["silver"], all["bronze"]), (600, 300, 150));
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
        assert_eq!(count_of(quiet.tenant_id), 15);
        let (_, throttled) = split_tier("gold", &[slow], &HashMap::new(), 30, &mut ledger, now);
        assert_eq!(throttled, [(slow.tenant_id, Throttle::Rate)]);
    }

    #[test]
    fn jain() {
        assert!((jain_index(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-9);
        assert!((jain_index(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-9);
    }
}
