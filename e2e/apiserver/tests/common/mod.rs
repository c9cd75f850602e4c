//! Helpers shared by the integration tests: start a server, poll for a condition with a deadline, a
//! small test CRD.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ApiResource, PostParams};
use lockstep_testapi::{Options, TestApiServer};
use serde_json::json;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// An in-memory server and a client for it.
pub async fn server() -> Result<(TestApiServer, Client), Box<dyn std::error::Error + Send + Sync>> {
    server_with(Options::default()).await
}

/// A server with options, and a client for it.
pub async fn server_with(
    options: Options,
) -> Result<(TestApiServer, Client), Box<dyn std::error::Error + Send + Sync>> {
    let server = TestApiServer::start(options).await?;
    let client = server.client().await?;
    Ok((server, client))
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The API error code and message of a kube error, if it is one.
pub fn api_error(e: &kube::Error) -> Option<(u16, String, String)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.reason.clone(), s.message.clone())),
        _ => None,
    }
}

/// A small CRD: `widgets.test.lockstep.dev`, namespaced, status subresource, a schema with bounds, an
/// enum with a default, a pattern, a CEL rule and a transition rule on `status.epoch`.
pub fn widget_crd() -> serde_json::Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.lockstep.dev"},
        "spec": {
            "group": "test.lockstep.dev",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["size"],
                            "properties": {
                                "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                "mode": {"type": "string", "enum": ["Fast", "Safe"], "default": "Safe"},
                                "label": {"type": "string", "pattern": "^[a-z]+$"},
                                "members": {"type": "array", "items": {"type": "string"}}
                            },
                            "x-kubernetes-validations": [
                                {"rule": "!has(self.members) || size(self.members) <= self.size",
                                 "message": "a widget has at most size members", "fieldPath": ".members"}
                            ]
                        },
                        "status": {
                            "type": "object",
                            "properties": {"epoch": {"type": "integer", "minimum": 0}},
                            "x-kubernetes-validations": [
                                {"rule": "(has(self.epoch) ? self.epoch : 0) >= (has(oldSelf.epoch) ? oldSelf.epoch : 0)",
                                 "message": "status.epoch never decreases"}
                            ]
                        }
                    }
                }}
            }]
        }
    })
}

/// The `ApiResource` for widgets.
pub fn widget_resource() -> ApiResource {
    ApiResource {
        group: "test.lockstep.dev".into(),
        version: "v1".into(),
        api_version: "test.lockstep.dev/v1".into(),
        kind: "Widget".into(),
        plural: "widgets".into(),
    }
}

/// Installs the widget CRD and waits until it is Established.
pub async fn install_widgets(client: &Client) -> TestResult {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(widget_crd())?;
    crds.create(&PostParams::default(), &crd).await?;
    wait_established(client, "widgets.test.lockstep.dev").await
}

/// Waits until a CRD has `Established=True`.
pub async fn wait_established(client: &Client, name: &str) -> TestResult {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually(5, "Established", || async {
        let crd = crds.get(name).await.ok()?;
        let conditions = crd.status?.conditions?;
        conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await?;
    Ok(())
}
