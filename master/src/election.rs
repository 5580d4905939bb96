//! Leader election over etcd: the only module that knows etcd.
//!
//! A master campaigns with a lease; once elected, the election key's create
//! revision is its epoch, recorded in Postgres (fencing) before it runs the
//! singleton loops. It steps down at once when the lease is lost (or cannot be
//! renewed in time) and resigns when it shuts down, so a standby takes over
//! within the lease TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{Client, ConnectOptions, ResignOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use ward_store::Store;

use crate::config::Config;
use crate::dispatch;
use crate::metrics::Metrics;

/// Backoff between failed leadership attempts.
const RETRY_DELAY_MS_MIN: u64 = 200;
const RETRY_DELAY_MS_MAX: u64 = 5_000;
/// Bound on the resign and revoke calls at step-down.
const STEP_DOWN_TIMEOUT_MS: u64 = 1_000;

/// Campaigns until `shutdown`, leading whenever elected. Publishes the epoch
/// of the current term on `leader` (None while not leading).
pub async fn run(
    config: Arc<Config>,
    store: Store,
    metrics: Metrics,
    leader: watch::Sender<Option<i64>>,
    shutdown: CancellationToken,
) {
    let mut retry_delay_ms = RETRY_DELAY_MS_MIN;
    while !shutdown.is_cancelled() {
        match term(&config, &store, &metrics, &leader, &shutdown).await {
            Ok(()) => retry_delay_ms = RETRY_DELAY_MS_MIN,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    retry_delay_ms,
                    "leadership attempt ended"
                );
                retry_delay_ms = (retry_delay_ms * 2).min(RETRY_DELAY_MS_MAX);
            }
        }
        if leader.send_replace(None).is_some() {
            metrics.leader_changes_total.inc();
        }
        metrics.leader.set(0);
        metrics.leader_epoch.set(0);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(retry_delay_ms)) => {}
        }
    }
}

/// One attempt: connect, lease, campaign, lead until the lease is lost or
/// shutdown, step down.
async fn term(
    config: &Config,
    store: &Store,
    metrics: &Metrics,
    leader: &watch::Sender<Option<i64>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(config.etcd.connect_timeout_ms))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
    let mut client = tokio::time::timeout(
        Duration::from_millis(config.etcd.connect_timeout_ms),
        Client::connect(&config.etcd.endpoints, Some(options)),
    )
    .await
    .context("connect to etcd: timed out")?
    .context("connect to etcd")?;
    let lease_ttl_s = config.etcd.lease_ttl_s;
    let lease_id = tokio::time::timeout(
        Duration::from_secs(lease_ttl_s.unsigned_abs()),
        client.lease_grant(lease_ttl_s, None),
    )
    .await
    .context("grant lease: timed out")?
    .context("grant lease")?
    .id();
    let lease_lost = CancellationToken::new();
    let keeper = tokio::spawn(keep_alive(
        client.clone(),
        lease_id,
        lease_ttl_s,
        lease_lost.clone(),
    ));
    let result = campaign_and_lead(
        config,
        store,
        metrics,
        leader,
        shutdown,
        &mut client,
        lease_id,
        &lease_lost,
    )
    .await;
    keeper.abort();
    let _ = tokio::time::timeout(
        Duration::from_millis(STEP_DOWN_TIMEOUT_MS),
        client.lease_revoke(lease_id),
    )
    .await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn campaign_and_lead(
    config: &Config,
    store: &Store,
    metrics: &Metrics,
    leader: &watch::Sender<Option<i64>>,
    shutdown: &CancellationToken,
    client: &mut Client,
    lease_id: i64,
    lease_lost: &CancellationToken,
) -> anyhow::Result<()> {
    let mut election = client.election_client();
    let election_name = format!("{}/leader", config.etcd.prefix);
    let campaign = tokio::select! {
        response = election.campaign(election_name.as_str(), config.node_id.as_str(), lease_id) => {
            response.context("campaign")?
        }
        () = lease_lost.cancelled() => anyhow::bail!("lease lost while campaigning"),
        () = shutdown.cancelled() => return Ok(()),
    };
    let leader_key = campaign
        .leader()
        .cloned()
        .context("campaign answered without a leader key")?;
    // etcd's cluster id tells a rebuilt etcd (whose revisions start over) from a stale leader.
    let etcd_cluster_id = campaign
        .header()
        .map_or(0, |header| header.cluster_id() as i64);
    let epoch = store
        .claim_epoch(leader_key.rev(), etcd_cluster_id, &config.node_id)
        .await
        .context("claim epoch")?;
    tracing::info!(epoch, node_id = %config.node_id, "elected leader");
    leader.send_replace(Some(epoch));
    metrics.leader.set(1);
    metrics.leader_epoch.set(epoch);
    metrics.leader_changes_total.inc();

    // The singleton loops of this term stop when the lease is lost, at
    // shutdown, or when one of them finds itself fenced.
    let term_over = CancellationToken::new();
    let dispatcher = tokio::spawn(dispatch::run(
        Arc::new(config.clone()),
        store.clone(),
        metrics.clone(),
        epoch,
        term_over.clone(),
    ));
    let timers = tokio::spawn(crate::timers::run(
        store.clone(),
        metrics.clone(),
        config.dispatch.clone(),
        epoch,
        term_over.clone(),
    ));
    let stop_reason = tokio::select! {
        () = lease_lost.cancelled() => "lease lost",
        () = shutdown.cancelled() => "shutdown",
        () = term_over.cancelled() => "fenced",
    };
    term_over.cancel();
    leader.send_replace(None);
    metrics.leader.set(0);
    metrics.leader_epoch.set(0);
    tracing::info!(epoch, reason = stop_reason, "stepping down");
    let _ = dispatcher.await;
    let _ = timers.await;
    let _ = tokio::time::timeout(
        Duration::from_millis(STEP_DOWN_TIMEOUT_MS),
        election.resign(Some(ResignOptions::new().with_leader(leader_key))),
    )
    .await;
    if stop_reason == "shutdown" {
        Ok(())
    } else {
        anyhow::bail!("{stop_reason}")
    }
}

/// Renews the lease every third of its TTL. Cancels `lease_lost` when etcd
/// reports it expired, or when no renewal succeeded for two thirds of the TTL
/// (so this master stops acting before etcd hands leadership to another).
async fn keep_alive(
    mut client: Client,
    lease_id: i64,
    lease_ttl_s: i64,
    lease_lost: CancellationToken,
) {
    let lease_ttl = Duration::from_secs(lease_ttl_s.unsigned_abs());
    let interval = lease_ttl / 3;
    let deadline = lease_ttl * 2 / 3;
    let mut renewed_at = Instant::now();
    let stream = tokio::time::timeout(interval, client.lease_keep_alive(lease_id)).await;
    let Ok(Ok((mut keeper, mut responses))) = stream else {
        lease_lost.cancel();
        return;
    };
    loop {
        tokio::time::sleep(interval).await;
        let renewal = tokio::time::timeout(interval, async {
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match renewal {
            Ok(Ok(Some(response))) if response.ttl() > 0 => renewed_at = Instant::now(),
            Ok(Ok(Some(_))) => {
                tracing::warn!(lease_id, "lease expired");
                lease_lost.cancel();
                return;
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                tracing::debug!(lease_id, "lease renewal failed");
            }
        }
        if renewed_at.elapsed() >= deadline {
            tracing::warn!(lease_id, "lease not renewed in time");
            lease_lost.cancel();
            return;
        }
    }
}
