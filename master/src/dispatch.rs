//! The leader's dispatcher: moves ready tasks from Postgres to the tier
//! queues, fairly across tenants (see `fairness.rs`) and within a bounded
//! window of in-flight tasks, woken by LISTEN/NOTIFY or a poll interval.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use uuid::Uuid;
use ward_broker::Broker;
use ward_store::{ActiveTenant, Listener, LocalWake, Pick, Store, TierSpec};

use crate::config::Config;
use crate::fairness::{self, Ledger};
use crate::metrics::Metrics;

/// How often the leader refreshes the backlog gauge.
const BACKLOG_REFRESH_MS: u64 = 5_000;
/// The periodic reads (backlog gauge, active tenants) wait at least this
/// many times their last duration before running again (up to the caps
/// below): with a backlog of millions, counting it takes a large share of a
/// core otherwise.
const REFRESH_COST_FACTOR: u32 = 50;
/// Longest wait between backlog counts.
const BACKLOG_REFRESH_MS_MAX: u64 = 60_000;
/// Longest wait between rebuilds of the active tenants (work that arrived
/// without a notification, such as a bulk load, is found within it).
const ACTIVE_REFRESH_MS_MAX: u64 = 5_000;
/// How often the active-tenant sets are rebuilt from Postgres.
const ACTIVE_REFRESH_MS: u64 = 1_000;
/// Shortest interval between rebuilds forced by a newly active tenant.
const ACTIVE_REFRESH_MS_MIN: u64 = 20;
/// Most active tenants tracked per tier.
const ACTIVE_TENANTS_MAX: i64 = 100_000;
/// Most drained tenants remembered between rebuilds (see `Active::idle`).
const IDLE_TENANTS_MAX: usize = 100_000;
/// Most newly active tenants looked up one by one per loop; more force a rebuild.
const NEWLY_ACTIVE_MAX: usize = 64;
/// Bound on buffered notification payloads.
const PAYLOADS_MAX: usize = 4_096;
/// Backoff after a broker or store failure.
const FAILURE_DELAY_MS: u64 = 500;
/// Age after which the in-flight counts are read again from Postgres.
/// Between reads the leader adds what it dispatched and subtracts nothing,
/// so the counts only overestimate: windows and quotas stay respected.
const INFLIGHT_REFRESH_MS: u64 = 250;
/// The same, when the last round found a window full or a tenant at its
/// `inflight_max`: only a fresh count can show room again. (The count
/// visits every dispatched run, a few ms under load, so it is not read on
/// every round.)
const INFLIGHT_REFRESH_MS_FULL: u64 = 50;
/// Unless a window is full, a count waits at least this many times the
/// last one's duration after it: the count also visits the runs settled
/// since the last VACUUM (their index entries stay until then), so it
/// grows slower under load, and counting back to back took a core.
const INFLIGHT_COST_FACTOR: u32 = 4;

/// Dispatched, unsettled runs per (tier, tenant), as last read plus what
/// was dispatched since.
#[derive(Default)]
struct Inflight {
    counts: HashMap<(String, Uuid), i64>,
    /// Picked by rounds still in flight (counted in `counts` as if all
    /// were dispatched, and added again to each fresh read, which cannot
    /// see uncommitted claims).
    outstanding: HashMap<(String, Uuid), i64>,
    read_at: Option<Instant>,
    /// The last round found a window full or a tenant at its cap.
    full: bool,
    /// A count read in the background (after the first, rounds never wait
    /// for one); it resolves to the count and how long it took.
    reading: Option<tokio::task::JoinHandle<(InflightRead, Duration)>>,
    /// What the rounds that ended while `reading` dispatched: the count may
    /// not see them, so they are added to it.
    ended_during_read: HashMap<(String, Uuid), i64>,
    /// How long the last count took.
    read_cost: Duration,
}

type InflightRead = Result<HashMap<(String, Uuid), i64>, ward_store::Error>;

impl Inflight {
    /// Takes a fresh count that took `cost` to read: the rounds still in flight
    /// and those that ended while it was read are added to it (it cannot see
    /// uncommitted claims, and may have missed commits made during the
    /// read), so the counts only overestimate.
    fn merge(&mut self, mut counts: HashMap<(String, Uuid), i64>, cost: Duration) {
        for (key, count) in self.outstanding.iter().chain(&self.ended_during_read) {
            *counts.entry(key.clone()).or_default() += count;
        }
        self.ended_during_read.clear();
        self.counts = counts;
        self.read_at = Some(Instant::now());
        self.read_cost = cost;
    }
}

/// What a round in flight resolves to: its picks, when it started, and the
/// claimed count per tenant.
type RoundDone = (
    Vec<Pick>,
    Instant,
    Result<HashMap<Uuid, usize>, ward_store::Error>,
);

