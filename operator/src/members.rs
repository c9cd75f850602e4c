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

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
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
    pub claims: Vec<Arc<PersistentVolumeClaim>>,
    /// Its PersistentVolumes (API path).
    pub volumes: Vec<Arc<PersistentVolume>>,
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
    /// Its lists indexed by name, once complete ([`Self::indexed`]); without it, each resolution
    /// indexes the view for itself.
    pub names: Option<std::sync::Arc<ViewNames>>,
}

impl ClusterView {
    /// The view with its lists indexed by name, for every resolution against it. Call it once the
    /// view is complete: the index holds positions in its lists.
    pub fn indexed(mut self) -> Self {
        self.names = Some(std::sync::Arc::new(ViewNames::of(&self)));
        self
    }
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

impl ReportedState {
    /// Takes this report, from the volume's own node, as `member`'s state unless it is older than the
    /// volume's last acknowledgement: then it says nothing about the volume now. Returns whether taken.
    pub fn apply_to(&self, member: &mut MemberVolumeStatus) -> bool {
        let current = member
            .acknowledged
            .as_ref()
            .is_none_or(|ack| (self.epoch, self.stage) >= (ack.epoch, ack.stage));
        if current {
            member.state = Some(self.state);
        }
        current
    }
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

/// Positions in one cluster view's lists of claims, volumes and reported volumes, by name (and the
/// claims by namespace and by label, for selectors). Built once per view, when it is read
/// ([`ClusterView::indexed`]), and shared by every group resolved against it: a group of 10 000 volumes
/// looked each claim up in lists of thousands (quadratic, seconds per round), and building the index for
/// each of 500 groups' reconciles was most of a round.
#[derive(Debug, Clone, Default)]
pub struct ViewNames {
    /// namespace → claim name → position in `claims`.
    claims: HashMap<String, HashMap<String, usize>>,
    /// namespace → positions of its claims, for selectors.
    by_namespace: HashMap<String, Vec<usize>>,
    /// namespace → label key → label value → positions: a selector of 10 claims among 10 000 looks at
    /// its 10 (each group's reconcile resolves every earlier group's selector).
    by_label: HashMap<String, HashMap<String, HashMap<String, Vec<usize>>>>,
    /// PersistentVolume name → position in `volumes`.
    volumes: HashMap<String, usize>,
    /// namespace → claim name → position in `reported` (the first report of a claim wins).
    reported: HashMap<String, HashMap<String, usize>>,
}

impl ViewNames {
    fn of(view: &ClusterView) -> Self {
        let mut names = Self::default();
        for (i, claim) in view.claims.iter().enumerate() {
            let Some(namespace) = claim.metadata.namespace.as_deref() else {
                continue;
            };
            if let Some(name) = claim.metadata.name.as_deref() {
                names
                    .claims
                    .entry(namespace.to_owned())
                    .or_default()
                    .entry(name.to_owned())
                    .or_insert(i);
            }
            names
                .by_namespace
                .entry(namespace.to_owned())
                .or_default()
                .push(i);
            let labels = names.by_label.entry(namespace.to_owned()).or_default();
            for (key, value) in claim.metadata.labels.iter().flatten() {
                labels
                    .entry(key.clone())
                    .or_default()
                    .entry(value.clone())
                    .or_default()
                    .push(i);
            }
        }
        for (i, pv) in view.volumes.iter().enumerate() {
            if let Some(name) = pv.metadata.name.as_deref() {
                names.volumes.entry(name.to_owned()).or_insert(i);
            }
        }
        for (i, reported) in view.reported.iter().enumerate() {
            names
                .reported
                .entry(reported.namespace.clone())
                .or_default()
                .entry(reported.pvc.clone())
                .or_insert(i);
        }
        names
    }
}

/// A cluster view with its [`ViewNames`], for one resolution.
struct ViewIndex<'a> {
    view: &'a ClusterView,
    names: std::borrow::Cow<'a, ViewNames>,
}

impl<'a> ViewIndex<'a> {
    fn of(view: &'a ClusterView) -> Self {
        let names = match &view.names {
            Some(names) => std::borrow::Cow::Borrowed(&**names),
            None => std::borrow::Cow::Owned(ViewNames::of(view)),
        };
        Self { view, names }
    }

