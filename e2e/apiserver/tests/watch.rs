//! Watches as kube-runtime uses them: a `Controller` and a `reflector` run unchanged; a watch resumes
//! after a restart in durable mode; a too-old resourceVersion makes the watcher relist; bookmarks,
//! timeouts and selector transitions; the fault hooks.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{TestResult, api_error, eventually, server, server_with};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector};
use lockstep_testapi::{Failure, Options};
use serde_json::json;
use tokio::sync::mpsc;

fn config_map(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    cm.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    cm
}

async fn reconcile(cm: Arc<ConfigMap>, api: Arc<Api<ConfigMap>>) -> Result<Action, kube::Error> {
    let name = cm.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply("test-controller"),
        &Patch::Apply(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name,
                             "labels": {"reconciled": "yes"}}}),
        ),
    )
    .await?;
    Ok(Action::await_change())
}

fn error_policy(_cm: Arc<ConfigMap>, _e: &kube::Error, _api: Arc<Api<ConfigMap>>) -> Action {
    Action::requeue(Duration::from_millis(50))
}

#[tokio::test]
async fn a_controller_and_a_reflector_run_unchanged() -> TestResult {
    let (_server, client) = server().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    let (reader, writer) = reflector::store::<ConfigMap>();
    let reflect = reflector(
        writer,
        watcher::watcher(cms.clone(), watcher::Config::default()).default_backoff(),
    )
    .applied_objects()
    .for_each(|_| async {});
    let reflect = tokio::spawn(reflect);
    let controller = Controller::new(cms.clone(), watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(cms.clone()))
        .for_each(|_| async {});
    let controller = tokio::spawn(controller);

    for name in ["one", "two", "three"] {
        cms.create(&PostParams::default(), &config_map(name, &[]))
            .await?;
    }
    eventually(10, "every ConfigMap reconciled", || async {
        let list = cms.list(&Default::default()).await.ok()?;
        let done = list.items.iter().all(|c| {
            c.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("reconciled"))
                .map(String::as_str)
                == Some("yes")
        });
        (list.items.len() == 3 && done).then_some(())
    })
    .await?;
    eventually(
        10,
        "the reflector to hold three reconciled objects",
        || async {
            let state = reader.state();
            let reconciled = state
                .iter()
                .filter(|c| {
                    c.metadata
                        .labels
                        .as_ref()
                        .is_some_and(|l| l.contains_key("reconciled"))
                })
                .count();
            (reconciled == 3).then_some(())
        },
    )
    .await?;
    cms.delete("two", &DeleteParams::default()).await?;
    eventually(10, "the reflector to forget the deleted object", || async {
        (reader.state().len() == 2).then_some(())
    })
    .await?;
    controller.abort();
    reflect.abort();
    Ok(())
}

/// Forwards a watcher's events to a channel, so a test can wait for them.
fn spawn_watcher(
    api: Api<ConfigMap>,
) -> (
    mpsc::UnboundedReceiver<Event<ConfigMap>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(item) = stream.next().await {
            if let Ok(event) = item
                && tx.send(event).is_err()
            {
                break;
            }
        }
    });
    (rx, task)
}

fn describe(e: &Event<ConfigMap>) -> String {
    let name = |c: &ConfigMap| c.metadata.name.clone().unwrap_or_default();
    match e {
        Event::Init => "Init".into(),
        Event::InitApply(c) => format!("InitApply {}", name(c)),
        Event::InitDone => "InitDone".into(),
        Event::Apply(c) => format!("Apply {}", name(c)),
        Event::Delete(c) => format!("Delete {}", name(c)),
    }
}

/// Receives events until one described as `want`, returning everything seen before it.
async fn until(
    rx: &mut mpsc::UnboundedReceiver<Event<ConfigMap>>,
    want: &str,
) -> Result<Vec<String>, String> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => {
                let d = describe(&e);
                if d == want {
                    return Ok(seen);
                }
                seen.push(d);
            }
            Ok(None) => return Err(format!("watcher ended before {want}; saw {seen:?}")),
            Err(_) => return Err(format!("timed out waiting for {want}; saw {seen:?}")),
        }
    }
}

