//! Load generation and measurement: Zipf-distributed tenant choice,
//! closed-loop bursts and open-loop paced submission (measured from the
//! intended send time), latency percentiles and Jain's index.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;
use serde_json::{Value, json};

use crate::cluster::Cluster;

/// Chooses tenant indices with probability proportional to 1 / rank^s.
#[derive(Debug, Clone)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(count: usize, exponent: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=count)
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(exponent);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let target = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&value| value < target)
            .min(self.cumulative.len() - 1)
    }
}

/// Starts one instance per entry (the tenant's key), `concurrency` at a
/// time, as fast as the API takes them. Returns how many were accepted.
pub async fn burst(
    cluster: &Cluster,
    keys: &[&str],
    definition: &str,
    input: &Value,
    concurrency: usize,
) -> usize {
    let body = json!({ "definition": definition, "input": input });
    futures::stream::iter(keys)
        .map(|key| {
            let body = &body;
            async move { cluster.post(key, "/v1/instances", body).await.is_ok() }
        })
        .buffer_unordered(concurrency)
        .filter(|accepted| std::future::ready(*accepted))
        .count()
        .await
}

/// Submits `(offset, key)` pairs at their intended offsets from now (open
/// loop: a slow answer does not delay later sends). Returns accepted count.
pub async fn paced(
    cluster: &Cluster,
    sends: Vec<(Duration, String)>,
    definition: &str,
    input: &Value,
) -> usize {
    let started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(512));
    let body = Arc::new(json!({ "definition": definition, "input": input }));
    let mut handles = Vec::with_capacity(sends.len());
    for (offset, key) in sends {
        let http = cluster.http.clone();
        let url = format!("{}/v1/instances", cluster.url);
        let body = body.clone();
        let limit = limit.clone();
        handles.push(tokio::spawn(async move {
            tokio::time::sleep_until((started + offset).into()).await;
            let _permit = limit.acquire().await.ok()?;
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&*body)
                .send()
                .await
                .ok()?;
            response.status().is_success().then_some(())
        }));
    }
    let mut accepted = 0;
    for handle in handles {
        if let Ok(Some(())) = handle.await {
            accepted += 1;
        }
    }
    accepted
}

/// The value at quantile `q` (0..=1) of sorted `values`.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Jain's fairness index: 1 when all shares are equal.
pub fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|share| share * share).sum();
    if shares.is_empty() || squares == 0.0 {
        return 1.0;
    }
    sum * sum / (shares.len() as f64 * squares)
}

/// Schedule-to-start latencies in ms (task created to handler started), by
/// tenant slug and tier.
pub async fn schedule_to_start(cluster: &Cluster) -> anyhow::Result<Vec<(String, String, f64)>> {
    let sql = cluster.sql().await?;
    let rows = sql
        .query(
            "SELECT t.slug, r.tier, (extract(epoch FROM r.started_at - r.created_at) * 1000)::float8 \
             FROM task_runs r JOIN tenants t ON t.id = r.tenant_id WHERE r.started_at IS NOT NULL",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect())
}

pub fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(|a, b| a.total_cmp(b));
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn zipf_prefers_low_ranks() {
        let zipf = Zipf::new(1000, 1.1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let samples: Vec<usize> = (0..10_000).map(|_| zipf.sample(&mut rng)).collect();
        let first = samples.iter().filter(|&&s| s == 0).count();
        let last_half = samples.iter().filter(|&&s| s >= 500).count();
        assert!(first > 1000, "{first}");
        assert!(last_half < 2000, "{last_half}");
        assert!(samples.iter().all(|&s| s < 1000));
    }

    #[test]
    fn percentiles_and_jain() {
        let values = sorted((1..=100).map(f64::from).collect());
        assert_eq!(percentile(&values, 0.5), 51.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert!((jain(&[2.0, 2.0]) - 1.0).abs() < 1e-12);
    }
}
