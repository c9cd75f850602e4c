//! Disaster recovery through the `Replicator` service (issue 33), with real sockets and files: a group
//! of two volumes written with dependent pairs, frozen with its image kept, a resync started, the
//! primary site killed; the secondaries promoted from the image (the consistency checker passes on it)
//! take new writes; the old primaries come back fenced; the DR site replicates back (the old site's
//! writes after the image discarded and reported); a planned switch back ends with both sites identical
//! byte for byte and every acknowledged write present. And the refusals: no complete image, a volume
//! not suspended, a replicator that serves only primaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_checker::{CheckOptions, Layout, NbdAddress, Source, WorkloadHandle, WorkloadOptions};
use lockstep_replicator::link_tls::SiteCa;
use lockstep_replicator::nbd::proto::EIO;
use lockstep_replicator::secondary::SecondaryConfig;
use lockstep_replicator::testing::{control_client, eventually};
use lockstep_replicator::{
    CopyConfig, LinkSecurity, Primary, PrimaryConfig, SecondaryNode, SecondaryNodeConfig,
    VolumeConfig,
};
use pb::replicator_client::ReplicatorClient;
use tonic::transport::Channel;

const GROUP: &str = "group-uid-dr";
const VOLUMES: [&str; 2] = ["vol-a", "vol-b"];
const SIZE: u64 = 8 * MIB;
/// Where the tests' own marked writes go: past the checker's lanes.
const MARKS_AT: u64 = 6 * MIB;

type Client = ReplicatorClient<Channel>;

fn names() -> Vec<String> {
    VOLUMES.iter().map(|v| (*v).to_owned()).collect()
}

fn directive(epoch: u64) -> pb::DirectiveRequest {
    pb::DirectiveRequest {
        volume_handles: names(),
        group_uid: GROUP.into(),
        epoch,
        fail_safe: false,
    }
}

fn failover(epoch: u64) -> pb::FailoverRequest {
    pb::FailoverRequest {
        volume_handles: names(),
        group_uid: GROUP.into(),
        epoch,
        primary_site_lost: false,
    }
}

/// The primary site's replicator: both volumes in `dir`, copied to `secondary`, the control socket
/// at `dir/control.sock`.
async fn start_primary(dir: &Path, secondary: &str, security: &LinkSecurity) -> Primary {
    let volumes = VOLUMES
        .iter()
        .map(|name| VolumeConfig {
            require_confirmation: true,
            hold_timeout: Duration::from_secs(120),
            ..VolumeConfig::new(
                name,
                dir.join(name),
                Some(SIZE),
                Some(CopyConfig {
                    security: security.clone(),
                    ..CopyConfig::plaintext(secondary, Duration::from_secs(5))
                }),
            )
        })
        .collect();
    Primary::start(PrimaryConfig {
        volumes,
        nbd_listen: Some("127.0.0.1:0".parse().unwrap()),
        nbd_socket: None,
        record_latency: false,
        control_socket: Some(dir.join("control.sock")),
    })
    .await
    .unwrap()
}

/// A secondary over `dir` with its failover side (NBD for promoted volumes, the control socket at
/// `control`), listening on `listen`.
async fn start_secondary(
    dir: &Path,
    control: &Path,
    listen: &str,
    security: &LinkSecurity,
) -> SecondaryNode {
    SecondaryNode::start(SecondaryNodeConfig::serving(
        SecondaryConfig {
            listen: listen.parse().unwrap(),
            dir: dir.to_path_buf(),
            security: security.clone(),
        },
        control.to_path_buf(),
    ))
    .await
    .unwrap()
}

/// Promote at `epoch` once the replication streams of a lost (or suspended) primary have ended: until
/// then the secondary refuses, saying the volume is not suspended. The answer that is not that refusal.
async fn promote_once_streams_end(
    c: &Client,
    epoch: u64,
) -> Result<pb::FailoverResponse, tonic::Status> {
    eventually("the primary's replication streams to end", || {
        let mut c = c.clone();
        async move {
            match c.promote(failover(epoch)).await {
                Err(e) if e.message().contains("not suspended") => None,
                answer => Some(answer.map(tonic::Response::into_inner)),
            }
        }
    })
    .await
}

