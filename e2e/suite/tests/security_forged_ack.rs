//! Issue 27, the attack as a test. The gRPC Control path is secure (TLS, every sidecar authenticated by
//! its node's ServiceAccount token). West is a gRPC-only member whose node is cut off from the
//! operator; east's copy fails and the group freezes, waiting for west. Acknowledgements of every handle
//! at the new epoch are forged — with no credential, with east's valid identity speaking for west's
//! node, with east's identity naming west's volume, with a key no MemberCluster lists, and over
//! plaintext: each is refused, and the group does not release (on the old path one forged `Ack` was
//! answered with a Release within 48 ms and the checker found 9 262 gaps). The operator's certificate is
//! then rotated on disk to a new CA (the sidecars' bundle first holds both): once west's node is back,
//! its sidecar's new connection gets the new certificate, west suspends and acknowledges, and only then
//! is the group released. The consistency checker passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
use common::{all_handles, finish, image, start};

use std::time::{Duration, Instant};

use lockstep_api::domain::{Phase, Policy, Stage};
use lockstep_api::proto::control::v1::{
    AckRequest, GroupEpoch, NodeIdentity, Stage as ProtoStage, control_client::ControlClient,
};
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_e2e::faults::LinkCutMode;
use lockstep_e2e::scenario::{Harness, Setup, suspended_at};
use lockstep_operator::identity::TokenSigner;
use tonic::Code;

/// Puts a bearer token on every call (none when `None`).
#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        Ok(request)
    }
}

/// A forger's Control client: TLS trusting `ca_file` (it can reach the Service like anyone), presenting
/// `token`.
async fn forger(
    h: &Harness,
    ca_file: &std::path::Path,
    token: Option<String>,
) -> ControlClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>
{
    let addr = h.grpc_addr().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(lockstep_sidecar::tls::TlsConnector::new(ca_file, None))
        .await
        .unwrap();
    ControlClient::with_interceptor(channel, Bearer(token))
}

fn forged_ack(cluster: &str, node: &str, point: &GroupEpoch, handles: &[String]) -> AckRequest {
    AckRequest {
        node: Some(NodeIdentity {
            cluster: cluster.into(),
            node: node.into(),
        }),
        enforced: Some(point.clone()),
        volume_handles: handles.to_vec(),
        fail_safe: false,
    }
}

