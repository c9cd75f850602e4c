//! `kubectl lockstep freeze|release|resync` when the group changes between the read it plans on and the
//! patch: the patch carries the resourceVersion it was planned on, the test API server refuses it (409),
//! and the plugin reads the group again and plans again, so what it writes names the group's current
//! epoch, or it refuses, in one sentence, an `--epoch` that has become stale. The change is made by
//! another writer at the exact moment the plugin's patch is on its way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use kubectl_lockstep::{
    PluginError,
    connect::Connection,
    intents::{self, Intent, IntentArgs},
};
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_testapi::TestApiServer;
use serde_json::{Value, json};

const GROUP: &str = "orders-db";

/// A test API server with Lockstep's CRDs and the group frozen at epoch 3, its spec observed.
async fn frozen_group() -> (TestApiServer, Client) {
    let server = TestApiServer::start(lockstep_testapi::Options::default())
        .await
        .unwrap();
    let client = server.client().await.unwrap();
    lockstep_kube::crds::install_crds(&client).await.unwrap();
    let spec = serde_json::from_value(json!({
        "policy": "FreezeAndStop",
        "members": [{"cluster": "east", "namespace": "orders", "pvcNames": ["wal"]}],
    }))
    .unwrap();
    let group = ConsistencyGroup::new(GROUP, spec);
    let groups = Api::<ConsistencyGroup>::all(client.clone());
    let created = groups.create(&PostParams::default(), &group).await.unwrap();
    set_status(&client, created.metadata.generation.unwrap(), 3).await;
    (server, client)
}

/// Writes the group's status as the operator would: frozen at `epoch`, `generation` observed.
async fn set_status(client: &Client, generation: i64, epoch: u64) {
    Api::<ConsistencyGroup>::all(client.clone())
        .patch_status(
            GROUP,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "epoch": epoch, "stage": "Freeze", "phase": "Frozen",
                "observedGeneration": generation,
            }})),
        )
        .await
        .unwrap();
}

/// The plugin's client: every request goes to `real`, but before the first PATCH reaches it,
/// `interfere` runs (another writer changing the group after the plugin read it). The PATCH bodies
/// sent are recorded.
fn racing_client<F, Fut>(real: Client, interfere: F) -> (Client, Arc<Mutex<Vec<Value>>>)
where
    F: Fn(Client) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let patches = Arc::new(Mutex::new(Vec::<Value>::new()));
    let recorded = patches.clone();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let real = real.clone();
        let interfere = interfere.clone();
        let patches = patches.clone();
        async move {
            if request.method() != http::Method::PATCH {
                return real.send(request).await;
            }
            let (parts, body) = request.into_parts();
            let bytes = http_body_util::BodyExt::collect(body).await?.to_bytes();
            let first = {
                let mut patches = patches.lock().unwrap();
                patches.push(serde_json::from_slice(&bytes).unwrap());
                patches.len() == 1
            };
            if first {
                interfere(real.clone()).await;
            }
            let request =
                http::Request::from_parts(parts, kube::client::Body::from(bytes.to_vec()));
            real.send(request).await
        }
    });
    (Client::new(service, "default"), recorded)
}

async fn release(client: Client, epoch: Option<u64>) -> Result<intents::IntentReport, PluginError> {
    let connection = Connection {
        client,
        namespace: "lockstep".into(),
    };
    let args = IntentArgs {
        group: GROUP.into(),
        epoch,
        dry_run: false,
    };
    intents::apply(&connection, Intent::Release, &args).await
}

async fn group(client: &Client) -> ConsistencyGroup {
    Api::<ConsistencyGroup>::all(client.clone())
        .get(GROUP)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_changed_after_the_read_is_read_again_and_the_patch_names_its_current_version() {
    let (_server, client) = frozen_group().await;
    let planned_on = group(&client).await.metadata.resource_version.unwrap();
    // Someone labels the group while the release is on its way: same epoch, new resourceVersion.
    let (plugin, patches) = racing_client(client.clone(), |real: Client| async move {
        Api::<ConsistencyGroup>::all(real)
            .patch(
                GROUP,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"team": "orders"}}})),
            )
            .await
            .unwrap();
    });
    let report = release(plugin, None).await.unwrap();
    let patches = patches.lock().unwrap().clone();
    assert_eq!(patches.len(), 2, "refused once, planned again: {patches:?}");
    assert_eq!(patches[0]["metadata"]["resourceVersion"], json!(planned_on));
    assert_ne!(
        patches[1]["metadata"]["resourceVersion"],
        json!(planned_on),
        "the second patch is planned on the group as changed"
    );
    assert_eq!(
        patches[1], report.patch,
        "the report shows what was written"
    );
    assert!(report.applied);
    assert_eq!(report.epoch, 3);
    let after = group(&client).await;
    assert_eq!(after.spec.release.map(|release| release.epoch), Some(3));
    assert_eq!(
        after
            .metadata
            .labels
            .unwrap_or_default()
            .get("team")
            .map(String::as_str),
        Some("orders"),
        "the other writer's change is kept"
    );
}

/// Between the plugin's read and its patch, the group is resynced and frozen again: now at epoch 4.
async fn refrozen_at_4(real: Client) {
    let generation = group(&real).await.metadata.generation.unwrap();
    set_status(&real, generation, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_epoch_moved_after_the_read_is_released_at_its_current_epoch() {
    let (_server, client) = frozen_group().await;
    let (plugin, patches) = racing_client(client.clone(), refrozen_at_4);
    let report = release(plugin, None).await.unwrap();
    let patches = patches.lock().unwrap().clone();
    assert_eq!(
        patches
            .iter()
            .map(|patch| patch["spec"]["release"]["epoch"].clone())
            .collect::<Vec<_>>(),
        [json!(3), json!(4)],
        "planned at epoch 3, refused, planned again at 4"
    );
    assert!(report.applied);
    assert_eq!(report.epoch, 4);
    assert_eq!(
        group(&client)
            .await
            .spec
            .release
            .map(|release| release.epoch),
        Some(4),
        "the release names the current epoch, never the stale one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expected_epoch_that_went_stale_after_the_read_is_refused_in_one_sentence() {
    let (_server, client) = frozen_group().await;
    let (plugin, patches) = racing_client(client.clone(), refrozen_at_4);
    let error = release(plugin, Some(3)).await.unwrap_err().to_string();
    assert_eq!(
        error,
        "epoch 3 is stale: group orders-db is at epoch 4 (Frozen, stage Freeze); nothing was written"
    );
    assert_eq!(
        patches.lock().unwrap().len(),
        1,
        "only the refused patch was sent"
    );
    assert_eq!(group(&client).await.spec.release, None);
}