/// Confirms both volumes in `GROUP` at (epoch, stage), as the primary site's sidecar does.
async fn configure_all(c: &mut Client, epoch: u64, stage: pb::Stage) {
    for name in VOLUMES {
        c.configure(pb::ConfigureRequest {
            volume_handle: name.into(),
            group_uid: GROUP.into(),
            epoch,
            stage: stage.into(),
            hold_timeout_ms: 120_000,
        })
        .await
        .unwrap();
    }
}

async fn state_of(c: &mut Client, volume: &str) -> Option<pb::VolumeState> {
    let request = pb::StateRequest {
        volume_handle: volume.into(),
    };
    Some(c.state(request).await.ok()?.into_inner())
}

async fn states(c: &mut Client) -> Vec<pb::VolumeState> {
    let mut out = Vec::new();
    for name in VOLUMES {
        out.push(
            c.state(pb::StateRequest {
                volume_handle: name.into(),
            })
            .await
            .unwrap()
            .into_inner(),
        );
    }
    out
}

async fn until_modes(c: &mut Client, mode: pb::Mode, what: &str) {
    eventually(what, || {
        let mut c = c.clone();
        async move {
            states(&mut c)
                .await
                .iter()
                .all(|s| s.mode == mode as i32 && s.dirty_bytes == 0)
                .then_some(())
        }
    })
    .await;
}

fn files(dir: &Path) -> Vec<PathBuf> {
    VOLUMES.iter().map(|v| dir.join(v)).collect()
}