/// What the group's status records west's node acknowledged for all its volumes.
fn west_acknowledged(group: &ConsistencyGroup) -> Option<(u64, Stage)> {
    let ack = group
        .status
        .as_ref()?
        .node_acknowledgements
        .iter()
        .find(|n| n.cluster == "west")?;
    Some((ack.epoch, ack.stage))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_acknowledgements_never_release_a_group_before_its_member_suspended() {
    let began = Instant::now();
    let mut setup = Setup::new(Policy::FreezeAndGo).unwrap();
    setup.secure = true;
    setup.grpc_only = vec!["west".into()];
    setup.proxied = vec!["west".into()];
    setup.world.group.spec.hold_timeout = "120s".into();
    let mut h = start(setup).await;
    let west_node = h.cluster("west").unwrap().spec.node.clone();
    let east_node = h.cluster("east").unwrap().spec.node.clone();
    let west_handle = h.handle("west-reporting").unwrap();

    // West's node cannot reach the operator; east's copy fails and the group freezes, waiting for west.
    h.isolate("west", true).unwrap();
    h.cut(&["east-postgres-wal"], LinkCutMode::Reset).unwrap();
    ok!(h, h.wait_for_copy_failure());
    let group = ok!(
        h,
        h.wait_group("freezing at epoch 1, east suspended", |g| g.position()
            == (1, Stage::Freeze))
    );
    for volume in ["east-postgres-wal", "east-postgres-data"] {
        ok!(
            h,
            h.wait_volume(volume, "suspended at epoch 1", |s| suspended_at(s, 1))
        );
    }
    let point = GroupEpoch {
        group_uid: group.metadata.uid.clone().unwrap(),
        epoch: 1,
        stage: ProtoStage::Freeze as i32,
    };
    let handles = all_handles(&h);
    let credentials = h.credentials().unwrap();
    let ca_file = credentials.ca_file();

    // The forgeries, each answered at once.
    let refused = forger(&h, &ca_file, None)
        .await
        .ack(forged_ack("west", &west_node, &point, &handles))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    h.timeline.say(format!(
        "forged Ack without a credential: {}",
        refused.code()
    ));
    let east_token = credentials.token("east", &east_node).unwrap();
    let refused = forger(&h, &ca_file, Some(east_token.clone()))
        .await
        .ack(forged_ack("west", &west_node, &point, &handles))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    h.timeline.say(format!(
        "forged Ack as west's node with east's valid token: {}",
        refused.code()
    ));
    let answer = forger(&h, &ca_file, Some(east_token))
        .await
        .ack(forged_ack("east", &east_node, &point, &handles))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.applied, "{answer:?}");
    assert!(answer.reason.contains(&west_handle), "{answer:?}");
    h.timeline.say(format!(
        "forged Ack of west's volume as east's node: not applied ({})",
        answer.reason
    ));
    let stranger = TokenSigner::generate().unwrap();
    let stranger_token = stranger
        .pod_token(
            "lockstep.dev/control",
            "lockstep",
            "lockstep-sidecar",
            "lockstep-sidecar-x",
            &west_node,
            k8s_openapi::jiff::Timestamp::now().as_second(),
            600,
        )
        .unwrap();
    let refused = forger(&h, &ca_file, Some(stranger_token))
        .await
        .ack(forged_ack("west", &west_node, &point, &handles))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let plaintext =
        tonic::transport::Endpoint::from_shared(format!("http://{}", h.grpc_addr().unwrap()))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
    let refused = ControlClient::new(plaintext)
        .ack(forged_ack("west", &west_node, &point, &handles))
        .await
        .unwrap_err();
    assert_ne!(refused.code(), Code::Ok);
    h.timeline.say(format!(
        "forged Ack with an unknown key and over plaintext: refused ({})",
        refused.code()
    ));

    // Every forgery was answered, so decided: the group still waits for west, whose volume still
    // replicates (a release now would let a dependent write reach its secondary).
    let group = ok!(h, h.wait_group("still freezing", |_| true));
    assert_eq!(
        group.position(),
        (1, Stage::Freeze),
        "{}",
        h.timeline.text()
    );
    assert_ne!(
        group.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Running)
    );
    assert_ne!(west_acknowledged(&group), Some((1, Stage::Freeze)));
    let west = h.volume_status(&west_handle).unwrap();
    assert!(!suspended_at(&west, 1), "{west:?}");

    // The operator's certificate is rotated on disk to a new CA; new connections get it at once.
    let only_new = h.credentials_mut().unwrap().rotate().unwrap();
    h.timeline
        .say("operator certificate rotated on disk to a new CA (the sidecars' bundle holds both)");
    let mut rotated = forger(&h, &only_new, None).await;
    let refused = rotated
        .ack(forged_ack("west", &west_node, &point, &handles))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // West's node is back: its sidecar's new connection verifies the new certificate, hears the
    // freeze, suspends and acknowledges; only then is the group released.
    h.isolate("west", false).unwrap();
    ok!(
        h,
        h.wait_group("west acknowledged epoch 1, released", |g| {
            west_acknowledged(g).is_some_and(|ack| ack >= (1, Stage::Freeze))
                && g.position() >= (1, Stage::Release)
        })
    );
    ok!(
        h,
        h.wait_volume("west-reporting", "released at epoch 1", |s| s
            .replication
            .epoch
            >= 1)
    );

    // The image of epoch 1 holds every volume, west's included; then resynced and replicating again,
    // and the checker passes on the secondaries.
    let every = all_handles(&h);
    let released = h
        .wait_group("the image of epoch 1 holding every volume", |g| {
            image(g) == every
        })
        .await;
    let released = match released {
        Ok(group) => group,
        Err(_) => ok!(h, h.wait_group("the image of epoch 1", |_| true)),
    };
    assert_eq!(
        image(&released),
        every,
        "{}\n{}",
        serde_json::to_string_pretty(&released.status).unwrap_or_default(),
        h.timeline.text()
    );
    let outcome = finish(h).await;
    assert!(outcome.holds());
    eprintln!(
        "security_forged_ack: {:.1} s",
        began.elapsed().as_secs_f64()
    );
}