/// The dispatcher's view of who has work.
struct Active {
    tiers: Vec<TierSpec>,
    by_tier: HashMap<String, Vec<ActiveTenant>>,
    known: HashSet<Uuid>,
    /// Tenants whose ready work ran out since the last rebuild, with their
    /// tier and quotas: a notification from one of them puts it back
    /// without a look-up (the next rebuild reads them all again).
    idle: HashMap<Uuid, (String, ActiveTenant)>,
    refreshed_at: Option<Instant>,
    /// The last round left ready work waiting for a free slot or quota.
    blocked: bool,
    /// Known tenants woken again (new ready work committed) since a round
    /// last came up short for them: a round that gets fewer runs than it
    /// picked for one of these may have claimed before that work was
    /// committed, so the tenant is not taken for drained.
    rewoken: HashSet<Uuid>,
}

/// A rebuild of the active tenants read in the background: the dispatch
/// loop goes on with the sets it has meanwhile (the read walks the ready
/// index, tens of ms when it holds many dead entries, and rounds planned
/// inline behind it waited that long).
struct Rebuild {
    /// Resolves to the tiers and each tier's active tenants, and how long
    /// the read took; dropped (the loop ended), it stops the read.
    reading: AbortOnDropHandle<(Result<ActiveSets, ward_store::Error>, Duration)>,
    /// Tenants that joined the sets while it read: its snapshot may predate
    /// their work, so they are kept if it does not list them.
    joined: HashMap<Uuid, (String, ActiveTenant)>,
    /// Known tenants woken while it read (new work committed): kept too,
    /// with their tier and quotas of the sets it replaces, for the same
    /// reason (the wake-up is spent; none would bring them back).
    woken: HashSet<Uuid>,
}

/// The tiers, and each tier's tenants with ready work.
type ActiveSets = (Vec<TierSpec>, HashMap<String, Vec<ActiveTenant>>);

/// Keeps a dispatcher registered for local wake-ups while it lives.
struct LocalWakeGuard(Store);

impl LocalWakeGuard {
    fn register(store: &Store, local: LocalWake) -> LocalWakeGuard {
        store.wake_locally(Some(local));
        LocalWakeGuard(store.clone())
    }
}

impl Drop for LocalWakeGuard {
    fn drop(&mut self) {
        self.0.wake_locally(None);
    }
}