fn read_all(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn nbd_url(addr: std::net::SocketAddr, volume: &str) -> NbdAddress {
    format!("nbd://{addr}/{volume}").parse().unwrap()
}

/// Writes that were acknowledged, to find again at the end: (volume index, offset, byte).
#[derive(Default)]
struct Acked(Vec<(usize, u64, u8)>);

impl Acked {
    /// Writes a 4 KiB block of `byte` at mark `n` of each volume through `clients`; all must succeed.
    async fn write(&mut self, clients: &mut [RawClient], n: u64, byte: u8) {
        for (i, client) in clients.iter_mut().enumerate() {
            let offset = MARKS_AT + n * 4096;
            assert_eq!(client.write(offset, &[byte; 4096]).await, Some(0));
            self.0.retain(|(v, o, _)| !(*v == i && *o == offset));
            self.0.push((i, offset, byte));
        }
    }

    fn present_in(&self, dir: &Path) {
        for (volume, offset, byte) in &self.0 {
            let found = read_file_at(&dir.join(VOLUMES[*volume]), *offset, 4096);
            assert!(
                found.iter().all(|b| b == byte),
                "acknowledged write {byte:#x} at {offset} of {} missing in {}",
                VOLUMES[*volume],
                dir.display()
            );
        }
    }
}

async fn clients(addr: std::net::SocketAddr) -> Vec<RawClient> {
    let mut out = Vec::new();
    for name in VOLUMES {
        out.push(RawClient::connect(addr, name).await);
    }
    out
}

/// How each site's replicators secure the replication link, in both directions: a site's primary and
/// secondary use one certificate (usable as client and server, naming the address it is dialled at),
/// signed by its site's CA, and trust the other site's CA.
struct Sites {
    old: LinkSecurity,
    dr: LinkSecurity,
}

impl Sites {
    fn plaintext() -> Sites {
        Sites {
            old: LinkSecurity::Plaintext,
            dr: LinkSecurity::Plaintext,
        }
    }

    fn tls() -> Sites {
        let (east, west) = (SiteCa::new("east").unwrap(), SiteCa::new("west").unwrap());
        Sites {
            old: LinkSecurity::Tls(east.link_tls("east-node-1", &["127.0.0.1"], &west).unwrap()),
            dr: LinkSecurity::Tls(west.link_tls("west-node-1", &["127.0.0.1"], &east).unwrap()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_over_to_the_image_with_the_primary_site_gone_and_fail_back_without_losing_a_write() {
    fail_over_and_back(Sites::plaintext()).await;
}

/// The same over the authenticated link: the reverse stream is the DR site's (the old site's files are
/// its from then on), the switch back the old site's own identity again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_over_and_back_over_mutual_tls() {
    fail_over_and_back(Sites::tls()).await;
}

async fn fail_over_and_back(sites: Sites) {
    let root = tempfile::tempdir().unwrap();
    let (old_dir, dr_dir) = (root.path().join("old"), root.path().join("dr"));
    std::fs::create_dir_all(&old_dir).unwrap();
    let dr_control = root.path().join("dr-control.sock");
    let old_control = root.path().join("old-control.sock");

    // The DR site's secondary (with its control surface) and the primary site's replicator.
    let dr = start_secondary(&dr_dir, &dr_control, "127.0.0.1:0", &sites.dr).await;
    let dr_link = dr.secondary.local_addr().to_string();
    let primary = start_primary(&old_dir, &dr_link, &sites.old).await;
    let mut old_ctl = control_client(&old_dir.join("control.sock")).await;
    configure_all(&mut old_ctl, 0, pb::Stage::Unspecified).await;

    // Dependent pairs across both volumes: four lanes, each alternating between the two.
    let layout = Layout::with_span(2, 4, 2, 96, 0).unwrap();
    assert!(layout.required_volume_size() <= MARKS_AT);
    let primary_nbd = primary.nbd_addr().unwrap();
    let mut workload = WorkloadHandle::spawn(
        VOLUMES.iter().map(|v| nbd_url(primary_nbd, v)).collect(),
        WorkloadOptions::new(layout, None),
    );
    workload
        .wait_for_acked(300, Duration::from_secs(60))
        .await
        .unwrap();

    // Freeze at epoch 1: what was acknowledged is on the secondaries, which hold the image.
    old_ctl.suspend(directive(1)).await.unwrap();
    let acked_at_freeze = workload.current().last_acked;
    let image = read_all(&files(&dr_dir));
    // Released: the primaries run on primary-only; then the resync starts over the kept image.
    old_ctl.release(directive(1)).await.unwrap();
    let before = workload.current().acked;
    workload
        .wait_for_acked(before + 200, Duration::from_secs(60))
        .await
        .unwrap();
    let kept = old_ctl
        .keep_image(pb::ImageRequest {
            volume_handles: names(),
            group_uid: GROUP.into(),
            epoch: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(kept.volumes.iter().all(|v| v.epoch == Some(1)));
    old_ctl.resume(directive(1)).await.unwrap();
    eventually("the resync to overwrite the image", || {
        let (dr_dir, image) = (dr_dir.clone(), image.clone());
        async move { (read_all(&files(&dr_dir)) != image).then_some(()) }
    })
    .await;

    let report = workload.stop_and_join().await.unwrap();
    until_modes(&mut old_ctl, pb::Mode::Replicating, "the resync to finish").await;

    // The disaster: the DR site's secondary loses the link first, so the primaries hold the writes
    // that follow (written at the old site, in its dirty map, never acknowledged) — then the primary
    // site is lost: its replicator, its links and its clients.
    dr.kill().await;
    let held: Vec<_> = clients(primary.nbd_addr().unwrap())
        .await
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move { client.write(MARKS_AT + 20 * 4096, &[0x99; 4096]).await })
        })
        .collect();
    eventually("the held writes in the old site's state files", || {
        let old_dir = old_dir.clone();
        async move {
            files(&old_dir)
                .iter()
                .all(|f| {
                    let state = std::fs::read(lockstep_replicator::volume::state_path(f))
                        .unwrap_or_default();
                    serde_json::from_slice::<lockstep_replicator::hold::Persisted>(&state)
                        .is_ok_and(|p| p.mode == "held" && !p.dirty.is_empty())
                })
                .then_some(())
        }
    })
    .await;
    for write in &held {
        assert!(!write.is_finished(), "a held write is never answered");
        write.abort();
    }
    drop(old_ctl);
    drop(primary);
    let dr = start_secondary(&dr_dir, &dr_control, &dr_link, &sites.dr).await;

    // Promote at the DR site from the image of epoch 1: rolled back to it, byte for byte.
    let mut dr_ctl = control_client(&dr_control).await;
    let promoted = promote_once_streams_end(&dr_ctl, 1).await.unwrap();
    assert_eq!(promoted.volumes.len(), 2);
    for v in &promoted.volumes {
        assert_eq!(v.image_epoch, 1);
        let state = v.state.as_ref().unwrap();
        assert_eq!(state.promoted_epoch, Some(1));
        assert_eq!(state.mode, pb::Mode::Running as i32);
        assert_eq!(state.kept_image_epoch, None);
    }
    assert!(
        promoted.volumes.iter().any(|v| v.range_bytes > 0),
        "the resync had overwritten part of the image"
    );
    assert_eq!(read_all(&files(&dr_dir)), image, "promoted from the image");
    let verdict = lockstep_checker::check_sources(
        &files(&dr_dir)
            .into_iter()
            .map(Source::File)
            .collect::<Vec<_>>(),
        &CheckOptions::lanes(acked_at_freeze.clone()).run(report.run_id),
    )
    .await
    .unwrap();
    assert!(verdict.is_consistent(), "{verdict}");
    // Promoting again at the same epoch answers as it is.
    let again = dr_ctl.promote(failover(1)).await.unwrap().into_inner();
    assert_eq!(again.volumes.len(), 2);

    // The workload continues at the DR site: new writes are acknowledged and tracked.
    let dr_nbd = dr.nbd_addr().unwrap();
    let mut dr_clients = clients(dr_nbd).await;
    let mut acked = Acked::default();
    for n in 0..8 {
        acked.write(&mut dr_clients, n, 0xd0 + n as u8).await;
    }
    assert!(states(&mut dr_ctl).await.iter().all(|s| s.dirty_bytes > 0));

    // The old site returns: its primaries come up fail-closed, are fenced, and refuse writes — also
    // after another restart.
    let primary = start_primary(&old_dir, &dr_link, &sites.old).await;
    let mut old_ctl = control_client(&old_dir.join("control.sock")).await;
    let fenced = old_ctl.fence(failover(1)).await.unwrap().into_inner();
    let refused = old_ctl.resume(directive(1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("fenced"),
        "{}",
        refused.message()
    );
    let old_site_changes: Vec<pb::VolumeRanges> = fenced
        .volumes
        .iter()
        .map(|v| {
            let state = v.state.as_ref().unwrap();
            assert_eq!(state.fenced_epoch, Some(1));
            pb::VolumeRanges {
                volume_handle: state.volume_handle.clone(),
                ranges: v.ranges.clone(),
            }
        })
        .collect();
    let mut old_clients = clients(primary.nbd_addr().unwrap()).await;
    assert_eq!(
        old_clients[0].write(MARKS_AT, &[0xee; 4096]).await,
        Some(EIO)
    );
    drop(old_clients);
    drop(old_ctl);
    drop(primary);
    let primary = start_primary(&old_dir, &dr_link, &sites.old).await;
    let mut old_clients = clients(primary.nbd_addr().unwrap()).await;
    assert_eq!(
        old_clients[1].write(MARKS_AT, &[0xee; 4096]).await,
        Some(EIO)
    );
    drop(old_clients);
    drop(primary);

    // Failback, step 1: the old site runs a secondary over the old primaries' files; the DR site
    // replicates to it, copying what changed since the failover and discarding what the old site
    // wrote after the image.
    let old = start_secondary(&old_dir, &old_control, "127.0.0.1:0", &sites.old).await;
    let reversed = dr_ctl
        .reverse(pb::ReverseRequest {
            volume_handles: names(),
            group_uid: GROUP.into(),
            epoch: 1,
            peer: old.secondary.local_addr().to_string(),
            old_site_changes,
        })
        .await
        .unwrap()
        .into_inner();
    for (v, fenced) in reversed.volumes.iter().zip(&fenced.volumes) {
        assert!(v.range_bytes >= fenced.range_bytes);
        for r in &fenced.ranges {
            assert!(
                v.ranges
                    .iter()
                    .any(|d| d.offset <= r.offset && r.offset + r.length <= d.offset + d.length),
                "the old site's change {r:?} is reported discarded"
            );
        }
    }
    assert!(
        fenced.volumes.iter().all(|v| v.range_bytes > 0),
        "the held writes"
    );
    until_modes(
        &mut dr_ctl,
        pb::Mode::Replicating,
        "the reverse resync to finish",
    )
    .await;
    assert_eq!(
        read_all(&files(&old_dir)),
        read_all(&files(&dr_dir)),
        "the old site holds the DR state"
    );
    // Writes at the DR site are now copied to the old site synchronously.
    for n in 4..12 {
        acked.write(&mut dr_clients, n, 0xe0 + n as u8).await;
    }

    // Failback, step 2: a planned switch back at epoch 2 — suspend, in sync, swap roles.
    dr_ctl.suspend(directive(2)).await.unwrap();
    assert!(states(&mut dr_ctl).await.iter().all(|s| s.dirty_bytes == 0));
    let dr_fenced = dr_ctl.fence(failover(2)).await.unwrap().into_inner();
    assert!(dr_fenced.volumes.iter().all(|v| v.range_bytes == 0));
    assert_eq!(
        dr_clients[0].write(MARKS_AT, &[0x11; 4096]).await,
        Some(EIO)
    );
    drop(dr_clients);
    let mut old_ctl = control_client(&old_control).await;
    // The DR side's link may take a moment to close after the suspension.
    let back = promote_once_streams_end(&old_ctl, 2).await.unwrap();
    assert!(
        back.volumes
            .iter()
            .all(|v| v.image_epoch == 2 && v.range_bytes == 0)
    );
    old_ctl
        .reverse(pb::ReverseRequest {
            volume_handles: names(),
            group_uid: GROUP.into(),
            epoch: 2,
            peer: dr_link.clone(),
            old_site_changes: Vec::new(),
        })
        .await
        .unwrap();
    until_modes(
        &mut old_ctl,
        pb::Mode::Replicating,
        "the switch back to finish",
    )
    .await;
    // The DR volumes become secondaries again once the old site's streams arrive (demoted by them).
    // With nothing to resync the old site reports Replicating at once while its streams connect in
    // the background, so the demotion may still be on its way.
    eventually(
        "the DR volumes to be demoted by the old site's streams",
        || {
            let mut dr_ctl = dr_ctl.clone();
            async move {
                states(&mut dr_ctl)
                    .await
                    .iter()
                    .all(|v| v.replica)
                    .then_some(())
            }
        },
    )
    .await;
    let mut old_clients = clients(old.nbd_addr().unwrap()).await;
    for n in 10..14 {
        acked.write(&mut old_clients, n, 0xf0 + n as u8).await;
    }
    drop(old_clients);

    // Both sites identical byte for byte; every acknowledged write present; the pre-freeze lanes
    // still consistent.
    assert_eq!(read_all(&files(&old_dir)), read_all(&files(&dr_dir)));
    acked.present_in(&old_dir);
    for file in files(&old_dir) {
        assert_ne!(
            read_file_at(&file, MARKS_AT + 20 * 4096, 4096),
            vec![0x99; 4096],
            "the old site's write after the image, never acknowledged, is discarded"
        );
    }
    acked.present_in(&dr_dir);
    let verdict = lockstep_checker::check_sources(
        &files(&old_dir)
            .into_iter()
            .map(Source::File)
            .collect::<Vec<_>>(),
        &CheckOptions::lanes(acked_at_freeze).run(report.run_id),
    )
    .await
    .unwrap();
    assert!(verdict.is_consistent(), "{verdict}");
    drop(dr);
}

/// A primary site replicating both volumes (written once) to a DR secondary with its control surface:
/// (the DR node, the primary, the primary's control client, the DR's control client).
async fn replicating_pair(root: &Path) -> (SecondaryNode, Primary, Client, Client) {
    let dr_dir = root.join("dr");
    let dr = start_secondary(
        &dr_dir,
        &root.join("dr-control.sock"),
        "127.0.0.1:0",
        &LinkSecurity::Plaintext,
    )
    .await;
    let old_dir = root.join("old");
    std::fs::create_dir_all(&old_dir).unwrap();
    let primary = start_primary(
        &old_dir,
        &dr.secondary.local_addr().to_string(),
        &LinkSecurity::Plaintext,
    )
    .await;
    let mut old_ctl = control_client(&old_dir.join("control.sock")).await;
    configure_all(&mut old_ctl, 0, pb::Stage::Unspecified).await;
    let mut nbd = clients(primary.nbd_addr().unwrap()).await;
    let mut acked = Acked::default();
    acked.write(&mut nbd, 0, 0x01).await;
    let dr_ctl = control_client(&root.join("dr-control.sock")).await;
    (dr, primary, old_ctl, dr_ctl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promotion_without_a_complete_image_or_of_a_volume_not_suspended_is_refused_with_the_reason()
 {
    let root = tempfile::tempdir().unwrap();
    let (dr, primary, mut old_ctl, mut dr_ctl) = replicating_pair(root.path()).await;

    // The primary still replicates: its secondaries are not suspended.
    let refused = dr_ctl.promote(failover(1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("not suspended"),
        "{}",
        refused.message()
    );

    // A replicator that serves only primaries does not promote, and says so.
    let refused = old_ctl.promote(failover(1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
    assert!(
        refused.message().contains("does not support failover"),
        "{}",
        refused.message()
    );

    // Frozen at 1, released, the image of 1 kept, the resync started; the site lost.
    old_ctl.suspend(directive(1)).await.unwrap();
    old_ctl.release(directive(1)).await.unwrap();
    let mut nbd = clients(primary.nbd_addr().unwrap()).await;
    let mut acked = Acked::default();
    acked.write(&mut nbd, 1, 0x02).await;
    old_ctl
        .keep_image(pb::ImageRequest {
            volume_handles: names(),
            group_uid: GROUP.into(),
            epoch: 1,
        })
        .await
        .unwrap();
    old_ctl.resume(directive(1)).await.unwrap();
    until_modes(&mut old_ctl, pb::Mode::Replicating, "the resync").await;
    drop(nbd);
    drop(old_ctl);
    drop(primary);

    // Epoch 2's image was never complete (the secondaries keep epoch 1's): refused, nothing changed.
    let refused = promote_once_streams_end(&dr_ctl, 2).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("no complete image of epoch 2")
            && refused.message().contains("promote from epoch 1"),
        "{}",
        refused.message()
    );
    assert!(
        states(&mut dr_ctl)
            .await
            .iter()
            .all(|s| s.replica && s.kept_image_epoch == Some(1))
    );
    // A volume that is not there, and a Reverse of volumes not promoted, are refused too.
    let refused = dr_ctl
        .promote(pb::FailoverRequest {
            volume_handles: vec!["no-such-volume".into()],
            group_uid: GROUP.into(),
            epoch: 1,
            primary_site_lost: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    let refused = dr_ctl
        .reverse(pb::ReverseRequest {
            volume_handles: names(),
            group_uid: GROUP.into(),
            epoch: 1,
            peer: "127.0.0.1:9".into(),
            old_site_changes: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("not promoted"),
        "{}",
        refused.message()
    );

    // At epoch 1 it is promoted; a primary streaming to a promoted volume is refused with the reason.
    dr_ctl.promote(failover(1)).await.unwrap();
    let dr_dir = root.path().join("dr");
    let stale = start_primary(
        &root.path().join("old"),
        &dr.secondary.local_addr().to_string(),
        &LinkSecurity::Plaintext,
    )
    .await;
    let mut stale_ctl = control_client(&root.path().join("old").join("control.sock")).await;
    let mut events = stale_ctl
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    // Confirmed as replicating after the resync: its link opens and is refused.
    configure_all(&mut stale_ctl, 1, pb::Stage::Resume).await;
    let mut writer = clients(stale.nbd_addr().unwrap()).await;
    let write = tokio::spawn(async move { writer[0].write(MARKS_AT, &[0x66; 4096]).await });
    let failed = next_copy_failed(&mut events).await;
    assert!(
        failed.error.contains("was promoted here"),
        "{}",
        failed.error
    );
    // The refused write is held, never acknowledged; the promoted volume did not take it.
    assert!(!write.is_finished());
    assert!(read_file_at(&dr_dir.join(VOLUMES[0]), MARKS_AT, 4096) != vec![0x66; 4096]);
    write.abort();
}

/// A partitioned primary site leaves its replication connections open: the promotion, told the site
/// is lost, cuts them; the primary's next write is held (its stream refused: the volume is promoted)
/// and never lands on the promoted volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promotion_told_the_primary_site_is_lost_cuts_a_stream_still_open() {
    let root = tempfile::tempdir().unwrap();
    let (dr, primary, mut old_ctl, dr_ctl) = replicating_pair(root.path()).await;
    assert!(states(&mut dr_ctl.clone()).await.iter().all(|s| s.replica));
    let mut events = old_ctl
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let promoted = dr_ctl
        .clone()
        .promote(pb::FailoverRequest {
            primary_site_lost: true,
            ..failover(0)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(promoted.volumes.iter().all(|v| v.image_epoch == 0));
    let mut writer = clients(primary.nbd_addr().unwrap()).await;
    let write = tokio::spawn(async move { writer[1].write(MARKS_AT, &[0x77; 4096]).await });
    let failed = next_copy_failed(&mut events).await;
    assert!(
        failed.error.contains("was promoted here") || failed.error.contains("replication link"),
        "{}",
        failed.error
    );
    assert!(!write.is_finished(), "the write is held, not acknowledged");
    let dr_file = dr.site().dir().join(VOLUMES[1]);
    assert_ne!(read_file_at(&dr_file, MARKS_AT, 4096), vec![0x77; 4096]);
    write.abort();
    drop(old_ctl);
}

/// A free loopback TCP port (bound and released; the process started next binds it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary as deployed: `lockstep-replicator secondary --control-socket --nbd-socket` promotes after
/// the primary's process is killed (SIGKILL, a write held under it), serves the image and new writes
/// over NBD, and after its own SIGKILL and restart serves the promoted volume again, changes tracked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_secondary_process_promotes_after_the_primary_process_is_killed_and_keeps_serving_after_a_restart()
 {
    let root = tempfile::tempdir().unwrap();
    let (old_dir, dr_dir) = (root.path().join("old"), root.path().join("dr"));
    std::fs::create_dir_all(&old_dir).unwrap();
    let (dr_control, dr_nbd) = (root.path().join("dr.sock"), root.path().join("dr-nbd.sock"));
    let (old_control, old_nbd) = (
        root.path().join("old.sock"),
        root.path().join("old-nbd.sock"),
    );
    let link = format!("127.0.0.1:{}", free_port());
    let secondary = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep-replicator"))
            .args(["secondary", "--listen", &link, "--insecure-plaintext"])
            .arg("--dir")
            .arg(&dr_dir)
            .arg("--control-socket")
            .arg(&dr_control)
            .arg("--nbd-socket")
            .arg(&dr_nbd)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut dr = secondary();
    let primary_process = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep-replicator"))
            .args(["primary", "--insecure-plaintext", "--volume"])
            .arg(format!(
                "vol-a={},size=4M,secondary={link}",
                old_dir.join("vol-a").display()
            ))
            .arg("--nbd-socket")
            .arg(&old_nbd)
            .arg("--control-socket")
            .arg(&old_control)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut primary = primary_process();
    let old_url = format!("nbd+unix:///vol-a?socket={}", old_nbd.display());
    let dr_url = format!("nbd+unix:///vol-a?socket={}", dr_nbd.display());
    let verb = |verb: &str, socket: &Path, epoch: u64| -> Vec<String> {
        [
            verb,
            "--control-socket",
            &socket.display().to_string(),
            "--group",
            GROUP,
            "--epoch",
            &epoch.to_string(),
            "--volume",
            "vol-a",
        ]
        .map(str::to_owned)
        .to_vec()
    };

    let mut old_ctl = control_client(&old_control).await;
    old_ctl
        .configure(pb::ConfigureRequest {
            volume_handle: "vol-a".into(),
            group_uid: GROUP.into(),
            epoch: 0,
            stage: pb::Stage::Unspecified.into(),
            hold_timeout_ms: 120_000,
        })
        .await
        .unwrap();
    let out = qemu_io(&old_url, &["write -P 0x41 0 64k"]).await;
    assert!(out.clean(), "{out:?}");
    old_ctl
        .suspend(pb::DirectiveRequest {
            volume_handles: vec!["vol-a".into()],
            group_uid: GROUP.into(),
            epoch: 1,
            fail_safe: false,
        })
        .await
        .unwrap();
    let held = tokio::spawn({
        let url = old_url.clone();
        async move { qemu_io(&url, &["write -P 0x42 1M 64k"]).await }
    });
    eventually("the write held", || {
        let mut c = old_ctl.clone();
        async move {
            let s = state_of(&mut c, "vol-a").await?;
            (s.held_writes == 1).then_some(())
        }
    })
    .await;
    // A primary's replicator does not promote, and the command says so.
    let refused = cli(&verb("promote", &old_control, 1)).await;
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("does not support failover"),
        "{}",
        refused.stderr
    );
    primary.kill().await.unwrap();
    assert!(
        !held.await.unwrap().success,
        "the held write was never acknowledged"
    );

    // Promoted from the image of epoch 1 (once the killed primary's stream has ended): the
    // acknowledged write is there, the held one is not.
    let promoted = eventually("the promotion", || {
        let args = verb("promote", &dr_control, 1);
        async move {
            let out = cli(&args).await;
            assert!(
                out.status.success() || out.stderr.contains("not suspended"),
                "{}",
                out.stderr
            );
            out.status.success().then_some(out.stdout)
        }
    })
    .await;
    assert!(
        promoted.contains("vol-a: promoted from the image of epoch 1"),
        "{promoted}"
    );
    let out = qemu_io(
        &dr_url,
        &[
            "read -P 0x41 0 64k",
            "read -P 0 1M 64k",
            "write -P 0x43 2M 64k",
        ],
    )
    .await;
    assert!(out.clean(), "{out:?}");

    // The DR process killed and restarted: the volume is served again as promoted, its change tracked.
    dr.kill().await.unwrap();
    let _dr = secondary();
    let dr_ctl = control_client(&dr_control).await;
    let listed = dr_ctl
        .clone()
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.volumes.len(), 1, "{:?}", listed.volumes);
    let state = &listed.volumes[0];
    assert_eq!(state.promoted_epoch, Some(1));
    assert_eq!(state.mode, pb::Mode::Running as i32);
    assert!(state.dirty_bytes >= 64 * 1024, "{state:?}");
    let out = qemu_io(&dr_url, &["read -P 0x43 2M 64k", "write -P 0x44 3M 4k"]).await;
    assert!(out.clean(), "{out:?}");

    // The old site returns: its primary fenced (the command prints what it wrote after the image:
    // the held write), then a secondary over its files, and the DR site replicates back to it.
    let old = primary_process();
    drop(control_client(&old_control).await);
    let fenced = cli(&verb("fence", &old_control, 1)).await;
    assert!(fenced.status.success(), "{}", fenced.stderr);
    let changes: lockstep_replicator::failover_cli::Fenced =
        serde_json::from_str(&fenced.stdout).unwrap();
    assert!(
        changes.volumes[0]
            .ranges
            .iter()
            .any(|(offset, length)| *offset <= MIB && MIB + 65536 <= offset + length),
        "{changes:?}"
    );
    let out = qemu_io(&old_url, &["write -P 0x45 0 4k"]).await;
    assert!(!out.success, "a fenced primary refuses writes: {out:?}");
    drop(old);
    let changes_file = root.path().join("fenced.json");
    std::fs::write(&changes_file, &fenced.stdout).unwrap();
    let old_link = format!("127.0.0.1:{}", free_port());
    let _old_secondary = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep-replicator"))
        .args(["secondary", "--listen", &old_link, "--insecure-plaintext"])
        .arg("--dir")
        .arg(&old_dir)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually("the old site's secondary to listen", || {
        let old_link = old_link.clone();
        async move { tokio::net::TcpStream::connect(old_link).await.ok() }
    })
    .await;
    let mut args = verb("reverse", &dr_control, 1);
    args.extend(["--peer".into(), old_link.clone()]);
    args.extend([
        "--old-site-changes".into(),
        changes_file.display().to_string(),
    ]);
    let reversed = cli(&args).await;
    assert!(reversed.status.success(), "{}", reversed.stderr);
    assert!(
        reversed
            .stdout
            .contains(&format!("vol-a: replicating to {old_link} from epoch 1")),
        "{}",
        reversed.stdout
    );
    let old_file = old_dir.join("vol-a");
    eventually("the old site to hold the DR state", || {
        let (old_file, dr_file) = (old_file.clone(), dr_dir.join("vol-a"));
        let mut c = dr_ctl.clone();
        async move {
            let s = state_of(&mut c, "vol-a").await?;
            (s.mode == pb::Mode::Replicating as i32
                && s.dirty_bytes == 0
                && std::fs::read(&old_file).ok()? == std::fs::read(&dr_file).ok()?)
            .then_some(())
        }
    })
    .await;
    assert_eq!(
        read_file_at(&old_file, MIB, 65536),
        vec![0; 65536],
        "the old site's held write is discarded"
    );
}

/// The output of one `lockstep-replicator` command.
struct CliOutput {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

async fn cli(args: &[String]) -> CliOutput {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep-replicator"))
        .args(args)
        .output()
        .await
        .unwrap();
    CliOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
