//! The operator against two test API servers over real HTTP (east is the hub, west a member reached by
//! both paths) and a sidecar stand-in speaking real gRPC: members resolve to volumes and nodes, mirrors
//! appear and are kept, selector changes move members, bad clusters show in conditions, and a failure
//! reported on one path freezes the group on both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use lockstep_api::{
    conditions,
    domain::{ClusterPaths, Phase, Policy, Stage, VolumeState, condition},
    proto::control::v1::{
        self as pb, AckRequest, NodeIdentity, ReportRequest, SubscribeRequest,
        control_client::ControlClient, control_message::Kind,
    },
    v1alpha1::{
        ConsistencyGroup, ConsistencyGroupSpec, GROUP_UID_LABEL, GroupMember, HUB_LABEL,
        MemberCluster, MemberClusterSpec, NodeVolume, ReplicationNode, ReplicationNodeSpec,
        ReplicationNodeStatus, SecretKeyRef,
    },
};
use lockstep_kube::backend::ApiServer;
use lockstep_operator::{Operator, Options};
use serde_json::json;
use tokio_stream::StreamExt;

mod common;

use common::{api_server, eventually, next_directive, options, volume};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The ReplicationNode a sidecar on `node` keeps: the volumes it serves.
async fn replication_node(client: &Client, cluster: &str, node: &str, handles: &[&str]) {
    let api = Api::<ReplicationNode>::all(client.clone());
    let object = ReplicationNode::new(
        node,
        ReplicationNodeSpec {
            node_name: node.into(),
            cluster: cluster.into(),
        },
    );
    api.create(&PostParams::default(), &object).await.unwrap();
    let status = ReplicationNodeStatus {
        volumes: handles
            .iter()
            .map(|handle| NodeVolume {
                volume_handle: (*handle).into(),
                pvc: None,
                group_uid: None,
                state: VolumeState::Replicating,
                epoch: 0,
                stage: None,
                hold_timeout: None,
            })
            .collect(),
        volume_count: u32::try_from(handles.len()).unwrap(),
        ..Default::default()
    };
    let patch =
        json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode", "status": status});
    api.patch_status(
        node,
        &PatchParams::apply("test-sidecar").force(),
        &Patch::Apply(&patch),
    )
    .await
    .unwrap();
}

async fn member_cluster(hub: &Client, name: &str, spec: MemberClusterSpec) {
    Api::<MemberCluster>::all(hub.clone())
        .create(&PostParams::default(), &MemberCluster::new(name, spec))
        .await
        .unwrap();
}

async fn kubeconfig_secret(hub: &Client, name: &str, of: &ApiServer) {
    let yaml = of.admin_kubeconfig_yaml().unwrap();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("lockstep-system".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([("kubeconfig".to_owned(), yaml)])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(hub.clone(), "lockstep-system")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

fn group_spec(members: Vec<GroupMember>, policy: Policy) -> ConsistencyGroupSpec {
    ConsistencyGroupSpec {
        members,
        policy,
        hold_timeout: "30s".into(),
        release: None,
        resync: None,
        freeze: None,
        failover: None,
    }
}

fn by_names(cluster: &str, names: &[&str]) -> GroupMember {
    GroupMember {
        cluster: cluster.into(),
        namespace: "orders".into(),
        pvc_names: Some(names.iter().map(|name| (*name).to_owned()).collect()),
        selector: None,
    }
}

fn by_label(cluster: &str, app: &str) -> GroupMember {
    GroupMember {
        cluster: cluster.into(),
        namespace: "orders".into(),
        pvc_names: None,
        selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
            match_expressions: None,
        }),
    }
}

fn condition_of(group: &ConsistencyGroup, type_: &str) -> Option<(bool, String)> {
    let status = group.status.as_ref()?;
    let found = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((found.status == "True", found.message.clone()))
}

/// Two clusters: east (hub, local) with wal + data on node e1, west (both paths) with reporting on w1.
struct World {
    east: ApiServer,
    east_client: Client,
    west: ApiServer,
    west_client: Client,
    operator: Operator,
}

async fn world() -> World {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "lockstep_operator=info".into()),
        )
        .try_init();
    let (east, east_client) = api_server().await;
    let (west, west_client) = api_server().await;
    volume(&east_client, "wal", "orders", "vol-wal", "e1").await;
    volume(&east_client, "data", "orders", "vol-data", "e1").await;
    volume(&west_client, "reporting", "orders", "vol-reporting", "w1").await;
    volume(&west_client, "scratch", "scratch", "vol-scratch", "w1").await;
    replication_node(&east_client, "east", "e1", &["vol-wal", "vol-data"]).await;
    replication_node(
        &west_client,
        "west",
        "w1",
        &["vol-reporting", "vol-scratch"],
    )
    .await;
    member_cluster(
        &east_client,
        "east",
        MemberClusterSpec {
            paths: ClusterPaths::Both,
            local: true,
            kubeconfig_secret_ref: None,
            network: None,
            service_account_keys: None,
            volume_binding: Default::default(),
        },
    )
    .await;
    kubeconfig_secret(&east_client, "west-kubeconfig", &west).await;
    member_cluster(
        &east_client,
        "west",
        MemberClusterSpec {
            paths: ClusterPaths::Both,
            local: false,
            kubeconfig_secret_ref: Some(SecretKeyRef {
                namespace: "lockstep-system".into(),
                name: "west-kubeconfig".into(),
                key: "kubeconfig".into(),
            }),
            network: None,
            service_account_keys: None,
            volume_binding: Default::default(),
        },
    )
    .await;
    let operator = Operator::start(east_client.clone(), &options())
        .await
        .unwrap();
    World {
        east,
        east_client,
        west,
        west_client,
        operator,
    }
}

async fn resolved(client: &Client, name: &str, expected: usize) -> ConsistencyGroup {
    eventually(
        &format!("group {name} resolved to {expected} volumes"),
        || {
            let client = client.clone();
            async move {
                let group = common::get_with_volumes(&client, name).await?;
                let (resolved, _) = condition_of(&group, condition::MEMBERS_RESOLVED)?;
                (resolved && group.status.as_ref()?.members.len() == expected).then_some(group)
            }
        },
    )
    .await
}

