//! Prometheus metrics, labelled by group, path, stage, phase and state — never by volume or write.

use std::{sync::Arc, time::Duration};

use lockstep_api::domain::{Path, Phase, Stage, VolumeState};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectiveLabels {
    path: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathReasonLabels {
    path: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupPhaseLabels {
    group: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterPathLabels {
    cluster: String,
    path: String,
}

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reports: Family<PathLabels, Counter>,
    acks: Family<PathLabels, Counter>,
    directives: Family<DirectiveLabels, Counter>,
    freeze_latency: Histogram,
    groups: Family<PhaseLabels, Gauge>,
    group_phase: Family<GroupPhaseLabels, Gauge>,
    volumes: Family<StateLabels, Gauge>,
    cluster_path_up: Family<ClusterPathLabels, Gauge>,
    grpc_sessions: Family<ClusterLabels, Gauge>,
    leader: Gauge,
    held_writes_failed: Family<GroupLabels, Counter>,
    events_dropped: Family<GroupLabels, Counter>,
    decision_batch: Histogram,
    control_refused: Family<ReasonLabels, Counter>,
    reports_refused: Family<PathReasonLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lockstep");
        let reports = Family::<PathLabels, Counter>::default();
        let acks = Family::<PathLabels, Counter>::default();
        let directives = Family::<DirectiveLabels, Counter>::default();
        let freeze_latency = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let groups = Family::<PhaseLabels, Gauge>::default();
        let volumes = Family::<StateLabels, Gauge>::default();
        let held_writes_failed = Family::<GroupLabels, Counter>::default();
        let events_dropped = Family::<GroupLabels, Counter>::default();
        registry.register(
            "events_dropped",
            "Reports and acknowledgements about a group dropped because the API server refused the status they decided (invalid or too large), by group",
            events_dropped.clone(),
        );
        let control_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "control_refused",
            "gRPC Control calls refused for their credential or for speaking for another node's volumes, by reason",
            control_refused.clone(),
        );
        let reports_refused = Family::<PathReasonLabels, Counter>::default();
        registry.register(
            "reports_refused",
            "Reports and acknowledgements refused, on either path, as malformed or for a group this hub does not know, by path and reason",
            reports_refused.clone(),
        );
        let decision_batch = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]);
        registry.register(
            "decision_batch_events",
            "Events decided together in one decision (one read and at most one status write)",
            decision_batch.clone(),
        );
        registry.register(
            "held_writes_failed",
            "Held writes that failed with an I/O error at the hold timeout, by group",
            held_writes_failed.clone(),
        );
        registry.register(
            "reports",
            "Copy-failure reports received, by path",
            reports.clone(),
        );
        registry.register(
            "acknowledgements",
            "Acknowledgements received, by path",
            acks.clone(),
        );
        registry.register(
            "directives",
            "Directives sent: gRPC messages and mirror writes, by path and stage",
            directives.clone(),
        );
        registry.register(
            "freeze_latency_seconds",
            "From the decision to freeze to the last member volume's acknowledgement",
            freeze_latency.clone(),
        );
        registry.register("groups", "Consistency groups, by phase", groups.clone());
        let group_phase = Family::<GroupPhaseLabels, Gauge>::default();
        registry.register(
            "group_phase",
            "1 for each group, labelled with the phase it is in (for alerts on how long a group stays in one)",
            group_phase.clone(),
        );
        let cluster_path_up = Family::<ClusterPathLabels, Gauge>::default();
        registry.register(
            "member_cluster_path_up",
            "Whether a path to a member cluster works (1) or not (0), for each path the MemberCluster uses: api (its API server answers) and grpc (at least one of its sidecars holds a stream)",
            cluster_path_up.clone(),
        );
        let grpc_sessions = Family::<ClusterLabels, Gauge>::default();
        registry.register(
            "grpc_sessions",
            "Sidecars holding an open gRPC Control stream, by member cluster",
            grpc_sessions.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "operator_leader",
            "1 while this replica holds the leader Lease (and so serves gRPC and writes), 0 on a standby",
            leader.clone(),
        );
        registry.register(
            "member_volumes",
            "Member volumes, by replication state",
            volumes.clone(),
        );
        // Both paths are known up front: their counters start at 0, so a path that never carried a
        // report or an acknowledgement shows as 0 (and `increase` sees its first one) rather than
        // being absent.
        for path in [Path::Api, Path::Grpc] {
            let labels = PathLabels {
                path: path.to_string(),
            };
            reports.get_or_create(&labels).inc_by(0);
            acks.get_or_create(&labels).inc_by(0);
        }
        Self {
            registry: Arc::new(registry),
            reports,
            acks,
            directives,
            freeze_latency,
            groups,
            group_phase,
            volumes,
            cluster_path_up,
            grpc_sessions,
            leader,
            held_writes_failed,
            events_dropped,
            decision_batch,
            control_refused,
            reports_refused,
        }
    }
}