/// Dispatches until `term_over` is cancelled; cancels it itself when the
/// store reports this epoch fenced.
pub async fn run(
    config: Arc<Config>,
    store: Store,
    metrics: Metrics,
    epoch: i64,
    term_over: CancellationToken,
) {
    let db_settings = crate::store_settings(&config);
    let broker_settings = crate::broker_settings(&config);
    let wake = Arc::new(Notify::new());
    let (payload_tx, mut payloads) = mpsc::channel::<String>(PAYLOADS_MAX);
    // Starts committed by this process wake this dispatcher directly.
    let _local = LocalWakeGuard::register(
        &store,
        LocalWake {
            payloads: payload_tx.clone(),
            notify: wake.clone(),
        },
    );
    let mut listener: Option<Listener> = None;
    let mut broker: Option<Arc<Broker>> = None;
    let mut backlog_refreshed_at: Option<Instant> = None;
    // The backlog count in the background (it only sets a gauge): resolves
    // to how long it took. The reads in the background only inform, so
    // they stop when the loop ends (`AbortOnDropHandle`).
    let mut backlog_reading: Option<AbortOnDropHandle<Duration>> = None;
    let mut rebuild: Option<Rebuild> = None;
    let mut rebuilt = None;
    // A background rebuild failed: back off as for any store failure.
    let mut rebuild_failed = false;
    let mut backlog_refresh_every = Duration::from_millis(BACKLOG_REFRESH_MS);
    let mut active_refresh_every = Duration::from_millis(ACTIVE_REFRESH_MS);
    // A newly active tenant seen too soon after the last rebuild: rebuild as
    // soon as allowed rather than forget it until the periodic one.
    let mut refresh_pending = false;
    let mut active = Active {
        tiers: Vec::new(),
        by_tier: HashMap::new(),
        known: HashSet::new(),
        idle: HashMap::new(),
        refreshed_at: None,
        blocked: false,
        rewoken: HashSet::new(),
    };
    let mut ledger = Ledger::default();
    let mut inflight = Inflight::default();
    let rounds_max = config.dispatch.rounds_in_flight_max.max(1);
    let mut rounds: FuturesUnordered<BoxFuture<'static, RoundDone>> = FuturesUnordered::new();
    let mut plan_more = true;
    while !term_over.is_cancelled() {
        if listener.as_ref().is_none_or(Listener::is_closed) {
            listener =
                Listener::start_with_payloads(&db_settings, wake.clone(), Some(payload_tx.clone()))
                    .await
                    .inspect_err(|error| tracing::debug!(%error, "listen failed; polling"))
                    .ok();
        }
        let mut force_refresh = refresh_pending;
        let mut newly_active = Vec::new();
        while let Ok(payload) = payloads.try_recv() {
            match payload.parse::<Uuid>() {
                Ok(tenant_id) if !active.known.contains(&tenant_id) => {
                    if newly_active.len() < NEWLY_ACTIVE_MAX {
                        newly_active.push(tenant_id);
                    } else {
                        force_refresh = true;
                    }
                }
                Ok(tenant_id) => {
                    active.rewoken.insert(tenant_id);
                    if let Some(rebuild) = &mut rebuild {
                        rebuild.woken.insert(tenant_id);
                    }
                }
                Err(_) => force_refresh = true,
            }
        }
        // A tenant that just got ready work joins its tier's set at once (one
        // indexed read, none if it ran out of work since the last rebuild),
        // without waiting for a rebuild.
        newly_active.sort();
        newly_active.dedup();
        newly_active.retain(|tenant_id| match active.idle.remove(tenant_id) {
            Some((tier, tenant)) => {
                if let Some(rebuild) = &mut rebuild {
                    rebuild.joined.insert(*tenant_id, (tier.clone(), tenant));
                }
                active.known.insert(*tenant_id);
                active.by_tier.entry(tier).or_default().push(tenant);
                false
            }
            None => true,
        });
        for tenant_id in newly_active {
            match store.active_tenant(tenant_id).await {
                Ok(Some((tier, tenant))) if !active.known.contains(&tenant_id) => {
                    if let Some(rebuild) = &mut rebuild {
                        rebuild.joined.insert(tenant_id, (tier.clone(), tenant));
                    }
                    active.known.insert(tenant_id);
                    active.by_tier.entry(tier).or_default().push(tenant);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "look-up of a newly active tenant failed");
                    force_refresh = true;
                }
            }
        }
        let mut failed = std::mem::take(&mut rebuild_failed);
        // Not while backing off from a failed one: the next look comes
        // after the failure pause.
        let due = !failed
            && rebuild.is_none()
            && active.refreshed_at.is_none_or(|at| {
                let age = at.elapsed();
                age >= active_refresh_every
                    || (force_refresh && age >= Duration::from_millis(ACTIVE_REFRESH_MS_MIN))
            });
        // A rebuild in flight may have read before what forced this one.
        refresh_pending = force_refresh && !due;
        if due && active.refreshed_at.is_none() {
            // The term's first: nothing to plan with before it.
            let started = Instant::now();
            match read_active(&store, &config.tiers).await {
                Ok(sets) => replace_active(
                    &mut active,
                    &mut ledger,
                    sets,
                    HashMap::new(),
                    &HashSet::new(),
                ),
                Err(error) => {
                    tracing::warn!(%error, "refresh of active tenants failed");
                    failed = true;
                }
            }
            active_refresh_every = (started.elapsed() * REFRESH_COST_FACTOR).clamp(
                Duration::from_millis(ACTIVE_REFRESH_MS),
                Duration::from_millis(ACTIVE_REFRESH_MS_MAX),
            );
        } else if due {
            let (store, tiers) = (store.clone(), config.tiers.clone());
            rebuild = Some(Rebuild {
                reading: AbortOnDropHandle::new(tokio::spawn(async move {
                    let started = Instant::now();
                    (read_active(&store, &tiers).await, started.elapsed())
                })),
                joined: HashMap::new(),
                woken: HashSet::new(),
            });
        }
        // A broken broker is replaced once no round uses it any more.
        if rounds.is_empty() && broker.as_ref().is_none_or(|broker| !broker.is_connected()) {
            let tiers: Vec<String> = active
                .tiers
                .iter()
                .map(|tier| tier.name.clone())
                .chain(config.tiers.iter().cloned())
                .collect();
            broker = connect_broker(&broker_settings, &tiers).await.map(Arc::new);
        }
        failed |= broker.as_ref().is_none_or(|broker| !broker.is_connected());
        // Start rounds while there may be work and fewer than the bound are
        // in flight: a new round claims (SKIP LOCKED) while the others wait
        // for their publisher confirms.
        if let (Some(connected), false) = (&broker, failed) {
            while plan_more && rounds.len() < rounds_max {
                plan_more = false;
                match plan_round(
                    &store,
                    &config,
                    &metrics,
                    &mut active,
                    &mut ledger,
                    &mut inflight,
                )
                .await
                {
                    Ok(picks) if picks.is_empty() => {}
                    Ok(picks) => rounds.push(spawn_round(
                        store.clone(),
                        connected.clone(),
                        config.clone(),
                        metrics.clone(),
                        epoch,
                        picks,
                    )),
                    Err(error) => {
                        metrics
                            .dispatch_errors_total
                            .with_label_values(&["store"])
                            .inc();
                        tracing::warn!(%error, "dispatch planning failed");
                        failed = true;
                    }
                }
            }
        }
        if let Some(reading) = backlog_reading.take_if(|reading| reading.is_finished()) {
            let cost = reading.await.unwrap_or_default();
            backlog_refresh_every = (cost * REFRESH_COST_FACTOR).clamp(
                Duration::from_millis(BACKLOG_REFRESH_MS),
                Duration::from_millis(BACKLOG_REFRESH_MS_MAX),
            );
            backlog_refreshed_at = Some(Instant::now());
        }
        if backlog_reading.is_none()
            && backlog_refreshed_at.is_none_or(|at| at.elapsed() >= backlog_refresh_every)
        {
            let (store, metrics, tiers) = (store.clone(), metrics.clone(), active.tiers.clone());
            backlog_reading = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                let started = Instant::now();
                refresh_backlog(&store, &metrics, &tiers).await;
                started.elapsed()
            })));
        }
        if failed {
            // Let the rounds in flight end before backing off and replacing
            // the broker.
            while let Some(done) = rounds.next().await {
                if finish_round(&metrics, done, &mut active, &mut ledger, &mut inflight).is_err() {
                    term_over.cancel();
                    return;
                }
            }
            if let Some(broken) = broker.take_if(|broker| !broker.is_connected()) {
                broken.close().await;
            }
        }
        let mut pause = if failed {
            FAILURE_DELAY_MS
        } else if active.blocked {
            // Work waits for a free slot; settlements do not notify, so look again soon.
            config.dispatch.saturated_poll_ms
        } else {
            config.dispatch.poll_ms
        };
        if refresh_pending && rebuild.is_none() {
            let age_ms = active
                .refreshed_at
                .map_or(0, |at| at.elapsed().as_millis() as u64);
            pause = pause.min(ACTIVE_REFRESH_MS_MIN.saturating_sub(age_ms).max(1));
        }
        tokio::select! {
            () = term_over.cancelled() => break,
            Some(done) = rounds.next(), if !rounds.is_empty() => {
                match finish_round(&metrics, done, &mut active, &mut ledger, &mut inflight) {
                    // More may be ready: plan again at once.
                    Ok(Some(dispatched)) => plan_more = dispatched > 0,
                    Ok(None) => {}
                    Err(()) => {
                        term_over.cancel();
                        return;
                    }
                }
            }
            () = wake.notified() => plan_more = true,
            () = tokio::time::sleep(Duration::from_millis(pause)) => plan_more = true,
            read = async {
                match rebuild.as_mut() {
                    Some(rebuild) => (&mut rebuild.reading).await,
                    None => std::future::pending().await,
                }
            } => rebuilt = Some(read),
        }
        // A rebuild read in the background replaces the sets once it is in
        // (its handle is spent: it goes too).
        if let Some((read, done)) = rebuilt
            .take()
            .and_then(|read| Some((read, rebuild.take()?)))
        {
            plan_more = true;
            let (read, cost) = read.unwrap_or_else(|error| {
                let error = format!("rebuild of active tenants stopped: {error}");
                (Err(ward_store::Error::Unavailable(error)), Duration::ZERO)
            });
            match read {
                Ok(sets) => {
                    replace_active(&mut active, &mut ledger, sets, done.joined, &done.woken)
                }
                Err(error) => {
                    tracing::warn!(%error, "refresh of active tenants failed");
                    rebuild_failed = true;
                }
            }
            active_refresh_every = (cost * REFRESH_COST_FACTOR).clamp(
                Duration::from_millis(ACTIVE_REFRESH_MS),
                Duration::from_millis(ACTIVE_REFRESH_MS_MAX),
            );
        }
    }
    // Stop taking work; let the rounds in flight end (each is bounded by
    // the publish timeout) so none is left half done.
    drop((rebuild, backlog_reading));
    while let Some(done) = rounds.next().await {
        let _ = finish_round(&metrics, done, &mut active, &mut ledger, &mut inflight);
    }
    if let Some(broker) = broker {
        broker.close().await;
    }
}

