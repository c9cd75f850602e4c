//! The whole freeze with real parts: two test API servers over real HTTP (east is the hub), the reference
//! replicator on each node (volumes served over NBD, copied through a cuttable link to a real secondary),
//! a real sidecar per node over real gRPC and a unix socket, and the operator. The dependent-write workload
//! runs across the three volumes; one link is cut; the operator freezes every member on both paths,
//! releases (FreezeAndGo), and the consistency checker passes on the secondaries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, Client, api::PostParams};
use lockstep_api::{
    domain::{ClusterPaths, Phase, Policy, Stage},
    v1alpha1::{
        ConsistencyGroup, ConsistencyGroupSpec, GroupMember, MemberCluster, MemberClusterSpec,
        SecretKeyRef,
    },
};
use lockstep_checker::{
    CheckOptions, Layout, NbdAddress, OnError, Source, WorkloadHandle, WorkloadOptions,
};
use lockstep_operator::{Operator, Options};
use lockstep_replicator::{
    linkcut::LinkMode,
    testing::{NodeSpec, ReplicatorNode},
};
use lockstep_sidecar::Sidecar;
use lockstep_testapi::TestApiServer;

mod common;

use common::{cluster, eventually, patch_spec, volume, wait_for_group};

const MIB: u64 = 1024 * 1024;

/// One node: the shared replicator fixture (a primary serving `volumes`, each copied through its own
/// cuttable link to the node's secondary); the PV and bound PVC of each volume in the cluster's API server.
async fn start_node(client: &Client, node: &str, volumes: &[&str]) -> ReplicatorNode {
    for name in volumes {
        volume(client, name, "orders", name, node).await;
    }
    NodeSpec::new(volumes, 4 * MIB).start().await.unwrap()
}

/// Where the workload reaches `volume` of `node` over NBD.
fn nbd(node: &ReplicatorNode, volume: &str) -> NbdAddress {
    node.nbd_url(volume).unwrap().parse().unwrap()
}

async fn sidecar(
    node: &ReplicatorNode,
    cluster: &str,
    name: &str,
    client: &Client,
    endpoint: &str,
) -> Sidecar {
    let mut options = lockstep_sidecar::Options::new(name, cluster);
    options.replicator_socket = node.control_socket().unwrap();
    options.operator_endpoint = Some(endpoint.to_owned());
    options.insecure_plaintext_control = true;
    options.listen = "127.0.0.1:0".parse().unwrap();
    options.inventory_interval = Duration::from_millis(300);
    options.rpc_timeout = Duration::from_secs(2);
    options.fail_safe_interval = Duration::from_secs(10);
    options.lease_duration = Duration::from_secs(3);
    Sidecar::start(options, Some(client.clone())).await.unwrap()
}

