//! The sidecar driving the real reference replicator (its `Replicator` gRPC service on a unix socket,
//! volumes served over NBD and copied to a real secondary through a cuttable link), with real HTTP to the
//! test API server and real gRPC to a test `Control` server. A cut link is reported on both paths, the
//! freeze suspends every volume of the group, and only the release lets the held write complete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use lockstep_api::domain::Stage;
use lockstep_api::proto::control::v1 as cpb;
use lockstep_api::proto::replicator::v1 as rpb;
use lockstep_checker::{NbdAddress, NbdClient};
use lockstep_replicator::linkcut::LinkMode;
use lockstep_replicator::testing::{NodeSpec, ReplicatorNode, control_client};
use rpb::replicator_client::ReplicatorClient;
use tonic::transport::Channel;

const MIB: u64 = 1024 * 1024;

/// The shared replicator fixture (each volume through its own cuttable link, a control socket, volumes
/// unconfirmed at start), with what these tests need of it.
struct Node(ReplicatorNode);

impl Node {
    async fn start(volumes: &[&str]) -> Node {
        Node(NodeSpec::new(volumes, 4 * MIB).start().await.unwrap())
    }

    fn socket(&self) -> std::path::PathBuf {
        self.0.control_socket().unwrap()
    }

    fn cut(&self, volume: &str, mode: LinkMode) {
        self.0.cut(volume, mode).unwrap();
    }

    async fn nbd(&self, volume: &str) -> NbdClient {
        let address: NbdAddress = self.0.nbd_url(volume).unwrap().parse().unwrap();
        NbdClient::connect(&address).await.unwrap()
    }

    async fn client(&self) -> ReplicatorClient<Channel> {
        control_client(&self.socket()).await
    }
}

/// Volumes v1 and v2 on a real replicator, in one group on the test API server, with a test `Control`
/// server naming them members at (0, Resume) and sidecar options pointing at both.
struct Rig {
    node: Node,
    replicator: ReplicatorClient<Channel>,
    server: lockstep_testapi::TestApiServer,
    client: kube::Client,
    uid: String,
    control: FakeControl,
    opts: lockstep_sidecar::Options,
}

impl Rig {
    async fn start() -> Rig {
        let node = Node::start(&["v1", "v2"]).await;
        let replicator = node.client().await;
        let (server, client) = api_server().await;
        let uid = create_group(&client, &["v1", "v2"]).await;
        let control = FakeControl::start().await;
        control.set_membership(&uid, 0, cpb::Stage::Resume, &["v1", "v2"]);
        let mut opts = FakeReplicatorless::options(&node.socket());
        opts.operator_endpoint = Some(control.endpoint());
        opts.insecure_plaintext_control = true;
        Rig {
            node,
            replicator,
            server,
            client,
            uid,
            control,
            opts,
        }
    }
}

/// Waits until the sidecar confirmed both volumes and they replicate.
async fn replicating(replicator: &ReplicatorClient<Channel>) {
    for v in ["v1", "v2"] {
        let r = replicator.clone();
        eventually_async(&format!("{v} replicating"), move || {
            let mut r = r.clone();
            async move { mode(&mut r, v).await == rpb::Mode::Replicating as i32 }
        })
        .await;
    }
}

