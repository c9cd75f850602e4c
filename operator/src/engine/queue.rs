//! Each group's inbox: events queue while a decision is being persisted and are decided as one batch by
//! whoever holds the group's lock next (one status write for a burst of acknowledgements).

use super::*;

/// How many undecided events one group's inbox keeps while its decisions fail.
pub(super) const INBOX_LIMIT: usize = 10_000;

/// One group's decisions: the lock that serialises them and the inbox where events wait for it.
#[derive(Default)]
pub(super) struct GroupLock {
    pub(super) memory: tokio::sync::Mutex<GroupMemory>,
    pub(super) inbox: Mutex<Batch>,
    /// The (epoch, stage) this operator last persisted, ahead of the reflector's copy for a moment.
    pub(super) persisted: Mutex<Option<(u64, Stage)>>,
}

impl GroupLock {
    pub(super) fn persisted(&self) -> Option<(u64, Stage)> {
        *self
            .persisted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn set_persisted(&self, position: (u64, Stage)) {
        let mut persisted = self
            .persisted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *persisted = (*persisted).max(Some(position));
    }

    pub(super) fn inbox(&self, events: Vec<Event>, observation: Option<Observation>) {
        let mut inbox = self
            .inbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        inbox.needs_fresh_read |= events.iter().any(|event| matches!(event, Event::Evaluate));
        inbox.events.extend(events);
        // Concurrent reconciles can deliver their reads out of order: keep the newest.
        if let Some(observation) = observation
            && inbox
                .observation
                .as_ref()
                .is_none_or(|queued| queued.read_at <= observation.read_at)
        {
            inbox.observation = Some(observation);
        }
    }

    /// Puts the events of a failed batch back in front of those that arrived since, up to
    /// [`INBOX_LIMIT`] events (the oldest go first: a hub down for long must not grow it without bound).
    pub(super) fn requeue(&self, mut events: Vec<Event>) {
        let mut inbox = self
            .inbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        events.append(&mut inbox.events);
        let excess = events.len().saturating_sub(INBOX_LIMIT);
        if excess > 0 {
            tracing::warn!(
                dropped = excess,
                "decision inbox full: oldest events dropped"
            );
        }
        inbox.events = events.split_off(excess);
        inbox.needs_fresh_read = true;
    }

    pub(super) fn take_inbox(&self) -> Option<Batch> {
        let mut inbox = self
            .inbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (!inbox.events.is_empty()).then(|| std::mem::take(&mut *inbox))
    }
}

/// Events about one group waiting to be decided together.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) events: Vec<Event>,
    /// The latest resolution of the members read for a reconcile in the batch.
    pub(super) observation: Option<Observation>,
    /// An evaluation is in the batch: the spec may have changed, so the group is read afresh.
    pub(super) needs_fresh_read: bool,
}

/// What the engine remembers of a group between decisions (never needed for safety).
#[derive(Default)]
pub(super) struct GroupMemory {
    /// When the current freeze started, for the freeze-latency metric.
    pub(super) freeze_started: Option<(u64, Instant)>,
    /// The group as this operator last wrote it (what the API server answered to the write).
    pub(super) last_written: Option<ConsistencyGroup>,
    /// The claims on volumes of other groups refused at the last resolution (an Event says when they
    /// change).
    pub(super) refused_claims: Vec<String>,
    /// When the views of the last resolution applied were read: an older one, delivered late by a
    /// concurrent reconcile, would move volume states back (a volume replicating shown resyncing again).
    pub(super) last_observation: Option<Instant>,
}

impl GroupMemory {
    /// Whether a resolution whose views were read at `read_at` may be applied: never one read before the
    /// last one applied (it would move volume states back). Records it when it may.
    pub(super) fn accepts_observation(&mut self, read_at: Instant) -> bool {
        let newer = self.last_observation.is_none_or(|last| last <= read_at);
        if newer {
            self.last_observation = Some(read_at);
        }
        newer
    }
}

impl Engine {
    pub(super) fn existing_lock(&self, uid: &str) -> Option<Arc<GroupLock>> {
        let locks = self
            .inner
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.get(uid).cloned()
    }

    pub(super) fn lock_for(&self, uid: &str) -> Arc<GroupLock> {
        let mut locks = self
            .inner
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(uid.to_owned()).or_default().clone()
    }

    /// Decides one event about a group and carries the decision out.
    pub async fn handle(&self, uid: &str, event: Event) -> Result<(), EngineError> {
        let name = self
            .group_by_uid(uid)
            .map(|group| group.name_any())
            .ok_or_else(|| EngineError::UnknownGroup(uid.to_owned()))?;
        let span = tracing::info_span!("decide", group = %name, event = event_kind(&event));
        self.handle_named(uid, &name, event).instrument(span).await
    }

    pub(super) async fn handle_named(
        &self,
        uid: &str,
        name: &str,
        event: Event,
    ) -> Result<(), EngineError> {
        self.handle_observed(uid, name, event, None).await
    }

    /// Queues the event in the group's inbox, then decides everything queued there in one batch: events
    /// that arrive while a decision is being persisted (the acknowledgements of a freeze, a burst of
    /// reports) wait for the lock together and cost one status write, not one each. An event decided in
    /// another caller's batch returns `Ok` here; a failed batch is retried by its senders and by the next
    /// periodic evaluation, as a failed decision always was.
    pub(super) async fn handle_observed(
        &self,
        uid: &str,
        name: &str,
        event: Event,
        observation: Option<Observation>,
    ) -> Result<(), EngineError> {
        self.handle_all(uid, name, vec![event], observation).await
    }