#[tokio::test]
async fn a_two_cluster_group_resolves_and_is_mirrored_and_its_mirror_kept() -> TestResult {
    let world = world().await;
    let hub_groups = Api::<ConsistencyGroup>::all(world.east_client.clone());
    let spec = group_spec(
        vec![
            by_names("east", &["wal", "data"]),
            by_label("west", "orders"),
        ],
        Policy::FreezeAndGo,
    );
    hub_groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await?;

    let group = resolved(&world.east_client, "orders-db", 3).await;
    let mut found: Vec<(String, String, String, String)> = group
        .status
        .as_ref()
        .unwrap()
        .members
        .iter()
        .map(|m| {
            (
                m.cluster.clone(),
                m.pvc.clone(),
                m.volume_handle.clone().unwrap(),
                m.node.clone().unwrap(),
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            ("east".into(), "data".into(), "vol-data".into(), "e1".into()),
            ("east".into(), "wal".into(), "vol-wal".into(), "e1".into()),
            (
                "west".into(),
                "reporting".into(),
                "vol-reporting".into(),
                "w1".into()
            ),
        ]
    );
    assert_eq!(
        group.status.as_ref().unwrap().phase,
        Some(Phase::Replicating)
    );

    // The mirror in west: labelled, same spec, west's members in status.
    let mirrors = Api::<ConsistencyGroup>::all(world.west_client.clone());
    let uid = group.metadata.uid.clone().unwrap();
    let mirror = eventually("the mirror in west", || {
        let west = world.west_client.clone();
        async move {
            let mirror = common::get_with_volumes(&west, "orders-db").await?;
            (mirror.status.as_ref()?.members.len() == 1).then_some(mirror)
        }
    })
    .await;
    assert_eq!(
        mirror.labels().get(HUB_LABEL).map(String::as_str),
        Some("hub-east")
    );
    assert_eq!(mirror.labels().get(GROUP_UID_LABEL), Some(&uid));
    assert_eq!(
        mirror.group_uid(),
        Some(uid.as_str()),
        "sidecars in west see the hub's UID"
    );
    assert_eq!(mirror.spec, group.spec);
    assert_eq!(
        mirror.status.as_ref().unwrap().members[0]
            .volume_handle
            .as_deref(),
        Some("vol-reporting")
    );

    // A person edits the mirror's spec: the hub's spec comes back.
    let edit = json!({"spec": {"policy": "FreezeAndStop"}});
    mirrors
        .patch("orders-db", &PatchParams::default(), &Patch::Merge(&edit))
        .await?;
    eventually("the mirror's spec restored", || {
        let mirrors = mirrors.clone();
        async move {
            (mirrors.get("orders-db").await.ok()?.spec.policy == Policy::FreezeAndGo).then_some(())
        }
    })
    .await;

    // A selector change moves west's members.
    let change = json!({"spec": {"members": [
        {"cluster": "east", "namespace": "orders", "pvcNames": ["wal", "data"]},
        {"cluster": "west", "namespace": "orders", "selector": {"matchLabels": {"app": "scratch"}}}
    ]}});
    hub_groups
        .patch("orders-db", &PatchParams::default(), &Patch::Merge(&change))
        .await?;
    eventually("west's member replaced by the selector change", || {
        let hub = world.east_client.clone();
        async move {
            let group = common::get_with_volumes(&hub, "orders-db").await?;
            let west: Vec<_> = group
                .status?
                .members
                .into_iter()
                .filter(|m| m.cluster == "west")
                .collect();
            (west.len() == 1 && west[0].volume_handle.as_deref() == Some("vol-scratch"))
                .then_some(())
        }
    })
    .await;

    // kubectl in the member cluster answers for the mirror.
    if let Some(kubectl) = kubectl() {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("west.kubeconfig");
        world.west.write_kubeconfig(&config)?;
        let output = tokio::process::Command::new(kubectl)
            .args([
                "--kubeconfig",
                config.to_str().unwrap(),
                "--cache-dir",
                dir.path().join("cache").to_str().unwrap(),
            ])
            .args(["get", "cg", "orders-db"])
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "kubectl get cg failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("orders-db"), "{stdout}");
    }
    world.operator.shutdown().await;
    drop((world.east, world.west));
    Ok(())
}

/// The newest versioned kubectl the machine has, else the one on PATH.
fn kubectl() -> Option<std::path::PathBuf> {
    let versioned = std::path::Path::new("/usr/lib/google-cloud-sdk/bin/kubectl.1.33");
    if versioned.exists() {
        return Some(versioned.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("kubectl"))
            .find(|candidate| candidate.exists())
    })
}

