//! A replicated volume the control system confirmed in no group (issue 21 item 3c), through real NBD and
//! real gRPC: when its copy fails there is no group to freeze, so it cannot hold writes forever — it runs
//! primary-only with its changes tracked in the dirty map, says so (a `CopyFailed` event naming no group,
//! its mode `Running`), and resynchronises by itself once the secondary answers again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use lockstep_replicator::testing::control_client as client;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_replicator::Event;
use lockstep_replicator::linkcut::LinkMode;
use lockstep_replicator::testing::{NodeSpec, ReplicatorNode};
use pb::replicator_client::ReplicatorClient;
use tonic::transport::Channel;

const VOLUME: &str = "vol1";

async fn state(c: &mut ReplicatorClient<Channel>) -> pb::VolumeState {
    c.state(pb::StateRequest {
        volume_handle: VOLUME.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// One volume behind a cuttable link, waiting for its confirmation: the shared node fixture.
struct Node(ReplicatorNode);

impl Node {
    async fn start() -> Node {
        let mut spec = NodeSpec::new(&[VOLUME], 4 * MIB);
        spec.copy_timeout = Duration::from_millis(500);
        Node(spec.start().await.unwrap())
    }
    fn control(&self) -> PathBuf {
        self.0.control_socket().unwrap()
    }
    fn file(&self, side: &str) -> String {
        self.0.dir().join(side).join(VOLUME).display().to_string()
    }
    fn url(&self) -> String {
        self.0.nbd_url(VOLUME).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_in_no_group_whose_copy_fails_runs_primary_only_and_resyncs_when_the_link_returns()
{
    let node = Node::start().await;
    let mut ctl = client(&node.control()).await;
    let mut events = node.0.primary.subscribe();
    // The sidecar confirms the volume in no group; a hold timeout short enough that a held write
    // would fail within the test rather than hang it.
    let s = ctl
        .configure(pb::ConfigureRequest {
            volume_handle: VOLUME.into(),
            group_uid: String::new(),
            epoch: 0,
            stage: pb::Stage::Unspecified.into(),
            hold_timeout_ms: 1_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.mode, i32::from(pb::Mode::Replicating));
    let out = qemu_io(&node.url(), &["write -P 0x31 0 64k"]).await;
    assert!(out.clean(), "{out:?}");

    // The link is cut: the next write is not held (there is no group to freeze and release it) but
    // completes primary-only, tracked in the dirty map.
    node.0.links[0].set_mode(LinkMode::Blackhole);
    let out = qemu_io(&node.url(), &["write -P 0x32 64k 64k"]).await;
    assert!(
        out.clean(),
        "a write to a volume in no group failed: {out:?}"
    );
    let failed = loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Ok(Event::CopyFailed(failed))) => break failed,
            Ok(Ok(_)) => {}
            other => panic!("expected CopyFailed, got {other:?}"),
        }
    };
    assert_eq!(
        (failed.volume.as_str(), failed.group_uid.as_str()),
        (VOLUME, "")
    );
    let s = state(&mut ctl).await;
    assert_eq!(s.mode, i32::from(pb::Mode::Running), "{s:?}");
    assert!(s.dirty_bytes >= 64 * 1024, "{s:?}");
    assert_eq!(s.held_writes, 0, "{s:?}");
    let out = qemu_io(&node.url(), &["write -P 0x33 128k 4k"]).await;
    assert!(out.clean(), "{out:?}");

    // The secondary answers again: the volume resynchronises by itself and replicates.
    node.0.links[0].set_mode(LinkMode::Pass);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = state(&mut ctl).await;
        if s.mode == i32::from(pb::Mode::Replicating) && s.dirty_bytes == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never replicating again: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = qemu_io(&node.url(), &["write -P 0x34 256k 4k"]).await;
    assert!(out.clean(), "{out:?}");
    let cmp = qemu_img_compare(&node.file("primary"), &node.file("secondary")).await;
    assert!(
        cmp.success,
        "the secondary differs from the primary: {cmp:?}"
    );
}