#[tokio::test]
async fn a_watch_resumes_after_a_restart_in_durable_mode() -> TestResult {
    let dir = tempfile::tempdir()?;
    let options = Options {
        data_dir: Some(dir.path().to_path_buf()),
        ..Options::default()
    };
    let (server, client) = server_with(options).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    common::install_widgets(&client).await?;
    let widgets: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &common::widget_resource());
    let widget = serde_json::from_value(
        json!({"apiVersion": "test.lockstep.dev/v1", "kind": "Widget",
                                               "metadata": {"name": "w"}, "spec": {"size": 1}}),
    )?;
    widgets.create(&PostParams::default(), &widget).await?;
    let before = cms
        .create(&PostParams::default(), &config_map("before", &[]))
        .await?;
    let rv_before = before.metadata.resource_version.clone().unwrap_or_default();

    let (mut events, task) = spawn_watcher(cms.clone());
    until(&mut events, "InitDone").await?;
    cms.create(&PostParams::default(), &config_map("live", &[]))
        .await?;
    until(&mut events, "Apply live").await?;

    server.stop().await;
    let err = cms
        .get("before")
        .await
        .err()
        .ok_or("a stopped server answered")?;
    assert!(
        api_error(&err).is_none(),
        "a stopped server refuses connections: {err}"
    );
    server.restart().await?;

    // Objects and resourceVersions survived.
    let again = cms.get("before").await?;
    assert_eq!(again.metadata.uid, before.metadata.uid);
    assert_eq!(
        again.metadata.resource_version.as_deref(),
        Some(rv_before.as_str())
    );
    // CRDs come back registered, with their validation.
    assert_eq!(widgets.get("w").await?.data["spec"]["mode"], "Safe");
    let bad = serde_json::from_value(
        json!({"apiVersion": "test.lockstep.dev/v1", "kind": "Widget",
                                            "metadata": {"name": "bad"}, "spec": {"size": 99}}),
    )?;
    let err = widgets
        .create(&PostParams::default(), &bad)
        .await
        .err()
        .ok_or("validation lost")?;
    assert_eq!(api_error(&err).map(|e| e.0), Some(422));

    // The watcher resumes from its resourceVersion: the next change arrives, with no relist.
    let after = cms
        .create(&PostParams::default(), &config_map("after", &[]))
        .await?;
    let seen = until(&mut events, "Apply after").await?;
    assert!(
        !seen.iter().any(|e| e == "Init"),
        "the watcher relisted: {seen:?}"
    );
    let rv_after: u64 = after
        .metadata
        .resource_version
        .unwrap_or_default()
        .parse()?;
    assert!(rv_after > rv_before.parse::<u64>()?);

    // A plain watch from the resourceVersion before the restart replays what came after it, in order.
    let mut stream = cms
        .watch(&WatchParams::default(), &rv_before)
        .await?
        .boxed();
    let mut names = Vec::new();
    while names.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await {
            Ok(Ok(Some(WatchEvent::Added(c)))) => names.push(c.metadata.name.unwrap_or_default()),
            Ok(Ok(Some(_))) => {}
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    assert_eq!(names, vec!["live", "after"]);
    task.abort();
    Ok(())
}

#[tokio::test]
async fn a_too_old_resource_version_makes_the_watcher_relist() -> TestResult {
    let options = Options {
        history: 5,
        ..Options::default()
    };
    let (server, client) = server_with(options).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let (mut events, task) = spawn_watcher(cms.clone());
    until(&mut events, "InitDone").await?;
    cms.create(&PostParams::default(), &config_map("probe", &[]))
        .await?;
    until(&mut events, "Apply probe").await?;

    // Keep the watcher away while the history moves on past its resourceVersion.
    server.faults().set_hang_watches(true);
    server.faults().drop_watches();
    for i in 0..10 {
        cms.create(&PostParams::default(), &config_map(&format!("cm{i}"), &[]))
            .await?;
    }
    server.faults().set_hang_watches(false);
    until(&mut events, "Init").await?;
    let listed = until(&mut events, "InitDone").await?;
    assert_eq!(
        listed.len(),
        11,
        "the relist brings every object: {listed:?}"
    );

    // A plain watch from a too-old resourceVersion gets 410 Gone as an ERROR event.
    let mut stream = cms.watch(&WatchParams::default(), "1").await?.boxed();
    match tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await {
        Ok(Ok(Some(WatchEvent::Error(e)))) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
        }
        other => return Err(format!("expected 410, got {other:?}").into()),
    }
    task.abort();
    Ok(())
}