/// Reads the tiers (those of the store and the configured ones) and each
/// tier's active tenants.
async fn read_active(
    store: &Store,
    configured: &[String],
) -> Result<ActiveSets, ward_store::Error> {
    let mut tiers = store.tiers().await?;
    for name in configured {
        if !tiers.iter().any(|tier| &tier.name == name) {
            tiers.push(TierSpec {
                name: name.clone(),
                weight: 1,
                min_share_percent: 0,
            });
        }
    }
    let mut by_tier = HashMap::new();
    for tier in &tiers {
        let tenants = store.active_tenants(&tier.name, ACTIVE_TENANTS_MAX).await?;
        if !tenants.is_empty() {
            by_tier.insert(tier.name.clone(), tenants);
        }
    }
    Ok((tiers, by_tier))
}

/// Replaces the dispatcher's sets with a rebuild, keeping the tenants that
/// `joined` the sets or were `woken` while it was read and that it does not
/// list.
fn replace_active(
    active: &mut Active,
    ledger: &mut Ledger,
    (tiers, mut by_tier): ActiveSets,
    joined: HashMap<Uuid, (String, ActiveTenant)>,
    woken: &HashSet<Uuid>,
) {
    let mut known: HashSet<Uuid> = by_tier
        .values()
        .flatten()
        .map(|tenant| tenant.tenant_id)
        .collect();
    let kept_woken = active.by_tier.iter().flat_map(|(tier, tenants)| {
        tenants
            .iter()
            .filter(|tenant| woken.contains(&tenant.tenant_id))
            .map(move |tenant| (tenant.tenant_id, (tier.clone(), *tenant)))
    });
    let kept: Vec<(Uuid, (String, ActiveTenant))> = joined.into_iter().chain(kept_woken).collect();
    for (tenant_id, (tier, tenant)) in kept {
        if known.insert(tenant_id) {
            by_tier.entry(tier).or_default().push(tenant);
        }
    }
    ledger.retain(&known);
    // A round planned before this rebuild may still end after it.
    let rewoken = std::mem::take(&mut active.rewoken)
        .into_iter()
        .filter(|tenant_id| known.contains(tenant_id))
        .collect();
    *active = Active {
        tiers,
        by_tier,
        known,
        idle: HashMap::new(),
        refreshed_at: Some(Instant::now()),
        blocked: false,
        rewoken,
    };
}

