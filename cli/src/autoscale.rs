//! `wardctl autoscale`: the local autoscaler for installs without
//! Kubernetes. It reads the leader's per-tier desired worker count (the
//! signal KEDA and the HPA use, through `GET /v1/admin/cluster`), starts
//! `ward-worker` processes up to it and stops the newest ones (SIGTERM: they
//! drain before they exit) when it stays lower for the scale-down delay,
//! always between the minimum and the maximum. Optionally writes the
//! workers' addresses as a Prometheus file_sd target file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::Client;

/// `wardctl autoscale` options.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Tiers to scale (each gets its own workers); repeat or comma-separate.
    #[arg(long = "tier", required = true, value_delimiter = ',')]
    pub tiers: Vec<String>,
    /// Fewest workers per tier.
    #[arg(long, default_value_t = 1)]
    pub min: usize,
    /// Most workers per tier.
    #[arg(long, default_value_t = 4)]
    pub max: usize,
    /// The worker binary (default: `ward-worker` next to wardctl, else on PATH).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// First port of the workers' health and metrics endpoints; each worker
    /// takes the next free one from here (0: any free port).
    #[arg(long, default_value_t = 9100)]
    pub port_base: u16,
    /// How often to read the signal.
    #[arg(long, default_value_t = 2_000)]
    pub interval_ms: u64,
    /// A lower desired count must hold this long before workers are stopped.
    #[arg(long, default_value_t = 30)]
    pub scale_down_delay_s: u64,
    /// Node-id prefix of the started workers (`<prefix>-<tier>-<n>`).
    #[arg(long, default_value = "autoscale")]
    pub node_prefix: String,
    /// Prometheus file_sd target file to keep current (written atomically).
    #[arg(long)]
    pub targets_file: Option<PathBuf>,
    /// Folder for the workers' log files.
    #[arg(long, default_value = ".ward/autoscale")]
    pub log_dir: PathBuf,
    /// Stop after this many seconds (tests and demos); runs until SIGTERM
    /// or Ctrl-C otherwise.
    #[arg(long)]
    pub run_for_s: Option<u64>,
}

/// A worker this autoscaler started.
struct Started {
    node_id: String,
    port: u16,
    child: Child,
}

/// One tier's workers and its pending scale-down.
#[derive(Default)]
struct TierState {
    workers: Vec<Started>,
    lower_since: Option<Instant>,
    next_index: usize,
}

/// The count to run: the signal within `[min, max]`; with no signal, keep
/// what runs (within the bounds).
pub fn target(desired: Option<i64>, running: usize, min: usize, max: usize) -> usize {
    let max = max.max(min);
    match desired {
        Some(desired) => usize::try_from(desired.max(0))
            .unwrap_or(max)
            .clamp(min, max),
        None => running.clamp(min, max),
    }
}

