//! Resolution of a group's members, pure: the spec's (cluster, namespace, PVC names or selector) + what
//! each member cluster shows → member volumes (cluster, namespace, PVC, PV, volume handle, node) and the
//! MembersResolved condition.
//!
//! Each cluster is seen through a [`ClusterView`]: its PVCs and PVs (API path) or the volumes its
//! sidecars reported over gRPC (gRPC-only clusters), plus the node serving each volume. A volume belongs
//! to at most one group (DESIGN.md rule 5): a volume another group already claims is refused here and
//! named in the condition. Acknowledgements already recorded for a volume are kept across resolutions, and
//! a member whose cluster cannot be read (an API server down; a gRPC-only cluster whose sidecars have not
//! reported to this operator since it started) keeps its last resolution.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::core::{Selector, SelectorExt};
use lockstep_api::{
    domain::{ClaimOrder, ClusterPaths, Stage, VolumeState},
    v1alpha1::{GroupMember, MemberVolumeStatus},
};

/// Volumes other groups hold, by (member cluster, volume handle), with the name of the group holding each.
pub type Claims = BTreeMap<(String, String), String>;

/// What the operator currently knows of one member cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Which paths reach it.
    pub paths: ClusterPaths,
    /// Why the cluster cannot be read through its API server, when it cannot (unreachable, bad
    /// kubeconfig, no MemberCluster of that name).
    pub unavailable: Option<String>,
    /// Its PersistentVolumeClaims (API path).
    pub claims: Vec<PersistentVolumeClaim>,
    /// Its PersistentVolumes (API path).
    pub volumes: Vec<PersistentVolume>,
    /// Volumes its sidecars resolved and reported (gRPC-only clusters, or any cluster's sidecars).
    pub reported: Vec<ReportedVolume>,
    /// The node serving each volume handle as its sidecar says (ReplicationNode status or its gRPC
    /// session): a claim the node itself makes, taken only when no binding below says otherwise and no
    /// other node claims the same handle.
    pub node_of_volume: BTreeMap<String, String>,
    /// The node each volume is bound to by a source no node can write: the PersistentVolume's node
    /// affinity (`kubernetes.io/hostname`) or an attached VolumeAttachment. It overrides every claim.
    pub bound_node_of_volume: BTreeMap<String, String>,
    /// Handles that several nodes claim, with the nodes: unresolved (so they block a release) unless
    /// bound above. A compromised node can make a volume contested — delaying a release — but cannot
    /// take a volume over.
    pub contested: BTreeMap<String, BTreeSet<String>>,
    /// Each volume's replication state as a sidecar last reported it (ReplicationNode status or its gRPC
    /// session), by (volume handle, reporting node): only the volume's resolved node's report counts.
    pub state_of_volume: BTreeMap<(String, String), ReportedState>,
    /// True when a volume's node may come only from [`Self::bound_node_of_volume`] (the cluster is read
    /// through its API server and its MemberCluster's `volumeBinding` is Required).
    pub binding_required: bool,
    /// Nodes whose sidecar Lease expired (their sidecar is not renewing it).
    pub silent_nodes: BTreeSet<String>,
}

/// A volume's replication state as one node's sidecar reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedState {
    /// The volume's replication state.
    pub state: VolumeState,
    /// The epoch the volume was at when reported.
    pub epoch: u64,
    /// The stage the volume was at when reported.
    pub stage: Stage,
}

/// A volume a sidecar resolved on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedVolume {
    /// The PVC's namespace.
    pub namespace: String,
    /// The PVC's name.
    pub pvc: String,
    /// The bound PV.
    pub persistent_volume: String,
    /// The CSI volume handle.
    pub volume_handle: String,
    /// The node whose sidecar reported it.
    pub node: String,
}

