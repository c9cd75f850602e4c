//! [`OperatorControl`]: the real control system — the operator (in-process, in the hub) and one sidecar
//! per simulated node, talking over both paths (the API servers and gRPC) — behind the same
//! [`ControlSystem`] seam as the demo's own [`crate::control::ManualFreeze`]. The scenario does not
//! change: it cuts a link and waits; here the operator and sidecars do the freezing, and this type only
//! watches the group's status and says what it sees.
//!
//! The sidecars dial the operator's gRPC listener through a link-cut proxy, so that the gRPC path can be
//! taken down ([`ControlSystem::set_grpc_path`]). While it runs, a sampler reads the operator's own
//! metrics (in-process, every 2 ms) and stamps each rise of a counter — a failure report received over
//! the API or gRPC path, an acknowledgement, a batch of directives sent — as a [`Milestone`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lockstep_api::conditions;
use lockstep_api::domain::{Phase, Policy, Stage, condition};
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_operator::Operator;
use lockstep_replicator::linkcut::{LinkCut, LinkMode};
use lockstep_sidecar::Sidecar;

use crate::cluster::ClusterError;
use crate::control::{ControlError, ControlSystem, CopyFailure, FreezeOutcome, ThawOutcome};
use crate::kubectl;
use crate::timeline::{Milestone, Timeline};
use crate::world::World;

/// Lockstep's namespace in every cluster (leases, the member kubeconfig Secrets).
pub const NAMESPACE: &str = "lockstep";
/// How long the operator may take to resolve the members or freeze.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long it may take to resync once asked.
const RESYNC_DEADLINE: Duration = Duration::from_secs(30);
/// How often the sampler reads the operator's metrics.
const SAMPLE_EVERY: Duration = Duration::from_millis(2);

/// The operator and the sidecars, started on [`ControlSystem::enroll`].
#[derive(Default)]
pub struct OperatorControl {
    operator: Option<Operator>,
    sidecars: Vec<Sidecar>,
    epoch: u64,
    /// The proxy the sidecars dial the operator's gRPC listener through.
    grpc_link: Option<LinkCut>,
    /// What the sampler saw.
    milestones: Arc<Mutex<Vec<Milestone>>>,
    sampler: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for OperatorControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorControl")
            .field("running", &self.operator.is_some())
            .field("sidecars", &self.sidecars.len())
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl OperatorControl {
    /// Not started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops the sidecars and the operator.
    pub async fn shutdown(&mut self) {
        if let Some(sampler) = self.sampler.take() {
            sampler.abort();
        }
        for sidecar in self.sidecars.drain(..) {
            sidecar.shutdown().await;
        }
        if let Some(operator) = self.operator.take() {
            operator.shutdown().await;
        }
    }
}

/// Reads the operator's metrics every [`SAMPLE_EVERY`] and stamps every rise of its report,
/// acknowledgement and directive counters.
fn sample_metrics(
    metrics: lockstep_operator::metrics::Metrics,
    milestones: Arc<Mutex<Vec<Milestone>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let at = Instant::now();
            for (series, value) in counters(&metrics.encode()) {
                let before = seen.insert(series.clone(), value).unwrap_or(0);
                if value > before
                    && let Some(what) = milestone_words(&series, value - before)
                {
                    milestones
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(Milestone { at, what });
                }
            }
        }
    })
}