/// Runs the autoscaler until a signal (or `run_for_s`), then stops every
/// worker it started (each drains first).
pub async fn run(client: &Client, token: &str, options: Options) -> anyhow::Result<Value> {
    anyhow::ensure!(options.max >= 1, "--max must be at least 1");
    anyhow::ensure!(options.min <= options.max, "--min must not exceed --max");
    let worker_bin = match &options.worker_bin {
        Some(path) => path.clone(),
        None => {
            let beside = std::env::current_exe()?
                .parent()
                .map(|dir| dir.join("ward-worker"));
            match beside {
                Some(path) if path.exists() => path,
                _ => PathBuf::from("ward-worker"),
            }
        }
    };
    std::fs::create_dir_all(&options.log_dir)
        .with_context(|| format!("create {}", options.log_dir.display()))?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    let deadline = options
        .run_for_s
        .map(|seconds| Instant::now() + Duration::from_secs(seconds));
    let mut tiers: BTreeMap<String, TierState> = options
        .tiers
        .iter()
        .map(|tier| (tier.clone(), TierState::default()))
        .collect();
    let mut events: Vec<Value> = Vec::new();
    // Workers being stopped (draining); awaited before the autoscaler exits.
    let mut stopping = tokio::task::JoinSet::new();
    loop {
        let status = client.get(token, "/v1/admin/cluster").await;
        let desired_by_tier: BTreeMap<String, Option<i64>> = match &status {
            Ok(status) => status["tiers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|tier| {
                    Some((
                        tier["tier"].as_str()?.to_owned(),
                        tier["workers_desired"].as_i64(),
                    ))
                })
                .collect(),
            Err(error) => {
                eprintln!("autoscale: cluster status unavailable ({error:#}); keeping workers");
                BTreeMap::new()
            }
        };
        for (tier, state) in tiers.iter_mut() {
            // Forget workers that exited on their own (a crash): started again below.
            let mut kept = Vec::new();
            for mut worker in state.workers.drain(..) {
                match worker.child.try_wait() {
                    Ok(Some(exit)) => eprintln!(
                        "autoscale: {} exited ({exit}); replacing it",
                        worker.node_id
                    ),
                    _ => kept.push(worker),
                }
            }
            state.workers = kept;
            let running = state.workers.len();
            let desired = desired_by_tier.get(tier).copied().flatten();
            let wanted = target(desired, running, options.min, options.max);
            if wanted > running {
                state.lower_since = None;
                for _ in running..wanted {
                    state.next_index += 1;
                    let node_id = format!("{}-{tier}-{}", options.node_prefix, state.next_index);
                    match start_worker(&worker_bin, tier, &node_id, &options) {
                        Ok((port, child)) => state.workers.push(Started {
                            node_id,
                            port,
                            child,
                        }),
                        // Tried again at the next round.
                        Err(error) => eprintln!("autoscale: start {node_id}: {error:#}"),
                    }
                }
                let now_running = state.workers.len();
                say(&mut events, tier, running, now_running, desired);
            } else if wanted < running {
                let since = *state.lower_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(options.scale_down_delay_s) {
                    // Newest first; each drains its in-flight tasks, then exits.
                    for worker in state.workers.drain(wanted..) {
                        stopping.spawn(stop(worker));
                    }
                    state.lower_since = None;
                    say(&mut events, tier, running, wanted, desired);
                }
            } else {
                state.lower_since = None;
            }
        }
        if let Some(path) = &options.targets_file {
            if let Err(error) = write_targets(path, &tiers) {
                eprintln!("autoscale: {error:#}");
            }
        }
        // Reap the workers that finished draining.
        while stopping.try_join_next().is_some() {}
        let sleep = tokio::time::sleep(Duration::from_millis(options.interval_ms.max(100)));
        let stop_now = tokio::select! {
            () = sleep => deadline.is_some_and(|deadline| Instant::now() >= deadline),
            _ = tokio::signal::ctrl_c() => true,
            _ = terminate.recv() => true,
        };
        if stop_now {
            break;
        }
    }
    for state in tiers.values_mut() {
        for worker in state.workers.drain(..) {
            stopping.spawn(stop(worker));
        }
    }
    // Every stopped worker drains before the autoscaler exits.
    while stopping.join_next().await.is_some() {}
    if let Some(path) = &options.targets_file {
        write_targets(path, &tiers)?;
    }
    Ok(json!({ "events": events }))
}

fn say(events: &mut Vec<Value>, tier: &str, from: usize, to: usize, desired: Option<i64>) {
    eprintln!("autoscale: {tier} {from} -> {to} workers (desired {desired:?})");
    events.push(json!({ "tier": tier, "from": from, "to": to, "desired": desired, "at": chrono::Utc::now() }));
}

/// SIGTERM, then wait: the worker stops taking work and drains within its
/// own shutdown deadline.
async fn stop(mut worker: Started) {
    if let Some(pid) = worker.child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    match worker.child.wait().await {
        Ok(exit) => eprintln!("autoscale: {} stopped ({exit})", worker.node_id),
        Err(error) => eprintln!("autoscale: {} wait failed: {error}", worker.node_id),
    }
}

/// Starts one worker of `tier`; its port and process.
fn start_worker(
    worker_bin: &std::path::Path,
    tier: &str,
    node_id: &str,
    options: &Options,
) -> anyhow::Result<(u16, Child)> {
    let port = free_port_from(options.port_base)?;
    let log = std::fs::File::create(options.log_dir.join(format!("{node_id}.log")))?;
    let child = Command::new(worker_bin)
        .env("WARD_TIERS", tier)
        .env("WARD_NODE_ID", node_id)
        .env("WARD_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", worker_bin.display()))?;
    Ok((port, child))
}

/// The first port from `base` that is free now (any free port when `base`
/// is 0); ports of stopped workers are reused.
fn free_port_from(base: u16) -> anyhow::Result<u16> {
    if base == 0 {
        return Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port());
    }
    for port in base..=base.saturating_add(1_000) {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port from {base} to {}", base.saturating_add(1_000))
}

/// Writes the Prometheus file_sd target file atomically.
fn write_targets(
    path: &std::path::Path,
    tiers: &BTreeMap<String, TierState>,
) -> anyhow::Result<()> {
    let targets: Vec<String> = tiers
        .values()
        .flat_map(|state| state.workers.iter())
        .map(|worker| format!("127.0.0.1:{}", worker.port))
        .collect();
    let body = json!([{ "targets": targets, "labels": { "role": "worker" } }]);
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, serde_json::to_vec_pretty(&body)?)
        .with_context(|| format!("write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::target;

    #[test]
    fn the_signal_is_bounded_and_its_absence_keeps_what_runs() {
        assert_eq!(target(Some(5), 1, 1, 3), 3);
        assert_eq!(target(Some(0), 2, 1, 3), 1);
        assert_eq!(target(Some(2), 2, 1, 3), 2);
        assert_eq!(target(None, 2, 1, 3), 2);
        assert_eq!(target(None, 0, 1, 3), 1);
        assert_eq!(target(Some(-4), 0, 0, 3), 0);
    }
}
