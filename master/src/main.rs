//! `ward-master`: the API server and leader-elected dispatcher.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ward_master::{Config, Master};

/// Ward master: serves the HTTP API; the elected leader dispatches ready tasks.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file; `WARD_*` environment variables override it.
    #[arg(long, env = "WARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Apply pending database migrations, then exit.
    Migrate,
}

/// mimalloc instead of glibc malloc: at full load glibc's malloc and free
/// (with its chunk consolidation) took a quarter of the Rust processes' CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(args.config.as_deref())?;
    init_tracing(config.log_json);
    if let Some(Command::Migrate) = args.command {
        ward_store::migrate(&ward_master::store_settings(&config)).await?;
        tracing::info!(schema = %config.database.schema, "migrations applied");
        return Ok(());
    }
    let master = Master::start(config).await?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    master.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}