/// The outcome of resolving a group's members.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    /// Every member volume, resolved as far as possible.
    pub members: Vec<MemberVolumeStatus>,
    /// True when every member in the spec resolved to volumes with a handle and a node.
    pub resolved: bool,
    /// Why not, in sentences (empty when resolved).
    pub problems: Vec<String>,
    /// Members kept as last resolved because their cluster could not be read (an API server down, or a
    /// gRPC-only cluster whose sidecars have not reported to this operator yet).
    pub stale: Vec<String>,
    /// Claims refused because another group holds the volume, in sentences naming that group (also in
    /// `problems`).
    pub refused: Vec<String>,
}

/// Resolves the spec's members against the clusters' views.
///
/// `previous` carries acknowledgements and states forward by volume handle; `claimed_elsewhere` maps
/// (cluster, volume handle) to the name of another group that holds the volume.
pub fn resolve(
    spec_members: &[GroupMember],
    clusters: &BTreeMap<String, ClusterView>,
    previous: &[MemberVolumeStatus],
    claimed_elsewhere: &Claims,
) -> Resolution {
    let mut members = Vec::new();
    let mut problems = Vec::new();
    let mut stale = Vec::new();
    let mut refused = Vec::new();
    for member in spec_members {
        let Some(view) = clusters.get(&member.cluster) else {
            problems.push(format!(
                "member cluster {:?} is not a known MemberCluster",
                member.cluster
            ));
            continue;
        };
        // An API server that cannot be read does not change which volumes a member is: keep what was
        // resolved before (with its acknowledgements) rather than unresolve it and block a release.
        if view.paths != ClusterPaths::GrpcOnly && view.unavailable.is_some() {
            let known: Vec<MemberVolumeStatus> = previous
                .iter()
                .filter(|earlier| {
                    earlier.cluster == member.cluster && earlier.namespace == member.namespace
                })
                .filter(|earlier| {
                    member
                        .pvc_names
                        .as_ref()
                        .is_none_or(|names| names.contains(&earlier.pvc))
                })
                .filter(|earlier| earlier.volume_handle.is_some() && earlier.node.is_some())
                .cloned()
                .collect();
            let expected = member
                .pvc_names
                .as_ref()
                .map_or(known.len().max(1), Vec::len);
            if known.len() == expected {
                stale.push(format!(
                    "{}/{} kept as last resolved ({})",
                    member.cluster,
                    member.namespace,
                    view.unavailable.as_deref().unwrap_or_default()
                ));
                members.extend(known);
                continue;
            }
        }
        let claims = match claim_names(member, view) {
            Ok(claims) => claims,
            Err(problem) => {
                problems.push(problem);
                continue;
            }
        };
        if claims.is_empty() {
            problems.push(format!(
                "no PersistentVolumeClaim in {}/{} matches the member's selector",
                member.cluster, member.namespace
            ));
        }
        let mut kept = KeptUntilReported::default();
        for pvc in claims {
            let mut resolved = resolve_claim(&member.cluster, &member.namespace, &pvc, view);
            if let Some(earlier) = kept.last_resolution(member, &pvc, &resolved, view, previous)
                && earlier.volume_handle.as_ref().is_some_and(|handle| {
                    !claimed_elsewhere.contains_key(&(member.cluster.clone(), handle.clone()))
                })
            {
                members.push(earlier.clone());
                continue;
            }
            match (&resolved.volume_handle, &resolved.node) {
                (None, _) if claim_missing(&member.namespace, &pvc, view) => {
                    problems.push(format!(
                        "PersistentVolumeClaim {}/{}/{pvc} does not exist",
                        member.cluster, member.namespace
                    ))
                }
                (None, _) => problems.push(format!(
                    "{}/{}/{pvc} is not bound to a CSI volume yet{}",
                    member.cluster,
                    member.namespace,
                    view.unavailable
                        .as_ref()
                        .map(|why| format!(" ({why})"))
                        .unwrap_or_default()
                )),
                (Some(handle), _)
                    if let Some(holder) =
                        claimed_elsewhere.get(&(member.cluster.clone(), handle.clone())) =>
                {
                    let refusal = format!(
                        "{}/{}/{pvc} (volume {handle}) already belongs to group {holder:?}; a volume belongs to at most one group",
                        member.cluster, member.namespace
                    );
                    problems.push(refusal.clone());
                    refused.push(refusal);
                    resolved.volume_handle = None;
                }
                (Some(handle), None) if let Some(nodes) = view.contested.get(handle) => {
                    problems.push(format!(
                        "{}/{}/{pvc} (volume {handle}) is claimed by several nodes ({}) and bound to none by its PersistentVolume's node affinity or a VolumeAttachment: unresolved until one claim remains",
                        member.cluster,
                        member.namespace,
                        nodes.iter().cloned().collect::<Vec<_>>().join(", ")
                    ))
                }
                (Some(handle), None) if view.binding_required => problems.push(format!(
                    "{}/{}/{pvc} (volume {handle}) is bound to no node: its PersistentVolume {} has no required kubernetes.io/hostname node affinity and no attached VolumeAttachment names it, and MemberCluster {} takes a volume's node only from these (volumeBinding: Required; SidecarClaims also trusts the one sidecar claiming it)",
                    member.cluster,
                    member.namespace,
                    resolved.persistent_volume.as_deref().unwrap_or("?"),
                    member.cluster,
                )),
                (Some(handle), None) => problems.push(format!(
                    "{}/{}/{pvc} (volume {handle}) is served by no node with a Lockstep sidecar",
                    member.cluster, member.namespace
                )),
                (Some(_), Some(_)) => {}
            }
            if let Some(earlier) = previous.iter().find(|earlier| {
                earlier.cluster == resolved.cluster
                    && earlier.volume_handle.is_some()
                    && earlier.volume_handle == resolved.volume_handle
            }) {
                resolved.acknowledged = earlier.acknowledged.clone();
                resolved.state = earlier.state;
                resolved.image_epoch = earlier.image_epoch;
            }
            // A report older than the volume's last acknowledgement says nothing about it now.
            // Only the volume's own node speaks for its state; a report older than the volume's last
            // acknowledgement says nothing about it now.
            if let (Some(handle), Some(node)) = (&resolved.volume_handle, &resolved.node)
                && let Some(reported) = view.state_of_volume.get(&(handle.clone(), node.clone()))
                && resolved
                    .acknowledged
                    .as_ref()
                    .is_none_or(|ack| (reported.epoch, reported.stage) >= (ack.epoch, ack.stage))
            {
                resolved.state = Some(reported.state);
            }
            members.push(resolved);
        }
        stale.extend(kept.sentence(member));
    }
    Resolution {
        resolved: problems.is_empty() && !members.is_empty(),
        members,
        problems,
        stale,
        refused,
    }
}

