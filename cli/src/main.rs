//! `wardctl`: Ward from a shell, through the HTTP API.

mod autoscale;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;

/// Command-line client for the Ward HTTP API.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Base URL of any master.
    #[arg(
        long,
        env = "WARD_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// A tenant's API key (tenant commands).
    #[arg(long, env = "WARD_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// The admin token (tenant management).
    #[arg(long, env = "WARD_ADMIN_TOKEN", hide_env_values = true, global = true)]
    admin_token: Option<String>,
    /// Bound on each HTTP request.
    #[arg(long, default_value_t = 10_000, global = true)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage tenants (admin token).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage workflow definitions.
    #[command(subcommand)]
    Definition(DefinitionCommand),
    /// Start, inspect, cancel and signal instances.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Manage cron schedules that start instances.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Apply a file of tiers and tenants (admin token): creates what is
    /// missing, updates what differs; idempotent.
    Apply {
        /// YAML (or JSON) file with `tiers:` and `tenants:`.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Show what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Where to write the API keys of created tenants (CSV: slug,api_key);
        /// printed to standard output when not given.
        #[arg(long)]
        keys_file: Option<PathBuf>,
        /// Tenants per request.
        #[arg(long, default_value_t = 500)]
        batch_len: usize,
    },
    /// Show the tenant's quotas and current usage.
    Usage,
    /// Cluster membership and health (admin token).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Local autoscaler (admin token): starts and stops `ward-worker`
    /// processes per tier between a minimum and a maximum, following the
    /// leader's desired worker count; stopped workers drain first.
    Autoscale(autoscale::Options),
    /// Dead-lettered tasks: poison tasks past the delivery limit and
    /// unreadable messages, with the reason.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// The leader and its epoch, registered masters and workers, and each
    /// tier's workers, ready backlog and in-flight runs.
    Status {
        /// Print the JSON answer instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// Newest first: the tenant's (with an API key) or, with the admin
    /// token, every tenant's or one tenant's (`--tenant`).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

#[derive(Debug, Subcommand)]
enum ScheduleCommand {
    /// Create or replace a schedule.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        definition: String,
        #[arg(long)]
        version: Option<i32>,
        /// Cron expression in UTC: 5 fields, or 6 with seconds first.
        #[arg(long)]
        cron: String,
        /// Input of every started instance, as JSON text.
        #[arg(long)]
        input: Option<String>,
        /// Store it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List the tenant's schedules.
    List,
    /// Delete a schedule.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant; prints its API key once.
    Create {
        #[arg(long)]
        slug: String,
        #[arg(long, default_value = "silver")]
        tier: String,
    },
}

#[derive(Debug, Subcommand)]
enum DefinitionCommand {
    /// Publish a definition file (YAML for .yaml/.yml, else JSON) as a new version.
    Publish { file: PathBuf },
}

#[derive(Debug, Subcommand)]
enum InstanceCommand {
    /// Start an instance of a definition.
    Start {
        #[arg(long)]
        definition: String,
        #[arg(long)]
        version: Option<i32>,
        /// Input as JSON text.
        #[arg(long, conflicts_with = "input_file")]
        input: Option<String>,
        /// Input read from a JSON file.
        #[arg(long)]
        input_file: Option<PathBuf>,
        #[arg(long)]
        business_key: Option<String>,
        /// Sent as the Idempotency-Key header: a retry with the same key
        /// returns the instance the first call started.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until the instance completes or fails, then print it.
        #[arg(long)]
        wait: bool,
        /// Bound on --wait.
        #[arg(long, default_value_t = 60)]
        wait_timeout_s: u64,
    },
    /// Show an instance with its steps.
    Show { id: String },
    /// List instances, newest first.
    List {
        #[arg(long)]
        definition: Option<String>,
        /// running, completed, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        business_key: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        /// The `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show an instance's history, oldest event first.
    History { id: String },
    /// Cancel a running instance.
    Cancel { id: String },
    /// Send a named signal to an instance.
    Signal {
        id: String,
        name: String,
        /// Payload as JSON text.
        #[arg(long)]
        payload: Option<String>,
    },
}

/// `cluster status` as plain-text tables.
fn cluster_tables(status: &Value) -> String {
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut out = String::new();
    match status.get("leader").filter(|leader| !leader.is_null()) {
        Some(leader) => out.push_str(&format!(
            "leader: {} (epoch {}, since {})\n",
            text(&leader["node_id"]),
            text(&leader["epoch"]),
            text(&leader["elected_at"])
        )),
        None => out.push_str("leader: none\n"),
    }
    out.push_str(&format!(
        "\n{:<8} {:<28} {:<22} {:<24} {:>8}  {}\n",
        "ROLE", "NODE", "HTTP", "TIERS", "PID", "STARTED"
    ));
    for role in ["masters", "workers"] {
        for member in status[role].as_array().into_iter().flatten() {
            let tiers = member["tiers"]
                .as_array()
                .map(|tiers| tiers.iter().map(text).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<8} {:<28} {:<22} {:<24} {:>8}  {}\n",
                text(&member["role"]),
                text(&member["node_id"]),
                text(&member["http_addr"]),
                if tiers.is_empty() {
                    "-".to_owned()
                } else {
                    tiers
                },
                text(&member["pid"]),
                text(&member["started_at"])
            ));
        }
    }
    out.push_str(&format!(
        "\n{:<12} {:>8} {:>8} {:>10} {:>10}\n",
        "TIER", "WORKERS", "DESIRED", "READY", "IN_FLIGHT"
    ));
    for tier in status["tiers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<12} {:>8} {:>8} {:>10} {:>10}\n",
            text(&tier["tier"]),
            text(&tier["workers"]),
            text(&tier["workers_desired"]),
            text(&tier["ready"]),
            text(&tier["in_flight"])
        ));
    }
    out
}