async fn mode(client: &mut ReplicatorClient<Channel>, volume: &str) -> i32 {
    client
        .state(rpb::StateRequest {
            volume_handle: volume.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .mode
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_link_on_the_real_replicator_is_reported_frozen_and_released_over_both_paths() {
    let Rig {
        node,
        mut replicator,
        server: _server,
        client,
        uid,
        control,
        opts,
    } = Rig::start().await;
    let sidecar = start(opts.clone(), Some(client.clone())).await;

    // Fail closed until the sidecar confirms; then replicating.
    replicating(&replicator).await;
    let mut v1 = node.nbd("v1").await;
    v1.write(0, &[1u8; 4096], false).await.unwrap();

    // Cut v1's link: its next write is held and reported on both paths at epoch 0.
    node.cut("v1", LinkMode::Reset);
    let held = tokio::spawn(async move {
        let result = v1.write(4096, &[2u8; 4096], false).await;
        (v1, result)
    });
    eventually("reported over gRPC", || {
        control.reports().iter().any(|r| {
            r.failures
                .iter()
                .any(|f| f.volume_handle == "v1" && f.epoch_seen == 0)
        })
    })
    .await;
    eventually_async("reported in status", || async {
        replication_node(&client).await.is_some_and(|n| {
            n.status.is_some_and(|s| {
                s.failures
                    .iter()
                    .any(|f| f.volume_handle == "v1" && f.epoch_seen == 0)
            })
        })
    })
    .await;
    assert!(!held.is_finished(), "the failed write is held");

    // The freeze, on both paths: both volumes suspended, acknowledged on both with the list.
    control.push(&uid, 1, cpb::Stage::Freeze);
    set_point(&client, 1, "Freeze").await;
    eventually("acked over gRPC", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    eventually_async("acked in status", || async {
        replication_node(&client).await.is_some_and(|n| {
            n.status.is_some_and(|s| {
                s.enforced.iter().any(|e| {
                    e.epoch == 1 && e.stage == Stage::Freeze && e.volume_handles == ["v1", "v2"]
                })
            })
        })
    })
    .await;
    for v in ["v1", "v2"] {
        assert_eq!(mode(&mut replicator, v).await, rpb::Mode::Suspended as i32);
    }
    assert!(!held.is_finished(), "still held until the release");

    // A restarted sidecar keeps them suspended.
    sidecar.abort();
    let sidecar = start(opts, Some(client.clone())).await;
    eventually("acked again after restart", || {
        control
            .acks()
            .iter()
            .filter(|a| a.enforced.as_ref().is_some_and(|e| e.epoch == 1))
            .count()
            >= 2
    })
    .await;
    for v in ["v1", "v2"] {
        assert_eq!(mode(&mut replicator, v).await, rpb::Mode::Suspended as i32);
    }

    // The release lets the held write complete (primary-only).
    control.push(&uid, 1, cpb::Stage::Release);
    let (_v1, result) = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .unwrap()
        .unwrap();
    result.unwrap();
    // v2 runs once its own release is on disk (the directive releases the volumes one by one).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while mode(&mut replicator, "v2").await != rpb::Mode::Running as i32 {
        assert!(std::time::Instant::now() < deadline, "v2 never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sidecar.shutdown().await;
}

/// Both paths down while the real replicator holds a failed write: the fail-safe suspends the group's
/// volumes (marked) well before the hold timeout; contact returns and says so; only a higher epoch lifts
/// it, and the release then completes the held write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_both_paths_down_the_real_replicator_is_suspended_by_the_fail_safe() {
    let Rig {
        node,
        mut replicator,
        server,
        client,
        uid,
        control,
        mut opts,
    } = Rig::start().await;
    // Far below the group's 30 s hold timeout.
    opts.fail_safe_interval = Duration::from_secs(2);
    let sidecar = start(opts, Some(client.clone())).await;
    replicating(&replicator).await;
    eventually("subscribed", || control.subscribers() > 0).await;

    stop_api_server(&server, &client).await;
    control.stop();
    node.cut("v2", LinkMode::Reset);
    let mut v2 = node.nbd("v2").await;
    let held = tokio::spawn(async move { v2.write(0, &[7u8; 4096], false).await });
    let r = replicator.clone();
    eventually_async("fail-safe suspension of both volumes", move || {
        let mut r = r.clone();
        async move {
            let mut all = true;
            for v in ["v1", "v2"] {
                let s = r
                    .state(rpb::StateRequest {
                        volume_handle: v.into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                all &= s.fail_safe && s.mode == rpb::Mode::Suspended as i32 && s.epoch == 0;
            }
            all
        }
    })
    .await;
    assert!(!held.is_finished(), "the failed write stays held");

    // Contact returns: the fail-safe is acknowledged on both paths.
    server.restart().await.unwrap();
    control.restart().await;
    eventually("fail-safe acked over gRPC", || {
        control.acked(0, cpb::Stage::Freeze, &["v1", "v2"], true)
    })
    .await;
    eventually_async("fail-safe in status", || async {
        replication_node(&client).await.is_some_and(|n| {
            n.status
                .is_some_and(|s| s.enforced.iter().any(|e| e.fail_safe && e.epoch == 0))
        })
    })
    .await;
    // A directive at the same epoch does not lift it; a higher epoch does, and its release completes
    // the held write.
    control.push(&uid, 0, cpb::Stage::Release);
    control.push(&uid, 1, cpb::Stage::Freeze);
    control.push(&uid, 1, cpb::Stage::Release);
    tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    for v in ["v1", "v2"] {
        assert_eq!(mode(&mut replicator, v).await, rpb::Mode::Running as i32);
    }
    sidecar.shutdown().await;
}

/// Options for a sidecar in front of a real replicator socket.
struct FakeReplicatorless;

impl FakeReplicatorless {
    fn options(socket: &std::path::Path) -> lockstep_sidecar::Options {
        let mut options = lockstep_sidecar::Options::new(NODE, CLUSTER);
        options.replicator_socket = socket.to_path_buf();
        options.listen = "127.0.0.1:0".parse().unwrap();
        options.rpc_timeout = Duration::from_secs(5);
        options.inventory_interval = Duration::from_millis(500);
        options.fail_safe_interval = Duration::from_secs(10);
        options.grpc_idle_timeout = Duration::from_secs(5);
        options.lease_duration = Duration::from_secs(3);
        options
    }
}

/// A volume the sidecar resumed is resynchronising from that moment: no report may say it replicates at
/// the resumed epoch before its resync finished. The operator counts a member whose sidecar reports it
/// replicating at (e, Resume) as back in sync — in the image of the next freeze — so such a report, sent
/// between the resume and the sidecar's next listing of the replicator, let a freeze during the resync
/// name an image whose secondaries were half overwritten (a CI run failed so).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_volume_is_never_reported_in_sync_before_its_resync_finished() {
    let Rig {
        node,
        mut replicator,
        server: _server,
        client,
        uid,
        control,
        mut opts,
    } = Rig::start().await;
    // gRPC only: reports carry the volume states (with an API path its ReplicationNode says them).
    opts.no_api_path = true;
    let sidecar = start(opts, Some(client.clone())).await;
    replicating(&replicator).await;

    // Frozen and released at epoch 1 by a cut link; v1 then written primary-only (dirty regions).
    node.cut("v1", LinkMode::Reset);
    let mut v1 = node.nbd("v1").await;
    let held = tokio::spawn(async move {
        let result = v1.write(0, &[1u8; 4096], false).await;
        (v1, result)
    });
    eventually("reported over gRPC", || {
        control
            .reports()
            .iter()
            .any(|r| r.failures.iter().any(|f| f.volume_handle == "v1"))
    })
    .await;
    control.push(&uid, 1, cpb::Stage::Freeze);
    eventually("frozen", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    control.push(&uid, 1, cpb::Stage::Release);
    let (mut v1, result) = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .unwrap()
        .unwrap();
    result.unwrap();
    v1.write(MIB, &[2u8; 4096], false).await.unwrap();

    // The resync cannot finish: v1's link drops everything.
    node.cut("v1", LinkMode::Blackhole);
    control.push(&uid, 1, cpb::Stage::Resume);
    eventually("resume acknowledged", || {
        control.acked(1, cpb::Stage::Resume, &["v1", "v2"], false)
    })
    .await;
    let v1_at_resume = |state: cpb::ReplicationState| {
        control.reports().iter().any(|r| {
            r.states.iter().any(|s| {
                s.volume_handle == "v1"
                    && s.epoch == 1
                    && s.stage == cpb::Stage::Resume as i32
                    && s.state == state as i32
            })
        })
    };
    eventually("v1 reported resyncing", || {
        v1_at_resume(cpb::ReplicationState::Resyncing)
    })
    .await;
    assert_eq!(
        mode(&mut replicator, "v1").await,
        rpb::Mode::Resyncing as i32,
        "v1's resync cannot finish through a blackholed link"
    );
    assert!(
        !v1_at_resume(cpb::ReplicationState::Replicating),
        "v1 was reported replicating (in sync) at (1, Resume) while its resync had not finished"
    );
    sidecar.shutdown().await;
}