#[tokio::test]
async fn unreachable_clusters_bad_kubeconfigs_and_double_claims_show_in_conditions() -> TestResult {
    let world = world().await;
    let hub_groups = Api::<ConsistencyGroup>::all(world.east_client.clone());
    // A member cluster whose Secret holds no kubeconfig.
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("broken".into()),
            namespace: Some("lockstep-system".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            "kubeconfig".to_owned(),
            "this is not a kubeconfig".to_owned(),
        )])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(world.east_client.clone(), "lockstep-system")
        .create(&PostParams::default(), &secret)
        .await?;
    let broken = MemberClusterSpec {
        paths: ClusterPaths::Both,
        local: false,
        kubeconfig_secret_ref: Some(SecretKeyRef {
            namespace: "lockstep-system".into(),
            name: "broken".into(),
            key: "kubeconfig".into(),
        }),
        network: None,
        service_account_keys: None,
        volume_binding: Default::default(),
    };
    member_cluster(&world.east_client, "north", broken).await;
    let spec = group_spec(
        vec![by_names("east", &["wal"]), by_label("north", "orders")],
        Policy::FreezeAndGo,
    );
    hub_groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("bad-kubeconfig", spec),
        )
        .await?;
    let message = eventually("MembersResolved=False naming the bad kubeconfig", || {
        let hub_groups = hub_groups.clone();
        async move {
            let (resolved, message) = condition_of(
                &hub_groups.get("bad-kubeconfig").await.ok()?,
                condition::MEMBERS_RESOLVED,
            )?;
            (!resolved && message.contains("not a valid kubeconfig")).then_some(message)
        }
    })
    .await;
    assert!(message.contains("north"), "{message}");

    // A double claim: the older group keeps vol-wal. creationTimestamp has a second's grain (two groups
    // made in the same second are ordered by UID), so the younger group is made in a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let spec = group_spec(vec![by_names("east", &["wal"])], Policy::FreezeAndGo);
    hub_groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("greedy", spec),
        )
        .await?;
    eventually("the younger group refused the volume", || {
        let hub_groups = hub_groups.clone();
        async move {
            let (resolved, message) = condition_of(
                &hub_groups.get("greedy").await.ok()?,
                condition::MEMBERS_RESOLVED,
            )?;
            (!resolved && message.contains("already belongs to group \"bad-kubeconfig\""))
                .then_some(())
        }
    })
    .await;

    // West's API server stops: a group there says so, and the other groups go on.
    let spec = group_spec(vec![by_label("west", "orders")], Policy::FreezeAndGo);
    hub_groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("west-only", spec),
        )
        .await?;
    resolved(&world.east_client, "west-only", 1).await;
    world.west.stop().await;
    eventually(
        "MembersResolved keeps west's volumes, saying its API server cannot be read",
        || {
            let hub = world.east_client.clone();
            async move {
                let group = common::get_with_volumes(&hub, "west-only").await?;
                let (resolved, message) = condition_of(&group, condition::MEMBERS_RESOLVED)?;
                (resolved
                    && message.contains("kept as last resolved")
                    && group.status?.members.len() == 1)
                    .then_some(())
            }
        },
    )
    .await;
    let member_clusters = Api::<MemberCluster>::all(world.east_client.clone());
    for (cluster, says) in [
        ("west", "did not answer"),
        ("north", "not a valid kubeconfig"),
    ] {
        let message = eventually(&format!("MemberCluster {cluster} Reachable=False"), || {
            let member_clusters = member_clusters.clone();
            async move {
                let status = member_clusters.get(cluster).await.ok()?.status?;
                let reachable = status.conditions.iter().find(|c| c.type_ == "Reachable")?;
                (reachable.status == "False").then(|| reachable.message.clone())
            }
        })
        .await;
        assert!(
            message.contains(says) || message.contains("failed"),
            "{cluster}: {message}"
        );
    }
    let east = member_clusters.get("east").await?.status.unwrap();
    assert_eq!(
        east.conditions
            .iter()
            .find(|c| c.type_ == "Reachable")
            .unwrap()
            .status,
        "True"
    );
    world.operator.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_group_spanning_a_grpc_only_and_an_api_only_cluster_resolves_and_freezes_both()