/// Poll interval of `instance start --wait`.
const WAIT_POLL_MS: u64 = 50;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(Value::Null) => {}
        Ok(output) => println!(
            "{}",
            serde_json::to_string_pretty(&output).unwrap_or_default()
        ),
        Err(error) => {
            eprintln!("wardctl: {error:#}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let client = Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_millis(args.timeout_ms))
            .build()?,
        url: args.url.trim_end_matches('/').to_owned(),
    };
    let tenant_key = || {
        args.api_key
            .clone()
            .context("a tenant API key is needed: --api-key or WARD_API_KEY")
    };
    match args.command {
        Command::Tenant(TenantCommand::Create { slug, tier }) => {
            let token = args
                .admin_token
                .clone()
                .context("the admin token is needed: --admin-token or WARD_ADMIN_TOKEN")?;
            client
                .post(
                    &token,
                    "/v1/admin/tenants",
                    serde_json::json!({ "slug": slug, "tier": tier }),
                )
                .await
        }
        Command::Definition(DefinitionCommand::Publish { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let yaml = file
                .extension()
                .is_some_and(|extension| extension == "yaml" || extension == "yml");
            let content_type = if yaml {
                "application/yaml"
            } else {
                "application/json"
            };
            client
                .post_raw(&tenant_key()?, "/v1/definitions", content_type, text)
                .await
        }
        Command::Instance(InstanceCommand::Start {
            definition,
            version,
            input,
            input_file,
            business_key,
            idempotency_key,
            wait,
            wait_timeout_s,
        }) => {
            let input: Value = match (input, input_file) {
                (Some(text), _) => serde_json::from_str(&text).context("--input is not JSON")?,
                (None, Some(path)) => serde_json::from_str(
                    &std::fs::read_to_string(&path)
                        .with_context(|| format!("read {}", path.display()))?,
                )
                .with_context(|| format!("parse {} as JSON", path.display()))?,
                (None, None) => Value::Object(Default::default()),
            };
            let mut body = serde_json::json!({ "definition": definition, "input": input });
            if let Some(version) = version {
                body["version"] = version.into();
            }
            if let Some(business_key) = business_key {
                body["business_key"] = business_key.into();
            }
            let key = tenant_key()?;
            let started = match idempotency_key {
                Some(idempotency_key) => {
                    client
                        .post_keyed(&key, "/v1/instances", body, &idempotency_key)
                        .await?
                }
                None => client.post(&key, "/v1/instances", body).await?,
            };
            if !wait {
                return Ok(started);
            }
            let id = started["id"]
                .as_str()
                .context("answer without an id")?
                .to_owned();
            let deadline = Instant::now() + Duration::from_secs(wait_timeout_s);
            loop {
                let instance = client.get(&key, &format!("/v1/instances/{id}")).await?;
                if instance["status"] != "running" {
                    report_elapsed(&instance);
                    return Ok(instance);
                }
                if Instant::now() >= deadline {
                    bail!("instance {id} still running after {wait_timeout_s} s");
                }
                tokio::time::sleep(Duration::from_millis(WAIT_POLL_MS)).await;
            }
        }
        Command::Apply {
            file,
            dry_run,
            keys_file,
            batch_len,
        } => {
            let token = args
                .admin_token
                .clone()
                .context("the admin token is needed: --admin-token or WARD_ADMIN_TOKEN")?;
            apply(
                &client,
                &token,
                &file,
                dry_run,
                keys_file.as_deref(),
                batch_len,
            )
            .await
        }
        Command::Usage => client.get(&tenant_key()?, "/v1/usage").await,
        Command::Cluster(ClusterCommand::Status { json }) => {
            let token = args
                .admin_token
                .clone()
                .context("the admin token is needed: --admin-token or WARD_ADMIN_TOKEN")?;
            let status = client.get(&token, "/v1/admin/cluster").await?;
            if json {
                return Ok(status);
            }
            print!("{}", cluster_tables(&status));
            Ok(Value::Null)
        }
        Command::Autoscale(options) => {
            let token = args
                .admin_token
                .clone()
                .context("the admin token is needed: --admin-token or WARD_ADMIN_TOKEN")?;
            autoscale::run(&client, &token, options).await
        }
        Command::DeadLetters(DeadLetterCommand::List { tenant, limit }) => {
            match (&args.admin_token, &args.api_key) {
                (Some(token), _) => {
                    let mut path = format!("/v1/admin/dead-letters?limit={limit}");
                    if let Some(tenant) = tenant {
                        path.push_str(&format!("&tenant={tenant}"));
                    }
                    client.get(token, &path).await
                }
                (None, Some(key)) => {
                    anyhow::ensure!(
                        tenant.is_none(),
                        "--tenant needs the admin token; an API key lists its own tenant's"
                    );
                    client
                        .get(key, &format!("/v1/dead-letters?limit={limit}"))
                        .await
                }
                (None, None) => {
                    bail!("an API key (--api-key) or the admin token (--admin-token) is needed")
                }
            }
        }
        Command::Instance(InstanceCommand::Show { id }) => {
            client
                .get(&tenant_key()?, &format!("/v1/instances/{id}"))
                .await
        }
        Command::Instance(InstanceCommand::List {
            definition,
            status,
            business_key,
            limit,
            cursor,
        }) => {
            let mut query: Vec<(&str, String)> = Vec::new();
            query.extend(definition.map(|value| ("definition", value)));
            query.extend(status.map(|value| ("status", value)));
            query.extend(business_key.map(|value| ("business_key", value)));
            query.extend(limit.map(|value| ("limit", value.to_string())));
            query.extend(cursor.map(|value| ("cursor", value)));
            let query = serde_urlencoded(&query);
            client
                .get(&tenant_key()?, &format!("/v1/instances{query}"))
                .await
        }
        Command::Instance(InstanceCommand::History { id }) => {
            client
                .get(&tenant_key()?, &format!("/v1/instances/{id}/history"))
                .await
        }
        Command::Instance(InstanceCommand::Cancel { id }) => {
            client
                .post(
                    &tenant_key()?,
                    &format!("/v1/instances/{id}/cancel"),
                    Value::Null,
                )
                .await
        }
        Command::Instance(InstanceCommand::Signal { id, name, payload }) => {
            let payload: Value = match payload {
                Some(text) => serde_json::from_str(&text).context("--payload is not JSON")?,
                None => Value::Null,
            };
            client
                .post(
                    &tenant_key()?,
                    &format!("/v1/instances/{id}/signals/{name}"),
                    payload,
                )
                .await
        }
        Command::Schedule(ScheduleCommand::Create {
            name,
            definition,
            version,
            cron,
            input,
            disabled,
        }) => {
            let input: Value = match input {
                Some(text) => serde_json::from_str(&text).context("--input is not JSON")?,
                None => Value::Object(Default::default()),
            };
            let mut body = serde_json::json!({
                "name": name, "definition": definition, "cron": cron, "input": input, "enabled": !disabled,
            });
            if let Some(version) = version {
                body["version"] = version.into();
            }
            client.post(&tenant_key()?, "/v1/schedules", body).await
        }
        Command::Schedule(ScheduleCommand::List) => {
            client.get(&tenant_key()?, "/v1/schedules").await
        }
        Command::Schedule(ScheduleCommand::Delete { name }) => {
            client
                .delete(&tenant_key()?, &format!("/v1/schedules/{name}"))
                .await
        }
    }
}

/// The file `wardctl apply` reads.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyFile {
    #[serde(default)]
    tiers: Vec<ward_shared::wire::TierSpec>,
    #[serde(default)]
    tenants: Vec<ward_shared::wire::TenantSpec>,
}

