//! Operating Lockstep from outside, as people who run it see it: the chart's alerts (a PrometheusRule
//! rendered where it should be, `promtool check rules`, and one `promtool test rules` file per alert), its
//! Grafana dashboard, and the GitOps health of the CRDs. A real operator and a real sidecar (over the
//! reference replicator) take a group through its phases; every metric an alert or a dashboard panel names
//! must be in their live `/metrics`, and the objects they wrote are read by the Argo CD health checks
//! (`deploy/argocd/health`, run by lua5.1) and by kstatus (`e2e/kstatus`, the Go library Flux reads health
//! with) as those tools would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kube::api::PostParams;
use kube::{Api, Client};
use lockstep_api::domain::{Phase, Policy};
use lockstep_api::v1alpha1::{ConsistencyGroup, MemberCluster, ReplicationNode};
use lockstep_operator::{Operator, Options};
use lockstep_replicator::testing::{NodeSpec, ReplicatorNode};
use lockstep_sidecar::Sidecar;
use serde_json::{Value, json};

mod common;

use common::{cluster, eventually, local_member, orders_group, patch_spec, volume, wait_for_group};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("deploy/helm/lockstep")
}

/// A tool `scripts/install-tools.sh` installs (into `$LOCKSTEP_TOOLS/bin`, or as a Debian package on
/// `PATH`).
fn tool(name: &str) -> PathBuf {
    let installed = std::env::var_os("LOCKSTEP_TOOLS")
        .map(|dir| PathBuf::from(dir).join("bin").join(name))
        .filter(|path| path.exists());
    let path = installed.unwrap_or_else(|| PathBuf::from(name));
    assert!(
        Command::new(&path)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok(),
        "{name} not found: run the tests through ./scripts/test.sh, or `source \"$(./scripts/install-tools.sh)\"` first"
    );
    path
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `helm template` of the chart for a hub, with `args` added; the rendered documents.
fn render(args: &[&str]) -> Vec<Value> {
    let output = Command::new(tool("helm"))
        .args(["template", "lockstep"])
        .arg(chart())
        .args(["--namespace", "lockstep", "--set", "clusterName=east"])
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "helm template: {}", text(&output));
    let rendered = String::from_utf8(output.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&rendered)
        .map(|document| serde::Deserialize::deserialize(document).unwrap())
        .filter(|document: &Value| !document.is_null())
        .collect()
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents
        .iter()
        .filter(|document| document["kind"] == kind)
        .collect()
}

const WITH_CRD: &[&str] = &["--api-versions", "monitoring.coreos.com/v1/PrometheusRule"];

/// The rule groups of the chart's PrometheusRule, rendered with `args`.
fn rule_groups(args: &[&str]) -> Value {
    let documents = render(args);
    let rules = of_kind(&documents, "PrometheusRule");
    assert_eq!(rules.len(), 1, "one PrometheusRule with {args:?}");
    rules[0]["spec"].clone()
}