/// Plans one dispatch round: windows per tier, shares per tenant. The
/// picks are counted in flight at once (a round that gets fewer gives the
/// difference back in `finish_round`).
async fn plan_round(
    store: &Store,
    config: &Config,
    metrics: &Metrics,
    active: &mut Active,
    ledger: &mut Ledger,
    inflight_cache: &mut Inflight,
) -> Result<Vec<Pick>, ward_store::Error> {
    if active.by_tier.is_empty() {
        return Ok(Vec::new());
    }
    let mut blocked = false;
    let refresh_after = Duration::from_millis(if inflight_cache.full {
        INFLIGHT_REFRESH_MS_FULL
    } else {
        INFLIGHT_REFRESH_MS
    });
    let refresh_after = if inflight_cache.full {
        refresh_after
    } else {
        refresh_after.max(inflight_cache.read_cost * INFLIGHT_COST_FACTOR)
    };
    if inflight_cache.read_at.is_none() {
        // The first count of the term: nothing to plan with before it.
        let started = Instant::now();
        let counts = store.inflight().await?;
        inflight_cache.merge(counts, started.elapsed());
    } else if let Some(reading) = inflight_cache.reading.take() {
        if !reading.is_finished() {
            inflight_cache.reading = Some(reading);
        } else {
            match reading.await {
                Ok((Ok(counts), cost)) => inflight_cache.merge(counts, cost),
                Ok((Err(error), _)) => {
                    inflight_cache.ended_during_read.clear();
                    return Err(error);
                }
                Err(error) => {
                    inflight_cache.ended_during_read.clear();
                    return Err(ward_store::Error::Unavailable(format!(
                        "in-flight count stopped: {error}"
                    )));
                }
            }
        }
    } else if inflight_cache
        .read_at
        .is_none_or(|at| at.elapsed() >= refresh_after)
    {
        let store = store.clone();
        inflight_cache.reading = Some(tokio::spawn(async move {
            let started = Instant::now();
            (store.inflight().await, started.elapsed())
        }));
    }
    let inflight = &inflight_cache.counts;
    let mut full = false;
    let busy: Vec<&str> = active.by_tier.keys().map(String::as_str).collect();
    let windows = fairness::tier_windows(&active.tiers, &busy, config.dispatch.window_max);
    let now = Instant::now();
    let mut picks = Vec::new();
    let mut batch_left = config.dispatch.batch_len_max;
    let mut tiers_by_weight: Vec<&TierSpec> = active
        .tiers
        .iter()
        .filter(|tier| windows.contains_key(&tier.name))
        .collect();
    tiers_by_weight.sort_by_key(|tier| std::cmp::Reverse(tier.weight));
    for tier in tiers_by_weight {
        let in_flight: i64 = inflight
            .iter()
            .filter(|((name, _), _)| name == &tier.name)
            .map(|(_, count)| *count)
            .sum();
        metrics
            .tasks_in_flight
            .with_label_values(&[tier.name.as_str()])
            .set(in_flight);
        let capacity = (windows[&tier.name] - in_flight).min(batch_left);
        let tenants = &active.by_tier[&tier.name];
        let (tier_picks, throttled) =
            fairness::split_tier(&tier.name, tenants, inflight, capacity, ledger, now);
        blocked |= capacity <= 0 || !throttled.is_empty();
        full |= capacity <= 0
            || throttled
                .iter()
                .any(|(_, reason)| *reason == fairness::Throttle::Inflight);
        for (_, reason) in throttled {
            metrics
                .tenant_throttled_total
                .with_label_values(&[reason.as_str()])
                .inc();
        }
        batch_left -= tier_picks.iter().map(|pick| pick.count).sum::<i64>();
        picks.extend(tier_picks);
    }
    active.blocked = blocked;
    inflight_cache.full = full;
    for pick in &picks {
        let key = (pick.tier.clone(), pick.tenant_id);
        *inflight_cache.counts.entry(key.clone()).or_default() += pick.count;
        *inflight_cache.outstanding.entry(key).or_default() += pick.count;
    }
    Ok(picks)
}