/// Applies the file in batches with a progress bar; returns the summed report.
async fn apply(
    client: &Client,
    token: &str,
    file: &std::path::Path,
    dry_run: bool,
    keys_file: Option<&std::path::Path>,
    batch_len: usize,
) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let spec: ApplyFile =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parse {}", file.display()))?;
    let started = Instant::now();
    let progress = indicatif::ProgressBar::new(spec.tenants.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} applying tenants [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut total = ward_shared::wire::ApplyReport::default();
    let batch_len = batch_len.clamp(1, 1_000);
    let batches: Vec<&[ward_shared::wire::TenantSpec]> = if spec.tenants.is_empty() {
        vec![&[]]
    } else {
        spec.tenants.chunks(batch_len).collect()
    };
    for (index, batch) in batches.into_iter().enumerate() {
        // Tiers go with every batch (a dry run rolls each batch back, and
        // later batches may name a new tier); they are counted once.
        let body = serde_json::json!({ "tiers": spec.tiers, "tenants": batch, "dry_run": dry_run });
        let answer = client
            .post(token, "/v1/admin/apply", body)
            .await
            .map_err(|error| {
                let first = index * batch_len;
                error.context(format!(
                    "tenants {first}..{} (earlier batches are applied; re-run to continue)",
                    first + batch.len()
                ))
            })?;
        let report: ward_shared::wire::ApplyReport =
            serde_json::from_value(answer).context("apply answer")?;
        if index == 0 {
            total.tiers_created.extend(report.tiers_created);
            total.tiers_updated.extend(report.tiers_updated);
        }
        total.tenants_created.extend(report.tenants_created);
        total.tenants_updated.extend(report.tenants_updated);
        total.tenants_unchanged += report.tenants_unchanged;
        total.keys.extend(report.keys);
        progress.inc(batch.len() as u64);
    }
    progress.finish_and_clear();
    let mut diff = String::new();
    for tier in &total.tiers_created {
        diff.push_str(&format!("+ tier {tier}\n"));
    }
    for tier in &total.tiers_updated {
        diff.push_str(&format!("~ tier {tier}\n"));
    }
    for slug in &total.tenants_created {
        diff.push_str(&format!("+ tenant {slug}\n"));
    }
    for slug in &total.tenants_updated {
        diff.push_str(&format!("~ tenant {slug}\n"));
    }
    if dry_run {
        eprint!("{diff}");
    }
    eprintln!(
        "{}tiers: {} created, {} updated; tenants: {} created, {} updated, {} unchanged; {:.1} s",
        if dry_run {
            "dry run, nothing changed: "
        } else {
            ""
        },
        total.tiers_created.len(),
        total.tiers_updated.len(),
        total.tenants_created.len(),
        total.tenants_updated.len(),
        total.tenants_unchanged,
        started.elapsed().as_secs_f64()
    );
    let mut keys_csv = String::new();
    for (slug, key) in &total.keys {
        keys_csv.push_str(&format!("{slug},{key}\n"));
    }
    let mut summary = serde_json::json!({
        "dry_run": dry_run,
        "tiers_created": total.tiers_created.len(),
        "tiers_updated": total.tiers_updated.len(),
        "tenants_created": total.tenants_created.len(),
        "tenants_updated": total.tenants_updated.len(),
        "tenants_unchanged": total.tenants_unchanged,
        "seconds": started.elapsed().as_secs_f64(),
    });
    match keys_file {
        Some(path) if !keys_csv.is_empty() => {
            write_private(path, &keys_csv)?;
            summary["keys_file"] = path.display().to_string().into();
        }
        _ => {
            summary["keys"] = total
                .keys
                .iter()
                .map(|(slug, key)| serde_json::json!({ "slug": slug, "api_key": key }))
                .collect();
        }
    }
    Ok(summary)
}