-> TestResult {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (east, hub) = api_server().await;
    let (south, south_client) = api_server().await;
    volume(&south_client, "ledger", "orders", "vol-ledger", "s1").await;
    replication_node(&south_client, "south", "s1", &["vol-ledger"]).await;
    member_cluster(
        &hub,
        "east",
        MemberClusterSpec {
            paths: ClusterPaths::Both,
            local: true,
            kubeconfig_secret_ref: None,
            network: None,
            service_account_keys: None,
            volume_binding: Default::default(),
        },
    )
    .await;
    member_cluster(
        &hub,
        "edge",
        MemberClusterSpec {
            paths: ClusterPaths::GrpcOnly,
            local: false,
            kubeconfig_secret_ref: None,
            network: Some("lte".into()),
            service_account_keys: None,
            volume_binding: Default::default(),
        },
    )
    .await;
    kubeconfig_secret(&hub, "south-kubeconfig", &south).await;
    let api_only = MemberClusterSpec {
        paths: ClusterPaths::ApiOnly,
        local: false,
        kubeconfig_secret_ref: Some(SecretKeyRef {
            namespace: "lockstep-system".into(),
            name: "south-kubeconfig".into(),
            key: "kubeconfig".into(),
        }),
        network: None,
        service_account_keys: None,
        volume_binding: Default::default(),
    };
    member_cluster(&hub, "south", api_only).await;
    let operator = Operator::start(hub.clone(), &options()).await?;

    // The edge node's sidecar dials out and says which PVCs it resolved.
    let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr)).await?;
    let edge_node = NodeIdentity {
        cluster: "edge".into(),
        node: "edge-1".into(),
    };
    let volumes = vec![pb::ResolvedVolume {
        namespace: "orders".into(),
        pvc: "wal".into(),
        persistent_volume: "pv-edge-wal".into(),
        volume_handle: "vol-edge-wal".into(),
    }];
    let mut stream = control
        .subscribe(SubscribeRequest {
            node: Some(edge_node.clone()),
            volumes,
            seen: vec![],
        })
        .await?
        .into_inner();

    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    let spec = group_spec(
        vec![by_names("edge", &["wal"]), by_label("south", "orders")],
        Policy::FreezeAndGo,
    );
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("edge-db", spec),
        )
        .await?;
    let group = resolved(&hub, "edge-db", 2).await;
    let uid = group.metadata.uid.clone().unwrap();
    let mut found: Vec<(String, String)> = group
        .status
        .unwrap()
        .members
        .into_iter()
        .map(|m| (m.volume_handle.unwrap(), m.node.unwrap()))
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            ("vol-edge-wal".into(), "edge-1".into()),
            ("vol-ledger".into(), "s1".into())
        ]
    );

    // A report for a group this hub does not know is refused.
    let stray = pb::CopyFailure {
        group_uid: "no-such-group".into(),
        volume_handle: "v".into(),
        ..Default::default()
    };
    let refused = control
        .report(ReportRequest {
            node: Some(edge_node.clone()),
            failures: vec![stray],
            volumes: vec![],
            hold_timeouts: vec![],
            states: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);

    // South's copy fails, reported through its API server only (ReplicationNode status).
    let south_nodes = Api::<ReplicationNode>::all(south_client.clone());
    let failed = json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode", "status": {
        "volumes": [{"volumeHandle": "vol-ledger", "state": "Held", "epoch": 0}],
        "volumeCount": 1,
        "failures": [{"volumeHandle": "vol-ledger", "groupUid": uid, "epochSeen": 0, "sequence": 7,
                      "error": "link down", "since": "2026-11-25T00:00:00Z"}],
        "failureCount": 1
    }});
    south_nodes
        .patch_status(
            "s1",
            &PatchParams::apply("test-sidecar").force(),
            &Patch::Apply(&failed),
        )
        .await?;

    // The edge cluster hears the freeze over gRPC; south through its mirror.
    let freeze = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Freeze as i32
    })
    .await;
    assert_eq!((freeze.group_uid.as_str(), freeze.epoch), (uid.as_str(), 1));
    let mirrors = Api::<ConsistencyGroup>::all(south_client.clone());
    eventually("south's mirror at epoch 1", || {
        let mirrors = mirrors.clone();
        async move {
            (mirrors.get("edge-db").await.ok()?.position() >= (1, Stage::Freeze)).then_some(())
        }
    })
    .await;
    // A freeze is sent before it is persisted (suspending early is always safe): the hub's status may
    // follow the mirror by a moment.
    let trigger = eventually("the hub's status names the trigger", || {
        let groups = groups.clone();
        async move { groups.get("edge-db").await.ok()?.status?.trigger }
    })
    .await;
    assert_eq!(trigger.path, Some(lockstep_api::domain::Path::Api));

    // Both acknowledge, each on its only path: the group is frozen and released.
    control
        .ack(AckRequest {
            node: Some(edge_node),
            enforced: Some(freeze),
            volume_handles: vec!["vol-edge-wal".into()],
            fail_safe: false,
        })
        .await?;
    let acked = json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode", "status": {
        "volumes": [{"volumeHandle": "vol-ledger", "state": "Suspended", "epoch": 1, "stage": "Freeze"}],
        "volumeCount": 1,
        "enforced": [{"groupUid": uid, "epoch": 1, "stage": "Freeze", "volumeHandles": ["vol-ledger"]}]
    }});
    south_nodes
        .patch_status(
            "s1",
            &PatchParams::apply("test-sidecar").force(),
            &Patch::Apply(&acked),
        )
        .await?;
    let release = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Release as i32
    })
    .await;
    assert_eq!(release.epoch, 1);
    eventually("south's mirror released", || {
        let mirrors = mirrors.clone();
        async move {
            (mirrors.get("edge-db").await.ok()?.position() == (1, Stage::Release)).then_some(())
        }
    })
    .await;
    let member_clusters = Api::<MemberCluster>::all(hub.clone());
    let edge = eventually("edge Reachable through its sidecars", || {
        let member_clusters = member_clusters.clone();
        async move {
            let status = member_clusters.get("edge").await.ok()?.status?;
            (status.grpc_sessions == 1).then_some(status)
        }
    })
    .await;
    assert_eq!(
        edge.conditions
            .iter()
            .find(|c| c.type_ == "Reachable")
            .unwrap()
            .status,
        "True"
    );
    operator.shutdown().await;
    drop((east, south));
    Ok(())
}

