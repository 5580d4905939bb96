//! Cluster membership in etcd: each master and worker keeps a key under
//! `{prefix}/members/{role}/{node_id}` bound to a lease it renews, so a lost
//! process disappears within the lease TTL; anyone can list the members.
//! Registration is best effort: a process keeps working while etcd is away
//! and registers again when it is back.

use std::time::Duration;

use anyhow::Context;
use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use tokio_util::sync::CancellationToken;
use ward_shared::settings::Etcd;
use ward_shared::wire::MemberRecord;

/// Backoff bounds between registration attempts.
const RETRY_DELAY_MS_MIN: u64 = 200;
const RETRY_DELAY_MS_MAX: u64 = 5_000;
/// Bound on the revoke at shutdown.
const REVOKE_TIMEOUT_MS: u64 = 1_000;
/// Most members one listing reads.
pub const MEMBERS_MAX: i64 = 10_000;

/// The key prefix of all members.
fn members_prefix(settings: &Etcd) -> String {
    format!("{}/members/", settings.prefix)
}

async fn connect(settings: &Etcd) -> anyhow::Result<Client> {
    let timeout = Duration::from_millis(settings.connect_timeout_ms);
    let options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
    tokio::time::timeout(timeout, Client::connect(&settings.endpoints, Some(options)))
        .await
        .context("connect to etcd: timed out")?
        .context("connect to etcd")
}

/// Keeps `member` registered until `shutdown`, then removes it.
pub async fn register(settings: Etcd, member: MemberRecord, shutdown: CancellationToken) {
    let mut retry_delay_ms = RETRY_DELAY_MS_MIN;
    let ttl = Duration::from_secs(settings.lease_ttl_s.unsigned_abs().max(1));
    while !shutdown.is_cancelled() {
        let began = std::time::Instant::now();
        let held = hold(&settings, &member, &shutdown).await;
        // A registration that lasted a while was healthy: start over fast.
        if began.elapsed() > ttl {
            retry_delay_ms = RETRY_DELAY_MS_MIN;
        }
        match held {
            Ok(()) => return,
            Err(error) => {
                tracing::debug!(
                    error = format!("{error:#}"),
                    retry_delay_ms,
                    "membership registration lost; registering again"
                );
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(retry_delay_ms)) => {}
        }
        retry_delay_ms = (retry_delay_ms * 2).min(RETRY_DELAY_MS_MAX);
    }
}

/// One registration: lease, put, renew until shutdown (Ok) or failure (Err).
async fn hold(
    settings: &Etcd,
    member: &MemberRecord,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut client = connect(settings).await?;
    let ttl = Duration::from_secs(settings.lease_ttl_s.unsigned_abs().max(1));
    let lease_id = tokio::time::timeout(ttl, client.lease_grant(settings.lease_ttl_s, None))
        .await
        .context("grant lease: timed out")?
        .context("grant lease")?
        .id();
    let key = format!(
        "{}{}/{}",
        members_prefix(settings),
        member.role,
        member.node_id
    );
    let value = serde_json::to_vec(member)?;
    tokio::time::timeout(
        ttl,
        client.put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease_id)),
        ),
    )
    .await
    .context("register: timed out")?
    .context("register")?;
    tracing::debug!(key, lease_id, "registered in etcd");
    let interval = ttl / 3;
    let (mut keeper, mut responses) =
        tokio::time::timeout(interval, client.lease_keep_alive(lease_id))
            .await
            .context("keep-alive: timed out")?
            .context("keep-alive")?;
    // A slow renewal is retried until the lease would have expired; only
    // then is it given up (and a new one granted by the caller).
    let mut renewed_at = std::time::Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
        let renewal = tokio::time::timeout(ttl / 2, async {
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match renewal {
            Ok(Ok(Some(response))) if response.ttl() > 0 => renewed_at = std::time::Instant::now(),
            Ok(Ok(Some(_))) => anyhow::bail!("lease expired"),
            Ok(Ok(None)) => anyhow::bail!("keep-alive stream closed"),
            Ok(Err(_)) | Err(_) => {}
        }
        anyhow::ensure!(
            renewed_at.elapsed() < ttl,
            "lease not renewed within its TTL"
        );
    }
    // Leaving: remove the key at once.
    let _ = tokio::time::timeout(
        Duration::from_millis(REVOKE_TIMEOUT_MS),
        client.lease_revoke(lease_id),
    )
    .await;
    Ok(())
}

/// One etcd client for the reads and signals of a process (the member
/// list, the leader's desired-worker signal), connected on first use and
/// again after an error, instead of a new connection per call.
pub struct Registry {
    settings: Etcd,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("prefix", &self.settings.prefix)
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(settings: Etcd) -> Registry {
        Registry {
            settings,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let mut client = self.client.lock().await;
        if let Some(client) = client.as_ref() {
            return Ok(client.clone());
        }
        let connected = connect(&self.settings).await?;
        *client = Some(connected.clone());
        Ok(connected)
    }

    /// Drops the client after an error: the next call connects again.
    async fn forget<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            *self.client.lock().await = None;
        }
        result
    }

    /// Every registered member, masters first, each sorted by node id.
    pub async fn list(&self) -> anyhow::Result<Vec<MemberRecord>> {
        let mut client = self.client().await?;
        let result = async {
            let response = client
                .get(
                    members_prefix(&self.settings),
                    Some(GetOptions::new().with_prefix().with_limit(MEMBERS_MAX)),
                )
                .await
                .context("list members")?;
            let mut members: Vec<MemberRecord> = response
                .kvs()
                .iter()
                .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
                .collect();
            members.sort_by(|a, b| (&a.role, &a.node_id).cmp(&(&b.role, &b.node_id)));
            Ok(members)
        }
        .await;
        self.forget(result).await
    }

    /// Publishes a cluster-wide signal (a small JSON value) under
    /// `{prefix}/signals/{name}`, for example the leader's desired worker counts.
    pub async fn put_signal(&self, name: &str, value: &serde_json::Value) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        let key = format!("{}/signals/{name}", self.settings.prefix);
        let result = async {
            client
                .put(key, serde_json::to_vec(value)?, None)
                .await
                .context("publish signal")?;
            Ok(())
        }
        .await;
        self.forget(result).await
    }

    /// Reads a signal published by `put_signal`, if any.
    pub async fn get_signal(&self, name: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let mut client = self.client().await?;
        let key = format!("{}/signals/{name}", self.settings.prefix);
        let result = async {
            let response = client.get(key, None).await.context("read signal")?;
            Ok(response
                .kvs()
                .first()
                .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
        }
        .await;
        self.forget(result).await
    }
}

/// The record of this process.
pub fn this_process(
    role: &str,
    node_id: &str,
    tiers: Vec<String>,
    http_addr: std::net::SocketAddr,
) -> MemberRecord {
    MemberRecord {
        role: role.to_owned(),
        node_id: node_id.to_owned(),
        tiers,
        http_addr: http_addr.to_string(),
        host: host_name(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: chrono::Utc::now(),
    }
}

/// This machine's host name (for member records).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}
