//! Events for people: on the group, and on the member claims whose volumes a decision concerns.

use super::*;

/// How many Events on member claims one decision publishes at once.
pub(super) const CLAIM_EVENTS_IN_FLIGHT: usize = 16;

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
        for (cluster, member) in &members {
            let Ok(client) = &member.client else { continue };
            let recorder = Recorder::new(client.clone(), reporter.clone());
            for volume in status
                .members
                .iter()
                .filter(|volume| &volume.cluster == cluster)
            {
                let (recorder, event) = (recorder.clone(), &event);
                publishing.push(async move { publish_on_claim(&recorder, event, volume).await });
            }
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
        for volume in status.members.iter().filter(|volume| {
            volumes.iter().any(|(cluster, handle)| {
                *cluster == volume.cluster && volume.volume_handle.as_ref() == Some(handle)
            })
        }) {
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
