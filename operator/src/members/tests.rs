//! Tests of the resolution of members to volumes and nodes; the claim order between groups is in
//! [`claims`].

use k8s_openapi::{
    api::core::v1::{CSIPersistentVolumeSource, PersistentVolumeClaimSpec, PersistentVolumeSpec},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use lockstep_api::{
    domain::{Path, Stage},
    v1alpha1::Acknowledgement,
};

use super::*;

mod claims;

fn claim(namespace: &str, name: &str, app: &str, pv: Option<&str>) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            volume_name: pv.map(Into::into),
            ..Default::default()
        }),
        status: None,
    }
}

fn pv(name: &str, handle: &str) -> PersistentVolume {
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            csi: Some(CSIPersistentVolumeSource {
                driver: "nbd.lockstep.dev".into(),
                volume_handle: handle.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

fn east() -> ClusterView {
    ClusterView {
        claims: [
            claim("orders", "wal", "orders", Some("pv-wal")),
            claim("orders", "data", "orders", Some("pv-data")),
            claim("orders", "scratch", "other", Some("pv-scratch")),
            claim("billing", "ledger", "orders", Some("pv-ledger")),
        ]
        .map(Arc::new)
        .into(),
        volumes: [
            pv("pv-wal", "vol-wal"),
            pv("pv-data", "vol-data"),
            pv("pv-scratch", "vol-scratch"),
        ]
        .map(Arc::new)
        .into(),
        node_of_volume: BTreeMap::from([
            ("vol-wal".to_owned(), "node-a".to_owned()),
            ("vol-data".to_owned(), "node-b".to_owned()),
        ]),
        ..ClusterView::default()
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

fn handles(resolution: &Resolution) -> Vec<(String, Option<String>, Option<String>)> {
    resolution
        .members
        .iter()
        .map(|member| {
            (
                member.pvc.clone(),
                member.volume_handle.clone(),
                member.node.clone(),
            )
        })
        .collect()
}

#[test]
fn named_and_selected_claims_resolve_to_volumes_and_nodes() {
    let clusters = BTreeMap::from([("east".to_owned(), east())]);
    let resolution = resolve(
        &[by_label("east", "orders")],
        &clusters,
        &[],
        &BTreeMap::new(),
    );
    assert!(resolution.resolved, "{:?}", resolution.problems);
    assert_eq!(
        handles(&resolution),
        vec![
            (
                "data".into(),
                Some("vol-data".into()),
                Some("node-b".into())
            ),
            ("wal".into(), Some("vol-wal".into()), Some("node-a".into())),
        ],
        "the selector matches within the member's namespace only"
    );
    let by_name = resolve(
        &[by_names("east", &["wal"])],
        &clusters,
        &[],
        &BTreeMap::new(),
    );
    assert_eq!(
        by_name.members[0].persistent_volume.as_deref(),
        Some("pv-wal")
    );
}

#[test]
fn a_selector_change_adds_and_removes_members() {
    let mut view = east();
    let clusters = BTreeMap::from([("east".to_owned(), view.clone())]);
    let before = resolve(
        &[by_label("east", "orders")],
        &clusters,
        &[],
        &BTreeMap::new(),
    );
    assert_eq!(before.members.len(), 2);
    view.node_of_volume
        .insert("vol-scratch".into(), "node-c".into());
    let clusters = BTreeMap::from([("east".to_owned(), view)]);
    let after = resolve(
        &[by_label("east", "other")],
        &clusters,
        &before.members,
        &BTreeMap::new(),
    );
    assert_eq!(
        handles(&after),
        vec![(
            "scratch".into(),
            Some("vol-scratch".into()),
            Some("node-c".into())
        )]
    );
}

#[test]
fn grpc_only_clusters_resolve_from_sidecar_reports() {
    let edge = ClusterView {
        paths: ClusterPaths::GrpcOnly,
        unavailable: Some("GrpcOnly: no API server path".into()),
        reported: vec![ReportedVolume {
            namespace: "orders".into(),
            pvc: "wal".into(),
            persistent_volume: "pv-edge-wal".into(),
            volume_handle: "vol-edge-wal".into(),
            node: "edge-node".into(),
        }],
        ..ClusterView::default()
    };
    let clusters = BTreeMap::from([("edge".to_owned(), edge)]);
    let resolution = resolve(
        &[by_names("edge", &["wal"])],
        &clusters,
        &[],
        &BTreeMap::new(),
    );
    assert!(resolution.resolved, "{:?}", resolution.problems);
    assert_eq!(
        handles(&resolution),
        vec![(
            "wal".into(),
            Some("vol-edge-wal".into()),
            Some("edge-node".into())
        )]
    );

    let selected = resolve(
        &[by_label("edge", "orders")],
        &clusters,
        &[],
        &BTreeMap::new(),
    );
    assert!(!selected.resolved);
    assert!(
        selected.problems[0].contains("GrpcOnly"),
        "{:?}",
        selected.problems
    );
}

#[test]
fn unknown_clusters_unbound_claims_and_nodeless_volumes_are_named() {
    let mut view = east();
    view.node_of_volume.clear();
    let clusters = BTreeMap::from([("east".to_owned(), view)]);
    let resolution = resolve(
        &[
            by_names("east", &["wal", "missing"]),
            by_names("mars", &["wal"]),
        ],
        &clusters,
        &[],
        &BTreeMap::new(),
    );
    assert!(!resolution.resolved);
    let text = resolution.problems.join("\n");
    assert!(text.contains("served by no node"), "{text}");
    assert!(
        text.contains("east/orders/missing does not exist"),
        "{text}"
    );
    assert!(
        text.contains("\"mars\" is not a known MemberCluster"),
        "{text}"
    );
}

#[test]
fn a_missing_claim_is_told_apart_from_an_unbound_one() {
    let mut view = east();
    view.claims
        .push(Arc::new(claim("orders", "pending", "orders", None)));
    let clusters = BTreeMap::from([("east".to_owned(), view)]);
    let resolution = resolve(
        &[by_names("east", &["wal", "missing", "pending"])],
        &clusters,
        &[],
        &BTreeMap::new(),
    );
    let text = resolution.problems.join("\n");
    assert!(
        text.contains("PersistentVolumeClaim east/orders/missing does not exist"),
        "{text}"
    );
    assert!(
        text.contains("east/orders/pending is not bound to a CSI volume yet"),
        "{text}"
    );
    assert!(!text.contains("missing is not bound"), "{text}");
}

#[test]
fn a_selector_with_an_unknown_operator_names_it() {
    let clusters = BTreeMap::from([("east".to_owned(), east())]);
    let mut member = by_label("east", "orders");
    member.selector = Some(LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "app".into(),
                operator: "Equals".into(),
                values: Some(vec!["orders".into()]),
            },
        ]),
    });
    let resolution = resolve(&[member], &clusters, &[], &BTreeMap::new());
    let text = resolution.problems.join("\n");
    assert!(
        text.contains(
            "unknown operator \"Equals\" for key \"app\" (In, NotIn, Exists or DoesNotExist)"
        ),
        "{text}"
    );
}

#[test]
fn an_unreadable_api_server_keeps_what_was_resolved() {
    let clusters = BTreeMap::from([("east".to_owned(), east())]);
    let before = resolve(
        &[by_names("east", &["wal", "data"])],
        &clusters,
        &[],
        &BTreeMap::new(),
    );
    assert!(before.resolved);
    let down = ClusterView {
        unavailable: Some("did not answer".into()),
        ..ClusterView::default()
    };
    let clusters = BTreeMap::from([("east".to_owned(), down)]);
    let during = resolve(
        &[by_names("east", &["wal", "data"])],
        &clusters,
        &before.members,
        &BTreeMap::new(),
    );
    assert!(during.resolved, "{:?}", during.problems);
    assert!(
        during.stale[0].contains("did not answer"),
        "{:?}",
        during.stale
    );
    assert_eq!(during.members, before.members);
    let new_claim = resolve(
        &[by_names("east", &["wal", "data", "new"])],
        &clusters,
        &before.members,
        &BTreeMap::new(),
    );
    assert!(
        !new_claim.resolved,
        "a claim never resolved cannot be resolved while the API server is down"
    );
}

fn edge_view(reported: Vec<ReportedVolume>) -> BTreeMap<String, ClusterView> {
    let edge = ClusterView {
        paths: ClusterPaths::GrpcOnly,
        unavailable: Some("GrpcOnly: no API server path".into()),
        reported,
        ..ClusterView::default()
    };
    BTreeMap::from([("edge".to_owned(), edge)])
}

fn edge_volume(pvc: &str, node: &str) -> ReportedVolume {
    ReportedVolume {
        namespace: "orders".into(),
        pvc: pvc.into(),
        persistent_volume: format!("pv-edge-{pvc}"),
        volume_handle: format!("vol-edge-{pvc}"),
        node: node.into(),
    }
}

#[test]
fn a_grpc_only_member_keeps_its_last_resolution_until_its_node_reports_again() {
    let spec = [by_names("edge", &["wal", "data"])];
    let (wal, data) = (edge_volume("wal", "edge-1"), edge_volume("data", "edge-2"));
    let before = resolve(
        &spec,
        &edge_view(vec![wal.clone(), data.clone()]),
        &[],
        &BTreeMap::new(),
    );
    assert!(before.resolved, "{:?}", before.problems);
    let mut previous = before.members;
    for member in &mut previous {
        member.acknowledged = Some(Acknowledgement {
            epoch: 1,
            stage: Stage::Freeze,
            path: Path::Grpc,
            fail_safe: false,
            at: None,
        });
    }

    // A restarted operator, before any sidecar of the cluster subscribed again.
    let restarted = resolve(&spec, &edge_view(vec![]), &previous, &BTreeMap::new());
    assert!(restarted.resolved, "{:?}", restarted.problems);
    assert_eq!(restarted.members, previous, "acknowledgements kept");
    assert!(
        restarted.stale.join("; ").contains("kept as last resolved"),
        "{:?}",
        restarted.stale
    );

    // edge-2 subscribed again, edge-1 not yet: wal stays as last resolved.
    let partly = resolve(
        &spec,
        &edge_view(vec![data.clone()]),
        &previous,
        &BTreeMap::new(),
    );
    assert!(partly.resolved, "{:?}", partly.problems);
    assert_eq!(partly.members, previous);
    assert!(
        partly.stale.join("; ").contains("edge-1"),
        "{:?}",
        partly.stale
    );

    // edge-1 reports again, without wal: it no longer serves it, so wal is unresolved.
    let moved = resolve(
        &spec,
        &edge_view(vec![data, edge_volume("scratch", "edge-1")]),
        &previous,
        &BTreeMap::new(),
    );
    assert!(!moved.resolved);
    let wal = moved
        .members
        .iter()
        .find(|member| member.pvc == "wal")
        .unwrap();
    assert_eq!(wal.volume_handle, None);
    assert!(moved.stale.is_empty(), "{:?}", moved.stale);
}

#[test]
fn a_volume_claimed_by_another_group_is_refused() {
    let clusters = BTreeMap::from([("east".to_owned(), east())]);
    let other = BTreeMap::from([(
        ("east".to_owned(), "vol-wal".to_owned()),
        "payments".to_owned(),
    )]);
    let resolution = resolve(
        &[by_names("east", &["wal", "data"])],
        &clusters,
        &[],
        &other,
    );
    assert!(!resolution.resolved);
    assert!(
        resolution.problems[0].contains("already belongs to group \"payments\""),
        "{:?}",
        resolution.problems
    );
    let wal = resolution
        .members
        .iter()
        .find(|member| member.pvc == "wal")
        .unwrap();
    assert_eq!(wal.volume_handle, None, "the refused volume is not counted");
}

#[test]
fn acknowledgements_survive_a_new_resolution() {
    let clusters = BTreeMap::from([("east".to_owned(), east())]);
    let mut first = resolve(
        &[by_names("east", &["wal"])],
        &clusters,
        &[],
        &BTreeMap::new(),
    );
    first.members[0].acknowledged = Some(Acknowledgement {
        epoch: 2,
        stage: Stage::Freeze,
        path: Path::Grpc,
        fail_safe: false,
        at: None,
    });
    first.members[0].image_epoch = Some(2);
    let again = resolve(
        &[by_names("east", &["wal", "data"])],
        &clusters,
        &first.members,
        &BTreeMap::new(),
    );
    let acknowledged = |pvc: &str| {
        again
            .members
            .iter()
            .find(|member| member.pvc == pvc)
            .and_then(|member| member.acknowledged.clone())
    };
    assert_eq!(acknowledged("wal"), first.members[0].acknowledged);
    assert_eq!(acknowledged("data"), None);
    let image_epoch = |pvc: &str| {
        again
            .members
            .iter()
            .find(|member| member.pvc == pvc)
            .and_then(|member| member.image_epoch)
    };
    assert_eq!(image_epoch("wal"), Some(2), "still in the image of epoch 2");
    assert_eq!(image_epoch("data"), None);
}

#[test]
fn an_acknowledgement_stays_with_its_own_cluster_s_volume() {
    let clusters = BTreeMap::from([("east".to_owned(), east()), ("west".to_owned(), east())]);
    let mut first = resolve(
        &[by_names("west", &["wal"])],
        &clusters,
        &[],
        &BTreeMap::new(),
    );
    first.members[0].acknowledged = Some(Acknowledgement {
        epoch: 2,
        stage: Stage::Freeze,
        path: Path::Grpc,
        fail_safe: false,
        at: None,
    });
    // East's wal has the same volume handle as west's: it is another volume.
    let again = resolve(
        &[by_names("east", &["wal"]), by_names("west", &["wal"])],
        &clusters,
        &first.members,
        &BTreeMap::new(),
    );
    let acknowledged = |cluster: &str| {
        again
            .members
            .iter()
            .find(|member| member.cluster == cluster)
            .and_then(|member| member.acknowledged.clone())
    };
    assert_eq!(acknowledged("east"), None);
    assert_eq!(acknowledged("west"), first.members[0].acknowledged);
}

/// Selectors narrowed by their rarest required label select exactly what the whole selector selects:
/// matchLabels, `In` with one value, several labels, and selectors that require no label at all.
#[test]
fn selectors_select_the_same_claims_through_the_label_index() {
    let mut view = east();
    let tier = |claim: &mut PersistentVolumeClaim, tier: &str| {
        if let Some(labels) = claim.metadata.labels.as_mut() {
            labels.insert("tier".to_owned(), tier.to_owned());
        }
    };
    tier(Arc::make_mut(&mut view.claims[0]), "log");
    tier(Arc::make_mut(&mut view.claims[1]), "data");
    tier(Arc::make_mut(&mut view.claims[2]), "log");
    // Indexed once when read (as the operator does), or by each resolution (a view built by hand).
    let indexed = BTreeMap::from([("east".to_owned(), view.clone().indexed())]);
    let clusters = BTreeMap::from([("east".to_owned(), view)]);
    let requirement = |key: &str, operator: &str, values: &[&str]| {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        }
    };
    let selected = |labels: &[(&str, &str)], expressions: Vec<_>| {
        let mut member = by_label("east", "unused");
        member.selector = Some(LabelSelector {
            match_labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            match_expressions: Some(expressions),
        });
        let resolution = resolve(&[member.clone()], &clusters, &[], &BTreeMap::new());
        let through_index = resolve(&[member], &indexed, &[], &BTreeMap::new());
        assert_eq!(handles(&resolution), handles(&through_index));
        let mut pvcs: Vec<String> = resolution.members.iter().map(|m| m.pvc.clone()).collect();
        pvcs.sort();
        pvcs
    };
    assert_eq!(selected(&[("app", "orders")], vec![]), ["data", "wal"]);
    assert_eq!(
        selected(&[("app", "orders"), ("tier", "log")], vec![]),
        ["wal"]
    );
    assert_eq!(
        selected(&[], vec![requirement("tier", "In", &["log"])]),
        ["scratch", "wal"]
    );
    assert_eq!(
        selected(
            &[("tier", "log")],
            vec![requirement("app", "NotIn", &["other"])]
        ),
        ["wal"]
    );
    assert_eq!(
        selected(&[], vec![requirement("tier", "In", &["log", "data"])]),
        ["data", "scratch", "wal"]
    );
    assert_eq!(
        selected(&[], vec![requirement("tier", "Exists", &[])]),
        ["data", "scratch", "wal"]
    );
    assert_eq!(selected(&[("app", "nobody")], vec![]), Vec::<String>::new());
}