/// A group of the hub, as far as claims on volumes go.
#[derive(Debug, Clone, Copy)]
pub struct Claimant<'a> {
    /// Its name, for the refusal.
    pub name: &'a str,
    /// Its place in the claim order.
    pub order: &'a ClaimOrder,
    /// Its spec's members.
    pub spec_members: &'a [GroupMember],
    /// Its members as last resolved (its status).
    pub status_members: &'a [MemberVolumeStatus],
    /// True at a replicating point (Replicating, or resumed by its finalizer): it lets go of the volumes
    /// it no longer claims.
    pub replicating: bool,
}

/// The volumes, in the clusters of `views`, that groups other than `me` hold ahead of it (DESIGN.md
/// rule 5), by (cluster, volume handle).
///
/// A group earlier in the claim order (creation time, then UID) claims what its spec resolves to, whether
/// or not it has resolved yet: the decision depends on neither its status nor the order in which groups
/// are reconciled, so it is the same after a restart. A group that holds a volume (its last resolution
/// names it) and is not at a replicating point keeps it, whatever the order, until it replicates again;
/// `me` keeps what it holds itself against any later claim.
pub fn claimed_elsewhere(
    me: &Claimant<'_>,
    others: &[Claimant<'_>],
    views: &BTreeMap<String, ClusterView>,
) -> Claims {
    let held_by_me: BTreeSet<(&str, &str)> = held(me.status_members).collect();
    let mut claimed = Claims::new();
    // `me` keeps a volume it holds against `holder` when its claim is the earlier one, or when it is not
    // at a replicating point (it has not let the volume go).
    let mut claim = |cluster: &str, handle: &str, holder: &Claimant<'_>| {
        let kept =
            held_by_me.contains(&(cluster, handle)) && (me.order < holder.order || !me.replicating);
        if views.contains_key(cluster) && !kept {
            claimed
                .entry((cluster.to_owned(), handle.to_owned()))
                .or_insert_with(|| holder.name.to_owned());
        }
    };
    let mut ordered: Vec<&Claimant<'_>> = others.iter().collect();
    ordered.sort_by(|a, b| a.order.cmp(b.order));
    for other in ordered {
        if other.order < me.order {
            // The other group's status stands in for clusters whose API server cannot be read now.
            let resolution = resolve(
                other.spec_members,
                views,
                other.status_members,
                &Claims::new(),
            );
            for member in &resolution.members {
                if let Some(handle) = &member.volume_handle {
                    claim(&member.cluster, handle, other);
                }
            }
        }
        // What it holds from its last resolution counts until it lets the volume go at a replicating
        // point.
        if !other.replicating {
            for (cluster, handle) in held(other.status_members) {
                claim(cluster, handle, other);
            }
        }
    }
    claimed
}

