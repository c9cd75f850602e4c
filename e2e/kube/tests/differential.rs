//! The differential suite: the same client-level checks against the test API server and a real
//! kube-apiserver, one check per behaviour Lockstep relies on, their outcomes (status codes, reasons,
//! messages, the resulting objects) compared. Checks: server-side apply (field ownership, force,
//! conflicts, fields a manager stops applying), every `examples/invalid` manifest's refusal (and a
//! valid or invalid create under a taken name), the Helm chart's RBAC (allow and deny of every verb on
//! every resource it names, for each of its identities),
//! watch bookmarks, 410 Gone on a too-old resourceVersion and resuming, resourceVersion conflicts on
//! update and on `/status`, the status subresource and `metadata.generation`, the request size limit,
//! finalizers and deletion.
//!
//! One pair of servers for the whole file, and one test that runs every check and reports every
//! divergence at once: the test API server runs on the runtime of the test that started it (a server
//! shared across `#[tokio::test]`s would die with the first one), kube-apiserver takes tens of seconds
//! to start, and a list of all divergences says more than the first.
//!
//! Without the binaries (`./scripts/build-kube.sh`) this test fails in CI and says it skipped elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use kube::Client;
use lockstep_kube::KubeBinaries;
use lockstep_kube::backend::{ApiServer, Backend};
use lockstep_testapi::TestApiServer;
use lockstep_testapi::invalid_examples::InvalidExample;
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), Error>;

const NAMESPACE: &str = "diff";
const CHART_NAMESPACE: &str = "lockstep";
const GROUPS: &str = "/apis/lockstep.dev/v1alpha1/consistencygroups";
const CONFIGMAPS: &str = "/api/v1/namespaces/diff/configmaps";
/// The test API server's watch history, small enough for a check to outrun it (kube-apiserver's watch
/// cache starts after resourceVersion 1 in any case).
const HISTORY: usize = 50;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One side of the comparison.
struct Side {
    server: ApiServer,
    admin: Client,
}

/// One answer of the API server.
struct Answer {
    code: u16,
    body: Value,
}