/// Runs a round as its own task, so it moves on (and meets its publish
/// timeout and transaction bounds) while the loop awaits other reads; the
/// returned future only waits for it.
fn spawn_round(
    store: Store,
    broker: Arc<Broker>,
    config: Arc<Config>,
    metrics: Metrics,
    epoch: i64,
    picks: Vec<Pick>,
) -> BoxFuture<'static, RoundDone> {
    let kept = picks.clone();
    let started_at = Instant::now();
    // The round's fenced transaction: claims the picks' ready runs,
    // publishes them, waits for the confirms, marks them dispatched.
    let task = tokio::spawn(async move {
        let publish_timeout = Duration::from_millis(config.amqp.publish_timeout_ms);
        let dispatched_total = &metrics.tasks_dispatched_total;
        let confirm_seconds = &metrics.publish_confirm_seconds;
        let broker = &broker;
        let result = store
            .dispatch_picks(epoch, lease(&config), &picks, |tasks| async move {
                let messages: Vec<(&str, &ward_shared::wire::TaskMessage)> = tasks
                    .iter()
                    .map(|task| (task.tier.as_str(), &task.message))
                    .collect();
                let publish_started = Instant::now();
                match tokio::time::timeout(publish_timeout, broker.publish(&messages)).await {
                    Ok(Ok(())) => {
                        confirm_seconds.observe(publish_started.elapsed().as_secs_f64());
                        for task in &tasks {
                            dispatched_total
                                .with_label_values(&[task.tier.as_str()])
                                .inc();
                        }
                        Ok(())
                    }
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("publisher confirms timed out".to_owned()),
                }
            })
            .await;
        (picks, started_at, result)
    });
    Box::pin(async move {
        match task.await {
            Ok(done) => done,
            Err(error) => (
                kept,
                started_at,
                Err(ward_store::Error::Unavailable(format!(
                    "dispatch round stopped: {error}"
                ))),
            ),
        }
    })
}