#[tokio::test]
async fn bookmarks_timeouts_and_selector_transitions() -> TestResult {
    let options = Options {
        bookmark_interval_ms: 50,
        ..Options::default()
    };
    let (_server, client) = server_with(options).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = cms
        .create(&PostParams::default(), &config_map("b", &[("app", "web")]))
        .await?;
    let rv: u64 = created
        .metadata
        .resource_version
        .unwrap_or_default()
        .parse()?;

    // Bookmarks.
    let wp = WatchParams::default().labels("app=web");
    let mut stream = cms.watch(&wp, "0").await?.boxed();
    // A bookmark comes once something newer than the watch exists (here a change it does not see), as
    // kube-apiserver sends none while nothing changes.
    cms.create(
        &PostParams::default(),
        &config_map("other", &[("app", "db")]),
    )
    .await?;
    let mut kinds = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await {
            Ok(Ok(Some(WatchEvent::Added(c)))) => {
                kinds.push(format!("ADDED {}", c.metadata.name.unwrap_or_default()))
            }
            Ok(Ok(Some(WatchEvent::Bookmark(b)))) => {
                let brv: u64 = b.metadata.resource_version.parse()?;
                assert!(brv >= rv);
                break;
            }
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    assert_eq!(kinds, vec!["ADDED b"]);

    // Leaving the selector reads as DELETED, entering it as ADDED.
    let relabel = |app: &str| Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
    cms.patch("b", &PatchParams::default(), &relabel("db"))
        .await?;
    cms.patch("b", &PatchParams::default(), &relabel("web"))
        .await?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await {
            Ok(Ok(Some(WatchEvent::Added(_)))) => seen.push("ADDED"),
            Ok(Ok(Some(WatchEvent::Deleted(_)))) => seen.push("DELETED"),
            Ok(Ok(Some(WatchEvent::Modified(_)))) => seen.push("MODIFIED"),
            Ok(Ok(Some(WatchEvent::Bookmark(_)))) => {}
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    assert_eq!(seen, vec!["DELETED", "ADDED"]);

    // timeoutSeconds ends the stream.
    let mut short = cms
        .watch(&WatchParams::default().timeout(1), "0")
        .await?
        .boxed();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = short.try_next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the watch ended at its timeout");
    Ok(())
}

/// A plain HTTP/1.1 GET; returns the whole answer.
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> Result<String, std::io::Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

#[tokio::test]
async fn fault_hooks() -> TestResult {
    let (server, client) = server().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut cm = config_map("f", &[]);
    cm.data = Some(BTreeMap::from([("k".to_string(), "v".to_string())]));
    cms.create(&PostParams::default(), &cm).await?;

    // kube clients retry 429s themselves, so this one is asked over a plain connection.
    server.faults().fail_requests(1.0, Failure::TooManyRequests);
    let answer = raw_get(server.addr(), "/api/v1/namespaces/default/configmaps/f").await?;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.to_lowercase().contains("retry-after: 1"), "{answer}");
    let health = raw_get(server.addr(), "/healthz").await?;
    assert!(
        health.starts_with("HTTP/1.1 200"),
        "health checks are exempt: {health}"
    );
    server.faults().fail_requests(1.0, Failure::InternalError);
    let err = cms.get("f").await.err().ok_or("no 500")?;
    assert_eq!(api_error(&err).map(|e| e.0), Some(500));
    server.faults().clear();
    cms.get("f").await?;

    server.faults().set_hang(true);
    let hung = tokio::time::timeout(Duration::from_millis(300), cms.get("f")).await;
    assert!(hung.is_err(), "a hung server does not answer");
    server.faults().set_hang(false);
    cms.get("f").await?;

    server.faults().set_latency(Duration::from_millis(20));
    cms.get("f").await?;
    server.faults().clear();

    server.refuse_connections().await;
    let err = cms.get("f").await.err().ok_or("connection not refused")?;
    assert!(api_error(&err).is_none(), "{err}");
    server.accept_connections().await?;
    cms.get("f").await?;

    // In memory mode, a stop and restart keep the objects.
    server.stop().await;
    assert!(!server.is_running());
    server.restart().await?;
    assert_eq!(cms.get("f").await?.data, cm.data);

    // The kubeconfig names the server.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path)?;
    let kc = kube::config::Kubeconfig::read_from(&path)?;
    let url = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone());
    assert_eq!(url, Some(server.url()));
    Ok(())
}

