//! The project's own CRDs (`crds/*.yaml`) install through kube's API; every example in `examples/` is
//! accepted; every invalid example in `examples/invalid/`, sent as `kubectl apply` sends it, is refused with
//! its own message (the file's first line says `# expect: <message substring>`); a status update that lowers
//! `status.epoch` is refused.

mod common;

use std::path::{Path, PathBuf};

use common::{TestResult, api_error, server, wait_established};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use lockstep_testapi::invalid_examples::InvalidExample;
use serde::Deserialize;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    manifest_dir().join("../..")
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

fn documents(path: &Path) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
    let text = std::fs::read_to_string(path)?;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

async fn install_project_crds(
    client: &kube::Client,
) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut installed = 0;
    for path in yaml_files(&repo().join("crds"))? {
        for doc in documents(&path)? {
            if doc.get("kind").and_then(Value::as_str) != Some("CustomResourceDefinition") {
                continue;
            }
            let crd: CustomResourceDefinition = serde_json::from_value(doc)?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            crds.create(&PostParams::default(), &crd)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            wait_established(client, &name).await?;
            installed += 1;
        }
    }
    Ok(installed)
}

/// An `Api` for an object's kind, found through discovery.
async fn api_for(
    client: &kube::Client,
    object: &Value,
) -> Result<Api<DynamicObject>, Box<dyn std::error::Error + Send + Sync>> {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (resource, caps) =
        discovery::pinned_kind(client, &GroupVersionKind::gvk(group, version, kind)).await?;
    Ok(match caps.scope {
        Scope::Cluster => Api::all_with(client.clone(), &resource),
        Scope::Namespaced => {
            let ns = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default");
            Api::namespaced_with(client.clone(), ns, &resource)
        }
    })
}

async fn ensure_namespace(client: &kube::Client, object: &Value) -> TestResult {
    if let Some(ns) = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
    {
        let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        if nss.get_opt(ns).await?.is_none() {
            let n = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
            nss.create(&PostParams::default(), &n).await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_project_crds_install_and_validate_the_examples() -> TestResult {
    let (_server, client) = server().await?;
    let installed = install_project_crds(&client).await?;
    assert!(
        installed >= 3,
        "expected the project's CRDs, found {installed}"
    );

    // Every example is accepted.
    let mut accepted = 0;
    for path in yaml_files(&repo().join("examples"))? {
        for doc in documents(&path)? {
            ensure_namespace(&client, &doc).await?;
            let api = api_for(&client, &doc).await?;
            let object: DynamicObject = serde_json::from_value(doc)?;
            api.create(&PostParams::default(), &object)
                .await
                .map_err(|e| format!("{} was refused: {e}", path.display()))?;
            accepted += 1;
        }
    }
    assert!(accepted > 0, "no examples found");

    // Every invalid example, sent as `kubectl apply` sends it, is refused with its own message.
    let invalid = InvalidExample::read_all(&repo().join("examples/invalid"))?;
    assert!(!invalid.is_empty(), "no invalid examples found");
    for example in invalid {
        let doc = example.as_kubectl_applies();
        let api = api_for(&client, &doc).await?;
        let object: DynamicObject = serde_json::from_value(doc)?;
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => return Err(format!("{} was accepted", example.file_name).into()),
            Err(e) => {
                let (code, _, message) =
                    api_error(&e).ok_or_else(|| format!("{}: {e}", example.file_name))?;
                let expected_code = if example.expect.starts_with("Request entity too large") {
                    413
                } else {
                    422
                };
                assert_eq!(code, expected_code, "{}: {message}", example.file_name);
                assert!(
                    message.contains(&example.expect),
                    "{}: expected {:?} in {message:?}",
                    example.file_name,
                    example.expect
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_status_update_that_lowers_the_epoch_is_refused() -> TestResult {
    let (_server, client) = server().await?;
    install_project_crds(&client).await?;
    let path = repo().join("examples/consistencygroup-two-cluster.yaml");
    let doc = documents(&path)?
        .into_iter()
        .next()
        .ok_or("no ConsistencyGroup example")?;
    let api = api_for(&client, &doc).await?;
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let object: DynamicObject = serde_json::from_value(doc)?;
    api.create(&PostParams::default(), &object).await?;
    let raised = api
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"epoch": 3}})),
        )
        .await?;
    assert_eq!(raised.data["status"]["epoch"], 3);
    let err = api
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"epoch": 2}})),
        )
        .await
        .err()
        .ok_or("the epoch was lowered")?;
    let (code, _, message) = api_error(&err).ok_or("not an API error")?;
    assert_eq!(code, 422);
    assert!(
        message.contains("status.epoch never decreases"),
        "{message}"
    );
    assert!(
        message.starts_with(&format!(
            "ConsistencyGroup.lockstep.dev \"{name}\" is invalid: "
        )),
        "{message}"
    );
    // Leaving the epoch out cannot lower it either: it is defaulted to 0, which the rule refuses.
    let err = api
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"epoch": null}})),
        )
        .await
        .err()
        .ok_or("the epoch was removed")?;
    let (code, _, message) = api_error(&err).ok_or("not an API error")?;
    assert_eq!(code, 422);
    assert!(
        message.contains("status.epoch never decreases"),
        "{message}"
    );
    // The value stayed at 3.
    assert_eq!(api.get_status(&name).await?.data["status"]["epoch"], 3);
    Ok(())
}

/// The crate's directory: where cargo says it is when it runs this (a binary reused from a build in
/// another checkout of the same tree would otherwise read that checkout's files), else where it was built.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
