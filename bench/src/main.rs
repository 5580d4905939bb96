//! `ward-bench`: benchmarks that print figures. `ward-bench tenancy` runs
//! the multi-tenancy scenarios against the local services with release
//! binaries and writes JSON and Markdown under `bench/results/`.

mod chaos;
mod cluster;
mod load;
mod perf;
mod tenancy;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;

/// Ward benchmarks.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[arg(
        long,
        env = "WARD_BENCH_DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/ward_bench"
    )]
    database_url: String,
    #[arg(
        long,
        env = "WARD_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    #[arg(
        long,
        env = "WARD_BENCH_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: String,
    /// Folder of the ward-master and ward-worker binaries (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Folder for the JSON and Markdown results.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The fault harness: own Postgres, RabbitMQ and etcd, 3 masters and 3
    /// workers, a steady workload, faults; checks nothing was lost,
    /// duplicated or stuck and prints failover and recovery figures. Exits
    /// non-zero when a check fails.
    Chaos {
        /// Each fault kind once, then drain (a few minutes; run in CI).
        #[arg(long)]
        quick: bool,
        /// Soak length: faults are injected for this long.
        #[arg(long, default_value_t = 600)]
        duration_s: u64,
        /// Soak: seconds between faults, a range `MIN..MAX`.
        #[arg(long, default_value = "10..30")]
        fault_every_s: String,
        /// Instances submitted per second.
        #[arg(long, default_value_t = 10.0)]
        rate_per_s: f64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Performance: throughput, workflow steps, latency at fixed load,
    /// queries under concurrency, the raw substrate, CPU and memory per
    /// 1,000 tasks. JSON and Markdown in --out; `bench/plot.py` draws PNGs.
    Perf {
        /// Shorter windows and a smaller store, for a quick look.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Measured window of each scenario, in seconds.
        #[arg(long)]
        measure_s: Option<u64>,
        /// Instances stored for the query scenario.
        #[arg(long)]
        query_instances: Option<i64>,
        /// Ready tasks loaded for the backlog scenario.
        #[arg(long)]
        backlog_tasks: Option<i64>,
        /// Scenarios to run (default all): throughput, steps, latency,
        /// queries, substrate, backlog. Results then go to
        /// perf[-quick]-only.json.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Scenario 3's offered loads, as shares of scenario 1's maximum.
        #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.8")]
        latency_shares: Vec<f64>,
        /// Take this as scenario 1's maximum (tasks/s) instead of measuring
        /// it, so scenarios 3, 4, 5 and 7 offer the same load in every run
        /// (A/B comparisons). Scenario 1 is then skipped.
        #[arg(long)]
        max_per_s: Option<f64>,
        /// Measure this running cluster (its API's base URL) instead of
        /// starting masters and workers. Its database must be
        /// --database-url (scenarios 4 and 7 bulk-load rows into it, and
        /// timings are read from its rows), its broker --amqp-url (for
        /// scenario 5); it keeps the benchmark's tenants and instances.
        #[arg(long)]
        cluster_url: Option<String>,
        /// The attached cluster's admin token.
        #[arg(long, env = "WARD_BENCH_ADMIN_TOKEN", requires = "cluster_url")]
        admin_token: Option<String>,
        /// The attached cluster's database schema (`database.schema`).
        #[arg(long, default_value = "public")]
        schema: String,
        /// The attached cluster's masters and workers (base URLs of their
        /// `/metrics`; default: --cluster-url alone). CPU and memory are
        /// read from this machine's `ward-master` and `ward-worker`
        /// processes, if it runs them.
        #[arg(long, value_delimiter = ',')]
        process_urls: Vec<String>,
    },
    /// Multi-tenancy: memory at scale, noisy neighbour, fairness, tier
    /// priority, shared versus per-tenant deployments.
    Tenancy {
        /// Smaller sizes, for a quick look.
        #[arg(long)]
        quick: bool,
        /// Seed of the Zipf load.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Scenarios to run (default all): memory, noisy, tiers, utilisation.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .context("binary folder")?
            .to_path_buf(),
    };
    let services = cluster::Services {
        database_url: args.database_url,
        amqp_url: args.amqp_url,
        etcd_endpoints: args.etcd_endpoints,
        bin_dir,
    };
    match args.command {
        Command::Perf {
            quick,
            seed,
            measure_s,
            query_instances,
            backlog_tasks,
            only,
            latency_shares,
            max_per_s,
            cluster_url,
            admin_token,
            schema,
            process_urls,
        } => {
            let mut options = perf::Options::new(quick, seed, args.out.clone());
            options.only = only;
            options.latency_shares = latency_shares
                .into_iter()
                .filter(|share| *share > 0.0 && *share <= 2.0)
                .collect();
            if let Some(backlog_tasks) = backlog_tasks {
                options.backlog_tasks = backlog_tasks.max(1_000);
            }
            options.max_per_s = max_per_s.filter(|max| *max >= 1.0);
            if let Some(url) = cluster_url {
                options.attach = Some(cluster::Attach {
                    url,
                    admin_token: admin_token.context(
                        "--admin-token (or WARD_BENCH_ADMIN_TOKEN) is needed with --cluster-url",
                    )?,
                    schema,
                    process_urls,
                });
            }
            if let Some(measure_s) = measure_s {
                options.measure_s = measure_s.max(1);
            }
            if let Some(query_instances) = query_instances {
                options.query_instances = query_instances.max(1_000);
            }
            let run = format!("p{}", chrono::Utc::now().format("%H%M%S"));
            println!(
                "# ward-bench perf ({})",
                if quick { "quick" } else { "full" }
            );
            perf::run(&services, &run, options).await?;
        }
        Command::Chaos {
            quick,
            duration_s,
            fault_every_s,
            rate_per_s,
            seed,
        } => {
            let (low, high) = fault_every_s
                .split_once("..")
                .and_then(|(low, high)| Some((low.parse().ok()?, high.parse().ok()?)))
                .filter(|(low, high): &(u64, u64)| *low >= 1 && low <= high)
                .context("--fault-every-s: expected MIN..MAX seconds, for example 10..30")?;
            chaos::run(chaos::Options {
                quick,
                duration_s,
                fault_every_s: (low, high),
                rate_per_s,
                seed,
                bin_dir: services.bin_dir.clone(),
                out: args.out.clone(),
            })
            .await?;
        }
        Command::Tenancy { quick, seed, only } => {
            let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
            let sizes = if quick {
                tenancy::Sizes::quick()
            } else {
                tenancy::Sizes::full()
            };
            let run = format!("b{}", chrono::Utc::now().format("%H%M%S"));
            println!(
                "# ward-bench tenancy ({})",
                if quick { "quick" } else { "full" }
            );
            println!(
                "machine: {} cores, {}",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0),
                memory_total()
            );
            let mut memory = serde_json::Value::Null;
            let mut noisy = serde_json::Value::Null;
            let mut tiers = serde_json::Value::Null;
            let mut utilisation = serde_json::Value::Null;
            if wanted("memory") {
                println!("## 1. memory at scale (Zipf s = 1.1 over the tenants, seed {seed})");
                memory = tenancy::memory_at_scale(&services, &run, sizes, seed).await?;
            }
            if wanted("noisy") {
                println!("## 2. noisy neighbour and fairness");
                noisy = tenancy::noisy_neighbour(&services, &run, sizes).await?;
            }
            if wanted("tiers") {
                println!("## 3. tier priority");
                tiers = tenancy::tier_priority(&services, &run).await?;
            }
            if wanted("utilisation") {
                println!("## 4. one shared deployment versus one per tenant");
                utilisation = tenancy::utilisation(&services, &run, sizes).await?;
            }
            let report = json!({
                "benchmark": "tenancy", "quick": quick, "seed": seed, "at": chrono::Utc::now(),
                "version": env!("CARGO_PKG_VERSION"),
                "memory_at_scale": memory, "noisy_neighbour": noisy, "tier_priority": tiers, "utilisation": utilisation,
            });
            std::fs::create_dir_all(&args.out)?;
            let path = args
                .out
                .join(format!("tenancy{}.json", if quick { "-quick" } else { "" }));
            std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
            println!("results: {}", path.display());
        }
    }
    Ok(())
}

fn memory_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .next()
                .map(|line| line.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.0} GiB memory", kb / 1_048_576.0))
        .unwrap_or_default()
}