#[tokio::test]
async fn a_streaming_list_watcher_gets_the_initial_events() -> TestResult {
    let (_server, client) = server().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    for name in ["s1", "s2"] {
        cms.create(&PostParams::default(), &config_map(name, &[]))
            .await?;
    }
    let (tx, mut events) = mpsc::unbounded_channel();
    let api = cms.clone();
    let task = tokio::spawn(async move {
        let mut stream =
            watcher::watcher(api, watcher::Config::default().streaming_lists()).boxed();
        while let Some(Ok(event)) = stream.next().await {
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    let initial = until(&mut events, "InitDone").await?;
    assert_eq!(initial, vec!["Init", "InitApply s1", "InitApply s2"]);
    cms.create(&PostParams::default(), &config_map("s3", &[]))
        .await?;
    until(&mut events, "Apply s3").await?;
    task.abort();
    Ok(())
}

#[tokio::test]
async fn a_watch_delivers_every_change_in_order_exactly_once() -> TestResult {
    let (server, client) = server().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let start = server
        .resource_version()
        .ok_or("no resourceVersion")?
        .to_string();
    let mut stream = cms.watch(&WatchParams::default(), &start).await?.boxed();

    // Four writers at once, each creating then updating its own objects.
    let mut writers = Vec::new();
    for w in 0..4 {
        let cms = cms.clone();
        writers.push(tokio::spawn(async move {
            let mut rvs = Vec::new();
            for i in 0..25 {
                let name = format!("w{w}-{i}");
                let created = cms
                    .create(&PostParams::default(), &config_map(&name, &[]))
                    .await?;
                rvs.push(created.metadata.resource_version.unwrap_or_default());
                let patch = Patch::Merge(json!({"data": {"n": i.to_string()}}));
                let patched = cms.patch(&name, &PatchParams::default(), &patch).await?;
                rvs.push(patched.metadata.resource_version.unwrap_or_default());
            }
            Ok::<_, kube::Error>(rvs)
        }));
    }
    let mut written = Vec::new();
    for w in writers {
        written.extend(w.await??);
    }
    let mut written: Vec<u64> = written
        .iter()
        .map(|rv| rv.parse())
        .collect::<Result<_, _>>()?;
    written.sort_unstable();

    let mut seen = Vec::new();
    while seen.len() < written.len() {
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await {
            Ok(Ok(Some(WatchEvent::Added(c) | WatchEvent::Modified(c)))) => {
                seen.push(
                    c.metadata
                        .resource_version
                        .unwrap_or_default()
                        .parse::<u64>()?,
                );
            }
            Ok(Ok(Some(WatchEvent::Bookmark(_)))) => {}
            other => return Err(format!("after {} events: {other:?}", seen.len()).into()),
        }
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "events out of order");
    assert_eq!(seen, written, "every write exactly once");
    Ok(())
}

#[tokio::test]
async fn the_history_is_bounded_by_size_as_well_as_count() -> TestResult {
    // 40 changes of a 900 KB ConfigMap (each holding the object before and after it: ~72 MB) are far
    // under the 10 000 changes kept by count, but over the 64 MiB kept by size: the oldest are dropped,
    // and a watch from before them gets 410 Gone, while a recent one resumes.
    let (_server, client) = server().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut big = config_map("big", &[]);
    big.data = Some(BTreeMap::from([("blob".to_string(), "x".repeat(900_000))]));
    let created = cms.create(&PostParams::default(), &big).await?;
    let first_rv = created
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let mut last_rv = first_rv.clone();
    for i in 0..40 {
        let patch = json!({"data": {"round": i.to_string()}});
        let patched = cms
            .patch("big", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        last_rv = patched
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
    }

    let mut old = cms.watch(&WatchParams::default(), &first_rv).await?.boxed();
    match tokio::time::timeout(Duration::from_secs(10), old.try_next()).await {
        Ok(Ok(Some(WatchEvent::Error(e)))) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
        }
        other => return Err(format!("expected 410 for rv {first_rv}, got {other:?}").into()),
    }

    let recent: u64 = last_rv.parse()?;
    let mut stream = cms
        .watch(&WatchParams::default(), &(recent - 1).to_string())
        .await?
        .boxed();
    match tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await {
        Ok(Ok(Some(WatchEvent::Modified(cm)))) => {
            assert_eq!(cm.metadata.resource_version, Some(last_rv));
        }
        other => return Err(format!("expected the last change, got {other:?}").into()),
    }
    Ok(())
}