    fn claim(&self, namespace: &str, name: &str) -> Option<&'a PersistentVolumeClaim> {
        let i = *self.names.claims.get(namespace)?.get(name)?;
        self.view.claims.get(i).map(|claim| &**claim)
    }

    fn volume(&self, name: &str) -> Option<&'a PersistentVolume> {
        self.view
            .volumes
            .get(*self.names.volumes.get(name)?)
            .map(|volume| &**volume)
    }

    fn reported(&self, namespace: &str, pvc: &str) -> Option<&'a ReportedVolume> {
        let i = *self.names.reported.get(namespace)?.get(pvc)?;
        self.view.reported.get(i)
    }

    /// The claims of `namespace` that can match `selector`: those with the rarest label it requires
    /// (`matchLabels`, or `In` with one value), else every claim of the namespace. The selector itself
    /// still decides.
    fn candidates(
        &self,
        namespace: &str,
        selector: Option<&LabelSelector>,
    ) -> impl Iterator<Item = &'a PersistentVolumeClaim> + '_ {
        let everything = self
            .names
            .by_namespace
            .get(namespace)
            .map_or(&[][..], Vec::as_slice);
        let labels = self.names.by_label.get(namespace);
        let required = selector.into_iter().flat_map(|selector| {
            selector
                .match_labels
                .iter()
                .flatten()
                .map(|(key, value)| (key.as_str(), value.as_str()))
                .chain(
                    selector
                        .match_expressions
                        .iter()
                        .flatten()
                        .filter(|e| e.operator == "In")
                        .filter_map(|e| match e.values.as_deref() {
                            Some([value]) => Some((e.key.as_str(), value.as_str())),
                            _ => None,
                        }),
                )
        });
        let positions = required
            .map(|(key, value)| {
                labels
                    .and_then(|labels| labels.get(key)?.get(value))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|positions| positions.len())
            .unwrap_or(everything);
        let claims = &self.view.claims;
        positions
            .iter()
            .filter_map(move |&i| claims.get(i).map(|claim| &**claim))
    }
}

/// Resolves the spec's members against the clusters' views.
///
/// `previous` carries acknowledgements and states forward by volume handle; `claimed_elsewhere` maps
/// (cluster, volume handle) to the name of another group that holds the volume.
pub fn resolve<V: Borrow<ClusterView>>(
    spec_members: &[GroupMember],
    clusters: &BTreeMap<String, V>,
    previous: &[MemberVolumeStatus],
    claimed_elsewhere: &Claims,
) -> Resolution {
    resolve_indexed(
        spec_members,
        clusters,
        &index_views(clusters),
        previous,
        claimed_elsewhere,
    )
}

/// Each view's index, built once for every resolution against the same views.
fn index_views<V: Borrow<ClusterView>>(
    clusters: &BTreeMap<String, V>,
) -> BTreeMap<&str, ViewIndex<'_>> {
    clusters
        .iter()
        .map(|(name, view)| (name.as_str(), ViewIndex::of(view.borrow())))
        .collect()
}