impl Answer {
    /// As a check records it: the code, and the reason and message of a Status.
    fn outcome(&self) -> Value {
        if self.body.get("kind").and_then(Value::as_str) == Some("Status") {
            json!({
                "code": self.code,
                "reason": self.body.get("reason"),
                "message": self.body.get("message"),
            })
        } else {
            json!({ "code": self.code })
        }
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

async fn request(
    client: &Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), Error> {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .header("accept", "application/json")
        .body(kube::client::Body::from(body))?;
    let response = client.send(request).await?;
    let code = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((code, bytes.to_vec()))
}

async fn call(
    client: &Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&Value>,
) -> Result<Answer, Error> {
    let body = match body {
        Some(body) => serde_json::to_vec(body)?,
        None => Vec::new(),
    };
    let (code, bytes) = request(client, method, path, content_type, body).await?;
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(Answer { code, body })
}

async fn get(client: &Client, path: &str) -> Result<Answer, Error> {
    call(client, "GET", path, "application/json", None).await
}

async fn post(client: &Client, path: &str, body: &Value) -> Result<Answer, Error> {
    call(client, "POST", path, "application/json", Some(body)).await
}

async fn put(client: &Client, path: &str, body: &Value) -> Result<Answer, Error> {
    call(client, "PUT", path, "application/json", Some(body)).await
}

async fn merge(client: &Client, path: &str, body: &Value) -> Result<Answer, Error> {
    call(
        client,
        "PATCH",
        path,
        "application/merge-patch+json",
        Some(body),
    )
    .await
}

async fn apply(client: &Client, path: &str, body: &Value) -> Result<Answer, Error> {
    call(
        client,
        "PATCH",
        path,
        "application/apply-patch+yaml",
        Some(body),
    )
    .await
}

async fn delete(client: &Client, path: &str) -> Result<Answer, Error> {
    call(client, "DELETE", path, "application/json", None).await
}

/// A watch's events, read until the server ends the stream (`timeoutSeconds`), or its error answer.
async fn watch(client: &Client, path: &str) -> Result<(u16, Vec<Value>), Error> {
    let (code, bytes) = request(client, "GET", path, "application/json", Vec::new()).await?;
    if code != 200 {
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        return Ok((code, vec![body]));
    }
    let events = bytes
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<_, _>>()?;
    Ok((code, events))
}

fn rv(object: &Value) -> Result<u64, Error> {
    Ok(object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .ok_or("no resourceVersion")?
        .parse()?)
}

/// Digits replaced by `N` (resourceVersions, sizes in messages that differ by server).
fn without_numbers(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('N') {
                out.push('N');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Who manages what: manager, operation, subresource and fields (no times).
fn managers(object: &Value) -> Value {
    let mut entries: Vec<Value> = object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|entry| {
            json!({
                "manager": entry.get("manager"),
                "operation": entry.get("operation"),
                "subresource": entry.get("subresource"),
                "fieldsV1": entry.get("fieldsV1"),
            })
        })
        .collect();
    entries.sort_by_key(|e| e.to_string());
    Value::Array(entries)
}

fn group(name: &str) -> Value {
    json!({
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "ConsistencyGroup",
        "metadata": {"name": name},
        "spec": {
            "policy": "FreezeAndGo",
            "holdTimeout": "30s",
            "members": [{"cluster": "east", "namespace": "orders", "pvcNames": ["wal"]}],
        },
    })
}

fn config_map(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
}

// ---------------------------------------------------------------------------------------------------
// The checks. Each returns what it saw, the same on both servers when they agree.

/// Server-side apply: ownership, removal of fields a manager stops applying, conflicts, force, and an
/// Update taking a field over.
async fn server_side_apply(side: &Side) -> Result<Value, Error> {
    let c = &side.admin;
    let path = |manager: &str, force: bool| {
        format!(
            "{CONFIGMAPS}/ssa?fieldManager={manager}{}",
            if force { "&force=true" } else { "" }
        )
    };
    let mut steps = Vec::new();
    let mut step = |what: &str, answer: &Answer| {
        let mut outcome = answer.outcome();
        if answer.ok() {
            outcome["data"] = answer.body["data"].clone();
            outcome["managers"] = managers(&answer.body);
        }
        steps.push(json!({ what: outcome }));
    };
    let a = apply(
        c,
        &path("a", false),
        &config_map("ssa", json!({"x": "1", "y": "1", "z": "1"})),
    )
    .await?;
    step("a applies x y z", &a);
    let a = apply(
        c,
        &path("a", false),
        &config_map("ssa", json!({"x": "1", "y": "1"})),
    )
    .await?;
    step("a stops applying z", &a);
    let b = apply(c, &path("b", false), &config_map("ssa", json!({"x": "2"}))).await?;
    step("b applies x without force", &b);
    let b = apply(
        c,
        &path("b", false),
        &config_map("ssa", json!({"x": "1", "w": "1"})),
    )
    .await?;
    step("b applies x unchanged and w", &b);
    let b = apply(
        c,
        &path("b", true),
        &config_map("ssa", json!({"x": "2", "w": "1"})),
    )
    .await?;
    step("b forces x", &b);
    let a = apply(c, &path("a", false), &config_map("ssa", json!({"y": "1"}))).await?;
    step("a stops applying x, which b owns", &a);
    let current = get(c, &format!("{CONFIGMAPS}/ssa")).await?;
    let mut updated = current.body.clone();
    updated["data"]["y"] = json!("3");
    let u = put(c, &format!("{CONFIGMAPS}/ssa?fieldManager=u"), &updated).await?;
    step("u updates y", &u);
    let a = apply(c, &path("a", false), &config_map("ssa", json!({"y": "1"}))).await?;
    step("a applies y again", &a);
    let b = apply(c, &path("b", false), &config_map("ssa", json!({}))).await?;
    step("b applies nothing", &b);
    Ok(Value::Array(steps))
}

/// Every `examples/invalid` manifest, created as `kubectl apply` creates it.
async fn invalid_examples(side: &Side) -> Result<Value, Error> {
    let mut outcomes = BTreeMap::new();
    for example in InvalidExample::read_all(&repo().join("examples/invalid"))? {
        let plural = example
            .plural()
            .ok_or_else(|| format!("{}: kind {}", example.file_name, example.object["kind"]))?;
        let answer = post(
            &side.admin,
            &format!("/apis/lockstep.dev/v1alpha1/{plural}?fieldManager=kubectl-client-side-apply"),
            &example.as_kubectl_applies(),
        )
        .await?;
        let mut outcome = answer.outcome();
        if answer.ok() {
            // Not refused: delete it again so that nothing else sees it.
            let created = answer.body["metadata"]["name"].as_str().unwrap_or_default();
            delete(
                &side.admin,
                &format!("/apis/lockstep.dev/v1alpha1/{plural}/{created}"),
            )
            .await?;
        }
        outcome["says what its header expects"] = json!(
            outcome["message"]
                .as_str()
                .is_some_and(|m| m.contains(&example.expect))
        );
        outcomes.insert(example.file_name, outcome);
    }
    // Under a name already taken: an invalid object is refused as invalid (422), a valid one as taken (409).
    let taken = json!({
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "ConsistencyGroup",
        "metadata": {"name": "taken"},
        "spec": {"members": [{"cluster": "east", "namespace": "orders", "pvcNames": ["wal"]}]}
    });
    let mut invalid = taken.clone();
    invalid["spec"]["members"] = json!([]);
    for (what, body) in [
        ("a valid group", &taken),
        ("the same group again", &taken),
        ("an invalid group under the taken name", &invalid),
    ] {
        outcomes.insert(
            what.to_owned(),
            post(&side.admin, GROUPS, body).await?.outcome(),
        );
    }
    delete(&side.admin, &format!("{GROUPS}/taken")).await?;
    Ok(json!(outcomes))
}

/// A resource the chart names, and where it lives.
struct Resource {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    subresource: Option<&'static str>,
    namespaced: bool,
}

const CHART_RESOURCES: &[Resource] = &[
    Resource {
        group: "lockstep.dev",
        version: "v1alpha1",
        plural: "consistencygroups",
        subresource: None,
        namespaced: false,
    },
    Resource {
        group: "lockstep.dev",
        version: "v1alpha1",
        plural: "consistencygroups",
        subresource: Some("status"),
        namespaced: false,
    },
    Resource {
        group: "lockstep.dev",
        version: "v1alpha1",
        plural: "memberclusters",
        subresource: None,
        namespaced: false,
    },
    Resource {
        group: "lockstep.dev",
        version: "v1alpha1",
        plural: "memberclusters",
        subresource: Some("status"),
        namespaced: false,
    },
    Resource {
        group: "lockstep.dev",
        version: "v1alpha1",
        plural: "replicationnodes",
        subresource: None,
        namespaced: false,
    },
    Resource {
        group: "lockstep.dev",
        version: "v1alpha1",
        plural: "replicationnodes",
        subresource: Some("status"),
        namespaced: false,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "persistentvolumes",
        subresource: None,
        namespaced: false,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "persistentvolumeclaims",
        subresource: None,
        namespaced: true,
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        subresource: None,
        namespaced: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "events",
        subresource: None,
        namespaced: true,
    },
    Resource {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        subresource: None,
        namespaced: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "secrets",
        subresource: None,
        namespaced: true,
    },
];

const VERBS: &[&str] = &[
    "get", "list", "watch", "create", "update", "patch", "delete",
];
const SUBRESOURCE_VERBS: &[&str] = &["get", "update", "patch"];

/// The chart's identities, as `system:serviceaccount:` users.
const IDENTITIES: &[&str] = &[
    "system:serviceaccount:lockstep:lockstep-operator",
    "system:serviceaccount:lockstep:lockstep-sidecar",
    "system:serviceaccount:lockstep:lockstep-member-access",
];

/// The chart rendered with every identity, as JSON documents.
fn rendered_chart() -> Result<Vec<Value>, Error> {
    let helm = std::env::var_os("LOCKSTEP_TOOLS")
        .map(|tools| PathBuf::from(tools).join("bin/helm"))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("helm"));
    let out = std::process::Command::new(&helm)
        .args([
            "template",
            "lockstep",
            "deploy/helm/lockstep",
            "--namespace",
            CHART_NAMESPACE,
            "--set",
            "clusterName=east,memberAccess.enabled=true",
        ])
        .current_dir(repo())
        .output()
        .map_err(|e| {
            format!(
                "{}: {e} (source \"$(./scripts/install-tools.sh)\")",
                helm.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!("helm template: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8(out.stdout)?;
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(document)?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// The chart's ServiceAccounts, roles and bindings: what its RBAC is made of.
fn chart_rbac(documents: &[Value]) -> Vec<Value> {
    documents
        .iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some(
                    "ServiceAccount"
                        | "ClusterRole"
                        | "ClusterRoleBinding"
                        | "Role"
                        | "RoleBinding"
                )
            )
        })
        .cloned()
        .collect()
}

fn rbac_path(kind: &str, namespace: Option<&str>) -> String {
    let (prefix, plural) = match kind {
        "ServiceAccount" => ("/api/v1", "serviceaccounts"),
        "ClusterRole" => ("/apis/rbac.authorization.k8s.io/v1", "clusterroles"),
        "ClusterRoleBinding" => ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings"),
        "Role" => ("/apis/rbac.authorization.k8s.io/v1", "roles"),
        _ => ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    };
    match namespace {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{plural}"),
        None => format!("{prefix}/{plural}"),
    }
}

/// Whether the chart's rules grant `user` the verb on the resource in the namespace.
fn granted(
    rbac: &[Value],
    user: &str,
    resource: &Resource,
    namespace: Option<&str>,
    verb: &str,
) -> bool {
    let name = user.rsplit(':').next().unwrap_or_default();
    let full = match resource.subresource {
        Some(sub) => format!("{}/{sub}", resource.plural),
        None => resource.plural.to_owned(),
    };
    let contains = |list: &Value, item: &str| {
        list.as_array().is_some_and(|l| {
            l.iter()
                .any(|v| v.as_str() == Some(item) || v.as_str() == Some("*"))
        })
    };
    rbac.iter()
        .filter(|b| {
            matches!(
                b["kind"].as_str(),
                Some("ClusterRoleBinding" | "RoleBinding")
            )
        })
        .filter(|b| {
            b["subjects"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"].as_str() == Some(name)))
        })
        .filter(|b| {
            b["kind"] == "ClusterRoleBinding"
                || namespace.is_some_and(|ns| b["metadata"]["namespace"].as_str() == Some(ns))
        })
        .filter_map(|b| {
            let role_kind = b["roleRef"]["kind"].as_str()?;
            let role_name = b["roleRef"]["name"].as_str()?;
            rbac.iter().find(|r| {
                r["kind"].as_str() == Some(role_kind)
                    && r["metadata"]["name"].as_str() == Some(role_name)
                    && (role_kind == "ClusterRole"
                        || r["metadata"]["namespace"] == b["metadata"]["namespace"])
            })
        })
        .flat_map(|role| role["rules"].as_array().cloned().unwrap_or_default())
        .any(|rule| {
            contains(&rule["apiGroups"], resource.group)
                && contains(&rule["resources"], &full)
                && contains(&rule["verbs"], verb)
        })
}

/// The chart's RBAC: every verb on every resource the chart names, for each of its identities, in
/// Lockstep's namespace and another one (or cluster-wide): allowed or refused, and the refusal's message.
async fn chart_rbac_enforced(side: &Side, rbac: &[Value]) -> Result<Value, Error> {
    let mut outcomes = BTreeMap::new();
    let mut not_as_granted = Vec::new();
    for user in IDENTITIES {
        let (client, _) = side.server.identity(user, None).await?;
        for resource in CHART_RESOURCES {
            let namespaces: &[Option<&str>] = if resource.namespaced {
                &[Some(CHART_NAMESPACE), Some(NAMESPACE)]
            } else {
                &[None]
            };
            for namespace in namespaces {
                let prefix = match resource.group {
                    "" => format!("/api/{}", resource.version),
                    group => format!("/apis/{group}/{}", resource.version),
                };
                let collection = match namespace {
                    Some(ns) => format!("{prefix}/namespaces/{ns}/{}", resource.plural),
                    None => format!("{prefix}/{}", resource.plural),
                };
                let object = match resource.subresource {
                    Some(sub) => format!("{collection}/absent/{sub}"),
                    None => format!("{collection}/absent"),
                };
                let verbs = if resource.subresource.is_some() {
                    SUBRESOURCE_VERBS
                } else {
                    VERBS
                };
                for verb in verbs {
                    let (code, bytes) = match *verb {
                        "get" => {
                            request(&client, "GET", &object, "application/json", vec![]).await?
                        }
                        "list" => {
                            request(&client, "GET", &collection, "application/json", vec![]).await?
                        }
                        "watch" => {
                            // Only the answer's status: an allowed watch stays open until dropped.
                            let request = http::Request::builder()
                                .method("GET")
                                .uri(format!("{collection}?watch=true&timeoutSeconds=1"))
                                .body(kube::client::Body::from(Vec::new()))?;
                            let code = client.send(request).await?.status().as_u16();
                            (code, Vec::new())
                        }
                        "create" => {
                            request(
                                &client,
                                "POST",
                                &collection,
                                "application/json",
                                b"{}".to_vec(),
                            )
                            .await?
                        }
                        "update" => {
                            request(&client, "PUT", &object, "application/json", b"{}".to_vec())
                                .await?
                        }
                        "patch" => {
                            request(
                                &client,
                                "PATCH",
                                &object,
                                "application/merge-patch+json",
                                b"{}".to_vec(),
                            )
                            .await?
                        }
                        _ => {
                            request(&client, "DELETE", &object, "application/json", vec![]).await?
                        }
                    };
                    let key = format!(
                        "{user} {verb} {}{}{} in {}",
                        if resource.group.is_empty() {
                            ""
                        } else {
                            resource.group
                        },
                        if resource.group.is_empty() { "" } else { "/" },
                        match resource.subresource {
                            Some(sub) => format!("{}/{sub}", resource.plural),
                            None => resource.plural.to_owned(),
                        },
                        namespace.unwrap_or("the cluster"),
                    );
                    let outcome = if code == 403 {
                        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        json!({"refused": body.get("message")})
                    } else {
                        json!("allowed")
                    };
                    if (code != 403) != granted(rbac, user, resource, *namespace, verb) {
                        not_as_granted.push(format!("{key}: {code}"));
                    }
                    outcomes.insert(key, outcome);
                }
            }
        }
    }
    Ok(json!({"requests": outcomes, "not as the chart grants": not_as_granted}))
}

/// Watch bookmarks: with `allowWatchBookmarks` one arrives before the watch times out, naming a
/// resourceVersion no older than the watch's; `sendInitialEvents` ends its initial events with one.
async fn watch_bookmarks(side: &Side) -> Result<Value, Error> {
    let c = &side.admin;
    post(c, CONFIGMAPS, &config_map("bookmarked", json!({"a": "1"}))).await?;
    let list = get(c, CONFIGMAPS).await?;
    let from = rv(&list.body)?;
    let shape = |event: &Value, from: u64| -> Value {
        let object = &event["object"];
        let mut metadata: Vec<String> = object["metadata"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        metadata.sort();
        json!({
            "kind": object["kind"],
            "apiVersion": object["apiVersion"],
            "metadata": metadata,
            "annotations": object["metadata"]["annotations"],
            "not older than the watch": rv(object).is_ok_and(|r| r >= from),
        })
    };
    // A bookmark names a resourceVersion newer than the watch's: another namespace's change makes one
    // while nothing this watch sees changes.
    let elsewhere = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        post(
            c,
            &format!("/api/v1/namespaces/{CHART_NAMESPACE}/configmaps"),
            &config_map("elsewhere", json!({})),
        )
        .await
    };
    let path = format!(
        "{CONFIGMAPS}?watch=true&allowWatchBookmarks=true&resourceVersion={from}&timeoutSeconds=5"
    );
    let (watched, written) = tokio::join!(watch(c, &path), elsewhere);
    written?;
    let (code, events) = watched?;
    // Nothing changed anywhere: no bookmark at the watch's own version (kube-apiserver sends one only
    // past it).
    let list = get(c, CONFIGMAPS).await?;
    let latest = rv(&list.body)?;
    let (quiet_code, quiet) = watch(
        c,
        &format!("{CONFIGMAPS}?watch=true&allowWatchBookmarks=true&resourceVersion={latest}&timeoutSeconds=2"),
    )
    .await?;
    let types: BTreeSet<String> = events
        .iter()
        .filter_map(|e| e["type"].as_str().map(str::to_owned))
        .collect();
    let bookmark = events
        .iter()
        .find(|e| e["type"] == "BOOKMARK")
        .map(|e| shape(e, from));
    let (initial_code, initial) = watch(
        c,
        &format!(
            "{CONFIGMAPS}?watch=true&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=2"
        ),
    )
    .await?;
    let initial_summary: Vec<Value> = initial
        .iter()
        .map(|e| match e["type"].as_str() {
            Some("BOOKMARK") => json!({"BOOKMARK": shape(e, from)}),
            Some(other) => json!({ other: e["object"]["metadata"]["name"] }),
            None => e.clone(),
        })
        .collect();
    Ok(json!({
        "code": code,
        "event types": types,
        // (kube-apiserver's own Lease renewals may move its cache on, so only this is certain.)
        "nothing changed": {
            "code": quiet_code,
            "events other than bookmarks": quiet.iter().filter(|e| e["type"] != "BOOKMARK").count(),
            "bookmarks not past the watch": quiet
                .iter()
                .filter(|e| e["type"] == "BOOKMARK" && rv(&e["object"]).is_ok_and(|r| r <= latest))
                .count(),
        },
        "bookmark": bookmark,
        "sendInitialEvents": {"code": initial_code, "events": dedup_bookmarks(initial_summary)},
    }))
}

/// Consecutive bookmarks as one (how many arrive depends on timing, not behaviour).
fn dedup_bookmarks(events: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for event in events {
        if out.last() == Some(&event) {
            continue;
        }
        out.push(event);
    }
    out
}

/// 410 Gone on a watch from a resourceVersion older than the server keeps, and resuming from a fresh
/// list.
async fn gone_and_resume(side: &Side) -> Result<Value, Error> {
    let c = &side.admin;
    // Outrun the test API server's history.
    post(c, CONFIGMAPS, &config_map("churn", json!({"n": "0"}))).await?;
    for n in 1..=HISTORY + 10 {
        merge(
            c,
            &format!("{CONFIGMAPS}/churn"),
            &json!({"data": {"n": n.to_string()}}),
        )
        .await?;
    }
    // ConsistencyGroups: kube-apiserver's watch cache for them starts when their CRD is established, so
    // resourceVersion 1 is older than anything it keeps (for ConfigMaps, cached since etcd's first
    // revision, it is not).
    post(c, GROUPS, &group("before-gone")).await?;
    let (code, events) = watch(
        c,
        &format!("{GROUPS}?watch=true&resourceVersion=1&timeoutSeconds=3"),
    )
    .await?;
    let gone: Vec<Value> = events
        .iter()
        .map(|e| {
            let status = if code == 200 { &e["object"] } else { e };
            json!({
                "type": e.get("type"),
                "kind": status.get("kind"),
                "code": status.get("code"),
                "reason": status.get("reason"),
                "message": status["message"].as_str().map(without_numbers),
            })
        })
        .collect();
    let list = get(c, GROUPS).await?;
    let from = rv(&list.body)?;
    post(c, GROUPS, &group("resumed")).await?;
    let (resumed_code, resumed) = watch(
        c,
        &format!("{GROUPS}?watch=true&resourceVersion={from}&timeoutSeconds=2"),
    )
    .await?;
    let resumed: Vec<Value> = resumed
        .iter()
        .filter(|e| e["type"] != "BOOKMARK")
        .map(|e| json!([e["type"], e["object"]["metadata"]["name"]]))
        .collect();
    Ok(json!({
        "too old": {"code": code, "events": gone},
        "resumed": {"code": resumed_code, "events": resumed},
    }))
}

/// A stale resourceVersion: 409 Conflict on update, on `/status`, and on a patch that names it.
async fn resource_version_conflicts(side: &Side) -> Result<Value, Error> {
    let c = &side.admin;
    let created = post(c, CONFIGMAPS, &config_map("stale", json!({"a": "1"}))).await?;
    let mut first = created.body.clone();
    first["data"]["a"] = json!("2");
    let fresh = put(c, &format!("{CONFIGMAPS}/stale"), &first).await?;
    first["data"]["a"] = json!("3");
    let stale = put(c, &format!("{CONFIGMAPS}/stale"), &first).await?;
    let stale_patch = merge(
        c,
        &format!("{CONFIGMAPS}/stale"),
        &json!({"metadata": {"resourceVersion": created.body["metadata"]["resourceVersion"]}, "data": {"a": "4"}}),
    )
    .await?;

    let group_created = post(c, GROUPS, &group("stale-status")).await?;
    let mut status = group_created.body.clone();
    status["status"] = json!({"phase": "Replicating", "epoch": 1});
    let status_fresh = put(c, &format!("{GROUPS}/stale-status/status"), &status).await?;
    status["status"]["epoch"] = json!(2);
    let status_stale = put(c, &format!("{GROUPS}/stale-status/status"), &status).await?;
    let status_stale_patch = merge(
        c,
        &format!("{GROUPS}/stale-status/status"),
        &json!({"metadata": {"resourceVersion": group_created.body["metadata"]["resourceVersion"]}, "status": {"epoch": 3}}),
    )
    .await?;
    let after = get(c, &format!("{GROUPS}/stale-status")).await?;
    Ok(json!({
        "update with the current resourceVersion": fresh.outcome(),
        "update with a stale resourceVersion": stale.outcome(),
        "merge patch naming a stale resourceVersion": stale_patch.outcome(),
        "status update with the current resourceVersion": status_fresh.outcome(),
        "status update with a stale resourceVersion": status_stale.outcome(),
        "status merge patch naming a stale resourceVersion": status_stale_patch.outcome(),
        "status after": after.body["status"],
    }))
}

/// The status subresource and `metadata.generation`: spec changes bump it, status and metadata changes
/// do not; the main resource ignores status, `/status` ignores everything else.
async fn status_and_generation(side: &Side) -> Result<Value, Error> {
    let c = &side.admin;
    let path = format!("{GROUPS}/generation");
    let mut steps = Vec::new();
    let mut step = |what: &str, answer: &Answer| {
        let mut outcome = answer.outcome();
        if answer.ok() {
            outcome["generation"] = answer.body["metadata"]["generation"].clone();
            outcome["holdTimeout"] = answer.body["spec"]["holdTimeout"].clone();
            outcome["status"] = answer.body["status"].clone();
            outcome["labels"] = answer.body["metadata"]["labels"].clone();
        }
        steps.push(json!({ what: outcome }));
    };
    let mut body = group("generation");
    body["status"] = json!({"phase": "Frozen"});
    step("create with a status", &post(c, GROUPS, &body).await?);
    let current = get(c, &path).await?;
    let mut status = current.body.clone();
    status["status"] = json!({"phase": "Replicating", "observedGeneration": 1});
    status["spec"]["holdTimeout"] = json!("45s");
    status["metadata"]["labels"] = json!({"through": "status"});
    step(
        "status update with spec and label changes",
        &put(c, &format!("{path}/status"), &status).await?,
    );
    step(
        "status merge patch",
        &merge(
            c,
            &format!("{path}/status"),
            &json!({"status": {"epoch": 4}}),
        )
        .await?,
    );
    step(
        "main resource merge patch of status",
        &merge(c, &path, &json!({"status": {"phase": "Frozen"}})).await?,
    );
    step(
        "label merge patch",
        &merge(c, &path, &json!({"metadata": {"labels": {"a": "b"}}})).await?,
    );
    step(
        "spec merge patch",
        &merge(c, &path, &json!({"spec": {"holdTimeout": "45s"}})).await?,
    );
    step(
        "same spec again",
        &merge(c, &path, &json!({"spec": {"holdTimeout": "45s"}})).await?,
    );
    let current = get(c, &path).await?;
    let mut replaced = current.body.clone();
    replaced["spec"]["policy"] = json!("FreezeAndStop");
    replaced["status"] = json!({"phase": "Degraded"});
    step(
        "spec update with a status change",
        &put(c, &path, &replaced).await?,
    );
    step(
        "spec server-side apply",
        &apply(
            c,
            &format!("{path}?fieldManager=lockstep"),
            &json!({
                "apiVersion": "lockstep.dev/v1alpha1",
                "kind": "ConsistencyGroup",
                "metadata": {"name": "generation"},
                "spec": {"holdTimeout": "50s"},
            }),
        )
        .await?,
    );
    Ok(Value::Array(steps))
}

/// The request size limit: etcd refuses values over 1.5 MiB, kube-apiserver bodies over 3 MiB.
async fn request_size_limit(side: &Side) -> Result<Value, Error> {
    let c = &side.admin;
    let mut outcomes = BTreeMap::new();
    for (name, size) in [
        ("one-mib", 1 << 20),
        ("two-mib", 2 << 20),
        ("three-and-a-half-mib", 7 << 19),
    ] {
        let answer = post(
            c,
            CONFIGMAPS,
            &config_map(name, json!({"blob": "x".repeat(size)})),
        )
        .await?;
        let mut outcome = answer.outcome();
        if let Some(message) = outcome["message"].as_str() {
            outcome["message"] = json!(message);
        }
        outcomes.insert(name, outcome);
        if answer.ok() {
            // A big object updated past the limit.
            let grown = merge(
                c,
                &format!("{CONFIGMAPS}/{name}"),
                &json!({"data": {"more": "y".repeat(1 << 20)}}),
            )
            .await?;
            outcomes.insert(
                if name == "one-mib" {
                    "one-mib grown to two"
                } else {
                    "grown"
                },
                grown.outcome(),
            );
        }
    }
    // A kind without a size rule of its own: etcd's limit (1.5 MiB) refuses it.
    for (name, size) in [
        ("lease-one-mib", 1 << 20),
        ("lease-one-and-a-half-mib", (3 << 19) + 4096),
    ] {
        let answer = post(
            c,
            "/apis/coordination.k8s.io/v1/namespaces/diff/leases",
            &json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name},
                "spec": {"holderIdentity": "h".repeat(size)},
            }),
        )
        .await?;
        outcomes.insert(name, answer.outcome());
    }
    Ok(json!(outcomes))
}

/// Finalizers: a delete marks the object (deletionTimestamp), which stays, takes no new finalizers, and
/// goes once its finalizers are removed.
async fn finalizers_and_deletion(side: &Side) -> Result<Value, Error> {
    let c = &side.admin;
    let path = format!("{GROUPS}/finalized");
    let mut body = group("finalized");
    body["metadata"]["finalizers"] = json!(["lockstep.dev/test"]);
    let created = post(c, GROUPS, &body).await?;
    let marked = |answer: &Answer| {
        let mut outcome = answer.outcome();
        if answer.ok() {
            outcome["kind"] = answer.body["kind"].clone();
            outcome["deletionTimestamp set"] =
                json!(answer.body["metadata"]["deletionTimestamp"].is_string());
            outcome["deletionGracePeriodSeconds"] =
                answer.body["metadata"]["deletionGracePeriodSeconds"].clone();
            outcome["finalizers"] = answer.body["metadata"]["finalizers"].clone();
            outcome["generation"] = answer.body["metadata"]["generation"].clone();
        }
        outcome
    };
    let deleted = delete(c, &path).await?;
    let still = get(c, &path).await?;
    let deleted_again = delete(c, &path).await?;
    let new_finalizer = merge(
        c,
        &path,
        &json!({"metadata": {"finalizers": ["lockstep.dev/test", "lockstep.dev/other"]}}),
    )
    .await?;
    let spec_while_deleting = merge(c, &path, &json!({"spec": {"holdTimeout": "40s"}})).await?;
    let status_while_deleting = merge(
        c,
        &format!("{path}/status"),
        &json!({"status": {"phase": "Frozen"}}),
    )
    .await?;
    let removed = merge(c, &path, &json!({"metadata": {"finalizers": null}})).await?;
    let gone = get(c, &path).await?;
    Ok(json!({
        "created": marked(&created),
        "delete": marked(&deleted),
        "get after delete": marked(&still),
        "delete again": marked(&deleted_again),
        "a new finalizer": marked(&new_finalizer),
        "spec change while deleting": marked(&spec_while_deleting),
        "status change while deleting": marked(&status_while_deleting),
        "finalizers removed": marked(&removed),
        "get after": gone.outcome(),
    }))
}

// ---------------------------------------------------------------------------------------------------

/// Where two values differ, as `path: test | kube` lines.
fn differences(path: &str, test: &Value, kube: &Value, out: &mut Vec<String>) {
    match (test, kube) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                differences(
                    &format!("{path}/{key}"),
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}/{i}"), x, y, out);
            }
        }
        _ if test != kube => out.push(format!("  {path}:\n    test: {test}\n    kube: {kube}")),
        _ => {}
    }
}