#[tokio::test]
async fn a_failure_reported_over_grpc_freezes_on_both_paths_and_releases_once_all_acknowledged()
-> TestResult {
    let world = world().await;
    let hub_groups = Api::<ConsistencyGroup>::all(world.east_client.clone());
    let spec = group_spec(
        vec![
            by_names("east", &["wal", "data"]),
            by_names("west", &["reporting"]),
        ],
        Policy::FreezeAndGo,
    );
    hub_groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await?;
    let group = resolved(&world.east_client, "orders-db", 3).await;
    let uid = group.metadata.uid.clone().unwrap();

    // West's sidecar (stand-in) subscribes over gRPC.
    let mut control =
        ControlClient::connect(format!("http://{}", world.operator.grpc_addr)).await?;
    let west_node = NodeIdentity {
        cluster: "west".into(),
        node: "w1".into(),
    };
    let mut stream = control
        .subscribe(SubscribeRequest {
            node: Some(west_node.clone()),
            ..Default::default()
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await?
        .unwrap()?;
    let Some(Kind::Membership(membership)) = first.kind else {
        panic!("membership comes first, got {first:?}")
    };
    assert_eq!(membership.groups.len(), 1);
    assert!(
        membership.groups[0]
            .volumes
            .iter()
            .any(|volume| volume.pvc == "reporting")
    );

    // A malformed report is refused, not a panic.
    let refused = control
        .report(ReportRequest {
            node: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // Epochs no operator ever sent are refused on the wire, in a report or a subscription.
    let beyond = control
        .report(ReportRequest {
            node: Some(west_node.clone()),
            failures: vec![pb::CopyFailure {
                group_uid: uid.clone(),
                volume_handle: "vol-reporting".into(),
                epoch_seen: u64::MAX,
                ..Default::default()
            }],
            volumes: vec![],
            hold_timeouts: vec![],
            states: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), tonic::Code::InvalidArgument, "{beyond}");
    let beyond = control
        .subscribe(SubscribeRequest {
            node: Some(west_node.clone()),
            seen: vec![pb::GroupEpoch {
                group_uid: uid.clone(),
                epoch: u64::MAX,
                stage: pb::Stage::Freeze.into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), tonic::Code::InvalidArgument, "{beyond}");
    assert_eq!(
        hub_groups.get("orders-db").await?.status.unwrap().epoch,
        0,
        "nothing was adopted"
    );

    // East's node reports a failed copy over gRPC only.
    let failure = pb::CopyFailure {
        group_uid: uid.clone(),
        volume_handle: "vol-wal".into(),
        epoch_seen: 0,
        sequence: 42,
        error: "secondary unreachable".into(),
        since_unix_ms: 0,
    };
    let east_node = NodeIdentity {
        cluster: "east".into(),
        node: "e1".into(),
    };
    let answer = control
        .report(ReportRequest {
            node: Some(east_node.clone()),
            failures: vec![failure.clone()],
            volumes: vec![],
            hold_timeouts: vec![],
            states: vec![],
        })
        .await?
        .into_inner();
    assert_eq!(
        answer.groups.iter().map(|g| g.epoch).max(),
        Some(1),
        "the answer carries the new epoch"
    );
    // The same report again (a retry, or the other path) changes nothing.
    control
        .report(ReportRequest {
            node: Some(east_node.clone()),
            failures: vec![failure],
            volumes: vec![],
            hold_timeouts: vec![],
            states: vec![],
        })
        .await?;

    // Path 2: the freeze reached west's node.
    let freeze = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Freeze as i32
    })
    .await;
    assert_eq!((freeze.group_uid.as_str(), freeze.epoch), (uid.as_str(), 1));
    // Path 1: the freeze reached west's mirror.
    let mirrors = Api::<ConsistencyGroup>::all(world.west_client.clone());
    eventually("the mirror in west at epoch 1", || {
        let mirrors = mirrors.clone();
        async move {
            (mirrors.get("orders-db").await.ok()?.position() >= (1, Stage::Freeze)).then_some(())
        }
    })
    .await;
    assert_eq!(
        hub_groups.get("orders-db").await?.position(),
        (1, Stage::Freeze)
    );

    // West acknowledges over gRPC; east through its ReplicationNode (path 1), one volume at a time.
    control
        .ack(AckRequest {
            node: Some(west_node),
            enforced: Some(freeze.clone()),
            volume_handles: vec!["vol-reporting".into()],
            fail_safe: false,
        })
        .await?;
    // A sidecar applies its whole status each time (volumes and enforcements).
    let enforced = |handles: &[&str]| {
        json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode", "status": {
            "volumes": [
                {"volumeHandle": "vol-wal", "state": "Suspended", "epoch": 1, "stage": "Freeze"},
                {"volumeHandle": "vol-data", "state": "Suspended", "epoch": 1, "stage": "Freeze"}
            ],
            "volumeCount": 2,
            "enforced": [{"groupUid": uid, "epoch": 1, "stage": "Freeze", "volumeHandles": handles}]
        }})
    };
    let east_nodes = Api::<ReplicationNode>::all(world.east_client.clone());
    east_nodes
        .patch_status(
            "e1",
            &PatchParams::apply("test-sidecar").force(),
            &Patch::Apply(&enforced(&["vol-wal"])),
        )
        .await?;
    let waiting = eventually("Frozen=False waiting for vol-data", || {
        let hub_groups = hub_groups.clone();
        async move {
            let group = hub_groups.get("orders-db").await.ok()?;
            let (frozen, message) = condition_of(&group, condition::FROZEN)?;
            (!frozen && message.contains("east/orders/data") && !message.contains("wal"))
                .then_some(group)
        }
    })
    .await;
    assert_eq!(
        waiting.position(),
        (1, Stage::Freeze),
        "one volume unacknowledged blocks the release"
    );

    east_nodes
        .patch_status(
            "e1",
            &PatchParams::apply("test-sidecar").force(),
            &Patch::Apply(&enforced(&["vol-wal", "vol-data"])),
        )
        .await?;
    let release = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Release as i32
    })
    .await;
    assert_eq!(release.epoch, 1);
    eventually("the group Running at epoch 1", || {
        let hub_groups = hub_groups.clone();
        async move {
            let group = hub_groups.get("orders-db").await.ok()?;
            (group.status.as_ref()?.phase == Some(Phase::Running)).then_some(group)
        }
    })
    .await;
    let status = &common::status_with_volumes(&world.east_client, "orders-db").await;
    let mut image = status
        .consistent_image
        .clone()
        .unwrap()
        .volumes
        .into_iter()
        .map(|volume| volume.volume_handle)
        .collect::<Vec<_>>();
    image.sort();
    assert_eq!(image, vec!["vol-data", "vol-reporting", "vol-wal"]);
    assert_eq!(
        conditions::status_of(&status.conditions, condition::FROZEN),
        Some(true)
    );
    assert_eq!(
        status.trigger.as_ref().unwrap().volume_handle.as_deref(),
        Some("vol-wal")
    );

    // Application owners see it on their claims, in their own cluster.
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(world.west_client.clone(), "orders");
    let seen = eventually("an Event on west's claim", || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            let notes: Vec<String> = list
                .items
                .into_iter()
                .filter(|event| {
                    event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("reporting")
                })
                .filter_map(|event| event.note)
                .collect();
            (notes.iter().any(|note| note.contains("held"))
                && notes.iter().any(|note| note.contains("released")))
            .then_some(notes)
        }
    })
    .await;
    assert!(
        seen.iter().any(|note| note.contains("orders-db")),
        "{seen:?}"
    );

    // The metrics saw it.
    let metrics = reqwest_free_get(world.operator.http_addr, "/metrics").await;
    // The series exists from the start, at 0: it must have counted the report.
    assert!(
        common::sample_value(&metrics, r#"lockstep_reports_total{path="grpc"}"#) >= Some(1.0),
        "{metrics}"
    );
    assert!(
        metrics.contains("lockstep_freeze_latency_seconds_count 1"),
        "{metrics}"
    );
    world.operator.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn deleting_a_frozen_group_resumes_its_volumes_removes_mirrors_and_says_so() -> TestResult {
    let world = world().await;
    let hub_groups = Api::<ConsistencyGroup>::all(world.east_client.clone());
    let spec = group_spec(
        vec![by_names("east", &["wal"]), by_names("west", &["reporting"])],
        Policy::FreezeAndStop,
    );
    hub_groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("doomed", spec),
        )
        .await?;
    let group = resolved(&world.east_client, "doomed", 2).await;
    let uid = group.metadata.uid.clone().unwrap();
    eventually("the finalizer added", || {
        let hub_groups = hub_groups.clone();
        async move {
            let group = hub_groups.get("doomed").await.ok()?;
            group
                .finalizers()
                .iter()
                .any(|f| f == lockstep_operator::engine::FINALIZER)
                .then_some(())
        }
    })
    .await;

    let mut control =
        ControlClient::connect(format!("http://{}", world.operator.grpc_addr)).await?;
    let west_node = NodeIdentity {
        cluster: "west".into(),
        node: "w1".into(),
    };
    let mut stream = control
        .subscribe(SubscribeRequest {
            node: Some(west_node.clone()),
            ..Default::default()
        })
        .await?
        .into_inner();
    control
        .report(copy_failed(west_node.clone(), &uid, "vol-reporting"))
        .await?;
    let freeze = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Freeze as i32
    })
    .await;
    // Each node acknowledges its own cluster's volumes: a volume is (cluster, volume handle).
    let east_node = NodeIdentity {
        cluster: "east".into(),
        node: "e1".into(),
    };
    let ack = |node: &NodeIdentity, point: pb::GroupEpoch, handle: &str| AckRequest {
        node: Some(node.clone()),
        enforced: Some(point),
        volume_handles: vec![handle.into()],
        fail_safe: false,
    };
    control
        .ack(ack(&east_node, freeze.clone(), "vol-wal"))
        .await?;
    control
        .ack(ack(&west_node, freeze.clone(), "vol-reporting"))
        .await?;
    eventually("the group Frozen (FreezeAndStop holds)", || {
        let hub_groups = hub_groups.clone();
        async move {
            (hub_groups.get("doomed").await.ok()?.status?.phase == Some(Phase::Frozen))
                .then_some(())
        }
    })
    .await;

    hub_groups.delete("doomed", &Default::default()).await?;
    let resume = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Resume as i32
    })
    .await;
    assert_eq!(
        resume.epoch, 1,
        "deletion resumes at the current epoch: no volume stays held"
    );
    let deleting = hub_groups.get("doomed").await?;
    assert!(
        deleting.metadata.deletion_timestamp.is_some(),
        "the object waits for the volumes"
    );
    control
        .ack(ack(&east_node, resume.clone(), "vol-wal"))
        .await?;
    control
        .ack(ack(&west_node, resume, "vol-reporting"))
        .await?;
    eventually("the group gone from the hub", || {
        let hub_groups = hub_groups.clone();
        async move {
            hub_groups
                .get_opt("doomed")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let mirrors = Api::<ConsistencyGroup>::all(world.west_client.clone());
    eventually("the mirror gone from west", || {
        let mirrors = mirrors.clone();
        async move {
            mirrors
                .get_opt("doomed")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(world.east_client.clone())
        .list(&Default::default())
        .await?;
    let reasons: Vec<String> = events
        .items
        .iter()
        .filter(|event| event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("doomed"))
        .filter_map(|event| event.reason.clone())
        .collect();
    assert!(
        reasons.iter().any(|r| r == "Deleting") && reasons.iter().any(|r| r == "Deleted"),
        "{reasons:?}"
    );
    world.operator.shutdown().await;
    Ok(())
}

async fn single_cluster_group(hub: &Client) -> (ConsistencyGroup, String) {
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    let spec = group_spec(
        vec![by_names("east", &["wal", "data"])],
        Policy::FreezeAndGo,
    );
    groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await
        .unwrap();
    let group = resolved(hub, "orders-db", 2).await;
    let uid = group.metadata.uid.clone().unwrap();
    (group, uid)
}

async fn east_only() -> (ApiServer, Client) {
    let (east, hub) = api_server().await;
    volume(&hub, "wal", "orders", "vol-wal", "e1").await;
    volume(&hub, "data", "orders", "vol-data", "e1").await;
    replication_node(&hub, "east", "e1", &["vol-wal", "vol-data"]).await;
    let local = MemberClusterSpec {
        paths: ClusterPaths::Both,
        local: true,
        kubeconfig_secret_ref: None,
        network: None,
        service_account_keys: None,
        volume_binding: Default::default(),
    };
    member_cluster(&hub, "east", local).await;
    (east, hub)
}

fn east_node() -> NodeIdentity {
    NodeIdentity {
        cluster: "east".into(),
        node: "e1".into(),
    }
}

/// The report of `node`'s sidecar that the copy of volume `handle` of group `uid` failed.
fn copy_failed(node: NodeIdentity, uid: &str, handle: &str) -> ReportRequest {
    ReportRequest {
        node: Some(node),
        failures: vec![pb::CopyFailure {
            group_uid: uid.to_owned(),
            volume_handle: handle.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn the_standby_finishes_a_freeze_the_killed_leader_started_and_the_deposed_write_is_refused()
-> TestResult {
    let (_east, hub) = east_only().await;
    let ha = |identity: &str| Options {
        leader_election: true,
        identity: identity.into(),
        ..options()
    };
    let first = Operator::start(hub.clone(), &ha("operator-a")).await?;
    eventually("operator-a leads", || async {
        first.engine().is_leader().then_some(())
    })
    .await;
    let second = Operator::start(hub.clone(), &ha("operator-b")).await?;
    let (_, uid) = single_cluster_group(&hub).await;
    assert!(!second.engine().is_leader(), "one leader at a time");
    let mut standby = ControlClient::connect(format!("http://{}", second.grpc_addr)).await?;
    let refused = standby
        .report(ReportRequest {
            node: Some(east_node()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::Unavailable,
        "only the leader serves Control"
    );

    // The leader freezes, then dies before any acknowledgement.
    let mut leader = ControlClient::connect(format!("http://{}", first.grpc_addr)).await?;
    leader
        .report(copy_failed(east_node(), &uid, "vol-wal"))
        .await?;
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    let stale = groups.get("orders-db").await?;
    assert_eq!(stale.position(), (1, Stage::Freeze));
    first.shutdown().await;

    // The standby takes over within the lease duration and finishes the freeze.
    eventually("operator-b leads", || async {
        second.engine().is_leader().then_some(())
    })
    .await;
    let mut stream = standby
        .subscribe(SubscribeRequest {
            node: Some(east_node()),
            ..Default::default()
        })
        .await?
        .into_inner();
    let freeze = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Freeze as i32
    })
    .await;
    assert_eq!(
        freeze.epoch, 1,
        "the new leader sends the persisted freeze again"
    );
    standby
        .ack(AckRequest {
            node: Some(east_node()),
            enforced: Some(freeze),
            volume_handles: vec!["vol-wal".into(), "vol-data".into()],
            fail_safe: false,
        })
        .await?;
    let release = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Release as i32
    })
    .await;
    assert_eq!(release.epoch, 1, "the epoch never went backwards");
    let released = groups.get("orders-db").await?;
    assert_eq!(released.position(), (1, Stage::Release));

    // The deposed leader's write, made with what it had read, is fenced by the resourceVersion.
    let deposed = groups
        .replace_status("orders-db", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(deposed, kube::Error::Api(ref status) if status.code == 409),
        "{deposed}"
    );
    assert_eq!(
        groups.get("orders-db").await?.position(),
        (1, Stage::Release)
    );
    second.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_freeze_sent_but_never_persisted_is_finished_by_the_next_operator() -> TestResult {
    let (_east, hub) = east_only().await;
    let operator = Operator::start(hub.clone(), &options()).await?;
    let (_, uid) = single_cluster_group(&hub).await;
    // A sidecar reconnects having seen epoch 1, which no status records (the old leader died first):
    // the one epoch after the persisted one can have been sent so.
    let seen = pb::GroupEpoch {
        group_uid: uid.clone(),
        epoch: 1,
        stage: pb::Stage::Freeze as i32,
    };
    let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr)).await?;
    let mut stream = control
        .subscribe(SubscribeRequest {
            node: Some(east_node()),
            volumes: vec![],
            seen: vec![seen],
        })
        .await?
        .into_inner();
    let freeze = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Freeze as i32
    })
    .await;
    assert_eq!(freeze.epoch, 1);
    let group = Api::<ConsistencyGroup>::all(hub.clone())
        .get("orders-db")
        .await?;
    assert_eq!(group.position(), (1, Stage::Freeze));
    assert_eq!(group.status.unwrap().trigger.unwrap().reason, "Adopted");
    operator.shutdown().await;
    Ok(())
}

/// The freeze history as the API server persisted it: one record for the freeze, its trigger and the
/// path that brought it, the times of suspension, freeze and release in milliseconds and in order, the
/// outcome as the group moves on to its resync.
#[tokio::test]
async fn a_freezes_history_is_persisted_with_its_trigger_steps_and_outcome() -> TestResult {
    let (_east, hub) = east_only().await;
    let operator = Operator::start(hub.clone(), &options()).await?;
    let (_, uid) = single_cluster_group(&hub).await;
    let mut control = ControlClient::connect(format!("http://{}", operator.grpc_addr)).await?;
    let mut stream = control
        .subscribe(SubscribeRequest {
            node: Some(east_node()),
            ..Default::default()
        })
        .await?
        .into_inner();
    control
        .report(copy_failed(east_node(), &uid, "vol-wal"))
        .await?;
    let freeze = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Freeze as i32
    })
    .await;
    control
        .ack(AckRequest {
            node: Some(east_node()),
            enforced: Some(freeze),
            volume_handles: vec!["vol-wal".into(), "vol-data".into()],
            fail_safe: false,
        })
        .await?;
    next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Release as i32
    })
    .await;
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    let released = groups.get("orders-db").await?;
    let history = released.status.clone().unwrap_or_default().history;
    assert_eq!(history.len(), 1, "{history:?}");
    let record = &history[0];
    assert_eq!(
        (record.epoch, record.trigger.reason.as_str()),
        (1, "CopyFailed")
    );
    assert_eq!(record.trigger.volume_handle.as_deref(), Some("vol-wal"));
    assert_eq!(
        (record.trigger.cluster.as_deref(), record.trigger.path),
        (Some("east"), Some(lockstep_api::domain::Path::Grpc))
    );
    assert_eq!(
        record.outcome,
        lockstep_api::v1alpha1::FreezeOutcome::Released
    );
    let steps = [record.suspended_at, record.frozen_at, record.released_at];
    assert!(steps.iter().all(Option::is_some), "{record:?}");
    assert!(
        steps.windows(2).all(|pair| pair[0] <= pair[1]) && Some(record.triggered_at) <= steps[0],
        "steps in order: {record:?}"
    );
    // As kubectl reads it: RFC 3339 with milliseconds.
    let raw = serde_json::to_value(&released)?;
    let triggered = raw["status"]["history"][0]["triggeredAt"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        triggered.len() == "2026-12-05T19:04:13.123Z".len()
            && triggered.ends_with('Z')
            && triggered.as_bytes()[19] == b'.',
        "{triggered}"
    );

    common::patch_spec(&groups, json!({"resync": {"epoch": 1}})).await;
    let resyncing = eventually("the resync is in the history", || {
        let groups = groups.clone();
        async move {
            let group = groups.get("orders-db").await.ok()?;
            let record = group.status?.history.first()?.clone();
            (record.outcome == lockstep_api::v1alpha1::FreezeOutcome::Resyncing).then_some(record)
        }
    })
    .await;
    assert_eq!(
        resyncing.released_at, record.released_at,
        "earlier steps keep their times"
    );
    assert!(resyncing.resync_started_at >= record.released_at);
    operator.shutdown().await;
    Ok(())
}