fn alert_names(groups: &Value) -> BTreeSet<String> {
    groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .filter_map(|rule| rule["alert"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_prometheus_rule_renders_where_its_crd_exists_or_when_enabled_and_never_when_disabled() {
    let count = |args: &[&str]| of_kind(&render(args), "PrometheusRule").len();
    assert_eq!(count(&[]), 0, "no CRD, not asked for: no PrometheusRule");
    assert_eq!(count(WITH_CRD), 1, "the CRD is installed: rendered");
    assert_eq!(count(&["--set", "alerts.enabled=true"]), 1);
    let disabled = [WITH_CRD, &["--set", "alerts.enabled=false"]].concat();
    assert_eq!(
        count(&disabled),
        0,
        "alerts.enabled=false wins over the CRD"
    );

    // Thresholds come from the values; the operator's own alerts only where the operator runs.
    let tuned = rule_groups(&["--set", "alerts.enabled=true,alerts.frozenFor=2h"]);
    let frozen = tuned["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|rule| rule["alert"] == "LockstepGroupFrozen")
        .unwrap();
    assert_eq!(frozen["for"], "2h");
    let member = rule_groups(&["--set", "alerts.enabled=true,operator.enabled=false"]);
    let names = alert_names(&member);
    assert!(!names.contains("LockstepNoOperatorLeader"), "{names:?}");
    assert!(names.contains("LockstepSidecarFailSafe"), "{names:?}");

    // A threshold that is no Prometheus duration is refused with the value's name.
    let output = Command::new(tool("helm"))
        .args(["template", "lockstep"])
        .arg(chart())
        .args(["--set", "clusterName=east,alerts.frozenFor=soon"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(text(&output).contains("frozenFor"), "{}", text(&output));
}

#[test]
fn promtool_checks_the_rules_and_every_alert_passes_its_unit_test() {
    let groups = rule_groups(&["--set", "alerts.enabled=true"]);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("rules.yaml"),
        serde_yaml_ng::to_string(&groups).unwrap(),
    )
    .unwrap();
    let tests_dir = repo().join("deploy/prometheus/tests");
    let mut test_files = Vec::new();
    let mut tested = BTreeSet::new();
    for entry in std::fs::read_dir(&tests_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let content = std::fs::read_to_string(&path).unwrap();
        let test: Value = serde_yaml_ng::from_str(&content).unwrap();
        for case in test["tests"].as_array().unwrap() {
            for alert in case["alert_rule_test"].as_array().unwrap() {
                // Tested only where it is expected to fire at some point, not merely to stay quiet.
                if alert["exp_alerts"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                {
                    tested.insert(alert["alertname"].as_str().unwrap().to_owned());
                }
            }
        }
        std::fs::write(work.path().join(&name), content).unwrap();
        test_files.push(name);
    }
    test_files.sort();
    assert_eq!(
        tested,
        alert_names(&groups),
        "every alert has a promtool test in which it fires, and every tested alert exists"
    );

    let promtool = tool("promtool");
    let check = Command::new(&promtool)
        .current_dir(work.path())
        .args(["check", "rules", "rules.yaml"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check rules: {}",
        text(&check)
    );
    let test = Command::new(&promtool)
        .current_dir(work.path())
        .args(["test", "rules"])
        .args(&test_files)
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "promtool test rules: {}",
        text(&test)
    );
    assert_eq!(
        text(&test).matches("SUCCESS").count(),
        test_files.len(),
        "{}",
        text(&test)
    );
}

/// The dashboard as the chart renders it (dashboard.enabled), parsed.
fn dashboard() -> Value {
    let documents = render(&["--set", "dashboard.enabled=true"]);
    let maps: Vec<&Value> = of_kind(&documents, "ConfigMap")
        .into_iter()
        .filter(|map| map["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(maps.len(), 1, "one dashboard ConfigMap");
    serde_json::from_str(maps[0]["data"]["lockstep.json"].as_str().unwrap()).unwrap()
}

#[test]
fn the_dashboard_is_a_configmap_for_grafanas_sidecar_only_when_enabled() {
    let documents = render(&[]);
    assert!(
        of_kind(&documents, "ConfigMap")
            .iter()
            .all(|map| map["metadata"]["labels"]["grafana_dashboard"].is_null()),
        "no dashboard unless dashboard.enabled"
    );
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "lockstep");
    let titles: BTreeSet<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|panel| panel["title"].as_str())
        .collect();
    for wanted in [
        "Groups by phase",
        "Freeze latency",
        "Acknowledgements by path",
        "Volumes holding writes",
        "Hold timeouts",
        "gRPC sessions per cluster",
    ] {
        assert!(titles.contains(wanted), "{wanted} missing from {titles:?}");
    }
}

/// Every PromQL expression of the alerts and of the dashboard's panels.
fn expressions() -> Vec<String> {
    let groups = rule_groups(&["--set", "alerts.enabled=true"]);
    let mut exprs: Vec<String> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .map(|rule| rule["expr"].as_str().unwrap().to_owned())
        .collect();
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    exprs
}

/// The metric names a PromQL expression reads: identifiers that are not functions (followed by `(`),
/// keywords, aggregations, or label names (in `{...}`, `by (...)`, `on (...)`); strings and ranges left
/// out.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let strip = |text: &str, open: char, close: char| {
        let mut out = String::new();
        let mut depth = 0;
        for c in text.chars() {
            if c == open {
                depth += 1;
            } else if c == close && depth > 0 {
                depth -= 1;
            } else if depth == 0 {
                out.push(c);
            }
        }
        out
    };
    let bare = strip(&strip(expr, '{', '}'), '[', ']');
    let mut names = BTreeSet::new();
    let tokens: Vec<char> = bare.chars().collect();
    let mut i = 0;
    let mut skip_group = false;
    while i < tokens.len() {
        let c = tokens[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < tokens.len()
                && (tokens[i].is_ascii_alphanumeric() || tokens[i] == '_' || tokens[i] == ':')
            {
                i += 1;
            }
            let word: String = tokens[start..i].iter().collect();
            let next = tokens[i..].iter().find(|c| !c.is_whitespace());
            if matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                // The label list that follows is no metric.
                skip_group = true;
            } else if !matches!(
                word.as_str(),
                "and" | "or" | "unless" | "offset" | "bool"
                // Aggregations, which may come before their `by (...)` rather than their `(`.
                | "sum" | "min" | "max" | "avg" | "count" | "group" | "stddev" | "stdvar"
                | "topk" | "bottomk" | "quantile" | "count_values"
            ) && next != Some(&'(')
            {
                names.insert(word);
            }
        } else if c == '(' && skip_group {
            while i < tokens.len() && tokens[i] != ')' {
                i += 1;
            }
            skip_group = false;
            i += 1;
        } else if c == '"' {
            i += 1;
            while i < tokens.len() && tokens[i] != '"' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            // A number (or a duration after `offset`): never a name.
            while i < tokens.len() && (tokens[i].is_ascii_alphanumeric() || tokens[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The sample names a `/metrics` page exports: every family its `# TYPE` lines declare (with their
/// counter and histogram suffixes), and every sample line's name.
fn exported_names(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

#[test]
fn promql_names_are_read_without_functions_keywords_or_labels() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(lockstep_freeze_latency_seconds_bucket{le="1.0"}[5m]))) > 2
           or (a_total > 0 unless a_total offset 15m) and on (instance) (b offset 1h)"#,
    );
    let expected: BTreeSet<String> = ["lockstep_freeze_latency_seconds_bucket", "a_total", "b"]
        .map(str::to_owned)
        .into();
    assert_eq!(names, expected);
    let page = "# TYPE lockstep_reports counter\n# TYPE lockstep_freeze_latency_seconds histogram\nlockstep_groups{phase=\"Frozen\"} 1\n# EOF\n";
    let exported = exported_names(page);
    for name in [
        "lockstep_reports_total",
        "lockstep_freeze_latency_seconds_bucket",
        "lockstep_freeze_latency_seconds_count",
        "lockstep_groups",
    ] {
        assert!(exported.contains(name), "{name} in {exported:?}");
    }
}

/// A plain HTTP GET of `path`, the body as text.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: lockstep\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    body.to_owned()
}

/// One cluster (the hub, its own member), one node whose replicator serves the volume `wal` and copies it
/// to a real secondary, its sidecar on both paths, and the operator.
struct Bed {
    _api: lockstep_testapi::TestApiServer,
    hub: Client,
    _node: ReplicatorNode,
    operator: Operator,
    sidecar: Sidecar,
}

async fn bed() -> Bed {
    let (api, hub) = cluster().await;
    local_member(&hub, Default::default()).await;
    volume(&hub, "wal", "orders", "wal", "e1").await;
    let node = NodeSpec::new(&["wal"], 1024 * 1024).start().await.unwrap();
    let options = Options {
        hub_name: "east".into(),
        namespace: "lockstep".into(),
        resync_interval: Duration::from_millis(300),
        ..common::options()
    };
    let operator = Operator::start(hub.clone(), &options).await.unwrap();
    let mut sidecar_options = lockstep_sidecar::Options::new("e1", "east");
    sidecar_options.replicator_socket = node.control_socket().unwrap();
    sidecar_options.operator_endpoint = Some(format!("http://{}", operator.grpc_addr));
    sidecar_options.insecure_plaintext_control = true;
    sidecar_options.listen = "127.0.0.1:0".parse().unwrap();
    sidecar_options.inventory_interval = Duration::from_millis(300);
    sidecar_options.lease_duration = Duration::from_secs(3);
    let sidecar = Sidecar::start(sidecar_options, Some(hub.clone()))
        .await
        .unwrap();
    Bed {
        _api: api,
        hub,
        _node: node,
        operator,
        sidecar,
    }
}

fn phase_of(group: &ConsistencyGroup) -> Option<Phase> {
    group.status.as_ref()?.phase
}

fn ready_of(group: &ConsistencyGroup) -> Option<bool> {
    lockstep_api::conditions::status_of(&group.status.as_ref()?.conditions, "Ready")
}

/// The objects a real operator and sidecar wrote, by a name saying what each shows.
type Samples = BTreeMap<String, Value>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_operator_and_sidecar_export_every_metric_named_and_read_as_argo_cd_and_flux_expect()
{
    let bed = bed().await;
    let groups = Api::<ConsistencyGroup>::all(bed.hub.clone());
    let mut spec = orders_group(&["wal"]);
    spec.policy = Policy::FreezeAndStop;
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await
        .unwrap();
    let mut samples = Samples::new();
    let sample = |group: ConsistencyGroup| serde_json::to_value(group).unwrap();

    let replicating = wait_for_group(&groups, "the group replicating and Ready", |group| {
        phase_of(group) == Some(Phase::Replicating) && ready_of(group) == Some(true)
    })
    .await;
    samples.insert("group-replicating".into(), sample(replicating));

    // A planned freeze (FreezeAndStop: writes stay held), then the release and the resync.
    patch_spec(&groups, json!({"freeze": {"epoch": 0}})).await;
    let frozen = wait_for_group(&groups, "the planned freeze complete", |group| {
        phase_of(group) == Some(Phase::Frozen)
    })
    .await;
    samples.insert("group-frozen".into(), sample(frozen));
    patch_spec(&groups, json!({"release": {"epoch": 1}})).await;
    let running = wait_for_group(&groups, "the release", |group| {
        phase_of(group) == Some(Phase::Running)
    })
    .await;
    samples.insert("group-running".into(), sample(running));
    patch_spec(&groups, json!({"resync": {"epoch": 1}})).await;
    wait_for_group(&groups, "resynced", |group| {
        group.position().0 == 1 && phase_of(group) == Some(Phase::Replicating)
    })
    .await;
    // The intents are spent: left in the spec they are stale, and Ready says so.
    patch_spec(
        &groups,
        json!({"freeze": null, "release": null, "resync": null}),
    )
    .await;
    let resynced = wait_for_group(&groups, "resynced and Ready", |group| {
        group.position().0 == 1
            && phase_of(group) == Some(Phase::Replicating)
            && ready_of(group) == Some(true)
    })
    .await;
    samples.insert("group-resynced".into(), sample(resynced));

    // A group naming a claim that does not exist: Degraded.
    let mut missing = orders_group(&["no-such-claim"]);
    missing.policy = Policy::FreezeAndGo;
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("unresolved", missing),
        )
        .await
        .unwrap();
    let degraded = eventually("the unresolved group Degraded", || {
        let groups = groups.clone();
        async move {
            let group = groups.get("unresolved").await.ok()?;
            (phase_of(&group) == Some(Phase::Degraded)).then_some(group)
        }
    })
    .await;
    samples.insert("group-degraded".into(), sample(degraded));

    let clusters = Api::<MemberCluster>::all(bed.hub.clone());
    let east = eventually("the MemberCluster east Ready", || {
        let clusters = clusters.clone();
        async move {
            let cluster = clusters.get("east").await.ok()?;
            let conditions = &cluster.status.as_ref()?.conditions;
            (lockstep_api::conditions::status_of(conditions, "Ready") == Some(true))
                .then_some(cluster)
        }
    })
    .await;
    samples.insert(
        "membercluster-reachable".into(),
        serde_json::to_value(east).unwrap(),
    );
    let nodes = Api::<ReplicationNode>::all(bed.hub.clone());
    let node = eventually("the ReplicationNode e1 Ready", || {
        let nodes = nodes.clone();
        async move {
            let node = nodes.get("e1").await.ok()?;
            let conditions = &node.status.as_ref()?.conditions;
            (lockstep_api::conditions::status_of(conditions, "Ready") == Some(true)).then_some(node)
        }
    })
    .await;
    // Its conditions name the generation they were written for, as kstatus and Argo CD read Ready.
    let generation = node.metadata.generation;
    assert!(generation.is_some());
    let conditions = &node.status.as_ref().unwrap().conditions;
    assert!(
        conditions
            .iter()
            .all(|condition| condition.observed_generation == generation),
        "{conditions:?} observed generation {generation:?}"
    );
    samples.insert(
        "replicationnode-serving".into(),
        serde_json::to_value(node).unwrap(),
    );

    // Every metric an alert or a panel names is on the live pages, once the operator counted the
    // groups and the cluster.
    let operator_page = eventually("the operator's census and cluster probe", || {
        let addr = bed.operator.http_addr;
        async move {
            let page = http_get(addr, "/metrics").await;
            (page.contains(r#"lockstep_group_phase{group="unresolved",phase="Degraded"} 1"#)
                && page.contains(r#"lockstep_member_cluster_path_up{cluster="east",path="api"} 1"#))
            .then_some(page)
        }
    })
    .await;
    let sidecar_page = http_get(bed.sidecar.metrics_addr(), "/metrics").await;
    let exported: BTreeSet<String> = exported_names(&operator_page)
        .union(&exported_names(&sidecar_page))
        .cloned()
        .collect();
    let named: BTreeSet<String> = expressions()
        .iter()
        .flat_map(|expr| metric_names(expr))
        .collect();
    assert!(named.len() > 10, "names read: {named:?}");
    // No exceptions: counters of events this run does not cause (a hold timeout, a copy-failure
    // report, a fail-safe) are exported at 0 for the paths and groups the binaries know.
    let missing: Vec<&String> = named.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "alerts or panels name metrics nothing exports: {missing:?}\nexported: {exported:?}"
    );
    assert!(operator_page.contains("lockstep_operator_leader 1"));
    assert!(operator_page.contains(r#"lockstep_grpc_sessions{cluster="east"} 1"#));
    assert!(operator_page.contains("lockstep_freeze_latency_seconds_count 1"));

    argo_cd_reads(&samples);
    flux_reads(&samples);
    bed.operator.shutdown().await;
}

/// What each Argo CD health check must say of each sample: the status, and a part of the message.
const ARGO_EXPECTED: &[(&str, &str, &str)] = &[
    ("group-replicating", "Healthy", "Replicating at epoch 0"),
    ("group-frozen", "Suspended", "Frozen at epoch 1"),
    ("group-running", "Suspended", "Running at epoch 1"),
    ("group-resynced", "Healthy", "Replicating at epoch 1"),
    ("group-degraded", "Degraded", "not every member is resolved"),
    ("group-freezing", "Progressing", "Freezing at epoch 2"),
    ("group-resyncing", "Progressing", "Resyncing at epoch 1"),
    ("group-stale-intent", "Degraded", "spec.release.epoch 0"),
    (
        "group-new-generation",
        "Progressing",
        "has not observed generation",
    ),
    (
        "group-new",
        "Progressing",
        "Waiting for the Lockstep operator",
    ),
    (
        "membercluster-reachable",
        "Healthy",
        "the API server answers",
    ),
    (
        "membercluster-unreachable",
        "Degraded",
        "ApiServerUnreachable",
    ),
    (
        "membercluster-new",
        "Progressing",
        "Waiting for the Lockstep operator",
    ),
    ("replicationnode-serving", "Healthy", "1 volumes served"),
    (
        "replicationnode-fail-safe",
        "Degraded",
        "suspended by its own fail-safe",
    ),
    (
        "replicationnode-hold-timed-out",
        "Degraded",
        "held writes failed",
    ),
    (
        "replicationnode-starting",
        "Progressing",
        "volumes are not known",
    ),
    (
        "replicationnode-new-generation",
        "Progressing",
        "has not observed generation",
    ),
];

/// What kstatus (Flux) must say of each sample.
const KSTATUS_EXPECTED: &[(&str, &str)] = &[
    ("group-replicating", "Current"),
    ("group-frozen", "InProgress"),
    ("group-running", "InProgress"),
    ("group-resynced", "Current"),
    ("group-degraded", "Failed"),
    ("group-freezing", "InProgress"),
    ("group-resyncing", "InProgress"),
    ("group-stale-intent", "InProgress"),
    ("group-new-generation", "InProgress"),
    ("membercluster-reachable", "Current"),
    ("membercluster-unreachable", "InProgress"),
    ("replicationnode-serving", "Current"),
    ("replicationnode-fail-safe", "InProgress"),
    ("replicationnode-starting", "InProgress"),
];

fn set_condition(object: &mut Value, type_: &str, status: &str, reason: &str, message: &str) {
    let generation = object["metadata"]["generation"].clone();
    let conditions = object["status"]["conditions"].as_array_mut().unwrap();
    conditions.retain(|condition| condition["type"] != type_);
    conditions.push(json!({
        "type": type_, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": generation,
    }));
}

/// The real samples, and from them the states a short run does not hold still in: what the operator and
/// sidecar write then (the reasons and messages of operator/src/freeze.rs and sidecar/src/api_path.rs).
fn with_derived(real: &Samples) -> Samples {
    let mut samples = real.clone();
    let mut freezing = real["group-resynced"].clone();
    freezing["status"]["phase"] = json!("Freezing");
    freezing["status"]["epoch"] = json!(2);
    set_condition(
        &mut freezing,
        "Ready",
        "False",
        "Freezing",
        "freezing at epoch 2",
    );
    samples.insert("group-freezing".into(), freezing);
    let mut resyncing = real["group-running"].clone();
    resyncing["status"]["phase"] = json!("Resyncing");
    set_condition(
        &mut resyncing,
        "Ready",
        "False",
        "Resyncing",
        "resynchronising after epoch 1",
    );
    samples.insert("group-resyncing".into(), resyncing);
    let mut stale = real["group-resynced"].clone();
    set_condition(
        &mut stale,
        "Ready",
        "False",
        "StaleIntent",
        "spec.release.epoch 0 is not the current epoch 1: ignored",
    );
    samples.insert("group-stale-intent".into(), stale);
    let mut newer = real["group-resynced"].clone();
    let generation = newer["metadata"]["generation"].as_i64().unwrap();
    newer["metadata"]["generation"] = json!(generation + 1);
    samples.insert("group-new-generation".into(), newer);
    let mut new = real["group-replicating"].clone();
    new.as_object_mut().unwrap().remove("status");
    samples.insert("group-new".into(), new);

    let mut unreachable = real["membercluster-reachable"].clone();
    for type_ in ["Reachable", "Ready"] {
        set_condition(
            &mut unreachable,
            type_,
            "False",
            "ApiServerUnreachable",
            "connection refused; 0 sidecars hold a gRPC stream",
        );
    }
    samples.insert("membercluster-unreachable".into(), unreachable);
    let mut new_cluster = real["membercluster-reachable"].clone();
    new_cluster.as_object_mut().unwrap().remove("status");
    samples.insert("membercluster-new".into(), new_cluster);

    let mut fail_safe = real["replicationnode-serving"].clone();
    set_condition(
        &mut fail_safe,
        "Ready",
        "False",
        "FailSafe",
        "suspended by its own fail-safe (a failed write reached neither path): orders-db at epoch 2; only a directive at a higher epoch lifts it",
    );
    samples.insert("replicationnode-fail-safe".into(), fail_safe);
    let mut held = real["replicationnode-serving"].clone();
    set_condition(
        &mut held,
        "HoldTimedOut",
        "True",
        "HeldWritesFailed",
        "held writes failed with an I/O error at the hold timeout: 3 on wal",
    );
    samples.insert("replicationnode-hold-timed-out".into(), held);
    let mut starting = real["replicationnode-serving"].clone();
    set_condition(
        &mut starting,
        "Ready",
        "False",
        "ReplicatorUnknown",
        "the replicator's volumes are not known yet",
    );
    samples.insert("replicationnode-starting".into(), starting);
    let mut newer_node = real["replicationnode-serving"].clone();
    let generation = newer_node["metadata"]["generation"].as_i64().unwrap();
    newer_node["metadata"]["generation"] = json!(generation + 1);
    samples.insert("replicationnode-new-generation".into(), newer_node);
    samples
}

/// A JSON value as a Lua table constructor (how Argo CD hands the object to the script).
fn lua(value: &Value) -> String {
    match value {
        Value::Null => "nil".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn argo_cd_reads(real: &Samples) {
    let samples = with_derived(real);
    let lua51 = tool("lua5.1");
    let health = repo().join("deploy/argocd/health");
    let work = tempfile::tempdir().unwrap();
    for (name, status, message) in ARGO_EXPECTED {
        let object = &samples[*name];
        let kind = object["kind"].as_str().unwrap();
        let file = work.path().join(format!("{name}.lua"));
        std::fs::write(&file, format!("return {}\n", lua(object))).unwrap();
        let output = Command::new(&lua51)
            .arg(health.join("run.lua"))
            .arg(health.join(format!("lockstep.dev_{kind}/health.lua")))
            .arg(&file)
            .output()
            .unwrap();
        assert!(output.status.success(), "{name}: {}", text(&output));
        let said = String::from_utf8(output.stdout).unwrap();
        let (got_status, got_message) = said.trim_end().split_once('\t').unwrap();
        assert_eq!(
            (got_status, got_message.contains(message)),
            (*status, true),
            "Argo CD health of {name}: {said}"
        );
    }
}

/// Builds e2e/kstatus (Go, sigs.k8s.io/cli-utils from the module proxy); `None` where there is no Go
/// outside CI (the test says it skipped that part, as the real-kube tests do).
fn kstatus_binary(out: &Path) -> Option<PathBuf> {
    let has_go = Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !has_go {
        assert!(
            std::env::var_os("CI").is_none(),
            "Go is needed for the kstatus check in CI"
        );
        eprintln!("skipped the kstatus check: no Go on this machine");
        return None;
    }
    let binary = out.join("kstatus");
    let output = Command::new("go")
        .current_dir(repo().join("e2e/kstatus"))
        .env("GOFLAGS", "-mod=mod")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "go build e2e/kstatus: {}",
        text(&output)
    );
    Some(binary)
}

fn flux_reads(real: &Samples) {
    let samples = with_derived(real);
    let work = tempfile::tempdir().unwrap();
    let Some(kstatus) = kstatus_binary(work.path()) else {
        return;
    };
    let mut objects = Vec::new();
    for (name, _) in KSTATUS_EXPECTED {
        let mut object = samples[*name].clone();
        object["metadata"]["name"] = json!(name);
        objects.push(object);
    }
    let mut child = Command::new(kstatus)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        serde_json::to_string(&objects).unwrap().as_bytes(),
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "kstatus: {}", text(&output));
    let said: BTreeMap<String, String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let mut fields = line.splitn(3, '\t');
            (
                fields.next().unwrap().to_owned(),
                fields.next().unwrap().to_owned(),
            )
        })
        .collect();
    for (name, status) in KSTATUS_EXPECTED {
        assert_eq!(
            said.get(*name).map(String::as_str),
            Some(*status),
            "kstatus of {name}: {said:?}"
        );
    }
}