/// What else is broken when the link is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Nothing: both paths work.
    None,
    /// West's API server is stopped: west hears the freeze and answers over gRPC only.
    WestApiServerDown,
    /// The operator's gRPC listener cannot be reached: every member freezes through the API servers.
    GrpcDown,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_link_freezes_every_member_on_both_paths_and_the_secondaries_stay_consistent() {
    scenario(Fault::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_member_api_server_stopped_its_volumes_freeze_over_grpc() {
    scenario(Fault::WestApiServerDown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_grpc_listener_down_every_member_freezes_through_the_api_servers() {
    scenario(Fault::GrpcDown).await;
}

/// Two clusters (east is the hub), three volumes on two nodes with their sidecars, the operator, and a
/// group of the three volumes, replicating.
struct Bed {
    _east: TestApiServer,
    west: TestApiServer,
    hub: Client,
    east_node: ReplicatorNode,
    west_node: ReplicatorNode,
    operator: Operator,
    _sidecars: Vec<Sidecar>,
}

async fn setup(fault: Fault, policy: Policy) -> Bed {
    setup_with_hold_timeout(fault, policy, "30s").await
}

async fn setup_with_hold_timeout(fault: Fault, policy: Policy, hold_timeout: &str) -> Bed {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    let (east, hub) = cluster().await;
    let (west, west_client) = cluster().await;
    let east_node = start_node(&hub, "e1", &["wal", "data"]).await;
    let west_node = start_node(&west_client, "w1", &["reporting"]).await;

    // The hub knows both clusters.
    let local = MemberClusterSpec {
        paths: ClusterPaths::Both,
        local: true,
        kubeconfig_secret_ref: None,
        network: None,
        service_account_keys: None,
        volume_binding: Default::default(),
    };
    Api::<MemberCluster>::all(hub.clone())
        .create(&PostParams::default(), &MemberCluster::new("east", local))
        .await
        .unwrap();
    let yaml = serde_yaml_ng::to_string(&west.kubeconfig().unwrap()).unwrap();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("west".into()),
            namespace: Some("lockstep".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([("kubeconfig".to_owned(), yaml)])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(hub.clone(), "lockstep")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let both = MemberClusterSpec {
        paths: ClusterPaths::Both,
        local: false,
        kubeconfig_secret_ref: Some(SecretKeyRef {
            namespace: "lockstep".into(),
            name: "west".into(),
            key: "kubeconfig".into(),
        }),
        network: None,
        service_account_keys: None,
        volume_binding: Default::default(),
    };
    Api::<MemberCluster>::all(hub.clone())
        .create(&PostParams::default(), &MemberCluster::new("west", both))
        .await
        .unwrap();

    let options = Options {
        kubeconfig: None,
        hub_name: "east".into(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        resync_interval: Duration::from_millis(300),
        leader_election: false,
        namespace: "lockstep".into(),
        identity: "operator-0".into(),
        lease_duration: Duration::from_secs(15),
        max_sessions_per_cluster: lockstep_operator::sessions::DEFAULT_SESSIONS_PER_CLUSTER,
        max_group_volumes: lockstep_operator::DEFAULT_MAX_GROUP_VOLUMES,
        control_security: lockstep_operator::ControlSecurity::insecure_plaintext(),
    };
    let operator = Operator::start(hub.clone(), &options).await.unwrap();
    let endpoint = if fault == Fault::GrpcDown {
        // A port nothing listens on: every call to the operator is refused.
        let unused = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        format!("http://{unused}")
    } else {
        format!("http://{}", operator.grpc_addr)
    };
    let east_sidecar = sidecar(&east_node, "east", "e1", &hub, &endpoint).await;
    let west_sidecar = sidecar(&west_node, "west", "w1", &west_client, &endpoint).await;

    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    let member = |cluster: &str, names: &[&str]| GroupMember {
        cluster: cluster.into(),
        namespace: "orders".into(),
        pvc_names: Some(names.iter().map(|name| (*name).to_owned()).collect()),
        selector: None,
    };
    let spec = ConsistencyGroupSpec {
        members: vec![
            member("east", &["wal", "data"]),
            member("west", &["reporting"]),
        ],
        policy,
        hold_timeout: hold_timeout.into(),
        release: None,
        resync: None,
        freeze: None,
        failover: None,
    };
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await
        .unwrap();
    eventually("the group resolved and replicating", || {
        let groups = groups.clone();
        async move {
            let group = groups.get("orders-db").await.ok()?;
            // Protected: every member volume replicates in sync within the group.
            let protected =
                condition(&group, "ConsistentImage").is_some_and(|(on, _, _)| on == "True");
            let status = group.status?;
            // Every volume's sidecar reported it replicating (a state not reported yet counts as in
            // sync for ConsistentImage, but one still Unconfirmed when a freeze begins is outside its image).
            let replicating = status
                .volumes
                .as_ref()
                .and_then(|counts| counts.by_state.get("Replicating").copied());
            (status.phase == Some(Phase::Replicating)
                && status.member_count == 3
                && protected
                && replicating == Some(3))
            .then_some(())
        }
    })
    .await;

    Bed {
        _east: east,
        west,
        hub,
        east_node,
        west_node,
        operator,
        _sidecars: vec![east_sidecar, west_sidecar],
    }
}

/// The dependent-write workload across the three volumes (lanes keep writing beside a held volume).
async fn start_workload(bed: &Bed) -> (WorkloadHandle, u64) {
    let addresses = vec![
        nbd(&bed.east_node, "wal"),
        nbd(&bed.east_node, "data"),
        nbd(&bed.west_node, "reporting"),
    ];
    let layout = Layout::with_span(3, 3, 2, 64, 0).unwrap();
    let mut workload_options = WorkloadOptions::new(layout, None);
    workload_options.on_error = OnError::Retry;
    workload_options.retry_backoff = Duration::from_millis(20);
    workload_options.flush_at_end = false;
    let run_id = workload_options.run_id;
    let mut workload = WorkloadHandle::spawn(addresses, workload_options);
    workload
        .wait_for_acked(60, Duration::from_secs(60))
        .await
        .unwrap();
    (workload, run_id)
}

fn secondaries(bed: &Bed) -> Vec<Source> {
    vec![
        Source::File(bed.east_node.secondary_file("wal")),
        Source::File(bed.east_node.secondary_file("data")),
        Source::File(bed.west_node.secondary_file("reporting")),
    ]
}

async fn scenario(fault: Fault) {
    let bed = setup(fault, Policy::FreezeAndGo).await;
    let groups = Api::<ConsistencyGroup>::all(bed.hub.clone());
    let (mut workload, run_id) = start_workload(&bed).await;

    if fault == Fault::WestApiServerDown {
        bed.west.stop().await;
    }
    // Cut wal's replication link.
    bed.east_node.cut("wal", LinkMode::Reset).unwrap();
    let before_failure = workload.current().last_acked.clone();
    let group = eventually("the freeze released at epoch 1 (FreezeAndGo)", || {
        let groups = groups.clone();
        async move {
            let group = groups.get("orders-db").await.ok()?;
            (group.position() == (1, Stage::Release)).then_some(group)
        }
    })
    .await;
    assert_eq!(group.status.as_ref().unwrap().phase, Some(Phase::Running));
    let status = common::status_with_volumes(&bed.hub, "orders-db").await;
    let west_ack = status
        .members
        .iter()
        .find(|m| m.cluster == "west")
        .unwrap()
        .acknowledged
        .clone()
        .unwrap();
    match fault {
        Fault::WestApiServerDown => assert_eq!(west_ack.path, lockstep_api::domain::Path::Grpc),
        Fault::GrpcDown => {
            assert_eq!(west_ack.path, lockstep_api::domain::Path::Api);
            assert_eq!(
                status.trigger.as_ref().unwrap().path,
                Some(lockstep_api::domain::Path::Api)
            );
        }
        Fault::None => {}
    }
    let mut image = status
        .consistent_image
        .clone()
        .unwrap()
        .volumes
        .into_iter()
        .map(|volume| volume.volume_handle)
        .collect::<Vec<_>>();
    image.sort();
    assert_eq!(
        image,
        vec!["data", "reporting", "wal"],
        "every member is in the consistent image: {:?}",
        status.members
    );
    assert_eq!(
        status.trigger.as_ref().unwrap().volume_handle.as_deref(),
        Some("wal")
    );
    for member in &status.members {
        let ack = member.acknowledged.as_ref().unwrap();
        assert!((ack.epoch, ack.stage) >= (1, Stage::Freeze), "{member:?}");
    }

    // The primaries run on, unreplicated.
    let after_release = workload.current().acked;
    workload
        .wait_for_acked(after_release + 30, Duration::from_secs(60))
        .await
        .unwrap();
    let report = workload.stop_and_join().await.unwrap();
    assert!(report.acked > after_release);

    // The secondaries together hold a state the application could have produced.
    let sources = secondaries(&bed);
    let verdict =
        lockstep_checker::check_sources(&sources, &CheckOptions::lanes(before_failure).run(run_id))
            .await
            .unwrap();
    assert!(verdict.is_consistent(), "{verdict}");
    bed.operator.shutdown().await;
}

/// Releases epoch 1 by `spec.release.epoch` and waits until 30 more writes than `acked` are acknowledged.
async fn release_and_write_on(
    groups: &Api<ConsistencyGroup>,
    workload: &mut WorkloadHandle,
    acked: u64,
) {
    patch_spec(groups, serde_json::json!({"release": {"epoch": 1}})).await;
    wait_for_group(groups, "released", |group| {
        group.position() == (1, Stage::Release)
    })
    .await;
    workload
        .wait_for_acked(acked + 30, Duration::from_secs(60))
        .await
        .unwrap();
}

/// The checker passes on the secondaries: together they hold the writes acknowledged by `last_acked`.
async fn secondaries_hold_the_image_at(bed: &Bed, last_acked: &[u64], run_id: u64) {
    let verdict = lockstep_checker::check_sources(
        &secondaries(bed),
        &CheckOptions::lanes(last_acked.to_vec()).run(run_id),
    )
    .await
    .unwrap();
    assert!(verdict.is_consistent(), "{verdict}");
}

fn condition(group: &ConsistencyGroup, type_: &str) -> Option<(String, String, String)> {
    let found = group
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((
        found.status.clone(),
        found.reason.clone(),
        found.message.clone(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn freeze_and_stop_a_planned_freeze_holds_until_released_then_resync_makes_secondaries_identical()
 {
    let bed = setup(Fault::None, Policy::FreezeAndStop).await;
    let groups = Api::<ConsistencyGroup>::all(bed.hub.clone());
    let (mut workload, run_id) = start_workload(&bed).await;

    // A failover asked for before any freeze is refused, saying why (issue 33).
    patch_spec(&groups, serde_json::json!({"failover": {"epoch": 1}})).await;
    wait_for_group(&groups, "the failover refused while replicating", |group| {
        condition(group, "FailoverReady").is_some_and(|(ready, reason, message)| {
            ready == "False"
                && reason == "NotFrozenAtEpoch"
                && message
                    .starts_with("spec.failover.epoch 1 refused: the group replicates at epoch 0")
        })
    })
    .await;

    // Every member replicating in sync first, as a person waits before counting on the group: a
    // volume not yet in sync when the freeze begins stays outside its image, and the failover to it is
    // then refused as incomplete.
    wait_for_group(&groups, "a consistent image while replicating", |group| {
        condition(group, "ConsistentImage").is_some_and(|(status, _, _)| status == "True")
    })
    .await;

    // A planned freeze names the epoch it is meant for.
    patch_spec(&groups, serde_json::json!({"freeze": {"epoch": 0}})).await;
    let frozen = wait_for_group(&groups, "a planned freeze, every volume frozen", |group| {
        group
            .status
            .as_ref()
            .is_some_and(|status| status.phase == Some(Phase::Frozen))
    })
    .await;
    assert_eq!(frozen.position(), (1, Stage::Freeze));
    assert_eq!(
        frozen
            .status
            .as_ref()
            .unwrap()
            .trigger
            .as_ref()
            .unwrap()
            .reason,
        "Planned"
    );
    // Frozen at 1 with every volume acknowledged: the image of epoch 1 is complete to fail over to.
    wait_for_group(&groups, "the failover to epoch 1 ready", |group| {
        condition(group, "FailoverReady")
            .is_some_and(|(ready, reason, _)| ready == "True" && reason == "ImageComplete")
    })
    .await;
    // Writes are held: nothing more is acknowledged while frozen (FreezeAndStop).
    let at_freeze = workload.current();
    secondaries_hold_the_image_at(&bed, &at_freeze.last_acked, run_id).await;

    // A release for another epoch is reported and ignored; being frozen stays the reason.
    patch_spec(&groups, serde_json::json!({"release": {"epoch": 0}})).await;
    let stale = wait_for_group(&groups, "the stale release reported", |group| {
        condition(group, "Ready").is_some_and(|(_, reason, message)| {
            reason == "WaitingForRelease"
                && message.contains("spec.release.epoch 0 is not the current epoch 1")
        })
    })
    .await;
    assert_eq!(
        stale.position(),
        (1, Stage::Freeze),
        "a stale release never acts"
    );
    assert!(
        condition(&stale, "Ready")
            .unwrap()
            .2
            .contains("spec.release.epoch 0 is not the current epoch 1")
    );
    assert_eq!(
        workload.current().acked,
        at_freeze.acked,
        "writes stay held until the release"
    );

    // The release names the current epoch: held writes complete, primaries run on unreplicated.
    release_and_write_on(&groups, &mut workload, at_freeze.acked).await;

    // Resync returns the group to Replicating.
    patch_spec(&groups, serde_json::json!({"resync": {"epoch": 1}})).await;
    let replicating = wait_for_group(&groups, "resynced and replicating", |group| {
        group.position() == (1, Stage::Resume)
            && group
                .status
                .as_ref()
                .is_some_and(|status| status.phase == Some(Phase::Replicating))
    })
    .await;
    assert_eq!(
        condition(&replicating, "ConsistentImage").unwrap().0,
        "True"
    );
    workload.stop_and_join().await.unwrap();
    // Writes in flight when the workload stopped finish on both sides: the copies converge.
    for (node, volume) in [
        (&bed.east_node, "wal"),
        (&bed.east_node, "data"),
        (&bed.west_node, "reporting"),
    ] {
        let (primary, secondary) = (
            Source::File(node.primary_file(volume)),
            Source::File(node.secondary_file(volume)),
        );
        eventually(
            &format!("{volume}: primary and secondary identical"),
            || async {
                lockstep_checker::first_difference(&primary, &secondary)
                    .await
                    .unwrap()
                    .is_none()
                    .then_some(())
            },
        )
        .await;
    }
    bed.operator.shutdown().await;
}

/// The Events recorded about an object (by name) in one cluster: (reason, note).
async fn events_about(client: &Client, name: &str) -> Vec<(String, String)> {
    Api::<k8s_openapi::api::events::v1::Event>::all(client.clone())
        .list(&Default::default())
        .await
        .map(|list| {
            list.items
                .into_iter()
                .filter(|event| {
                    event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
                .map(|event| {
                    (
                        event.reason.unwrap_or_default(),
                        event.note.unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn freeze_and_stop_past_the_hold_timeout_held_writes_fail_with_eio_and_the_status_says_so_until_released()
 {
    let bed = setup_with_hold_timeout(Fault::None, Policy::FreezeAndStop, "1s").await;
    let groups = Api::<ConsistencyGroup>::all(bed.hub.clone());
    let (mut workload, run_id) = start_workload(&bed).await;

    patch_spec(&groups, serde_json::json!({"freeze": {"epoch": 0}})).await;
    wait_for_group(&groups, "a planned freeze, every volume frozen", |group| {
        group
            .status
            .as_ref()
            .is_some_and(|status| status.phase == Some(Phase::Frozen))
    })
    .await;
    let at_freeze = workload.current();

    // Past the hold timeout, a held write fails with an I/O error (the workload retries it; each retry
    // is held and fails again until the release). Nothing is acknowledged meanwhile.
    let failed = workload
        .wait_until(
            "a held write failed",
            |progress| progress.failures > at_freeze.failures,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let failure = failed.first_failure.clone().unwrap();
    assert!(failure.error.contains("EIO"), "{failure:?}");
    assert_eq!(
        workload.current().acked,
        at_freeze.acked,
        "never acknowledged unreplicated"
    );

    // The group's status says so: which volumes, how many writes, at this epoch, and how to release.
    let said = wait_for_group(&groups, "hold timeouts in the group's status", |group| {
        group.status.as_ref().is_some_and(|status| {
            status
                .hold_timeouts
                .as_ref()
                .is_some_and(|held| held.epoch == 1 && held.failed_writes > 0)
        })
    })
    .await;
    let held = said.status.as_ref().unwrap().hold_timeouts.clone().unwrap();
    assert!(!held.volumes.is_empty());
    assert!(held.since.is_some());
    assert_eq!(
        held.failed_writes,
        held.volumes.iter().map(|v| v.failed_writes).sum::<u64>()
    );
    for volume in &held.volumes {
        assert!(
            ["wal", "data", "reporting"].contains(&volume.volume_handle.as_str()),
            "{volume:?}"
        );
    }
    let condition_says = wait_for_group(
        &groups,
        "the Ready condition names the hold timeout",
        |group| {
            condition(group, "Ready").is_some_and(|(_, _, message)| {
                message.contains("held writes failed with an I/O error (EIO) after holdTimeout 1s")
                    && message.contains("spec.release.epoch: 1")
            })
        },
    )
    .await;
    assert_eq!(condition_says.position(), (1, Stage::Freeze), "still held");
    let group_events = eventually("a HoldTimedOut Warning on the group", || {
        let hub = bed.hub.clone();
        async move {
            let events = events_about(&hub, "orders-db").await;
            events
                .iter()
                .any(|(reason, _)| reason == "HoldTimedOut")
                .then_some(events)
        }
    })
    .await;
    assert!(
        group_events
            .iter()
            .any(|(reason, note)| reason == "HoldTimedOut" && note.contains("I/O error")),
        "{group_events:?}"
    );
    // ... and on the claim of a volume whose writes failed, in its own cluster.
    let claim = held.volumes[0].volume_handle.clone();
    let claim_client = if claim == "reporting" {
        bed.west.client().await.unwrap()
    } else {
        bed.hub.clone()
    };
    eventually("a HoldTimedOut Warning on the claim", || {
        let client = claim_client.clone();
        let claim = claim.clone();
        async move {
            events_about(&client, &claim)
                .await
                .iter()
                .any(|(reason, _)| reason == "HoldTimedOut")
                .then_some(())
        }
    })
    .await;
    let metrics = eventually("the metric counts the failed writes", || {
        let addr = bed.operator.http_addr;
        async move {
            let text = http_get(addr, "/metrics").await?;
            // The series exists from the start, at 0: it must have counted the failed writes.
            (common::sample_value(
                &text,
                r#"lockstep_held_writes_failed_total{group="orders-db"}"#,
            ) > Some(0.0))
            .then_some(text)
        }
    })
    .await;
    assert!(!metrics.is_empty());

    // The release by epoch: writes complete again; the secondaries still hold the freeze's image.
    release_and_write_on(&groups, &mut workload, at_freeze.acked).await;
    workload.stop_and_join().await.unwrap();
    secondaries_hold_the_image_at(&bed, &at_freeze.last_acked, run_id).await;
    bed.operator.shutdown().await;
}

/// A plain HTTP/1.0 GET on the operator's HTTP listener; `None` on any failure.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: operator\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    Some(body)
}