/// Accounts for a round that ended: gives back what its picks did not get,
/// drops tenants whose ready work ran out. Returns how many tasks it
/// dispatched (None when it failed), or Err(()) when this epoch is fenced.
fn finish_round(
    metrics: &Metrics,
    (picks, started_at, result): RoundDone,
    active: &mut Active,
    ledger: &mut Ledger,
    inflight_cache: &mut Inflight,
) -> Result<Option<usize>, ()> {
    let dispatched = match result {
        Ok(dispatched) => Some(dispatched),
        Err(ward_store::Error::Fenced {
            epoch,
            epoch_current,
        }) => {
            metrics
                .dispatch_errors_total
                .with_label_values(&["fenced"])
                .inc();
            tracing::error!(
                epoch,
                epoch_current,
                "fenced: a newer leader exists; stopping dispatch"
            );
            return Err(());
        }
        Err(ward_store::Error::Publish(error)) => {
            metrics
                .dispatch_errors_total
                .with_label_values(&["broker"])
                .inc();
            tracing::warn!(%error, "publish failed; reconnecting to the broker");
            None
        }
        Err(error) => {
            metrics
                .dispatch_errors_total
                .with_label_values(&["store"])
                .inc();
            tracing::warn!(%error, "dispatch failed");
            None
        }
    };
    if dispatched.is_some() {
        metrics
            .dispatch_batch_seconds
            .observe(started_at.elapsed().as_secs_f64());
        metrics
            .store_transaction_seconds
            .with_label_values(&["dispatch"])
            .observe(started_at.elapsed().as_secs_f64());
    }
    for pick in &picks {
        let key = (pick.tier.clone(), pick.tenant_id);
        if let Some(outstanding) = inflight_cache.outstanding.get_mut(&key) {
            *outstanding -= pick.count;
            if *outstanding <= 0 {
                inflight_cache.outstanding.remove(&key);
            }
        }
        let got = dispatched
            .as_ref()
            .and_then(|dispatched| dispatched.get(&pick.tenant_id))
            .copied()
            .unwrap_or(0) as i64;
        if inflight_cache.reading.is_some() && got > 0 {
            *inflight_cache
                .ended_during_read
                .entry(key.clone())
                .or_default() += got;
        }
        if let Some(count) = inflight_cache.counts.get_mut(&key) {
            *count = (*count - (pick.count - got)).max(0);
        }
        if got < pick.count {
            if let Some(bucket) = ledger.buckets.get_mut(&pick.tenant_id) {
                bucket.tokens += (pick.count - got) as f64;
            }
            // A failed round says nothing about the tenant's ready work, and
            // neither does one that ran beside another round with picks of
            // the same tenant (its claim skipped the runs that round holds
            // locked) or one whose tenant was woken again meanwhile (its
            // claim may have run before that work committed, and the
            // wake-up was not acted on while the tenant was active). The
            // tenant then stays active; a later round finds out.
            let another_round_holds = inflight_cache
                .outstanding
                .get(&key)
                .is_some_and(|outstanding| *outstanding > 0);
            let rewoken = active.rewoken.remove(&pick.tenant_id);
            if dispatched.is_some() && !another_round_holds && !rewoken {
                ledger.drained(pick.tenant_id);
                if let Some(tenants) = active.by_tier.get_mut(&pick.tier) {
                    // Every copy goes; one is remembered.
                    let mut drained = None;
                    tenants.retain(|tenant| {
                        let keep = tenant.tenant_id != pick.tenant_id;
                        if !keep && drained.is_none() {
                            drained = Some(*tenant);
                        }
                        keep
                    });
                    if let Some(tenant) = drained
                        && active.idle.len() < IDLE_TENANTS_MAX
                    {
                        active
                            .idle
                            .insert(pick.tenant_id, (pick.tier.clone(), tenant));
                    }
                    if tenants.is_empty() {
                        active.by_tier.remove(&pick.tier);
                    }
                }
                active.known.remove(&pick.tenant_id);
            }
        }
    }
    Ok(dispatched.map(|dispatched| dispatched.values().sum()))
}

/// The lease of dispatched runs, from the configuration.
fn lease(config: &Config) -> ward_store::Lease {
    ward_store::Lease {
        default_ms: i64::try_from(config.dispatch.lease_default_ms).unwrap_or(i64::MAX),
        grace_ms: i64::try_from(config.dispatch.lease_grace_ms).unwrap_or(i64::MAX),
        publish_ms: i64::try_from(config.amqp.publish_timeout_ms).unwrap_or(i64::MAX),
    }
}

pub(crate) async fn connect_broker(
    settings: &ward_broker::Settings,
    tiers: &[String],
) -> Option<Broker> {
    let broker = match Broker::connect(settings).await {
        Ok(broker) => broker,
        Err(error) => {
            tracing::warn!(%error, "broker unreachable");
            return None;
        }
    };
    let mut unique: Vec<String> = tiers.to_vec();
    unique.sort();
    unique.dedup();
    match broker.declare(&unique).await {
        Ok(()) => Some(broker),
        Err(error) => {
            tracing::warn!(%error, "declare queues failed");
            broker.close().await;
            None
        }
    }
}

