//! Events for people: on the group, and on the member claims whose volumes a decision concerns.

use super::*;

/// How many Events on member claims one decision publishes at once.
pub(super) const CLAIM_EVENTS_IN_FLIGHT: usize = 16;

/// At most this many claims per member cluster get an Event of one decision. A group of 10 000 volumes
/// would otherwise write 10 000 Events into its member clusters at each hold, release and resync —
/// 30 000 a freeze, still being written seconds after it. Beyond the bound the group's own Event says how
/// many claims were not told, and the shards list every volume's state.
pub(super) const CLAIM_EVENTS_PER_CLUSTER: usize = 50;

/// The member volumes of `cluster` whose claims get an Event (the first [`CLAIM_EVENTS_PER_CLUSTER`]
/// in the status's order), and how many more there are.
pub(super) fn claims_to_tell<'a>(
    members: &'a [lockstep_api::v1alpha1::MemberVolumeStatus],
    cluster: &str,
) -> (Vec<&'a lockstep_api::v1alpha1::MemberVolumeStatus>, usize) {
    let mut told = Vec::new();
    let mut untold = 0;
    for volume in members.iter().filter(|volume| volume.cluster == cluster) {
        if told.len() < CLAIM_EVENTS_PER_CLUSTER {
            told.push(volume);
        } else {
            untold += 1;
        }
    }
    (told, untold)
}

/// Records an Event on a member volume's claim, in the claim's cluster (a failure is only logged).
pub(super) async fn publish_on_claim(
    recorder: &Recorder,
    event: &KubeEvent,
    volume: &lockstep_api::v1alpha1::MemberVolumeStatus,
) {
    let claim = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        namespace: Some(volume.namespace.clone()),
        name: Some(volume.pvc.clone()),
        ..Default::default()
    };
    if let Err(error) = recorder.publish(event, &claim).await {
        tracing::debug!(cluster = %volume.cluster, pvc = %volume.pvc, %error, "could not record an event on a claim");
    }
}