/// The (cluster, volume handle) of each resolved member.
fn held(members: &[MemberVolumeStatus]) -> impl Iterator<Item = (&str, &str)> {
    members
        .iter()
        .filter_map(|member| Some((member.cluster.as_str(), member.volume_handle.as_deref()?)))
}

/// A gRPC-only cluster's volumes are known only from its sidecars' reports, which a restarted operator
/// (or a new leader) has not heard yet: a PVC no sidecar reports keeps its last resolution, with its
/// acknowledgement, while the node it was resolved to has not reported its volumes to this operator.
/// Once that node's sidecar reports again without the PVC, the PVC is resolved afresh (or not at all).
#[derive(Default)]
struct KeptUntilReported {
    pvcs: Vec<String>,
    nodes: BTreeSet<String>,
}

impl KeptUntilReported {
    /// How many kept PVCs a sentence names.
    const NAMED: usize = 20;

    fn last_resolution<'a>(
        &mut self,
        member: &GroupMember,
        pvc: &str,
        resolved: &MemberVolumeStatus,
        view: &ClusterView,
        previous: &'a [MemberVolumeStatus],
    ) -> Option<&'a MemberVolumeStatus> {
        if view.paths != ClusterPaths::GrpcOnly || resolved.volume_handle.is_some() {
            return None;
        }
        let earlier = previous.iter().find(|earlier| {
            earlier.cluster == member.cluster
                && earlier.namespace == member.namespace
                && earlier.pvc == pvc
                && earlier.volume_handle.is_some()
        })?;
        let node = earlier.node.as_deref()?;
        if view.reported.iter().any(|reported| reported.node == node) {
            return None; // its node reported again, without it
        }
        self.pvcs.push(pvc.to_owned());
        self.nodes.insert(node.to_owned());
        Some(earlier)
    }

    fn sentence(&self, member: &GroupMember) -> Option<String> {
        if self.pvcs.is_empty() {
            return None;
        }
        let mut named = self
            .pvcs
            .iter()
            .take(Self::NAMED)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if self.pvcs.len() > Self::NAMED {
            named.push_str(&format!(" and {} more", self.pvcs.len() - Self::NAMED));
        }
        let nodes = self.nodes.iter().cloned().collect::<Vec<_>>().join(", ");
        Some(format!(
            "{}/{}: {} kept as last resolved, with their acknowledgements, until the sidecars of {nodes} report to this operator again (GrpcOnly)",
            member.cluster, member.namespace, named
        ))
    }
}