/// A minimal HTTP GET over a TCP socket (the operator's metrics endpoint).
async fn reqwest_free_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    response
}

/// Writes the status of ReplicationNode `e1` in `client`'s cluster as a sidecar would (path 1).
async fn node_status(client: &Client, status: serde_json::Value) {
    let patch =
        json!({"apiVersion": "lockstep.dev/v1alpha1", "kind": "ReplicationNode", "status": status});
    Api::<ReplicationNode>::all(client.clone())
        .patch_status(
            "e1",
            &PatchParams::apply("test-sidecar").force(),
            &Patch::Apply(&patch),
        )
        .await
        .unwrap();
}

/// An operator that was shut down decides nothing more: its ReplicationNode watches stop with it (they
/// used to outlive it, deciding on its last view of the hub beside the operator that came next — with
/// node names reused across runs on the same clusters, a second run's ReplicationNodes reached both).
#[tokio::test]
async fn an_operator_shut_down_no_longer_acts_on_replication_nodes() -> TestResult {
    let (_east, hub) = east_only().await;
    let operator = Operator::start(hub.clone(), &options()).await?;
    let (_, uid) = single_cluster_group(&hub).await;
    let volumes = json!([
        {"volumeHandle": "vol-wal", "state": "Replicating", "epoch": 0},
        {"volumeHandle": "vol-data", "state": "Replicating", "epoch": 0}
    ]);
    // A failure reported on path 1 freezes the group: the operator watches the node.
    node_status(
        &hub,
        json!({"volumes": volumes, "volumeCount": 2, "failureCount": 1, "failures": [{
            "volumeHandle": "vol-wal", "groupUid": uid, "epochSeen": 0, "sequence": 1,
            "error": "link cut", "since": "2026-01-01T00:00:00Z"}]}),
    )
    .await;
    let groups = Api::<ConsistencyGroup>::all(hub.clone());
    eventually("frozen at epoch 1 through the ReplicationNode", || async {
        (groups.get("orders-db").await.ok()?.position() == (1, Stage::Freeze)).then_some(())
    })
    .await;
    operator.shutdown().await;

    // Both volumes acknowledge the freeze on path 1. Nobody may release the group: no operator runs.
    node_status(
        &hub,
        json!({"volumes": volumes, "volumeCount": 2, "enforced": [{
            "groupUid": uid, "epoch": 1, "stage": "Freeze",
            "volumeHandles": ["vol-wal", "vol-data"]}]}),
    )
    .await;
    let watch = Api::<ReplicationNode>::all(hub.clone());
    eventually("the acknowledgement stored", || async {
        let node = watch.get("e1").await.ok()?;
        (!node.status?.enforced.is_empty()).then_some(())
    })
    .await;
    // A live watch takes well under the resync interval to hand a change to the engine; give a leaked
    // one several times that.
    tokio::time::sleep(options().resync_interval * 3).await;
    assert_eq!(
        groups.get("orders-db").await?.position(),
        (1, Stage::Freeze),
        "a shut-down operator released the group"
    );
    Ok(())
}