    pub(super) async fn handle_all(
        &self,
        uid: &str,
        name: &str,
        events: Vec<Event>,
        observation: Option<Observation>,
    ) -> Result<(), EngineError> {
        if !self.is_leader() {
            return Err(EngineError::NotLeader);
        }
        for event in &events {
            match event {
                Event::Report(report) => self.inner.metrics.report(report.path),
                Event::Ack(ack) => self.inner.metrics.ack(ack.path),
                Event::HoldTimedOut(_) | Event::Seen { .. } | Event::Evaluate => {}
            }
        }
        let group_lock = self.lock_for(uid);
        group_lock.inbox(events, observation);
        let mut memory = group_lock.memory.lock().await;
        let Some(batch) = group_lock.take_inbox() else {
            return Ok(()); // decided in the batch of the caller before us
        };
        self.inner.metrics.decision_batch(batch.events.len());
        let result = self
            .decide_and_apply(uid, name, &batch, &group_lock, &mut memory)
            .await;
        match &result {
            Err(EngineError::Hub(_) | EngineError::Conflicts(_)) => {
                // Not lost with the batch: the next event or periodic evaluation decides them again, on
                // a fresh read (they are idempotent: every report and acknowledgement names its epoch).
                group_lock.requeue(batch.events);
            }
            Err(EngineError::StatusRefused { code, message, .. }) => {
                // Retried, the batch would be refused again, ahead of every later event, forever: it is
                // dropped, and said so. Senders still holding a failure report it again.
                self.drop_refused(uid, name, batch.events.len(), *code, message);
            }
            _ => {}
        }
        result
    }

    /// Decides several events about one group as one batch (one read, at most one status write).
    pub async fn handle_many(&self, uid: &str, events: Vec<Event>) -> Result<(), EngineError> {
        let name = self
            .group_by_uid(uid)
            .map(|group| group.name_any())
            .ok_or_else(|| EngineError::UnknownGroup(uid.to_owned()))?;
        let span = tracing::info_span!("decide", group = %name, events = events.len());
        self.handle_all(uid, &name, events, None)
            .instrument(span)
            .await
    }

    /// Handles several events about one group as one batch; a failure is only worth a log line.
    pub async fn handle_many_quietly(&self, uid: &str, events: Vec<Event>) {
        if let Err(error) = self.handle_many(uid, events).await {
            tracing::warn!(%error, group_uid = uid, "events not handled");
        }
    }

    /// Handles an event whose failure is only worth a log line (the sender retries; reconciles repeat).
    pub async fn handle_quietly(&self, uid: &str, event: Event) {
        if let Err(error) = self.handle(uid, event).await {
            tracing::warn!(%error, group_uid = uid, "event not handled");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn seen(epoch: u64) -> Event {
        Event::Seen { epoch }
    }

    #[test]
    fn events_queue_until_one_caller_takes_them_all() {
        let lock = GroupLock::default();
        lock.inbox(vec![seen(1)], None);
        lock.inbox(vec![seen(2), seen(3)], None);
        let batch = lock.take_inbox().unwrap();
        assert_eq!(batch.events, vec![seen(1), seen(2), seen(3)]);
        assert!(
            !batch.needs_fresh_read,
            "sidecar events may use the last written copy"
        );
        assert!(
            lock.take_inbox().is_none(),
            "a later caller finds its event decided"
        );
        lock.inbox(vec![Event::Evaluate], None);
        assert!(lock.take_inbox().unwrap().needs_fresh_read);
    }

    fn observation(read_at: Instant) -> Observation {
        Observation {
            views: BTreeMap::new(),
            claimed_elsewhere: members::Claims::new(),
            read_at,
            volume_limit: crate::DEFAULT_MAX_GROUP_VOLUMES,
        }
    }

    #[test]
    fn a_read_delivered_late_never_replaces_or_overrides_a_newer_one() {
        let older = Instant::now();
        let newer = older + std::time::Duration::from_millis(5);
        let lock = GroupLock::default();
        lock.inbox(vec![seen(1)], Some(observation(newer)));
        lock.inbox(vec![seen(2)], Some(observation(older)));
        let batch = lock.take_inbox().unwrap();
        assert_eq!(batch.observation.map(|o| o.read_at), Some(newer));

        let mut memory = GroupMemory::default();
        assert!(memory.accepts_observation(newer));
        assert!(
            memory.accepts_observation(newer),
            "the same read again, on a retry"
        );
        assert!(!memory.accepts_observation(older));
    }

    #[test]
    fn a_failed_batch_goes_back_before_newer_events_and_is_read_afresh() {
        let lock = GroupLock::default();
        lock.inbox(vec![seen(1), seen(2)], None);
        let failed = lock.take_inbox().unwrap();
        lock.inbox(vec![seen(3)], None);
        lock.requeue(failed.events);
        let again = lock.take_inbox().unwrap();
        assert_eq!(again.events, vec![seen(1), seen(2), seen(3)]);
        assert!(again.needs_fresh_read);
    }

    #[test]
    fn a_requeued_inbox_keeps_at_most_its_limit_dropping_the_oldest() {
        let lock = GroupLock::default();
        let many: Vec<Event> = (0..INBOX_LIMIT as u64 + 5).map(seen).collect();
        lock.requeue(many);
        let kept = lock.take_inbox().unwrap().events;
        assert_eq!(kept.len(), INBOX_LIMIT);
        assert_eq!(kept.first(), Some(&seen(5)));
    }
}
