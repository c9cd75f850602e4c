//! One batch, in the order the design requires: decide ([`crate::freeze`]), send a freeze at once (rule 1),
//! persist the status with its resourceVersion precondition, and only then send a release or resume.

use super::*;

/// How often a conflicting status write is retried on fresh state before the event is dropped (the next
/// evaluation or the sender's retry brings it back).
pub(super) const CONFLICT_RETRIES: usize = 5;

/// Whether the API server's answer to a status write refuses that status for good (invalid, too large,
/// forbidden), rather than for now: a conflict, a timeout, throttling and 5xx are worth a retry, and a
/// group that is gone (404) is handled as unknown on the next read.
pub(super) fn refuses_for_good(code: u16) -> bool {
    (400..500).contains(&code) && !matches!(code, 404 | 408 | 409 | 429)
}

impl Engine {
    /// Reads the group (or takes the copy this operator last wrote, when nothing in the batch asks for a
    /// fresh read), decides the batch, sends a freeze at once, persists, then sends a release or resume.
    pub(super) async fn decide_and_apply(
        &self,
        uid: &str,
        name: &str,
        batch: &Batch,
        group_lock: &GroupLock,
        memory: &mut GroupMemory,
    ) -> Result<(), EngineError> {
        let api = Api::<ConsistencyGroup>::all(self.inner.hub.clone());
        // Events from sidecars may be decided on the copy this operator last wrote: only spec edits can
        // have changed the group since, and a stale copy either decides nothing new (the next evaluation
        // reads afresh) or fails its write on the resourceVersion precondition and is read again.
        let mut cached = memory
            .last_written
            .take()
            .filter(|_| !batch.needs_fresh_read);
        for _ in 0..CONFLICT_RETRIES {
            let mut group = match cached.take() {
                Some(group) => group,
                None => api.get(name).await?,
            };
            if group.metadata.uid.as_deref() != Some(uid) {
                return Err(EngineError::UnknownGroup(uid.to_owned()));
            }
            // The status persists the decision and counts; the volumes come from this operator's record
            // (rebuilt from the shards after a restart).
            let read = group.status.clone();
            let record = self.restored_record(uid, read.as_ref()).await?;
            // A record made for another decision than the persisted one (another replica wrote the
            // status since) is rebuilt from the status and the shards.
            let record = match record {
                Some(record)
                    if read.as_ref().and_then(|s| s.decision_id.as_ref())
                        != record.decision_id.as_ref() =>
                {
                    tracing::info!(
                        persisted = ?read.as_ref().and_then(|s| s.decision_id.as_ref()),
                        record = ?record.decision_id,
                        "the group's status was written by another decision: its record is rebuilt"
                    );
                    self.forget_record(uid);
                    self.restored_record(uid, read.as_ref()).await?
                }
                record => record,
            };
            group.status = crate::ledger::hydrate(read.clone(), record.as_deref());
            let refused = batch
                .observation
                .as_ref()
                .filter(|observation| memory.accepts_observation(observation.read_at))
                .map(|observation| apply_resolution(&mut group, observation));
            let held_before = group
                .status
                .as_ref()
                .and_then(|status| status.hold_timeouts.clone());
            // The one full copy of the status (thousands of volumes) is decided on in place; from here
            // on `group` carries the bounded status as read, cheap to copy.
            let full = group.status.take();
            group.status = read.clone();
            let freeze::Decision {
                status: mut decided,
                freeze_now,
                after_persist,
                notes,
            } = freeze::decide_batch_on(&group, full, &batch.events, &now())?;
            if let Some(point) = &freeze_now {
                // Rule 1: freeze at once, on both paths, before anything is persisted.
                memory.freeze_started = Some((point.epoch, Instant::now()));
                self.send(&group, point, Some(&decided)).await;
            }
            let mut persisted = crate::ledger::bounded(&decided);
            persisted.decision_id = read.as_ref().and_then(|s| s.decision_id.clone());
            let decided = if read.as_ref() != Some(&persisted) {
                let id = crate::ledger::new_decision_id();
                persisted.decision_id = Some(id.clone());
                decided.decision_id = Some(id);
                match self.persist(&api, &group, &persisted).await {
                    Ok(written) => {
                        group_lock.set_persisted(decided.position());
                        memory.last_written = Some(written);
                        let decided = Arc::new(decided);
                        self.publish_record(&group, decided.clone());
                        let (failed, volumes) = freeze::hold_timeout_growth(
                            held_before.as_ref(),
                            decided.hold_timeouts.as_ref(),
                        );
                        self.inner.metrics.held_writes_failed(name, failed);
                        if !volumes.is_empty() {
                            let (engine, group, status) =
                                (self.clone(), group.clone(), decided.clone());
                            tokio::spawn(
                                async move {
                                    engine
                                        .record_hold_timeouts_on_claims(&group, &status, &volumes)
                                        .await;
                                }
                                .instrument(tracing::Span::current()),
                            );
                        }
                        decided
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        tracing::debug!("status conflict; deciding again on fresh state");
                        continue;
                    }
                    Err(kube::Error::Api(status)) if refuses_for_good(status.code) => {
                        return Err(EngineError::StatusRefused {
                            group: name.to_owned(),
                            code: status.code,
                            message: status.message.clone(),
                        });
                    }
                    Err(error) => return Err(error.into()),
                }
            } else {
                let decided = Arc::new(decided);
                if record
                    .as_deref()
                    .is_none_or(|record| !crate::ledger::same_volumes(record, &decided))
                {
                    // Only the per-volume record changed (a state the counts do not show): it lives in
                    // memory and the shards.
                    self.publish_record(&group, decided.clone());
                }
                // The group as read for this batch (afresh when it held an evaluation) is still what
                // the hub holds: the next batch may decide on it, and `last_status` reads it rather
                // than the reflector's copy, which may lag behind this operator's last write.
                memory.last_written = Some(group.clone());
                decided
            };
            if let Some(refused) = refused {
                self.report_refused_claims(&group, refused, memory);
            }
            self.after_persist(&group, &decided, after_persist.as_ref(), notes, memory)
                .await;
            return Ok(());
        }
        Err(EngineError::Conflicts(name.to_owned()))
    }

