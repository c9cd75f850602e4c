//! Leader election on the `coordination.k8s.io` Lease [`crate::LEADER_LEASE`], driven here.
//!
//! This replica leads only while its monotonic clock is before the start of its last successful renewal
//! plus the renew deadline (four fifths of the lease duration). A replica cut off from the hub, whose
//! requests neither fail nor answer, so stops leading before a standby may take the Lease, whatever any
//! watch reports: kube-lease-manager's watch backed off and never reported the loss, and a deposed leader
//! went on answering ready. A standby takes the Lease once its record has stood unchanged for the
//! record's lease duration on the standby's own clock (as client-go does), so no two machines' clocks
//! are compared. Every write carries the resourceVersion read, so of two replicas racing for the Lease
//! one wins.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::{sync::watch, time::Instant};

/// The leader Lease of one replica: acquired, renewed and given up by [`LeaderElection::run`].
#[derive(Clone)]
pub struct LeaderElection {
    leases: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// Why one attempt at the Lease failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("the hub refused the Lease request: {0}")]
    Hub(#[from] kube::Error),
    #[error("no answer from the hub within {0:?}")]
    NoAnswer(Duration),
}

/// The record of another holder, and when this replica first saw it (its own clock).
struct Observed {
    spec: LeaseSpec,
    at: Instant,
}

impl LeaderElection {
    /// The Lease `name` in `namespace` of the hub, held as `identity` for `duration` at a time.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            leases: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration: duration.max(Duration::from_secs(1)),
        }
    }

    /// How long this replica leads after the start of a successful renewal.
    pub fn renew_deadline(&self) -> Duration {
        self.duration - self.duration / 5
    }

    /// How often the Lease is renewed (leading) or looked at (standing by).
    fn retry_period(&self) -> Duration {
        self.duration / 5
    }

    /// How long one attempt may wait for the hub.
    fn attempt_timeout(&self) -> Duration {
        self.duration / 2
    }

    /// Tries for the Lease and renews it for ever, sending `true` on `leading` while this replica leads
    /// and `false` the moment the renew deadline passes without a successful renewal.
    pub async fn run(self, leading: watch::Sender<bool>) {
        let mut valid_until: Option<Instant> = None;
        let mut observed: Option<Observed> = None;
        loop {
            let started = Instant::now();
            let attempt = async {
                tokio::time::timeout(self.attempt_timeout(), self.attempt(&mut observed))
                    .await
                    .map_err(|_| AttemptError::NoAnswer(self.attempt_timeout()))?
            };
            match self.until_deadline(attempt, valid_until, &leading).await {
                Ok(true) => valid_until = Some(started + self.renew_deadline()),
                Ok(false) => valid_until = None,
                Err(error) => {
                    tracing::warn!(identity = %self.identity, %error, "could not renew the leader Lease");
                }
            }
            self.publish(&leading, valid_until);
            let next = tokio::time::sleep_until(started + self.retry_period());
            self.until_deadline(next, valid_until, &leading).await;
        }
    }

    /// Runs `work`; if the renew deadline passes meanwhile, stops leading then and lets `work` finish.
    async fn until_deadline<F: Future>(
        &self,
        work: F,
        valid_until: Option<Instant>,
        leading: &watch::Sender<bool>,
    ) -> F::Output {
        let mut work = std::pin::pin!(work);
        if let Some(until) = valid_until {
            tokio::select! {
                output = &mut work => return output,
                () = tokio::time::sleep_until(until) => self.publish(leading, None),
            }
        }
        work.await
    }

    fn publish(&self, leading: &watch::Sender<bool>, valid_until: Option<Instant>) {
        let now_leading = valid_until.is_some_and(|until| Instant::now() < until);
        let changed =
            leading.send_if_modified(|was| std::mem::replace(was, now_leading) != now_leading);
        if changed && now_leading {
            tracing::info!(identity = %self.identity, "holding the leader Lease: leading");
        } else if changed {
            tracing::warn!(identity = %self.identity, renew_deadline = ?self.renew_deadline(), "the leader Lease was not renewed within the renew deadline, or another replica holds it: standing by");
        }
    }

    /// One look at the Lease: create it, renew it, or take it over when free or expired. `true` when
    /// this replica holds it now.
    async fn attempt(&self, observed: &mut Option<Observed>) -> Result<bool, AttemptError> {
        let now = MicroTime(Timestamp::now());
        let Some(lease) = self.leases.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    lease_transitions: Some(0),
                    ..self.taken(LeaseSpec::default(), now)
                }),
            };
            self.leases.create(&PostParams::default(), &lease).await?;
            return Ok(true);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let spec = if holder == Some(self.identity.as_str()) {
            LeaseSpec {
                renew_time: Some(now),
                lease_duration_seconds: Some(self.duration_seconds()),
                ..spec
            }
        } else if holder.is_none() || self.expired(observed, &spec) {
            tracing::info!(identity = %self.identity, previous = ?holder, "taking the leader Lease");
            self.taken(spec, now)
        } else {
            return Ok(false);
        };
        let renewed = Lease {
            spec: Some(spec),
            ..lease
        };
        // The resourceVersion read is the precondition: of two replicas racing, one wins.
        self.leases
            .replace(&self.name, &PostParams::default(), &renewed)
            .await?;
        *observed = None;
        Ok(true)
    }

    /// Whether another holder's record has stood unchanged for its lease duration on this clock.
    fn expired(&self, observed: &mut Option<Observed>, spec: &LeaseSpec) -> bool {
        let now = Instant::now();
        let seen = match observed {
            Some(seen) if seen.spec == *spec => seen,
            _ => observed.insert(Observed {
                spec: spec.clone(),
                at: now,
            }),
        };
        let duration = spec
            .lease_duration_seconds
            .and_then(|seconds| u64::try_from(seconds).ok())
            .map_or(self.duration, Duration::from_secs);
        now >= seen.at + duration
    }

    fn taken(&self, spec: LeaseSpec, now: MicroTime) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0).saturating_add(1)),
            ..spec
        }
    }

    /// The lease duration as the Lease states it: whole seconds, rounded up.
    fn duration_seconds(&self) -> i32 {
        let seconds = self.duration.as_secs() + u64::from(self.duration.subsec_nanos() > 0);
        i32::try_from(seconds).unwrap_or(i32::MAX)
    }
}