/// A reconcile works on the reflector's copy of the hub group, which can be behind the status the
/// fan-out already wrote into a mirror. Writing that copy's status would be refused ("status.epoch never
/// decreases") and logged as a failed mirror write; the mirror write leaves the newer status alone.
#[tokio::test]
async fn a_mirror_write_from_an_older_copy_leaves_the_mirrors_newer_status_alone() -> TestResult {
    use lockstep_api::v1alpha1::ConsistencyGroupStatus;
    let (_west, member) = api_server().await;
    let at = |epoch, stage| {
        let mut group = ConsistencyGroup::new(
            "orders-db",
            group_spec(vec![by_names("west", &["wal"])], Policy::FreezeAndGo),
        );
        group.metadata.uid = Some("uid-orders-db".into());
        group.status = Some(ConsistencyGroupStatus {
            epoch,
            stage: Some(stage),
            ..Default::default()
        });
        group
    };
    lockstep_operator::mirror::apply(&member, "west", "east", &at(3, Stage::Release)).await?;
    lockstep_operator::mirror::apply(&member, "west", "east", &at(2, Stage::Resume)).await?;
    let mirror = Api::<ConsistencyGroup>::all(member.clone())
        .get("orders-db")
        .await?;
    let status = mirror.status.unwrap();
    assert_eq!((status.epoch, status.stage), (3, Some(Stage::Release)));
    // A newer status still goes along.
    lockstep_operator::mirror::apply(&member, "west", "east", &at(4, Stage::Freeze)).await?;
    let mirror = Api::<ConsistencyGroup>::all(member.clone())
        .get("orders-db")
        .await?;
    assert_eq!(mirror.status.unwrap().epoch, 4);
    Ok(())
}