/// Writes a file only its owner can read (API keys).
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// Prints to stderr how long the instance took, from its own timestamps.
fn report_elapsed(instance: &Value) {
    let timestamp = |name: &str| {
        instance[name]
            .as_str()
            .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
    };
    if let (Some(created_at), Some(completed_at)) =
        (timestamp("created_at"), timestamp("completed_at"))
    {
        let elapsed_ms = (completed_at - created_at)
            .num_microseconds()
            .unwrap_or_default() as f64
            / 1000.0;
        eprintln!(
            "instance {} {} in {elapsed_ms:.1} ms (from POST /v1/instances to its last step committed)",
            instance["id"].as_str().unwrap_or_default(),
            instance["status"].as_str().unwrap_or_default(),
        );
    }
}

struct Client {
    http: reqwest::Client,
    url: String,
}

/// `?a=1&b=2` from pairs (empty when there are none).
fn serde_urlencoded(pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let encoded: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key}={}", percent_encode(value)))
        .collect();
    format!("?{}", encoded.join("&"))
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

impl Client {
    async fn post(&self, token: &str, path: &str, body: Value) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token);
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("POST {}{path}", self.url))?;
        answer(response).await
    }

    async fn post_keyed(
        &self,
        token: &str,
        path: &str,
        body: Value,
        idempotency_key: &str,
    ) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token)
            .header("idempotency-key", idempotency_key)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {}{path}", self.url))?;
        answer(response).await
    }

    async fn post_raw(
        &self,
        token: &str,
        path: &str,
        content_type: &str,
        body: String,
    ) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {}{path}", self.url))?;
        answer(response).await
    }

    async fn delete(&self, token: &str, path: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .delete(format!("{}{path}", self.url))
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("DELETE {}{path}", self.url))?;
        answer(response).await
    }

    async fn get(&self, token: &str, path: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("GET {}{path}", self.url))?;
        answer(response).await
    }
}

async fn answer(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await.context("answer is not JSON")?;
    if status.is_success() {
        return Ok(body);
    }
    let error = &body["error"];
    let mut message = format!(
        "{status}: {} ({})",
        error["message"].as_str().unwrap_or("no message"),
        error["code"].as_str().unwrap_or("no code")
    );
    if let Some(field) = error["field"].as_str() {
        message.push_str(&format!(" at `{field}`"));
    }
    if let Some(problems) = error["problems"].as_array() {
        for problem in problems {
            message.push_str(&format!(
                "\n  {}: {}",
                problem["field"].as_str().unwrap_or(""),
                problem["message"].as_str().unwrap_or("")
            ));
        }
    }
    bail!(message)
}
