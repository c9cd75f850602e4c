//! `lockstep-testapi-bench`: how fast the test API server creates, patches and delivers watch events,
//! through a real `kube::Client` over loopback HTTP. Prints throughput and p50/p99 latencies; asserts
//! nothing (the machines are shared and noisy). The floor the freeze's API path starts from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use lockstep_testapi::{Options, TestApiServer};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "Create / patch / watch-delivery throughput and latency of the test API server.")]
struct Cli {
    /// How many objects.
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Durable mode: keep the objects in this directory (measures the log too).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

/// When each object's latest write was sent, to time its watch event.
type Sent = Arc<Mutex<HashMap<String, Instant>>>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(what: &str, mut latencies: Vec<Duration>, elapsed: Duration) {
    latencies.sort();
    let n = latencies.len();
    println!(
        "{what:<16} {n:>6} in {:>7.2}s  {:>8.0}/s  p50 {:>7.2}ms  p99 {:>7.2}ms  max {:>7.2}ms",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64().max(1e-9),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

async fn run_phase<F, Fut>(
    n: usize,
    concurrency: usize,
    op: F,
) -> anyhow::Result<(Vec<Duration>, Duration)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    let latencies: Vec<Duration> = futures::stream::iter(0..n)
        .map(|i| {
            let fut = op(i);
            async move {
                let t = Instant::now();
                fut.await?;
                Ok::<_, anyhow::Error>(t.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    Ok((latencies, start.elapsed()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let server = TestApiServer::start(Options {
        data_dir: cli.data_dir.clone(),
        history: cli.objects * 3,
        ..Options::default()
    })
    .await?;
    let client = server.client().await?;
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "bench"}}))?,
    )
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "bench");
    println!(
        "lockstep-testapi-bench: {} objects, {} in flight, {} mode",
        cli.objects,
        cli.concurrency,
        if cli.data_dir.is_some() {
            "durable"
        } else {
            "in-memory"
        }
    );

    // The watcher: every ADDED and MODIFIED event, timed from when its write was sent.
    let sent: Sent = Arc::new(Mutex::new(HashMap::new()));
    let rv = server.resource_version().unwrap_or(0).to_string();
    let mut events = cms.watch(&WatchParams::default(), &rv).await?.boxed();
    let expected = cli.objects * 2;
    let watch_sent = sent.clone();
    let watcher = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(expected);
        let mut first: Option<Instant> = None;
        while latencies.len() < expected {
            match events.try_next().await {
                Ok(Some(WatchEvent::Added(cm) | WatchEvent::Modified(cm))) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    let name = cm.metadata.name.unwrap_or_default();
                    let at = watch_sent
                        .lock()
                        .map(|m| m.get(&name).copied())
                        .ok()
                        .flatten();
                    latencies.push(at.map(|t| now.duration_since(t)).unwrap_or_default());
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        (latencies, first.map(|f| f.elapsed()).unwrap_or_default())
    });

    let create = |i: usize| {
        let cms = cms.clone();
        let sent = sent.clone();
        async move {
            let name = format!("cm-{i:05}");
            let cm: ConfigMap = serde_json::from_value(
                json!({"metadata": {"name": name}, "data": {"i": i.to_string()}}),
            )?;
            if let Ok(mut m) = sent.lock() {
                m.insert(name, Instant::now());
            }
            cms.create(&PostParams::default(), &cm).await?;
            Ok(())
        }
    };
    let (latencies, elapsed) = run_phase(cli.objects, cli.concurrency, create).await?;
    report("create", latencies, elapsed);

    let patch = |i: usize| {
        let cms = cms.clone();
        let sent = sent.clone();
        async move {
            let name = format!("cm-{i:05}");
            if let Ok(mut m) = sent.lock() {
                m.insert(name.clone(), Instant::now());
            }
            cms.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"patched": "yes"}})),
            )
            .await?;
            Ok(())
        }
    };
    let (latencies, elapsed) = run_phase(cli.objects, cli.concurrency, patch).await?;
    report("patch (merge)", latencies, elapsed);

    let apply = |i: usize| {
        let cms = cms.clone();
        async move {
            let name = format!("cm-{i:05}");
            let config = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                                "data": {"applied": "yes"}});
            cms.patch(&name, &PatchParams::apply("bench"), &Patch::Apply(config))
                .await?;
            Ok(())
        }
    };
    let (watch_latencies, watch_elapsed) =
        match tokio::time::timeout(Duration::from_secs(300), watcher).await {
            Ok(joined) => joined?,
            Err(_) => anyhow::bail!("the watch did not deliver every event within 300s"),
        };
    report("watch delivery", watch_latencies, watch_elapsed);
    let (latencies, elapsed) = run_phase(cli.objects, cli.concurrency, apply).await?;
    report("server-side apply", latencies, elapsed);

    let list_start = Instant::now();
    let listed = cms.list(&Default::default()).await?;
    report(
        "list (one call)",
        vec![list_start.elapsed()],
        list_start.elapsed(),
    );
    println!(
        "listed {} objects at resourceVersion {:?}",
        listed.items.len(),
        listed.metadata.resource_version
    );
    server.stop().await;
    Ok(())
}
