//! What the engine observes of member clusters (a short-lived cache of each cluster's view) and how a
//! group's members are resolved from it; the periodic reconcile of one group.

use super::*;

/// One member cluster's last view and when it was read, behind a lock so concurrent reconciles read once.
pub(super) type CachedView = Arc<tokio::sync::Mutex<Option<(Instant, Arc<ClusterView>)>>>;

/// How long one read of a member cluster serves the groups reconciled after it.
pub(super) const VIEW_REUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// What the member clusters showed of a group's members.
pub(super) struct Observation {
    pub(super) views: BTreeMap<String, Arc<ClusterView>>,
    pub(super) claimed_elsewhere: members::Claims,
    /// When the oldest of `views` was read.
    pub(super) read_at: Instant,
    /// How many volumes the group may resolve to (`--max-group-volumes`).
    pub(super) volume_limit: usize,
}

/// A group as a claimant of volumes: its spec, its last resolution and whether it is at a replicating
/// point (Replicating, or resumed), where it lets go of volumes it no longer claims.
pub(super) fn claimant_of<'a>(
    group: &'a ConsistencyGroup,
    order: &'a ClaimOrder,
    volumes: &'a [lockstep_api::v1alpha1::MemberVolumeStatus],
) -> members::Claimant<'a> {
    members::Claimant {
        name: group.metadata.name.as_deref().unwrap_or_default(),
        order,
        spec_members: &group.spec.members,
        status_members: volumes,
        replicating: group.position().1 == Stage::Resume,
    }
}

/// Resolves the members into the group's status (members, count, MembersResolved), keeping
/// acknowledgements recorded in that status; returns the claims refused because another group holds the
/// volume.
pub(super) fn apply_resolution(
    group: &mut ConsistencyGroup,
    observation: &Observation,
) -> Vec<String> {
    let generation = group.metadata.generation;
    let status = group.status.get_or_insert_with(Default::default);
    let resolution = members::resolve(
        &group.spec.members,
        &observation.views,
        &status.members,
        &observation.claimed_elsewhere,
    );
    let resolved_volumes = resolution.members.len();
    let limit = observation.volume_limit;
    let too_many = resolved_volumes > limit;
    status.members = resolution.members;
    // A group holds at most `limit` volumes: the rest stay out of it and the group counts as unresolved,
    // so no release acts on an image it cannot list.
    status.members.truncate(limit);
    status.member_count = u32::try_from(status.members.len()).unwrap_or(u32::MAX);
    let update = ConditionUpdate {
        type_: condition::MEMBERS_RESOLVED,
        status: resolution.resolved && !too_many,
        reason: if too_many {
            "TooManyVolumes"
        } else if resolution.resolved {
            "Resolved"
        } else if !resolution.refused.is_empty() {
            "ClaimedByAnotherGroup"
        } else {
            "Unresolved"
        },
        message: if too_many {
            format!(
                "the members resolve to {resolved_volumes} volumes, more than the {limit} one group may hold (--max-group-volumes): \
                 narrow the selectors or split the group; until then the group is Degraded and a freeze is not released"
            )
        } else if resolution.resolved {
            let mut message = format!(
                "{} member volumes resolved to volumes and nodes",
                status.member_count
            );
            if !resolution.stale.is_empty() {
                message.push_str("; ");
                message.push_str(&resolution.stale.join("; "));
            }
            message
        } else {
            resolution
                .problems
                .iter()
                .chain(&resolution.stale)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        },
    };
    conditions::set(&mut status.conditions, update, generation, &now());
    resolution.refused
}

impl Engine {
    /// Level-triggered reconcile of one group: resolve its members (MembersResolved), evaluate in the
    /// same decision, and keep its mirrors current.
    pub async fn reconcile(&self, group: Arc<ConsistencyGroup>) -> Result<(), EngineError> {
        let name = group.name_any();
        let uid = group
            .metadata
            .uid
            .clone()
            .ok_or_else(|| EngineError::UnknownGroup(name.clone()))?;
        let span = tracing::info_span!("reconcile", group = %name);
        async {
            if group.metadata.deletion_timestamp.is_some() {
                return self.finalize(&uid, &name).await;
            }
            if !group
                .finalizers()
                .iter()
                .any(|finalizer| finalizer == FINALIZER)
            {
                let mut finalizers = group.finalizers().to_vec();
                finalizers.push(FINALIZER.to_owned());
                self.set_finalizers(&name, &group, finalizers).await?;
            }
            // A new operator (a restart mid-freeze) has not connected the member clusters yet:
            // resolving now would drop every member with its acknowledgements, and the sidecars,
            // having acknowledged, would not send them again.
            self.connect_members_once().await;
            let observation = self.observe(&uid, &group).await;
            self.handle_observed(&uid, &name, Event::Evaluate, Some(observation))
                .await?;
            self.mirror(&uid, &name).await
        }
        .instrument(span)
        .await
    }

    /// One member cluster's view, shared by every group reconciled within [`VIEW_REUSE`]: a resync round
    /// lists each cluster once, not once per group. Returns when it was read.
    pub(super) async fn view_of(&self, member: &Member) -> (Instant, Arc<ClusterView>) {
        let lock = {
            let mut views = self
                .inner
                .views
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            views.entry(member.name.clone()).or_default().clone()
        };
        let mut cached = lock.lock().await;
        if let Some((read, view)) = cached.as_ref()
            && read.elapsed() < VIEW_REUSE
        {
            return (*read, view.clone());
        }
        let read = Instant::now();
        let view = Arc::new(
            clusters::view(member, &self.inner.sessions, &self.inner.lease_namespace).await,
        );
        *cached = Some((read, view.clone()));
        (read, view)
    }

    /// What the member clusters show of a group's members, read without holding the group's lock.
    pub(super) async fn observe(&self, uid: &str, group: &ConsistencyGroup) -> Observation {
        let members = self.members().await;
        let mut views = BTreeMap::new();
        let mut read_at = Instant::now();
        for cluster in Self::member_clusters_of(group) {
            if let Some(member) = members.get(&cluster) {
                let (read, view) = self.view_of(member).await;
                read_at = read_at.min(read);
                views.insert(cluster, view);
            }
        }
        let claimed_elsewhere = self.claimed_elsewhere(uid, group, &views);
        Observation {
            views,
            claimed_elsewhere,
            read_at,
            volume_limit: self.inner.max_group_volumes,
        }
    }

    /// The volumes of `views` that other groups of this hub hold ahead of this one (rule 5).
    pub(super) fn claimed_elsewhere(
        &self,
        uid: &str,
        group: &ConsistencyGroup,
        views: &BTreeMap<String, Arc<ClusterView>>,
    ) -> members::Claims {
        let groups = self.inner.groups.state();
        let ordered: Vec<(Arc<ConsistencyGroup>, ClaimOrder, MemberVolumes)> = groups
            .iter()
            .filter(|other| other.metadata.uid.as_deref() != Some(uid))
            .filter_map(|other| {
                let volumes = self.member_volumes_of(other.metadata.uid.as_deref()?);
                Some((other.clone(), other.claim_order()?, volumes))
            })
            .collect();
        let Some(my_order) = group.claim_order() else {
            return members::Claims::new();
        };
        let my_volumes = self.member_volumes_of(uid);
        let me = claimant_of(group, &my_order, &my_volumes);
        let others: Vec<members::Claimant<'_>> = ordered
            .iter()
            .map(|(other, order, volumes)| claimant_of(other, order, volumes))
            .collect();
        members::claimed_elsewhere(&me, &others, views)
    }
}