    /// Counts the events of a batch whose status the API server refused and records a Warning Event on
    /// the group saying so (in the background, off the group's lock).
    pub(super) fn drop_refused(
        &self,
        uid: &str,
        name: &str,
        events: usize,
        code: u16,
        message: &str,
    ) {
        tracing::warn!(
            group = name,
            events,
            code,
            %message,
            "the API server refused the decided status: events dropped"
        );
        self.inner.metrics.events_dropped(name, events);
        let Some(group) = self.group_by_uid(uid) else {
            return;
        };
        let note = format!(
            "the API server refused the status decided from {events} reports and acknowledgements ({code}: {message}); \
             they were dropped so that later ones can be decided (a sidecar still holding a failure reports it again)"
        );
        let engine = self.clone();
        tokio::spawn(
            async move {
                engine.record(&group, true, "StatusRefused", &note).await;
            }
            .instrument(tracing::Span::current()),
        );
    }

    pub(super) async fn persist(
        &self,
        api: &Api<ConsistencyGroup>,
        group: &ConsistencyGroup,
        status: &ConsistencyGroupStatus,
    ) -> Result<ConsistencyGroup, kube::Error> {
        let mut updated = group.clone();
        updated.status = Some(status.clone());
        // The resourceVersion read above is the precondition: a concurrent writer (or a deposed leader) loses.
        api.replace_status(&group.name_any(), &PostParams::default(), &updated)
            .await
    }

    pub(super) async fn after_persist(
        &self,
        group: &ConsistencyGroup,
        decided: &Arc<ConsistencyGroupStatus>,
        after_persist: Option<&GroupEpoch>,
        notes: Vec<freeze::Note>,
        memory: &mut GroupMemory,
    ) {
        if let Some(point) = after_persist {
            self.send(group, point, Some(decided)).await;
        }
        let frozen = conditions::status_of(&decided.conditions, condition::FROZEN) == Some(true);
        if frozen
            && let Some((epoch, started)) = memory.freeze_started
            && epoch == decided.epoch
        {
            self.inner.metrics.freeze_completed(started.elapsed());
            memory.freeze_started = None;
        }
        if !notes.is_empty() {
            self.publish_notes(group.clone(), decided.clone(), notes);
        }
    }

    /// Sends a directive on both paths; a release or resume is also mirrored with the status it belongs to.
    pub(super) async fn send(
        &self,
        group: &ConsistencyGroup,
        point: &GroupEpoch,
        status: Option<&ConsistencyGroupStatus>,
    ) {
        // Mirrors carry the bounded status, as the hub's does.
        let status = status.map(crate::ledger::bounded);
        let status = status.as_ref();
        let members = self.inner.members.read().await.clone();
        let clusters = Self::member_clusters_of(group);
        let targets: Vec<Member> = clusters
            .iter()
            .filter_map(|name| members.get(name).cloned())
            .collect();
        self.inner
            .fanout
            .send(group, point, status, &clusters, &targets)
            .await;
    }
}