/// The PVC names a member covers in its cluster.
fn claim_names(member: &GroupMember, view: &ClusterView) -> Result<BTreeSet<String>, String> {
    if let Some(names) = &member.pvc_names {
        return Ok(names.iter().cloned().collect());
    }
    let Some(selector) = &member.selector else {
        return Err(format!(
            "member {}/{} names no PVCs and no selector",
            member.cluster, member.namespace
        ));
    };
    if view.paths == ClusterPaths::GrpcOnly {
        return Err(format!(
            "member {}/{} uses a selector, but cluster {} is GrpcOnly: the hub cannot list its PVCs; name them in pvcNames",
            member.cluster, member.namespace, member.cluster
        ));
    }
    if let Some(why) = &view.unavailable {
        return Err(format!(
            "cannot list the PVCs of {}/{}: {why}",
            member.cluster, member.namespace
        ));
    }
    if let Some(unknown) = selector.match_expressions.iter().flatten().find(|e| {
        !matches!(
            e.operator.as_str(),
            "In" | "NotIn" | "Exists" | "DoesNotExist"
        )
    }) {
        return Err(format!(
            "member {}/{} has an invalid selector: unknown operator {:?} for key {:?} (In, NotIn, Exists or DoesNotExist)",
            member.cluster, member.namespace, unknown.operator, unknown.key
        ));
    }
    let selector = Selector::try_from(selector.clone()).map_err(|error| {
        format!(
            "member {}/{} has an invalid selector: {error}",
            member.cluster, member.namespace
        )
    })?;
    Ok(view
        .claims
        .iter()
        .filter(|claim| claim.metadata.namespace.as_deref() == Some(member.namespace.as_str()))
        .filter(|claim| {
            selector.matches(claim.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
        })
        .filter_map(|claim| claim.metadata.name.clone())
        .collect())
}

/// True when the cluster's API server was read and holds no claim `namespace/pvc`, and no sidecar
/// reported one: the PVC does not exist (as opposed to existing and not bound yet).
fn claim_missing(namespace: &str, pvc: &str, view: &ClusterView) -> bool {
    view.paths != ClusterPaths::GrpcOnly
        && view.unavailable.is_none()
        && !view.claims.iter().any(|claim| {
            claim.metadata.namespace.as_deref() == Some(namespace)
                && claim.metadata.name.as_deref() == Some(pvc)
        })
        && !view
            .reported
            .iter()
            .any(|reported| reported.namespace == namespace && reported.pvc == pvc)
}

/// Resolves one claim: through the API path (PVC → PV → CSI handle), else through sidecar reports.
fn resolve_claim(
    cluster: &str,
    namespace: &str,
    pvc: &str,
    view: &ClusterView,
) -> MemberVolumeStatus {
    let mut resolved = MemberVolumeStatus {
        cluster: cluster.to_owned(),
        namespace: namespace.to_owned(),
        pvc: pvc.to_owned(),
        persistent_volume: None,
        volume_handle: None,
        node: None,
        state: None,
        acknowledged: None,
        image_epoch: None,
    };
    let bound = view
        .claims
        .iter()
        .find(|claim| {
            claim.metadata.namespace.as_deref() == Some(namespace)
                && claim.metadata.name.as_deref() == Some(pvc)
        })
        .and_then(|claim| claim.spec.as_ref()?.volume_name.clone());
    if let Some(pv_name) = bound {
        let handle = view
            .volumes
            .iter()
            .find(|pv| pv.metadata.name.as_deref() == Some(pv_name.as_str()))
            .and_then(|pv| Some(pv.spec.as_ref()?.csi.as_ref()?.volume_handle.clone()));
        resolved.persistent_volume = Some(pv_name);
        resolved.volume_handle = handle;
    }
    if resolved.volume_handle.is_none()
        && let Some(reported) = view
            .reported
            .iter()
            .find(|reported| reported.namespace == namespace && reported.pvc == pvc)
    {
        resolved.persistent_volume = Some(reported.persistent_volume.clone());
        resolved.volume_handle = Some(reported.volume_handle.clone());
        resolved.node = Some(reported.node.clone());
    }
    if let Some(handle) = &resolved.volume_handle {
        if let Some(bound) = view.bound_node_of_volume.get(handle) {
            resolved.node = Some(bound.clone());
        } else if view.binding_required || view.contested.contains_key(handle) {
            resolved.node = None;
        } else if resolved.node.is_none() {
            resolved.node = view.node_of_volume.get(handle).cloned();
        }
    }
    resolved
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{
            CSIPersistentVolumeSource, PersistentVolumeClaimSpec, PersistentVolumeSpec,
        },
        apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
    };
    use lockstep_api::{
        domain::{Path, Stage},
        v1alpha1::Acknowledgement,
    };

    use super::*;

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
            claims: vec![
                claim("orders", "wal", "orders", Some("pv-wal")),
                claim("orders", "data", "orders", Some("pv-data")),
                claim("orders", "scratch", "other", Some("pv-scratch")),
                claim("billing", "ledger", "orders", Some("pv-ledger")),
            ],
            volumes: vec![
                pv("pv-wal", "vol-wal"),
                pv("pv-data", "vol-data"),
                pv("pv-scratch", "vol-scratch"),
            ],
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
        view.claims.push(claim("orders", "pending", "orders", None));
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

    fn resolved(cluster: &str, pvc: &str, handle: &str) -> MemberVolumeStatus {
        MemberVolumeStatus {
            cluster: cluster.into(),
            namespace: "orders".into(),
            pvc: pvc.into(),
            persistent_volume: None,
            volume_handle: Some(handle.into()),
            node: Some("node-a".into()),
            state: None,
            acknowledged: None,
            image_epoch: None,
        }
    }

    fn claimant<'a>(
        name: &'a str,
        order: &'a ClaimOrder,
        spec_members: &'a [GroupMember],
        status_members: &'a [MemberVolumeStatus],
        replicating: bool,
    ) -> Claimant<'a> {
        Claimant {
            name,
            order,
            spec_members,
            status_members,
            replicating,
        }
    }

    fn key(cluster: &str, handle: &str) -> (String, String) {
        (cluster.to_owned(), handle.to_owned())
    }

    #[test]
    fn an_older_group_claims_its_volumes_before_it_has_resolved_them() {
        // After an operator restart (or right after both were applied) the older group may not have
        // resolved yet: its claim stands on its spec, not on its status.
        let clusters = BTreeMap::from([("east".to_owned(), east())]);
        let (first, later) = (
            ClaimOrder::new(Some(1_000), "uid-first"),
            ClaimOrder::new(Some(2_000), "uid-later"),
        );
        let first_spec = [by_names("east", &["wal", "data"])];
        let later_spec = [by_label("east", "orders")];
        let first = claimant("first", &first, &first_spec, &[], true);
        let later = claimant("later", &later, &later_spec, &[], true);
        let claimed = claimed_elsewhere(&later, &[first], &clusters);
        assert_eq!(
            claimed,
            BTreeMap::from([
                (key("east", "vol-data"), "first".to_owned()),
                (key("east", "vol-wal"), "first".to_owned()),
            ])
        );
        let resolution = resolve(&later_spec, &clusters, &[], &claimed);
        assert!(!resolution.resolved);
        assert!(
            resolution
                .members
                .iter()
                .all(|member| member.volume_handle.is_none()),
            "the later group counts none of the first group's volumes: {:?}",
            resolution.members
        );
        assert!(
            claimed_elsewhere(&first, &[later], &clusters).is_empty(),
            "the first group yields nothing to the later one"
        );
    }

    #[test]
    fn the_first_claim_wins_by_creation_time_then_uid_never_by_name() {
        let clusters = BTreeMap::from([("east".to_owned(), east())]);
        let spec = [by_names("east", &["wal"])];
        let held = [resolved("east", "wal", "vol-wal")];
        // Created later but named and UID'd to sort first: still the later claim.
        let (older, younger) = (
            ClaimOrder::new(Some(1_000), "uid-9"),
            ClaimOrder::new(Some(2_000), "uid-1"),
        );
        let zeta = claimant("zeta", &older, &spec, &held, true);
        let alpha = claimant("alpha", &younger, &spec, &held, true);
        assert!(claimed_elsewhere(&zeta, &[alpha], &clusters).is_empty());
        assert_eq!(
            claimed_elsewhere(&alpha, &[zeta], &clusters).get(&key("east", "vol-wal")),
            Some(&"zeta".to_owned())
        );
        // Created in the same instant (creation times have a second's grain): the smaller UID wins,
        // whatever the names.
        let (small_uid, large_uid) = (
            ClaimOrder::new(Some(1_000), "uid-1"),
            ClaimOrder::new(Some(1_000), "uid-9"),
        );
        let zeta = claimant("zeta", &small_uid, &spec, &held, true);
        let alpha = claimant("alpha", &large_uid, &spec, &held, true);
        assert!(claimed_elsewhere(&zeta, &[alpha], &clusters).is_empty());
        assert_eq!(
            claimed_elsewhere(&alpha, &[zeta], &clusters).get(&key("east", "vol-wal")),
            Some(&"zeta".to_owned())
        );
    }

    #[test]
    fn a_same_named_volume_in_another_cluster_is_another_volume() {
        let mut west = east();
        west.node_of_volume
            .insert("vol-wal".into(), "west-node".into());
        let clusters = BTreeMap::from([("east".to_owned(), east()), ("west".to_owned(), west)]);
        let (first, later) = (
            ClaimOrder::new(Some(1_000), "uid-first"),
            ClaimOrder::new(Some(2_000), "uid-later"),
        );
        let first_spec = [by_names("east", &["wal"])];
        let later_spec = [by_names("west", &["wal"])];
        let held = [resolved("east", "wal", "vol-wal")];
        let first = claimant("first", &first, &first_spec, &held, true);
        let later = claimant("later", &later, &later_spec, &[], true);
        let claimed = claimed_elsewhere(&later, &[first], &clusters);
        let resolution = resolve(&later_spec, &clusters, &[], &claimed);
        assert!(resolution.resolved, "{:?}", resolution.problems);
        assert_eq!(
            resolution.members[0].volume_handle.as_deref(),
            Some("vol-wal")
        );
    }

    #[test]
    fn a_volume_changes_group_only_once_its_old_group_replicates() {
        // The later group holds the volume (it had it before the first group's selector matched it) and
        // is frozen: the volume stays with it until it replicates again.
        let clusters = BTreeMap::from([("east".to_owned(), east())]);
        let (first, later) = (
            ClaimOrder::new(Some(1_000), "uid-first"),
            ClaimOrder::new(Some(2_000), "uid-later"),
        );
        let first_spec = [by_names("east", &["wal", "data"])];
        let first_held = [resolved("east", "data", "vol-data")];
        let later_spec = [by_names("east", &["wal"])];
        let later_held = [resolved("east", "wal", "vol-wal")];
        let first = claimant("first", &first, &first_spec, &first_held, true);
        let frozen = claimant("later", &later, &later_spec, &later_held, false);
        assert_eq!(
            claimed_elsewhere(&first, &[frozen], &clusters),
            BTreeMap::from([(key("east", "vol-wal"), "later".to_owned())]),
            "the frozen group has not let the volume go"
        );
        let replicating = claimant("later", &later, &later_spec, &later_held, true);
        assert!(
            claimed_elsewhere(&first, &[replicating], &clusters).is_empty(),
            "at a replicating point the first claim takes it"
        );
        // A group keeps what it holds against a later group, frozen or not.
        let first_holding_wal = [resolved("east", "wal", "vol-wal")];
        let first = claimant("first", first.order, &first_spec, &first_holding_wal, true);
        assert!(claimed_elsewhere(&first, &[frozen], &clusters).is_empty());
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
}
