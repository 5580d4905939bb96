//! `ward-worker`: a worker with the built-in handlers.

use std::path::PathBuf;

use clap::Parser;
use ward_worker::{Config, Registry, Worker};

/// Ward worker: consumes tier queues and runs the built-in handlers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file; `WARD_*` environment variables override it.
    #[arg(long, env = "WARD_CONFIG")]
    config: Option<PathBuf>,
}

/// mimalloc instead of glibc malloc: at full load glibc's malloc and free
/// (with its chunk consolidation) took a quarter of the Rust processes' CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(args.config.as_deref())?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if config.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let mut registry = Registry::builtin();
    if config.fault_handlers {
        tracing::warn!("fault-injection handlers `crash` and `ledger` are enabled");
        registry = registry.with_fault_handlers(config.ledger_path.as_ref().map(PathBuf::from));
    }
    let worker = Worker::start(config, registry).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    worker.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}