impl Metrics {
    /// A Control call was refused: no valid credential, or speaking for what is not the sender's.
    pub fn control_refused(&self, reason: &str) {
        self.control_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// What a node sent on `path` was refused for `reason` (see [`crate::ingest::Refusal::reason`]).
    pub fn report_refused(&self, path: Path, reason: &str) {
        self.reports_refused
            .get_or_create(&PathReasonLabels {
                path: path.to_string(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// `count` events about a group were dropped: the API server refused the status they decided.
    pub fn events_dropped(&self, group: &str, count: usize) {
        self.events_dropped
            .get_or_create(&GroupLabels {
                group: group.to_owned(),
            })
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// A report arrived on a path.
    pub fn report(&self, path: Path) {
        self.reports
            .get_or_create(&PathLabels {
                path: path.to_string(),
            })
            .inc();
    }

    /// An acknowledgement arrived on a path.
    pub fn ack(&self, path: Path) {
        self.acks
            .get_or_create(&PathLabels {
                path: path.to_string(),
            })
            .inc();
    }

    /// Directives went out on a path.
    pub fn directives(&self, path: Path, stage: Stage, count: usize) {
        let labels = DirectiveLabels {
            path: path.to_string(),
            stage: stage.to_string(),
        };
        self.directives
            .get_or_create(&labels)
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// Held writes of a group failed at the hold timeout (counted once, as the group's status grew).
    pub fn held_writes_failed(&self, group: &str, count: u64) {
        if count == 0 {
            return;
        }
        self.held_writes_failed
            .get_or_create(&GroupLabels {
                group: group.to_owned(),
            })
            .inc_by(count);
    }

    /// A decision took `events` events from a group's inbox.
    pub fn decision_batch(&self, events: usize) {
        self.decision_batch.observe(events as f64);
    }

    /// A freeze completed: every member volume acknowledged.
    pub fn freeze_completed(&self, latency: Duration) {
        self.freeze_latency.observe(latency.as_secs_f64());
    }

    /// Sets the gauges of groups by phase (counted, and each group's own) and member volumes by state,
    /// and gives each group its held-writes counter (at 0 until its first hold timeout).
    pub fn census(&self, phases: &[(&str, Phase)], states: &[VolumeState]) {
        self.groups.clear();
        self.group_phase.clear();
        for (group, phase) in phases {
            self.groups
                .get_or_create(&PhaseLabels {
                    phase: phase.to_string(),
                })
                .inc();
            self.group_phase
                .get_or_create(&GroupPhaseLabels {
                    group: (*group).to_owned(),
                    phase: phase.to_string(),
                })
                .set(1);
            // A known group's hold-timeout counter exists from the start, at 0.
            self.held_writes_failed
                .get_or_create(&GroupLabels {
                    group: (*group).to_owned(),
                })
                .inc_by(0);
        }
        self.volumes.clear();
        for state in states {
            self.volumes
                .get_or_create(&StateLabels {
                    state: format!("{state:?}"),
                })
                .inc();
        }
    }

    /// What the operator saw of a member cluster in its last probe: which of the paths it uses work,
    /// and how many of its sidecars hold a gRPC stream.
    pub fn member_cluster(&self, cluster: &str, paths: &[(Path, bool)], sessions: u32) {
        for (path, up) in paths {
            self.cluster_path_up
                .get_or_create(&ClusterPathLabels {
                    cluster: cluster.to_owned(),
                    path: path.to_string(),
                })
                .set(i64::from(*up));
        }
        self.grpc_sessions
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_owned(),
            })
            .set(i64::from(sessions));
    }

    /// Whether this replica leads (set as the metrics are read). A standby drops the gauges only the
    /// leader keeps current (groups by phase, member clusters), so an old leader's last values do not
    /// linger beside the new leader's.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        if !leading {
            self.groups.clear();
            self.group_phase.clear();
            self.volumes.clear();
            self.cluster_path_up.clear();
            self.grpc_sessions.clear();
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "metrics could not be encoded");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_labelled_by_path_stage_and_phase() {
        let metrics = Metrics::default();
        metrics.report(Path::Grpc);
        metrics.directives(Path::Api, Stage::Freeze, 2);
        metrics.held_writes_failed("orders-db", 3);
        metrics.held_writes_failed("orders-db", 0);
        metrics.held_writes_failed("orders-db", 2);
        metrics.member_cluster("west", &[(Path::Api, false), (Path::Grpc, true)], 2);
        metrics.set_leader(true);
        metrics.census(
            &[("orders-db", Phase::Frozen)],
            &[VolumeState::Suspended, VolumeState::Suspended],
        );
        let text = metrics.encode();
        assert!(
            text.contains(r#"lockstep_reports_total{path="grpc"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lockstep_directives_total{path="api",stage="Freeze"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lockstep_held_writes_failed_total{group="orders-db"} 5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lockstep_groups{phase="Frozen"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lockstep_member_volumes{state="Suspended"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lockstep_group_phase{group="orders-db",phase="Frozen"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lockstep_member_cluster_path_up{cluster="west",path="api"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lockstep_member_cluster_path_up{cluster="west",path="grpc"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lockstep_grpc_sessions{cluster="west"} 2"#),
            "{text}"
        );
        assert!(text.contains("lockstep_operator_leader 1"), "{text}");
    }

    #[test]
    fn counters_of_known_paths_and_groups_are_exported_at_zero_before_their_first_event() {
        let metrics = Metrics::default();
        let fresh = metrics.encode();
        for series in [
            r#"lockstep_reports_total{path="api"} 0"#,
            r#"lockstep_reports_total{path="grpc"} 0"#,
            r#"lockstep_acknowledgements_total{path="api"} 0"#,
            r#"lockstep_acknowledgements_total{path="grpc"} 0"#,
        ] {
            assert!(fresh.contains(series), "{series} in\n{fresh}");
        }
        assert!(
            !fresh.contains("lockstep_held_writes_failed_total{"),
            "{fresh}"
        );
        metrics.set_leader(true);
        metrics.census(&[("orders-db", Phase::Replicating)], &[]);
        let text = metrics.encode();
        assert!(
            text.contains(r#"lockstep_held_writes_failed_total{group="orders-db"} 0"#),
            "{text}"
        );
        metrics.held_writes_failed("orders-db", 2);
        metrics.census(&[("orders-db", Phase::Frozen)], &[]);
        assert!(
            metrics
                .encode()
                .contains(r#"lockstep_held_writes_failed_total{group="orders-db"} 2"#),
            "a later census keeps the count"
        );
    }
}
