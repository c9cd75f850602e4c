//! Installing the project's CRDs into an API server (test or real) and waiting until each is
//! Established: what the operator's and sidecar's tests and the end-to-end harness all do first.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use lockstep_replicator::testing::poll_until;

/// How long the CRDs may take to become Established.
pub const ESTABLISHED_DEADLINE: Duration = Duration::from_secs(60);

/// Why the CRDs could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The API server refused to create a CRD.
    #[error("creating CRD {name}: {source}")]
    Create {
        /// The CRD.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// A CRD never became Established.
    #[error("CRD {name} not Established within {within:?} (last seen: {last})")]
    NotEstablished {
        /// The CRD.
        name: String,
        /// How long was waited.
        within: Duration,
        /// What the last look found.
        last: String,
    },
}

/// Creates every CRD of the project (one that exists already is kept) and waits until each is
/// Established.
pub async fn install_crds(client: &kube::Client) -> Result<(), CrdError> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in lockstep_api::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(source) => return Err(CrdError::Create { name, source }),
        }
    }
    crds_established(client).await
}

/// Waits until every CRD of the project is Established (installed by [`install_crds`], a chart or
/// `kubectl apply`).
pub async fn crds_established(client: &kube::Client) -> Result<(), CrdError> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in lockstep_api::crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let last = std::sync::Mutex::new(String::from("nothing yet"));
        let established = poll_until(
            &format!("CRD {name} Established"),
            ESTABLISHED_DEADLINE,
            || async {
                let seen = match crds.get(&name).await {
                    Ok(crd) => crd,
                    Err(e) => {
                        note(&last, e.to_string());
                        return None;
                    }
                };
                let conditions = seen.status.and_then(|s| s.conditions).unwrap_or_default();
                let done = conditions
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if !done {
                    note(&last, format!("conditions {conditions:?}"));
                }
                done.then_some(())
            },
        )
        .await;
        if established.is_err() {
            let last = last.lock().map(|l| l.clone()).unwrap_or_default();
            return Err(CrdError::NotEstablished {
                name,
                within: ESTABLISHED_DEADLINE,
                last,
            });
        }
    }
    Ok(())
}

fn note(last: &std::sync::Mutex<String>, what: String) {
    if let Ok(mut last) = last.lock() {
        *last = what;
    }
}