async fn install(side: &Side, rbac: &[Value]) -> Result<(), Error> {
    let c = &side.admin;
    for ns in [NAMESPACE, CHART_NAMESPACE] {
        let answer = post(
            c,
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .await?;
        if !answer.ok() {
            return Err(format!("namespace {ns}: {}", answer.body).into());
        }
    }
    let mut crds = Vec::new();
    for entry in std::fs::read_dir(repo().join("crds"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let crd: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path)?)?;
            let answer = post(
                c,
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                &crd,
            )
            .await?;
            if !answer.ok() {
                return Err(format!("{}: {}", path.display(), answer.body).into());
            }
            crds.push(
                crd["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    for document in rbac {
        let namespace = document["metadata"]["namespace"].as_str();
        let kind = document["kind"].as_str().unwrap_or_default();
        let answer = post(c, &rbac_path(kind, namespace), document).await?;
        if !answer.ok() {
            return Err(format!("{kind}: {}", answer.body).into());
        }
    }
    // The CRDs Established and their resources served.
    let started = Instant::now();
    for name in crds {
        loop {
            let crd = get(
                c,
                &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
            )
            .await?;
            let established = crd.body["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Established" && c["status"] == "True")
                });
            let plural = crd.body["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or_default();
            if established
                && get(c, &format!("/apis/lockstep.dev/v1alpha1/{plural}"))
                    .await?
                    .ok()
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!("CRD {name} not Established and served in 60 s").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_api_server_answers_as_kube_apiserver_does() -> TestResult {
    let Some(_binaries) = KubeBinaries::for_tests()? else {
        return Ok(());
    };
    let started = Instant::now();
    let test = ApiServer::Test(
        TestApiServer::start(lockstep_testapi::Options {
            authorize: true,
            history: HISTORY,
            ..Default::default()
        })
        .await?,
    );
    let kube = ApiServer::start(Backend::Kube).await?;
    let test = Side {
        admin: test.admin().await?,
        server: test,
    };
    let kube = Side {
        admin: kube.admin().await?,
        server: kube,
    };
    let rbac = chart_rbac(&rendered_chart()?);
    let (a, b) = tokio::join!(install(&test, &rbac), install(&kube, &rbac));
    a.map_err(|e| format!("test: {e}"))?;
    b.map_err(|e| format!("kube: {e}"))?;
    eprintln!("both servers ready in {:?}", started.elapsed());

    let mut divergences = Vec::new();
    let mut compare = |name: &str, test: Result<Value, Error>, kube: Result<Value, Error>| {
        let test = test.unwrap_or_else(|e| json!({"check failed": e.to_string()}));
        let kube = kube.unwrap_or_else(|e| json!({"check failed": e.to_string()}));
        let mut out = Vec::new();
        differences("", &test, &kube, &mut out);
        if out.is_empty() {
            eprintln!("{name}: same");
        } else {
            divergences.push(format!("{name}:\n{}", out.join("\n")));
        }
    };
    macro_rules! check {
        ($name:literal, $check:expr) => {{
            let t = Instant::now();
            let (a, b) = tokio::join!($check(&test), $check(&kube));
            compare($name, a, b);
            eprintln!("  ({:?})", t.elapsed());
        }};
    }
    check!("server-side apply", server_side_apply);
    check!("examples/invalid", invalid_examples);
    check!("watch bookmarks", watch_bookmarks);
    check!("410 Gone and resume", gone_and_resume);
    check!("resourceVersion conflicts", resource_version_conflicts);
    check!("status subresource and generation", status_and_generation);
    check!("request size limit", request_size_limit);
    check!("finalizers and deletion", finalizers_and_deletion);
    let (a, b) = tokio::join!(
        chart_rbac_enforced(&test, &rbac),
        chart_rbac_enforced(&kube, &rbac)
    );
    let mut chart_issues = Vec::new();
    for (backend, outcome) in [("test", &a), ("kube", &b)] {
        if let Ok(outcome) = outcome
            && outcome["not as the chart grants"]
                .as_array()
                .is_some_and(|l| !l.is_empty())
        {
            chart_issues.push(format!(
                "the chart's RBAC on {backend} is not what the chart grants: {}",
                outcome["not as the chart grants"]
            ));
        }
    }
    compare("the chart's RBAC", a, b);
    divergences.extend(chart_issues);

    eprintln!("every check in {:?}", started.elapsed());
    assert!(
        divergences.is_empty(),
        "{} of the checks diverge:\n{}",
        divergences.len(),
        divergences.join("\n")
    );
    Ok(())
}
