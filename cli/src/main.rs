//! `wardctl`: Ward from a shell, through the HTTP API.

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

/// Poll interval of `instance start --wait`.
const WAIT_POLL_MS: u64 = 50;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(args).await {
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