/// A directive a connected node missed (the replica that decided it died between persisting and sending,
/// or the message was lost) is sent again each round to the clusters whose volumes have not acknowledged
/// it: enforcing is idempotent, and a gRPC-only member has no other way to learn it.
#[tokio::test]
async fn an_unacknowledged_directive_is_sent_again_to_connected_nodes() -> TestResult {
    let world = world().await;
    let hub_groups = Api::<ConsistencyGroup>::all(world.east_client.clone());
    let spec = group_spec(
        vec![
            by_names("east", &["wal", "data"]),
            by_names("west", &["reporting"]),
        ],
        Policy::FreezeAndGo,
    );
    hub_groups
        .create(
            &PostParams::default(),
            &ConsistencyGroup::new("orders-db", spec),
        )
        .await?;
    let group = resolved(&world.east_client, "orders-db", 3).await;
    let uid = group.metadata.uid.clone().unwrap();
    let mut control =
        ControlClient::connect(format!("http://{}", world.operator.grpc_addr)).await?;
    let west_node = NodeIdentity {
        cluster: "west".into(),
        node: "w1".into(),
    };
    let mut stream = control
        .subscribe(SubscribeRequest {
            node: Some(west_node.clone()),
            ..Default::default()
        })
        .await?
        .into_inner();
    control
        .report(ReportRequest {
            node: Some(west_node.clone()),
            failures: vec![pb::CopyFailure {
                group_uid: uid.clone(),
                volume_handle: "vol-reporting".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await?;
    let freeze = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Freeze as i32
    })
    .await;
    assert_eq!(freeze.epoch, 1);
    // West does not acknowledge: the freeze comes again, on the same stream.
    let again = next_directive(&mut stream, |target| {
        target.stage == pb::Stage::Freeze as i32 && target.epoch == 1
    })
    .await;
    assert_eq!(again.group_uid, uid);
    Ok(())
}