/// The report, acknowledgement and directive counters of a Prometheus text exposition: (series, value).
fn counters(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter(|l| {
            [
                "lockstep_reports_total{",
                "lockstep_acknowledgements_total{",
                "lockstep_directives_total{",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// A counter's rise by `by`, for people: `operator: failure report received over grpc`.
fn milestone_words(series: &str, by: u64) -> Option<String> {
    let label = |name: &str| {
        let start = series.find(&format!("{name}=\""))? + name.len() + 2;
        let end = series[start..].find('"')? + start;
        Some(series[start..end].to_owned())
    };
    let path = label("path")?;
    let times = if by > 1 {
        format!(" ({by})")
    } else {
        String::new()
    };
    if series.starts_with("lockstep_reports_total") {
        Some(format!(
            "operator: failure report received over {path}{times}"
        ))
    } else if series.starts_with("lockstep_acknowledgements_total") {
        Some(format!(
            "operator: acknowledgement received over {path}{times}"
        ))
    } else {
        let stage = label("stage")?;
        Some(format!(
            "operator: {stage} directives sent over {path} ({by})"
        ))
    }
}

fn started(what: &str, e: impl std::fmt::Display) -> ControlError {
    ControlError::Unsupported(format!("{what} did not start: {e}"))
}

/// The options of the operator in the hub `hub`: loopback listeners, a fast resync, no leader election.
pub fn operator_options(hub: &str) -> lockstep_operator::Options {
    lockstep_operator::Options {
        kubeconfig: None,
        hub_name: hub.to_owned(),
        grpc_listen: ([127, 0, 0, 1], 0).into(),
        http_listen: ([127, 0, 0, 1], 0).into(),
        resync_interval: Duration::from_millis(300),
        leader_election: false,
        namespace: NAMESPACE.into(),
        identity: "operator-0".into(),
        lease_duration: Duration::from_secs(15),
        max_sessions_per_cluster: lockstep_operator::sessions::DEFAULT_SESSIONS_PER_CLUSTER,
        max_group_volumes: lockstep_operator::DEFAULT_MAX_GROUP_VOLUMES,
        control_security: lockstep_operator::ControlSecurity::insecure_plaintext(),
    }
}

/// The options of the sidecar on `cluster`'s node, dialing the replicator on `socket` and the operator
/// at `endpoint`; short intervals so that a scenario takes seconds.
pub fn sidecar_options(
    cluster: &crate::cluster::SimCluster,
    socket: &std::path::Path,
    endpoint: &str,
) -> lockstep_sidecar::Options {
    let mut o = lockstep_sidecar::Options::new(&cluster.spec.node, cluster.name());
    o.replicator_socket = socket.to_path_buf();
    o.operator_endpoint = Some(endpoint.to_owned());
    o.insecure_plaintext_control = true;
    o.namespace = NAMESPACE.into();
    o.listen = ([127, 0, 0, 1], 0).into();
    o.inventory_interval = Duration::from_millis(300);
    o.rpc_timeout = Duration::from_secs(2);
    o.fail_safe_interval = Duration::from_secs(10);
    o.lease_duration = Duration::from_secs(3);
    o
}

/// Polls the hub's group every 50 ms, saying each new (phase, epoch, stage), until `goal` holds.
pub async fn watch_group(
    world: &World,
    timeline: &Timeline,
    wanted: &'static str,
    within: Duration,
    goal: impl Fn(&ConsistencyGroup) -> bool,
) -> Result<ConsistencyGroup, ControlError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut last = String::new();
    loop {
        tick.tick().await;
        // As a person would look: the group and its shards (the volumes), once they caught up.
        let (group, current) = world.group_with_shards().await?;
        let status = group.status.as_ref();
        let stage = status
            .and_then(|s| s.stage)
            .map_or_else(String::new, |s| format!(" stage={s}"));
        // What froze it, so that a failure shows which report came first.
        let trigger = status
            .and_then(|s| s.trigger.as_ref())
            .map_or_else(String::new, |t| {
                format!(
                    " trigger={} {}/{}: {}",
                    t.reason,
                    t.cluster.as_deref().unwrap_or("?"),
                    t.volume_handle.as_deref().unwrap_or("?"),
                    t.message.as_deref().unwrap_or("")
                )
            });
        let line = format!("{}{stage}{trigger}", kubectl::cg_line(&group));
        if line != last {
            timeline.say(format!("operator: {line}"));
            last = line;
        }
        if current && goal(&group) {
            return Ok(group);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ControlError::Cluster(ClusterError::Timeout {
                cluster: world.hub().name().to_owned(),
                what: format!("cg/{} {wanted}", world.group_name),
                within,
            }));
        }
    }
}

impl ControlSystem for OperatorControl {
    fn describe(&self) -> String {
        "the operator (in-process, in the hub) and one sidecar per node, over both paths".into()
    }

    async fn enroll(
        &mut self,
        world: &World,
        timeline: &Timeline,
    ) -> Result<Vec<String>, ControlError> {
        let hub = world.hub();
        let options = operator_options(hub.name());
        let operator = Operator::start(hub.client.clone(), &options)
            .await
            .map_err(|e| started("the operator", e))?;
        timeline.say(format!(
            "{}: operator started (gRPC Control at {})",
            hub.name(),
            operator.grpc_addr
        ));
        self.sampler = Some(sample_metrics(
            operator.engine().metrics().clone(),
            self.milestones.clone(),
        ));
        let link = LinkCut::start(operator.grpc_addr)
            .await
            .map_err(|e| started("the proxy to the operator's gRPC listener", e))?;
        let endpoint = format!("http://{}", link.addr());
        self.grpc_link = Some(link);
        self.operator = Some(operator);
        for cluster in &world.clusters {
            let Some(socket) = &cluster.control_socket else {
                return Err(ControlError::Unsupported(format!(
                    "{}: the replicator serves no control socket",
                    cluster.spec.node
                )));
            };
            let o = sidecar_options(cluster, socket, &endpoint);
            let sidecar = Sidecar::start(o, Some(cluster.client.clone()))
                .await
                .map_err(|e| started("a sidecar", e))?;
            timeline.say(format!(
                "{}: sidecar on {} started (replicator {}, operator {endpoint})",
                cluster.name(),
                cluster.spec.node,
                socket.display()
            ));
            self.sidecars.push(sidecar);
        }
        let total = world.volumes().count() as u32;
        let group = watch_group(
            world,
            timeline,
            "members resolved, replicating in sync",
            DEADLINE,
            |g| {
                g.status.as_ref().is_some_and(|s| {
                    s.member_count >= total
                        && conditions::status_of(&s.conditions, condition::CONSISTENT_IMAGE)
                            == Some(true)
                })
            },
        )
        .await?;
        Ok(group
            .status
            .iter()
            .flat_map(|s| s.members.iter())
            .filter_map(|m| m.volume_handle.clone())
            .collect())
    }

    async fn freeze(
        &mut self,
        world: &World,
        _failure: &CopyFailure,
        timeline: &Timeline,
    ) -> Result<FreezeOutcome, ControlError> {
        let from = self.epoch;
        let go = world.group.spec.policy == Policy::FreezeAndGo;
        let group = watch_group(world, timeline, "frozen", DEADLINE, |g| {
            let (epoch, stage) = g.position();
            let phase = g.status.as_ref().and_then(|s| s.phase);
            epoch > from
                && if go {
                    stage == Stage::Release
                } else {
                    phase == Some(Phase::Frozen)
                }
        })
        .await?;
        let status = group.status.clone().unwrap_or_default();
        self.epoch = status.epoch;
        if let Some(t) = &status.trigger {
            timeline.say(format!(
                "operator: triggered by {} on {} ({}), first heard over {}",
                t.reason,
                t.volume_handle.as_deref().unwrap_or("?"),
                t.node.as_deref().unwrap_or("?"),
                t.path.map_or_else(|| "?".to_owned(), |p| p.to_string())
            ));
        }
        for m in &status.members {
            if let Some(ack) = &m.acknowledged {
                timeline.say(format!(
                    "operator: {}/{} ({}) acknowledged epoch {} {} over {}",
                    m.cluster,
                    m.pvc,
                    m.volume_handle.as_deref().unwrap_or("?"),
                    ack.epoch,
                    ack.stage,
                    ack.path
                ));
            }
        }
        Ok(FreezeOutcome {
            epoch: status.epoch,
            frozen: status
                .consistent_image
                .map(|i| i.volumes.into_iter().map(|v| v.volume_handle).collect())
                .unwrap_or_default(),
            released: go,
        })
    }

    fn set_grpc_path(&mut self, down: bool) -> Result<(), ControlError> {
        let link = self.grpc_link.as_ref().ok_or_else(|| {
            ControlError::Unsupported("the operator and sidecars are not running".into())
        })?;
        link.set_mode(if down {
            LinkMode::Reset
        } else {
            LinkMode::Pass
        });
        Ok(())
    }

    fn milestones(&self) -> Vec<Milestone> {
        self.milestones
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn thaw(
        &mut self,
        world: &World,
        timeline: &Timeline,
    ) -> Result<ThawOutcome, ControlError> {
        let epoch = self.epoch;
        let resynced = watch_group(
            world,
            timeline,
            "back to Replicating",
            RESYNC_DEADLINE,
            |g| {
                g.position() == (epoch, Stage::Resume)
                    && g.status.as_ref().and_then(|s| s.phase) == Some(Phase::Replicating)
            },
        )
        .await;
        let outcome = match resynced {
            Ok(_) => ThawOutcome::Resumed,
            Err(e) => ThawOutcome::Unsupported(format!("the operator did not resync: {e}")),
        };
        self.shutdown().await;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_rises_of_the_operator_metrics_become_milestones() {
        let metrics = lockstep_operator::metrics::Metrics::default();
        metrics.report(lockstep_api::domain::Path::Grpc);
        metrics.directives(lockstep_api::domain::Path::Api, Stage::Freeze, 2);
        let found = counters(&metrics.encode());
        assert!(
            found.contains(&(r#"lockstep_reports_total{path="grpc"}"#.to_owned(), 1)),
            "{found:?}"
        );
        let words: Vec<String> = found
            .iter()
            .filter_map(|(series, value)| milestone_words(series, *value))
            .collect();
        assert!(
            words.contains(&"operator: failure report received over grpc".to_owned()),
            "{words:?}"
        );
        assert!(
            words.contains(&"operator: Freeze directives sent over api (2)".to_owned()),
            "{words:?}"
        );
    }
}
