//! The sidecar end to end against real parts: real HTTP to the test API server (path 1), real gRPC to a
//! test `Control` server on a loopback port (path 2), and a recording Replicator service on a unix
//! socket. Every wait polls with a generous deadline; nothing asserts on timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use lockstep_api::proto::control::v1 as cpb;
use lockstep_api::proto::replicator::v1 as rpb;

fn suspends_at(rep: &FakeReplicator, epoch: u64) -> Vec<Call> {
    rep.calls("suspend")
        .into_iter()
        .filter(|c| c.epoch == epoch)
        .collect()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

async fn enforced_in_status(
    client: &kube::Client,
    uid: &str,
    epoch: u64,
    stage: lockstep_api::domain::Stage,
    volumes: &[&str],
    fail_safe: bool,
) -> bool {
    replication_node(client).await.is_some_and(|n| {
        n.status.is_some_and(|s| {
            s.enforced.iter().any(|e| {
                e.group_uid == uid
                    && e.epoch == epoch
                    && e.stage == stage
                    && e.volume_handles == names(volumes)
                    && e.fail_safe == fail_safe
            })
        })
    })
}

async fn confirmed(rep: &FakeReplicator, volumes: &[&str]) {
    for v in volumes {
        let rep = rep.clone();
        let v = (*v).to_owned();
        eventually(&format!("{v} confirmed"), move || {
            rep.volume(&v).mode != rpb::Mode::Unconfirmed as i32
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_only_configuration_freezes_once_and_acknowledges_with_the_volume_list() {
    let rep = FakeReplicator::start(&["v1", "v2", "v3"]).await;
    let control = FakeControl::start().await;
    control.set_membership(
        "uid-g",
        0,
        cpb::Stage::Resume,
        &["v1", "v2", "vol-other-node"],
    );
    let mut options = options(&rep);
    options.no_api_path = true;
    options.operator_endpoint = Some(control.endpoint());
    options.insecure_plaintext_control = true;
    let sidecar = start(options, None).await;

    // Fail closed until a path spoke; then confirmed: v1, v2 in the group, v3 in none.
    confirmed(&rep, &["v1", "v2", "v3"]).await;
    assert_eq!(rep.volume("v1").group_uid, "uid-g");
    assert_eq!(rep.volume("v3").group_uid, "");
    eventually("subscribed", || control.subscribers() > 0).await;

    // Malformed directives are refused, never a panic.
    let _ = control.out.send(cpb::ControlMessage {
        kind: Some(cpb::control_message::Kind::Directive(cpb::Directive {
            target: Some(cpb::GroupEpoch {
                group_uid: "uid-g".into(),
                epoch: 9,
                stage: 0,
            }),
            group_name: GROUP.into(),
        })),
    });
    let _ = control.out.send(cpb::ControlMessage {
        kind: Some(cpb::control_message::Kind::Directive(cpb::Directive {
            target: None,
            group_name: GROUP.into(),
        })),
    });

    control.push("uid-g", 1, cpb::Stage::Freeze);
    control.push("uid-g", 1, cpb::Stage::Freeze);
    eventually("suspended at 1", || !suspends_at(&rep, 1).is_empty()).await;
    eventually("acknowledged over gRPC", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    // Stale and repeated directives, then a marker: everything before it was processed.
    control.push("uid-g", 0, cpb::Stage::Resume);
    control.push("uid-g", 1, cpb::Stage::Freeze);
    control.push("uid-g", 1, cpb::Stage::Release);
    eventually("released at 1", || !rep.calls("release").is_empty()).await;
    let suspends = suspends_at(&rep, 1);
    assert_eq!(suspends.len(), 1, "{suspends:?}");
    assert_eq!(suspends[0].volumes, names(&["v1", "v2"]));
    assert!(suspends_at(&rep, 9).is_empty());
    assert!(
        rep.calls("suspend")
            .iter()
            .all(|c| !c.volumes.contains(&"v3".to_owned()))
    );
    assert_eq!(rep.volume("v1").mode, rpb::Mode::Running as i32);

    // /healthz, /readyz, /metrics.
    let addr = sidecar.metrics_addr();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let body = http_get(addr, path).await;
        assert!(body.starts_with("HTTP/1.1 200"), "{path}: {body}");
        if path == "/metrics" {
            assert!(body.contains("lockstep_sidecar_directives_total"), "{body}");
            assert!(!body.contains("v1"), "metrics never carry a volume");
            // Volumes are counted under the group's name, not its UID.
            let named = format!("group=\"{GROUP}\"");
            assert!(
                body.lines()
                    .any(|l| l.starts_with("lockstep_sidecar_volumes") && l.contains(&named)),
                "{body}"
            );
            // A known group's fail-safe series exist before any fail-safe, at 0 (so alerts and
            // panels that name them find them).
            for series in [
                format!("lockstep_sidecar_fail_safe_in_force{{{named}}} 0"),
                format!(
                    "lockstep_sidecar_fail_safes_total{{{named},path=\"local\",state=\"taken\"}} 0"
                ),
            ] {
                assert!(body.contains(&series), "{series} in\n{body}");
            }
        }
    }
    sidecar.shutdown().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// How many directives the sidecar counted as stale (already enforced), summed over its series.
async fn stale_directives(sidecar: &lockstep_sidecar::Sidecar) -> u64 {
    http_get(sidecar.metrics_addr(), "/metrics")
        .await
        .lines()
        .filter(|l| {
            l.starts_with("lockstep_sidecar_directives_total") && l.contains("state=\"stale\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// How many replicator operations of a kind the sidecar counted as failed (after its retries).
async fn failed_replicator_calls(sidecar: &lockstep_sidecar::Sidecar, kind: &str) -> u64 {
    let series =
        format!("lockstep_sidecar_replicator_calls_total{{path=\"{kind}\",state=\"error\"}}");
    http_get(sidecar.metrics_addr(), "/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with(&series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The replicator operations of a burst of directives run together, yet an acknowledgement still waits
/// for its own volumes: with one group's suspend refused by the replicator, the other group frozen in
/// the same burst is acknowledged, the refused one is not, and it is once the replicator takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_suspend_withholds_only_its_own_groups_acknowledgement() {
    let rep = FakeReplicator::start(&["a1", "b1"]).await;
    let control = FakeControl::start().await;
    control.set_memberships(&[
        ("uid-a", 0, cpb::Stage::Resume, &["a1"]),
        ("uid-b", 0, cpb::Stage::Resume, &["b1"]),
    ]);
    let mut options = options(&rep);
    options.no_api_path = true;
    options.operator_endpoint = Some(control.endpoint());
    options.insecure_plaintext_control = true;
    let sidecar = start(options, None).await;
    confirmed(&rep, &["a1", "b1"]).await;

    rep.refuse_suspends(&["b1"]);
    control.push("uid-a", 1, cpb::Stage::Freeze);
    control.push("uid-b", 1, cpb::Stage::Freeze);
    eventually("group a's freeze acknowledged", || {
        control.acked(1, cpb::Stage::Freeze, &["a1"], false)
    })
    .await;
    // Twice: the first failure's outcome was published, and b1 re-learnt from the replicator's
    // listing and suspended again (refused again) before the check below.
    eventually_async("b1's suspend failed after its retries, twice", || async {
        failed_replicator_calls(&sidecar, "suspend").await >= 2
    })
    .await;
    let unacknowledged = rep.volume("b1");
    assert_ne!(unacknowledged.mode, rpb::Mode::Suspended as i32);
    assert!(
        !control.acked(1, cpb::Stage::Freeze, &["b1"], false),
        "b1 acknowledged though its suspend failed: {:?}",
        control.acks()
    );

    rep.refuse_suspends(&[]);
    eventually(
        "group b's freeze acknowledged once the replicator takes it",
        || control.acked(1, cpb::Stage::Freeze, &["b1"], false),
    )
    .await;
    assert_eq!(rep.volume("b1").mode, rpb::Mode::Suspended as i32);
    sidecar.shutdown().await;
}

/// The operator pushes a cluster's whole membership whenever any of its groups changes: hundreds of times
/// in a freeze of hundreds of groups. A group's entry repeated unchanged is not fed to the core again (each
/// input re-enforced every group); a changed one is, and its point is enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_membership_repeated_unchanged_is_not_fed_again_and_a_changed_one_is() {
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let control = FakeControl::start().await;
    control.set_membership("uid-g", 1, cpb::Stage::Freeze, &["v1", "v2"]);
    let mut options = options(&rep);
    options.no_api_path = true;
    options.operator_endpoint = Some(control.endpoint());
    options.insecure_plaintext_control = true;
    let sidecar = start(options, None).await;
    eventually("the membership's point acknowledged", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    // The operator's answer to that acknowledgement names the point just enforced, fed as a directive:
    // stale. Counted before the repeats.
    eventually_async("the acknowledgement's answer fed", || async {
        stale_directives(&sidecar).await >= 1
    })
    .await;
    let before = stale_directives(&sidecar).await;

    for _ in 0..5 {
        control.set_membership("uid-g", 1, cpb::Stage::Freeze, &["v1", "v2"]);
    }
    // Behind the repeats on the same stream: a changed entry, which moves the group on.
    control.set_membership("uid-g", 2, cpb::Stage::Freeze, &["v1", "v2"]);
    eventually("the changed membership's point acknowledged", || {
        control.acked(2, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    // At most one more stale directive: the answer to the epoch-2 acknowledgement (whether fed before
    // this read or after it). Fed again, the five repeats would each count one.
    let after = stale_directives(&sidecar).await;
    assert!(
        after <= before + 1,
        "the repeats were fed to the core again: {before} stale directives before them, {after} after"
    );
    assert!(
        rep.calls("suspend")
            .iter()
            .any(|c| c.epoch == 2 && c.volumes.len() == 2),
        "{:?}",
        rep.calls("suspend")
    );
    sidecar.shutdown().await;
}

/// A node of many volumes whose replicator announces every change (as the reference replicator does)
/// configures each volume once. Listings the replicator gave while the sidecar was configuring, read
/// after, said volumes were still unconfirmed and had them configured again — at thousands of volumes,
/// for ever (each configuration announced, each announcement listed again), and a failed copy waited
/// a minute behind the configurations to be reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_of_many_volumes_configures_each_once_while_its_replicator_announces_every_change() {
    let volumes: Vec<String> = (0..150).map(|i| format!("v{i:03}")).collect();
    let volumes: Vec<&str> = volumes.iter().map(String::as_str).collect();
    let rep = FakeReplicator::start(&volumes).await;
    rep.announce_changes();
    let control = FakeControl::start().await;
    control.set_membership("uid-g", 0, cpb::Stage::Resume, &volumes);
    let mut options = options(&rep);
    options.no_api_path = true;
    options.operator_endpoint = Some(control.endpoint());
    options.insecure_plaintext_control = true;
    let sidecar = start(options, None).await;
    confirmed(&rep, &volumes).await;
    // A freeze acknowledged for every volume: the inputs before it were processed.
    control.push("uid-g", 1, cpb::Stage::Freeze);
    eventually("the freeze acknowledged", || {
        control.acked(1, cpb::Stage::Freeze, &volumes, false)
    })
    .await;
    let mut configured: std::collections::BTreeMap<String, usize> = Default::default();
    for call in rep.calls("configure") {
        for volume in call.volumes {
            *configured.entry(volume).or_default() += 1;
        }
    }
    let again: Vec<(&String, &usize)> = configured.iter().filter(|(_, n)| **n > 1).collect();
    assert!(again.is_empty(), "configured more than once: {again:?}");
    assert_eq!(configured.len(), volumes.len());
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_only_configuration_freezes_once_and_acknowledges_in_the_node_status() {
    use lockstep_api::domain::Stage;
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let (_server, client) = api_server().await;
    let uid = create_group(&client, &["v1", "v2"]).await;
    let sidecar = start(options(&rep), Some(client.clone())).await;
    confirmed(&rep, &["v1", "v2"]).await;
    assert_eq!(rep.volume("v2").group_uid, uid);
    // The node's conditions name the generation they were written for, as kstatus and Argo CD read
    // Ready: the first, then the one after someone edits the spec.
    eventually_async("Ready naming generation 1", || {
        conditions_observed(&client, 1)
    })
    .await;
    let nodes: kube::Api<lockstep_api::v1alpha1::ReplicationNode> = kube::Api::all(client.clone());
    nodes
        .patch(
            NODE,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"cluster": "renamed"}})),
        )
        .await
        .unwrap();

    set_point(&client, 1, "Freeze").await;
    eventually("suspended at 1", || !suspends_at(&rep, 1).is_empty()).await;
    eventually_async("Ready naming generation 2", || {
        conditions_observed(&client, 2)
    })
    .await;
    eventually_async("enforced in status", || {
        enforced_in_status(&client, &uid, 1, Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    set_point(&client, 1, "Release").await;
    eventually("released", || !rep.calls("release").is_empty()).await;
    assert_eq!(suspends_at(&rep, 1).len(), 1);
    assert_eq!(suspends_at(&rep, 1)[0].volumes, names(&["v1", "v2"]));
    eventually_async("release in status", || {
        enforced_in_status(&client, &uid, 1, Stage::Release, &["v1", "v2"], false)
    })
    .await;
    // The node Lease exists in Lockstep's namespace.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client.clone(), "lockstep");
    eventually_async("lease", || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt(&format!("lockstep-sidecar-{NODE}"))
                .await
                .ok()
                .flatten()
                .is_some()
        }
    })
    .await;
    // The node status names each volume's claim, as the group's status resolved it.
    eventually_async("claims in the node status", || async {
        replication_node(&client).await.is_some_and(|n| {
            n.status.is_some_and(|s| {
                s.volume_count == 2
                    && s.volumes.iter().all(|v| {
                        v.pvc.as_ref().is_some_and(|claim| {
                            claim.namespace == "shop"
                                && claim.name == format!("pvc-{}", v.volume_handle)
                        })
                    })
            })
        })
    })
    .await;
    sidecar.shutdown().await;
}

/// Whether the node is at `generation` and its Ready and HoldTimedOut conditions both name it.
async fn conditions_observed(client: &kube::Client, generation: i64) -> bool {
    replication_node(client).await.is_some_and(|node| {
        let conditions = node.status.map(|s| s.conditions).unwrap_or_default();
        node.metadata.generation == Some(generation)
            && ["Ready", "HoldTimedOut"].iter().all(|type_| {
                conditions
                    .iter()
                    .any(|c| c.type_ == *type_ && c.observed_generation == Some(generation))
            })
    })
}

/// A sidecar on both paths: volumes v1 and v2 of a group replicating at epoch 0, confirmed, subscribed.
struct BothPaths {
    rep: FakeReplicator,
    _server: lockstep_testapi::TestApiServer,
    client: kube::Client,
    uid: String,
    control: FakeControl,
    sidecar: lockstep_sidecar::Sidecar,
}

async fn on_both_paths() -> BothPaths {
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let (server, client) = api_server().await;
    let uid = create_group(&client, &["v1", "v2"]).await;
    let control = FakeControl::start().await;
    control.set_membership(&uid, 0, cpb::Stage::Resume, &["v1", "v2"]);
    let mut options = options(&rep);
    options.operator_endpoint = Some(control.endpoint());
    options.insecure_plaintext_control = true;
    let sidecar = start(options, Some(client.clone())).await;
    confirmed(&rep, &["v1", "v2"]).await;
    eventually("subscribed", || control.subscribers() > 0).await;
    BothPaths {
        rep,
        _server: server,
        client,
        uid,
        control,
        sidecar,
    }
}

/// Both paths: a freeze delivered on both, in either order and duplicated, suspends once and is
/// acknowledged on both with the volume list.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_freeze_on_both_paths_in_either_order_suspends_once_and_is_acknowledged_on_both() {
    use lockstep_api::domain::Stage;
    let BothPaths {
        rep,
        _server,
        client,
        uid,
        control,
        sidecar,
    } = on_both_paths().await;

    // gRPC first, then the API path, then gRPC again.
    control.push(&uid, 1, cpb::Stage::Freeze);
    eventually("suspended at 1", || !suspends_at(&rep, 1).is_empty()).await;
    set_point(&client, 1, "Freeze").await;
    control.push(&uid, 1, cpb::Stage::Freeze);
    eventually("acked over gRPC", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    eventually_async("acked in status", || {
        enforced_in_status(&client, &uid, 1, Stage::Freeze, &["v1", "v2"], false)
    })
    .await;

    // The API path first, then gRPC twice.
    set_point(&client, 2, "Freeze").await;
    eventually("suspended at 2", || !suspends_at(&rep, 2).is_empty()).await;
    control.push(&uid, 2, cpb::Stage::Freeze);
    control.push(&uid, 2, cpb::Stage::Freeze);
    set_point(&client, 2, "Freeze").await;
    eventually("acked 2 over gRPC", || {
        control.acked(2, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    eventually_async("acked 2 in status", || {
        enforced_in_status(&client, &uid, 2, Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    // A marker on one path: everything before it on both paths was processed.
    control.push(&uid, 2, cpb::Stage::Release);
    eventually("released at 2", || !rep.calls("release").is_empty()).await;
    assert_eq!(suspends_at(&rep, 1).len(), 1, "{:?}", rep.all_calls());
    assert_eq!(suspends_at(&rep, 2).len(), 1, "{:?}", rep.all_calls());
    assert_eq!(suspends_at(&rep, 2)[0].volumes, names(&["v1", "v2"]));
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_link_is_reported_on_both_paths_naming_the_same_epoch_until_a_higher_one() {
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let (_server, client) = api_server().await;
    let uid = create_group(&client, &["v1", "v2"]).await;
    set_point(&client, 3, "Resume").await;
    let control = FakeControl::start().await;
    control.set_membership(&uid, 3, cpb::Stage::Resume, &["v1", "v2"]);
    let mut options = options(&rep);
    options.operator_endpoint = Some(control.endpoint());
    options.insecure_plaintext_control = true;
    let sidecar = start(options, Some(client.clone())).await;
    confirmed(&rep, &["v1", "v2"]).await;
    eventually("subscribed", || control.subscribers() > 0).await;
    // Wait for the sidecar to have taken in epoch 3 on both paths (its ack).
    eventually("acked 3", || {
        control.acked(3, cpb::Stage::Resume, &["v1", "v2"], false)
    })
    .await;

    rep.fail_copy("v1").await;
    eventually("reported over gRPC", || {
        control
            .reports()
            .iter()
            .any(|r| r.failures.iter().any(|f| f.volume_handle == "v1"))
    })
    .await;
    let grpc_epoch = control
        .reports()
        .iter()
        .flat_map(|r| r.failures.clone())
        .find(|f| f.volume_handle == "v1")
        .unwrap()
        .epoch_seen;
    eventually_async("reported in status", || async {
        replication_node(&client).await.is_some_and(|n| {
            n.status
                .is_some_and(|s| s.failures.iter().any(|f| f.volume_handle == "v1"))
        })
    })
    .await;
    let status = replication_node(&client).await.unwrap().status.unwrap();
    let api_failure = status
        .failures
        .iter()
        .find(|f| f.volume_handle == "v1")
        .unwrap();
    assert_eq!(api_failure.epoch_seen, grpc_epoch);
    assert_eq!(grpc_epoch, 3);
    assert_eq!(api_failure.group_uid, uid);

    // A higher epoch seen (here by the API path only) acknowledges the report on both.
    set_point(&client, 4, "Freeze").await;
    eventually_async("failure cleared from status", || async {
        replication_node(&client)
            .await
            .is_some_and(|n| n.status.is_some_and(|s| s.failures.is_empty()))
    })
    .await;
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_api_server_stopped_reports_and_freezes_flow_over_grpc() {
    use lockstep_api::domain::Stage;
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let (server, client) = api_server().await;
    let uid = create_group(&client, &["v1", "v2"]).await;
    let control = FakeControl::start().await;
    control.set_membership(&uid, 0, cpb::Stage::Resume, &["v1", "v2"]);
    let mut options = options(&rep);
    options.operator_endpoint = Some(control.endpoint());
    options.insecure_plaintext_control = true;
    let sidecar = start(options, Some(client.clone())).await;
    confirmed(&rep, &["v1", "v2"]).await;
    eventually("subscribed", || control.subscribers() > 0).await;

    stop_api_server(&server, &client).await;
    rep.fail_copy("v2").await;
    eventually("reported over gRPC", || {
        control.reports().iter().any(|r| {
            r.failures
                .iter()
                .any(|f| f.volume_handle == "v2" && f.epoch_seen == 0)
        })
    })
    .await;
    control.push(&uid, 1, cpb::Stage::Freeze);
    eventually("suspended at 1", || !suspends_at(&rep, 1).is_empty()).await;
    eventually("acked over gRPC", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    // The API path catches up when its server returns.
    server.restart().await.unwrap();
    eventually_async("enforced in status after restart", || {
        enforced_in_status(&client, &uid, 1, Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    assert_eq!(suspends_at(&rep, 1).len(), 1);
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_grpc_refused_reports_and_freezes_flow_over_the_api_server() {
    use lockstep_api::domain::Stage;
    let BothPaths {
        rep,
        _server,
        client,
        uid,
        control,
        sidecar,
    } = on_both_paths().await;

    control.stop();
    eventually("stream closed", || control.subscribers() == 0).await;
    rep.fail_copy("v1").await;
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
    set_point(&client, 1, "Freeze").await;
    eventually("suspended at 1", || !suspends_at(&rep, 1).is_empty()).await;
    eventually_async("enforced in status", || {
        enforced_in_status(&client, &uid, 1, Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    // gRPC catches up when the operator listens again.
    control.restart().await;
    eventually("acked over gRPC after restart", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    assert_eq!(suspends_at(&rep, 1).len(), 1);
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_both_paths_down_the_fail_safe_suspends_and_only_a_higher_epoch_lifts_it() {
    use lockstep_api::domain::Stage;
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let (server, client) = api_server().await;
    let uid = create_group(&client, &["v1", "v2"]).await;
    let control = FakeControl::start().await;
    control.set_membership(&uid, 0, cpb::Stage::Resume, &["v1", "v2"]);
    let mut options = options(&rep);
    options.operator_endpoint = Some(control.endpoint());
    options.insecure_plaintext_control = true;
    // Well below the group's 30 s hold timeout.
    options.fail_safe_interval = std::time::Duration::from_secs(2);
    let sidecar = start(options, Some(client.clone())).await;
    confirmed(&rep, &["v1", "v2"]).await;
    eventually("subscribed", || control.subscribers() > 0).await;

    stop_api_server(&server, &client).await;
    control.stop();
    rep.fail_copy("v1").await;
    eventually("fail-safe suspension", || {
        rep.calls("suspend").iter().any(|c| c.fail_safe)
    })
    .await;
    let taken: Vec<Call> = rep
        .calls("suspend")
        .into_iter()
        .filter(|c| c.fail_safe)
        .collect();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].epoch, 0, "at the epoch last seen");
    assert_eq!(taken[0].volumes, names(&["v1", "v2"]));
    assert!(rep.volume("v2").fail_safe);

    // Contact returns: the node says it suspended on its own, on both paths.
    server.restart().await.unwrap();
    control.restart().await;
    eventually("fail-safe acked over gRPC", || {
        control.acked(0, cpb::Stage::Freeze, &["v1", "v2"], true)
    })
    .await;
    eventually_async("fail-safe in status", || {
        enforced_in_status(&client, &uid, 0, Stage::Freeze, &["v1", "v2"], true)
    })
    .await;
    // Only a higher epoch lifts it.
    control.push(&uid, 1, cpb::Stage::Freeze);
    eventually("suspended at 1", || !suspends_at(&rep, 1).is_empty()).await;
    assert!(!rep.volume("v1").fail_safe);
    assert!(rep.calls("release").is_empty() && rep.calls("resume").is_empty());
    sidecar.shutdown().await;
}

/// The hold timeout each path last carried for a volume: (epoch, failed writes).
async fn hold_timeout_in_status(client: &kube::Client, volume: &str) -> Option<(u64, u64)> {
    let status = replication_node(client).await?.status?;
    let entry = status
        .volumes
        .into_iter()
        .find(|v| v.volume_handle == volume)?;
    entry.hold_timeout.map(|h| (h.epoch, h.failed_writes))
}

fn hold_timeout_reported(control: &FakeControl, volume: &str) -> Option<(u64, u64)> {
    control.reports().last().and_then(|r| {
        r.hold_timeouts
            .iter()
            .find(|h| h.volume_handle == volume)
            .map(|h| (h.epoch, h.failed_writes))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_writes_failed_at_the_hold_timeout_are_reported_on_both_paths_until_the_resume() {
    let BothPaths {
        rep,
        _server,
        client,
        uid,
        control,
        sidecar,
    } = on_both_paths().await;

    // Frozen at epoch 1 (FreezeAndStop: writes stay held), then held writes time out twice on v1.
    control.push(&uid, 1, cpb::Stage::Freeze);
    eventually("suspended at 1", || !suspends_at(&rep, 1).is_empty()).await;
    rep.time_out_holds("v1", 3).await;
    rep.time_out_holds("v1", 2).await;
    eventually("the running total reported over gRPC", || {
        hold_timeout_reported(&control, "v1") == Some((1, 5))
    })
    .await;
    eventually_async("the running total in the node status", || {
        let client = client.clone();
        async move { hold_timeout_in_status(&client, "v1").await == Some((1, 5)) }
    })
    .await;

    let node = replication_node(&client).await.unwrap().status.unwrap();
    let held = node
        .conditions
        .iter()
        .find(|c| c.type_ == "HoldTimedOut")
        .unwrap();
    assert_eq!(held.status, "True", "{held:?}");
    assert!(
        held.message.contains("v1 (5 at epoch 1)"),
        "{}",
        held.message
    );

    // A malformed event (no failed write) is refused; the next real one still counts.
    rep.time_out_holds("v2", 0).await;
    rep.time_out_holds("v1", 1).await;
    eventually_async("the next hold timeout in the node status", || {
        let client = client.clone();
        async move { hold_timeout_in_status(&client, "v1").await == Some((1, 6)) }
    })
    .await;
    // The two paths report independently: the gRPC report may follow the node status a moment later.
    eventually("the next hold timeout reported over gRPC", || {
        hold_timeout_reported(&control, "v1") == Some((1, 6))
    })
    .await;
    assert_eq!(hold_timeout_in_status(&client, "v2").await, None);
    assert_eq!(hold_timeout_reported(&control, "v2"), None);

    // The release keeps the record (it happened during epoch 1); the resume clears it.
    control.push(&uid, 1, cpb::Stage::Release);
    eventually("released", || !rep.calls("release").is_empty()).await;
    assert_eq!(hold_timeout_in_status(&client, "v1").await, Some((1, 6)));
    control.push(&uid, 1, cpb::Stage::Resume);
    eventually_async("cleared from the node status by the resume", || {
        let client = client.clone();
        async move {
            replication_node(&client).await.is_some_and(|n| {
                n.status.is_some_and(|s| {
                    s.volumes.iter().any(|v| {
                        v.volume_handle == "v1"
                            && v.epoch == 1
                            && v.stage == Some(lockstep_api::domain::Stage::Resume)
                    }) && s.volumes.iter().all(|v| v.hold_timeout.is_none())
                })
            })
        }
    })
    .await;
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_sidecar_keeps_a_frozen_groups_volumes_suspended() {
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let control = FakeControl::start().await;
    control.set_membership("uid-g", 0, cpb::Stage::Resume, &["v1", "v2"]);
    let mut opts = options(&rep);
    opts.no_api_path = true;
    opts.operator_endpoint = Some(control.endpoint());
    opts.insecure_plaintext_control = true;
    let sidecar = start(opts.clone(), None).await;
    confirmed(&rep, &["v1", "v2"]).await;
    eventually("subscribed", || control.subscribers() > 0).await;
    control.push("uid-g", 1, cpb::Stage::Freeze);
    eventually("acked", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    control.set_membership("uid-g", 1, cpb::Stage::Freeze, &["v1", "v2"]);

    // The replicator restarts under a running sidecar: its volumes wait for a confirmation, which the
    // sidecar gives at what they carry, without moving them.
    let configures = rep.calls("configure").len();
    rep.unconfirm_all();
    confirmed(&rep, &["v1", "v2"]).await;
    let again: Vec<Call> = rep.calls("configure")[configures..].to_vec();
    assert!(
        again
            .iter()
            .all(|c| c.epoch == 1 && c.stage == rpb::Stage::Freeze as i32),
        "{again:?}"
    );
    sidecar.abort();

    // The replicator restarted too: its volumes carry (1, Freeze) and hold I/O until confirmed.
    rep.unconfirm_all();
    let before = rep.all_calls().len();
    let sidecar = start(opts, None).await;
    confirmed(&rep, &["v1", "v2"]).await;
    eventually("acked again", || {
        control
            .acks()
            .iter()
            .filter(|a| a.enforced.as_ref().is_some_and(|e| e.epoch == 1))
            .count()
            >= 2
    })
    .await;
    let after: Vec<Call> = rep.all_calls()[before..].to_vec();
    assert!(
        after
            .iter()
            .all(|c| c.kind == "configure" && c.epoch == 1 && c.stage == rpb::Stage::Freeze as i32),
        "{after:?}"
    );
    for v in ["v1", "v2"] {
        assert_eq!(rep.volume(v).mode, rpb::Mode::Suspended as i32);
    }
    // The new subscription told the operator what the node had seen (rule 8).
    let last = control
        .state
        .subscribes
        .lock()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert!(last.seen.iter().any(|s| s.epoch == 1), "{last:?}");
    sidecar.shutdown().await;
}

/// A gRPC-only cluster: the operator names PVCs only; the sidecar resolves them through its own API
/// server, reports which it serves, and freezes from the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_only_cluster_resolves_named_pvcs_itself_and_freezes_from_the_stream() {
    let rep = FakeReplicator::start(&["v1", "v2"]).await;
    let (_server, client) = api_server().await;
    // v3 is another node's volume: resolvable, but not served here.
    create_claims(&client, &["v1", "v2", "v3"]).await;
    let control = FakeControl::start().await;
    control.set_membership_by_pvc("uid-edge", 0, cpb::Stage::Resume, &["v1", "v2", "v3"]);
    let mut options = options(&rep);
    options.no_api_path = true;
    options.operator_endpoint = Some(control.endpoint());
    options.insecure_plaintext_control = true;
    let sidecar = start(options, Some(client.clone())).await;
    confirmed(&rep, &["v1", "v2"]).await;
    assert_eq!(rep.volume("v1").group_uid, "uid-edge");
    eventually("resolved volumes reported", || {
        control.reports().iter().any(|r| {
            let mut handles: Vec<&str> =
                r.volumes.iter().map(|v| v.volume_handle.as_str()).collect();
            handles.sort();
            handles == ["v1", "v2"]
                && r.volumes
                    .iter()
                    .all(|v| v.persistent_volume.starts_with("pv-") && v.namespace == "shop")
        })
    })
    .await;
    control.push("uid-edge", 1, cpb::Stage::Freeze);
    eventually("suspended at 1", || !suspends_at(&rep, 1).is_empty()).await;
    eventually("acked", || {
        control.acked(1, cpb::Stage::Freeze, &["v1", "v2"], false)
    })
    .await;
    // Path 1 is off: no ReplicationNode is written.
    assert!(replication_node(&client).await.is_none());
    sidecar.shutdown().await;
}
