//! A replicated volume the control system confirmed in no group (issue 21 item 3c), through real NBD and
//! real gRPC: when its copy fails there is no group to freeze, so it cannot hold writes forever — it runs
//! primary-only with its changes tracked in the dirty map, says so (a `CopyFailed` event naming no group,
//! its mode `Running`), and resynchronises by itself once the secondary answers again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use hyper_util::rt::TokioIo;
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_replicator::linkcut::{LinkCut, LinkMode};
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::{CopyConfig, Event, Primary, PrimaryConfig, VolumeConfig};
use pb::replicator_client::ReplicatorClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

const VOLUME: &str = "vol1";

async fn client(socket: &Path) -> ReplicatorClient<Channel> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let path = socket.to_owned();
        let channel =
            Endpoint::try_from("http://replicator.invalid")
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await;
        if let Ok(channel) = channel {
            return ReplicatorClient::new(channel);
        }
        assert!(std::time::Instant::now() < deadline, "no control socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn state(c: &mut ReplicatorClient<Channel>) -> pb::VolumeState {
    c.state(pb::StateRequest {
        volume_handle: VOLUME.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// One volume behind a cuttable link, waiting for its confirmation.
struct Node {
    dir: tempfile::TempDir,
    _secondary: Secondary,
    link: LinkCut,
    primary: Primary,
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("primary")).unwrap();
        let secondary = Secondary::start(SecondaryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: dir.path().join("secondary"),
            security: lockstep_replicator::LinkSecurity::Plaintext,
        })
        .await
        .unwrap();
        let link = LinkCut::start(secondary.local_addr()).await.unwrap();
        let primary = Primary::start(PrimaryConfig {
            volumes: vec![VolumeConfig {
                require_confirmation: true,
                ..VolumeConfig::new(
                    VOLUME,
                    dir.path().join("primary").join(VOLUME),
                    Some(4 * MIB),
                    Some(CopyConfig {
                        secondary: link.addr().to_string(),
                        timeout: Duration::from_millis(500),
                        security: lockstep_replicator::LinkSecurity::Plaintext,
                    }),
                )
            }],
            nbd_listen: Some("127.0.0.1:0".parse().unwrap()),
            nbd_socket: None,
            record_latency: false,
            control_socket: Some(dir.path().join("control.sock")),
        })
        .await
        .unwrap();
        Node {
            dir,
            _secondary: secondary,
            link,
            primary,
        }
    }
    fn control(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }
    fn file(&self, side: &str) -> String {
        self.dir
            .path()
            .join(side)
            .join(VOLUME)
            .display()
            .to_string()
    }
    fn url(&self) -> String {
        format!("nbd://{}/{VOLUME}", self.primary.nbd_addr().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_in_no_group_whose_copy_fails_runs_primary_only_and_resyncs_when_the_link_returns()
{
    let node = Node::start().await;
    let mut ctl = client(&node.control()).await;
    let mut events = node.primary.subscribe();
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
    node.link.set_mode(LinkMode::Blackhole);
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
    node.link.set_mode(LinkMode::Pass);
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