impl Engine {
    /// Says on the group, with a Warning Event, which of its claims are refused because another group
    /// holds the volume (rule 5) — when that changes, not at every reconcile.
    pub(super) fn report_refused_claims(
        &self,
        group: &ConsistencyGroup,
        refused: Vec<String>,
        memory: &mut GroupMemory,
    ) {
        if refused == memory.refused_claims {
            return;
        }
        memory.refused_claims = refused.clone();
        if refused.is_empty() {
            return;
        }
        tracing::warn!(refused = ?refused, "claims on volumes of other groups refused");
        let (engine, group) = (self.clone(), group.clone());
        let message = format!(
            "{} volume(s) refused: {}",
            refused.len(),
            refused.join("; ")
        );
        tokio::spawn(
            async move {
                engine.record(&group, true, "ClaimRefused", &message).await;
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// Records the notes of a decision as Events on the group and, for holds and releases, on every
    /// member claim — in the background, off the group's lock: a hundred claims' Events must not delay
    /// the acknowledgements queued behind the decision.
    pub(super) fn publish_notes(
        &self,
        group: ConsistencyGroup,
        status: Arc<ConsistencyGroupStatus>,
        notes: Vec<freeze::Note>,
    ) {
        let engine = self.clone();
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                for note in &notes {
                    engine
                        .record(&group, note.warning, note.reason, &note.message)
                        .await;
                    if matches!(note.reason, "Freezing" | "Released" | "Resyncing") {
                        engine.record_on_claims(&group, &status, note).await;
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Tells application owners: an Event on every member PVC (in its own cluster) when its writes are
    /// held, released unreplicated, or resynchronised. Clusters without an API path are skipped.
    pub(super) async fn record_on_claims(
        &self,
        group: &ConsistencyGroup,
        status: &ConsistencyGroupStatus,
        note: &freeze::Note,
    ) {
        let members = self.members().await;
        let reporter = Reporter {
            controller: "lockstep-operator".into(),
            instance: Some(self.inner.hub_name.clone()),
        };
        let message = match note.reason {
            "Freezing" => format!(
                "writes to this volume are held (not acknowledged) while ConsistencyGroup {} freezes at epoch {}; \
                 they are released once every member is frozen, or fail with an I/O error after {}",
                group.name_any(),
                status.epoch,
                group.spec.hold_timeout
            ),
            "Released" => format!(
                "held writes released at epoch {}: this volume runs unreplicated until ConsistencyGroup {} is resynchronised",
                status.epoch,
                group.name_any()
            ),
            _ => format!("ConsistencyGroup {}: {}", group.name_any(), note.message),
        };
        let event = KubeEvent {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.to_owned(),
            note: Some(message),
            action: note.reason.to_owned(),
            secondary: Some(group.object_ref(&())),
        };
        let mut publishing = Vec::new();
        let mut untold = 0;
        for (cluster, member) in &members {
            let Ok(client) = &member.client else { continue };
            let recorder = Recorder::new(client.clone(), reporter.clone());
            let (told, rest) = claims_to_tell(&status.members, cluster);
            untold += rest;
            for volume in told {
                let (recorder, event) = (recorder.clone(), &event);
                publishing.push(async move { publish_on_claim(&recorder, event, volume).await });
            }
        }
        if untold > 0 {
            let message = format!(
                "{}: Events recorded on the first {CLAIM_EVENTS_PER_CLUSTER} claims of each member cluster; \
                 {untold} more claims were not told (kubectl get consistencygroupshards lists every volume's state)",
                note.reason
            );
            self.record(group, false, "ClaimEventsLimited", &message)
                .await;
        }
        // Concurrently, a few at a time per operator: one slow cluster delays no other claim's Event.
        futures::stream::iter(publishing)
            .buffer_unordered(CLAIM_EVENTS_IN_FLIGHT)
            .collect::<Vec<()>>()
            .await;
    }

    /// Tells the owners of the claims whose held writes just failed at the hold timeout (a Warning on each
    /// such PVC, in its own cluster). Clusters without an API path are skipped.
    pub(super) async fn record_hold_timeouts_on_claims(
        &self,
        group: &ConsistencyGroup,
        status: &ConsistencyGroupStatus,
        volumes: &[(String, String)],
    ) {
        let members = self.members().await;
        let reporter = Reporter {
            controller: "lockstep-operator".into(),
            instance: Some(self.inner.hub_name.clone()),
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "HoldTimedOut".to_owned(),
            note: Some(format!(
                "held writes to this volume failed with an I/O error after holdTimeout {} while ConsistencyGroup {} is frozen at epoch {}; \
                 later writes fail the same way until the group is released or resynchronised",
                group.spec.hold_timeout,
                group.name_any(),
                status.epoch
            )),
            action: "HoldTimedOut".to_owned(),
            secondary: Some(group.object_ref(&())),
        };
        // As for the other claim Events: at most CLAIM_EVENTS_PER_CLUSTER claims per cluster.
        let mut told: BTreeMap<&str, usize> = BTreeMap::new();
        for volume in status.members.iter().filter(|volume| {
            volumes.iter().any(|(cluster, handle)| {
                *cluster == volume.cluster && volume.volume_handle.as_ref() == Some(handle)
            })
        }) {
            let count = told.entry(volume.cluster.as_str()).or_default();
            if *count >= CLAIM_EVENTS_PER_CLUSTER {
                continue;
            }
            *count += 1;
            let Some(Ok(client)) = members.get(&volume.cluster).map(|member| &member.client) else {
                continue;
            };
            let recorder = Recorder::new(client.clone(), reporter.clone());
            publish_on_claim(&recorder, &event, volume).await;
        }
    }

    /// Records a Kubernetes Event on the group.
    pub async fn record(
        &self,
        group: &ConsistencyGroup,
        warning: bool,
        reason: &str,
        message: &str,
    ) {
        let event = KubeEvent {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(lockstep_api::domain::bounded_message(message)),
            action: reason.to_owned(),
            secondary: None,
        };
        if let Err(error) = self
            .inner
            .recorder
            .publish(&event, &group.object_ref(&()))
            .await
        {
            tracing::warn!(%error, reason, "could not record an event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(cluster: &str, pvc: usize) -> lockstep_api::v1alpha1::MemberVolumeStatus {
        lockstep_api::v1alpha1::MemberVolumeStatus {
            cluster: cluster.to_owned(),
            namespace: "apps".to_owned(),
            pvc: format!("data-{pvc}"),
            ..Default::default()
        }
    }

    #[test]
    fn at_most_the_bound_of_claims_per_cluster_get_an_event() {
        let mut members: Vec<_> = (0..120).map(|i| volume("east", i)).collect();
        members.extend((0..3).map(|i| volume("west", i)));
        let (told, untold) = claims_to_tell(&members, "east");
        assert_eq!((told.len(), untold), (CLAIM_EVENTS_PER_CLUSTER, 70));
        assert!(told.iter().all(|v| v.cluster == "east"));
        assert_eq!(told.first().map(|v| v.pvc.as_str()), Some("data-0"));
        let (told, untold) = claims_to_tell(&members, "west");
        assert_eq!((told.len(), untold), (3, 0));
    }
}