/// [`resolve`] with the views' indexes already built.
fn resolve_indexed<V: Borrow<ClusterView>>(
    spec_members: &[GroupMember],
    clusters: &BTreeMap<String, V>,
    indexes: &BTreeMap<&str, ViewIndex<'_>>,
    previous: &[MemberVolumeStatus],
    claimed_elsewhere: &Claims,
) -> Resolution {
    let mut members = Vec::new();
    let mut problems = Vec::new();
    let mut stale = Vec::new();
    let mut refused = Vec::new();
    // The first earlier member with a handle, by (cluster, handle), as a linear search found it.
    let mut earlier_by_handle: std::collections::HashMap<(&str, &str), &MemberVolumeStatus> =
        std::collections::HashMap::new();
    for earlier in previous {
        if let Some(handle) = earlier.volume_handle.as_deref() {
            earlier_by_handle
                .entry((earlier.cluster.as_str(), handle))
                .or_insert(earlier);
        }
    }
    for member in spec_members {
        let Some(view) = clusters.get(&member.cluster).map(Borrow::borrow) else {
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
        let Some(index) = indexes.get(member.cluster.as_str()) else {
            continue;
        };
        let claims = match claim_names(member, view, index) {
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
            let mut resolved = resolve_claim(&member.cluster, &member.namespace, &pvc, view, index);
            if let Some(earlier) = kept.last_resolution(member, &pvc, &resolved, view, previous)
                && earlier.volume_handle.as_ref().is_some_and(|handle| {
                    !claimed_elsewhere.contains_key(&(member.cluster.clone(), handle.clone()))
                })
            {
                members.push(earlier.clone());
                continue;
            }
            match (&resolved.volume_handle, &resolved.node) {
                (None, _) if claim_missing(&member.namespace, &pvc, view, index) => {
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
            if let Some(earlier) = resolved
                .volume_handle
                .as_deref()
                .and_then(|handle| earlier_by_handle.get(&(resolved.cluster.as_str(), handle)))
            {
                resolved.acknowledged = earlier.acknowledged.clone();
                resolved.state = earlier.state;
                resolved.image_epoch = earlier.image_epoch;
            }
            // Only the volume's own node speaks for its state.
            if let (Some(handle), Some(node)) = (&resolved.volume_handle, &resolved.node)
                && let Some(reported) = view.state_of_volume.get(&(handle.clone(), node.clone()))
            {
                reported.apply_to(&mut resolved);
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
pub fn claimed_elsewhere<V: Borrow<ClusterView>>(
    me: &Claimant<'_>,
    others: &[Claimant<'_>],
    views: &BTreeMap<String, V>,
) -> Claims {
    // Indexed once for every earlier group's resolution: with hundreds of groups on one cluster's
    // thousands of claims, indexing the views per group was most of a reconcile.
    let indexes = index_views(views);
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
            let resolution = resolve_indexed(
                other.spec_members,
                views,
                &indexes,
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
fn claim_names(
    member: &GroupMember,
    view: &ClusterView,
    index: &ViewIndex<'_>,
) -> Result<BTreeSet<String>, String> {
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
    Ok(index
        .candidates(&member.namespace, member.selector.as_ref())
        .filter(|claim| {
            selector.matches(claim.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
        })
        .filter_map(|claim| claim.metadata.name.clone())
        .collect())
}

/// True when the cluster's API server was read and holds no claim `namespace/pvc`, and no sidecar
/// reported one: the PVC does not exist (as opposed to existing and not bound yet).
fn claim_missing(namespace: &str, pvc: &str, view: &ClusterView, index: &ViewIndex<'_>) -> bool {
    view.paths != ClusterPaths::GrpcOnly
        && view.unavailable.is_none()
        && index.claim(namespace, pvc).is_none()
        && index.reported(namespace, pvc).is_none()
}

/// Resolves one claim: through the API path (PVC → PV → CSI handle), else through sidecar reports.
fn resolve_claim(
    cluster: &str,
    namespace: &str,
    pvc: &str,
    view: &ClusterView,
    index: &ViewIndex<'_>,
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
    let bound = index
        .claim(namespace, pvc)
        .and_then(|claim| claim.spec.as_ref()?.volume_name.clone());
    if let Some(pv_name) = bound {
        let handle = index
            .volume(&pv_name)
            .and_then(|pv| Some(pv.spec.as_ref()?.csi.as_ref()?.volume_handle.clone()));
        resolved.persistent_volume = Some(pv_name);
        resolved.volume_handle = handle;
    }
    if resolved.volume_handle.is_none()
        && let Some(reported) = index.reported(namespace, pvc)
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
mod tests;