async fn refresh_backlog(store: &Store, metrics: &Metrics, tiers: &[TierSpec]) {
    match store.ready_backlog().await {
        Ok(backlog) => {
            for tier in tiers {
                let count = backlog
                    .iter()
                    .find(|(name, _)| name == &tier.name)
                    .map(|(_, count)| *count)
                    .unwrap_or(0);
                metrics
                    .ready_backlog
                    .with_label_values(&[tier.name.as_str()])
                    .set(count);
            }
        }
        Err(error) => tracing::debug!(%error, "backlog refresh failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIER: &str = "gold";

    fn active_with(tenant_id: Uuid) -> Active {
        Active {
            tiers: Vec::new(),
            by_tier: HashMap::from([(
                TIER.to_owned(),
                vec![ActiveTenant {
                    tenant_id,
                    inflight_max: 0,
                    dispatch_rate_per_s: 0,
                }],
            )]),
            known: HashSet::from([tenant_id]),
            idle: HashMap::new(),
            refreshed_at: None,
            blocked: false,
            rewoken: HashSet::new(),
        }
    }

    /// A round that picked 2 of the tenant's runs (counted outstanding, as
    /// `plan_round` does) and got 1.
    fn short_round(tenant_id: Uuid, inflight: &mut Inflight) -> RoundDone {
        *inflight
            .outstanding
            .entry((TIER.to_owned(), tenant_id))
            .or_default() += 2;
        (
            vec![Pick {
                tenant_id,
                tier: TIER.to_owned(),
                count: 2,
            }],
            Instant::now(),
            Ok(HashMap::from([(tenant_id, 1)])),
        )
    }

    #[test]
    fn a_short_round_drains_its_tenant_unless_woken_meanwhile_or_another_round_holds_it() {
        let metrics = Metrics::new();
        let tenant_id = Uuid::now_v7();
        let drained = |active: &Active| {
            !active.known.contains(&tenant_id) && active.idle.contains_key(&tenant_id)
        };

        // Alone and not woken since: the tenant's ready work ran out.
        let (mut active, mut ledger, mut inflight) = (
            active_with(tenant_id),
            Ledger::default(),
            Inflight::default(),
        );
        let round = short_round(tenant_id, &mut inflight);
        let result = finish_round(&metrics, round, &mut active, &mut ledger, &mut inflight);
        assert_eq!(result, Ok(Some(1)));
        assert!(drained(&active));

        // Woken while the round was out: new work may have committed after
        // its claim, so the tenant stays; the next short round drains it.
        let (mut active, mut inflight) = (active_with(tenant_id), Inflight::default());
        active.rewoken.insert(tenant_id);
        let round = short_round(tenant_id, &mut inflight);
        finish_round(&metrics, round, &mut active, &mut ledger, &mut inflight).unwrap();
        assert!(!drained(&active) && active.known.contains(&tenant_id));
        let round = short_round(tenant_id, &mut inflight);
        finish_round(&metrics, round, &mut active, &mut ledger, &mut inflight).unwrap();
        assert!(drained(&active));

        // Another round with picks of the tenant is still out (its claim
        // holds runs locked): the tenant stays until that one ends short.
        let (mut active, mut inflight) = (active_with(tenant_id), Inflight::default());
        let other = short_round(tenant_id, &mut inflight);
        let round = short_round(tenant_id, &mut inflight);
        finish_round(&metrics, round, &mut active, &mut ledger, &mut inflight).unwrap();
        assert!(!drained(&active) && active.known.contains(&tenant_id));
        finish_round(&metrics, other, &mut active, &mut ledger, &mut inflight).unwrap();
        assert!(drained(&active));
    }

    #[test]
    fn a_rebuild_read_in_the_background_keeps_the_tenants_that_joined_or_woke_while_it_read() {
        let tenant = |tenant_id| ActiveTenant {
            tenant_id,
            inflight_max: 0,
            dispatch_rate_per_s: 0,
        };
        let (listed, joined_late, joined_listed, gone) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        let woke = Uuid::now_v7();
        let mut active = active_with(gone);
        active.by_tier.get_mut(TIER).unwrap().push(tenant(woke));
        active.known.insert(woke);
        active.rewoken.extend([gone, listed]);
        let mut ledger = Ledger::default();
        ledger.last_served.extend([(gone, 1), (listed, 2)]);
        // The rebuild read `listed` and `joined_listed`; `joined_late`'s work
        // committed after its snapshot.
        let read = (
            Vec::new(),
            HashMap::from([(TIER.to_owned(), vec![tenant(listed), tenant(joined_listed)])]),
        );
        let joined = HashMap::from([
            (joined_late, (TIER.to_owned(), tenant(joined_late))),
            (joined_listed, (TIER.to_owned(), tenant(joined_listed))),
        ]);
        // `woke` was known and woken while it read (its snapshot came when a
        // round held all its runs): kept. `gone` was not woken: dropped.
        replace_active(
            &mut active,
            &mut ledger,
            read,
            joined,
            &HashSet::from([woke, listed]),
        );
        let mut ids: Vec<Uuid> = active.by_tier[TIER].iter().map(|t| t.tenant_id).collect();
        ids.sort();
        let mut expected = vec![listed, joined_late, joined_listed, woke];
        expected.sort();
        assert_eq!(
            ids, expected,
            "each once; the late joiner and the woken one kept"
        );
        assert_eq!(active.known, HashSet::from_iter(expected));
        assert!(active.refreshed_at.is_some());
        // A tenant no longer active is forgotten; the others' state stays.
        assert_eq!(active.rewoken, HashSet::from([listed]));
        assert!(!ledger.last_served.contains_key(&gone));
        assert_eq!(ledger.last_served.get(&listed), Some(&2));
    }
}
