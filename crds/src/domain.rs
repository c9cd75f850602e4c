//! The shared domain types: a group's epoch and stage, policies, phases, paths and volume states.
//!
//! They are defined once here and used by the CRDs, the protocols and every component. The ordering of
//! [`Position`] (and of a [`GroupEpoch`]'s) is the ordering of DESIGN.md rule 3: by epoch, then by stage
//! (Freeze < Release < Resume).

use std::{fmt, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Malformed domain values, refused wherever they arrive (gRPC, status, flags).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A directive or acknowledgement without a group UID.
    #[error("the message names no group UID")]
    MissingGroupUid,
    /// The stage field was left unset.
    #[error("the message leaves the stage unspecified")]
    StageUnspecified,
    /// The stage field holds a value this version does not know.
    #[error("the message carries the unknown stage {0}")]
    StageUnknown(i32),
    /// A duration that is not of the form `30s`, `1m30s`, `500ms`.
    #[error("{0:?} is not a duration such as 30s, 1m30s or 500ms")]
    Duration(String),
    /// An epoch no operator ever sends: above 2^53 - 1.
    #[error("the message carries epoch {0}, above the largest epoch {MAX_EPOCH}")]
    EpochTooLarge(u64),
}

/// The stages of one epoch, in the only order they happen.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum Stage {
    /// Replication is suspended on every member and writes are held.
    Freeze,
    /// Held writes were released; primaries run on, unreplicated.
    Release,
    /// Members resynchronise and copy again.
    Resume,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Freeze => "Freeze",
            Stage::Release => "Release",
            Stage::Resume => "Resume",
        })
    }
}

/// Where a group (or one of its volumes) is in its life: an epoch and the stage within it, ordered as
/// DESIGN.md rule 3 orders them — by epoch, then by stage (Freeze < Release < Resume).
///
/// [`Position::decode`] is the one place a record without a stage is read: statuses, ReplicationNode
/// volumes and replicator states leave the stage out at a group's baseline, replicating at that epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// Grows by one with each freeze; never decreases. (Declared first: positions order by it first.)
    pub epoch: u64,
    /// The stage within the epoch.
    pub stage: Stage,
}

impl Position {
    /// Where every group starts: replicating at epoch 0.
    pub const START: Self = Self {
        epoch: 0,
        stage: Stage::Resume,
    };

    /// The position at `stage` of `epoch`.
    pub const fn new(epoch: u64, stage: Stage) -> Self {
        Self { epoch, stage }
    }

    /// An (epoch, stage) as recorded where the stage may be missing: a missing stage is the baseline, a
    /// group that never froze or has resumed, replicating at `epoch` (Resume).
    pub fn decode(epoch: u64, stage: Option<Stage>) -> Self {
        Self {
            epoch,
            stage: stage.unwrap_or(Stage::Resume),
        }
    }

    /// Whether it is its epoch's baseline: replicating (Resume).
    pub fn is_replicating(self) -> bool {
        self.stage == Stage::Resume
    }
}

impl From<Position> for (u64, Stage) {
    fn from(position: Position) -> Self {
        (position.epoch, position.stage)
    }
}

impl From<(u64, Stage)> for Position {
    fn from((epoch, stage): (u64, Stage)) -> Self {
        Self { epoch, stage }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.epoch, self.stage)
    }
}

/// One point in a group's life: (group UID, epoch, stage). Directives and acknowledgements carry it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GroupEpoch {
    /// The group's `metadata.uid` in the hub cluster.
    pub group_uid: String,
    /// Grows by one with each freeze; never decreases.
    pub epoch: u64,
    /// The stage within the epoch.
    pub stage: Stage,
}

/// The largest epoch Lockstep ever uses: 2^53 - 1, the largest integer a JSON number keeps exactly
/// (kubectl and most JSON tools print numbers as doubles). Epochs above it are refused wherever they
/// arrive: in manifests, in statuses and on the wire.
pub const MAX_EPOCH: u64 = (1 << 53) - 1;

impl GroupEpoch {
    /// A point of a named group; refuses an empty UID and an epoch above [`MAX_EPOCH`].
    pub fn new(group_uid: &str, epoch: u64, stage: Stage) -> Result<Self, DomainError> {
        if group_uid.is_empty() {
            return Err(DomainError::MissingGroupUid);
        }
        if epoch > MAX_EPOCH {
            return Err(DomainError::EpochTooLarge(epoch));
        }
        Ok(Self {
            group_uid: group_uid.to_owned(),
            epoch,
            stage,
        })
    }

    /// The (epoch, stage) pair by which points of the same group are ordered.
    pub fn position(&self) -> (u64, Stage) {
        self.at().into()
    }

    /// Where the point is in the group's life.
    pub fn at(&self) -> Position {
        Position::new(self.epoch, self.stage)
    }

    /// True when `self` is a later point of the same group than `other` (a different group is never later:
    /// epochs belong to a group's UID).
    pub fn supersedes(&self, other: &GroupEpoch) -> bool {
        self.group_uid == other.group_uid && self.position() > other.position()
    }
}

impl fmt::Display for GroupEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}/{}", self.group_uid, self.epoch, self.stage)
    }
}

/// What a group does once every member is frozen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Policy {
    /// Once every member is frozen, release the held writes: primaries keep running, unreplicated, and
    /// the secondaries keep the consistent image of the freeze. Favours availability.
    #[default]
    FreezeAndGo,
    /// Writes stay held until a person sets `spec.release.epoch` (or the hold timeout fails them). Favours
    /// a recovery point of zero: nothing is acknowledged that the secondaries lack.
    FreezeAndStop,
}

/// Where a group is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Every member copies synchronously to its secondary.
    Replicating,
    /// A copy failed or a freeze was asked for: members are being suspended.
    Freezing,
    /// Every member acknowledged the freeze; writes are held (FreezeAndStop) or about to be released.
    Frozen,
    /// Held writes were released; primaries run unreplicated; the secondaries keep the frozen image.
    Running,
    /// Members are copying their dirty regions back to the secondaries; the image is not consistent.
    Resyncing,
    /// The operator cannot do what the group asks (unresolved members, unreachable clusters); see
    /// conditions.
    Degraded,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The two independent paths between the control system and the nodes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum Path {
    /// Path 1: through the Kubernetes API servers (ReplicationNode status, mirrored groups).
    Api,
    /// Path 2: the operator's gRPC Control service.
    Grpc,
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Path::Api => "api",
            Path::Grpc => "grpc",
        })
    }
}

/// Which paths reach a member cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ClusterPaths {
    /// Both paths (the default and the recommended setting).
    #[default]
    Both,
    /// Only the Kubernetes API server: the cluster's nodes have no route to the operator's gRPC Service.
    ApiOnly,
    /// Only gRPC: the cluster's API server is not reachable from the hub (an edge cluster behind NAT whose
    /// sidecars dial out).
    GrpcOnly,
}

/// Where the operator takes the node of a member cluster's volume from, on a cluster it reads through the
/// API path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum VolumeBinding {
    /// Only from what no node can write: the PersistentVolume's required node affinity naming one
    /// `kubernetes.io/hostname`, or an attached VolumeAttachment. A volume bound by neither is unresolved
    /// (it blocks a release), so a compromised node can delay a release but never cause one. The default.
    #[default]
    Required,
    /// As Required where a binding exists; where none does, from the node whose sidecar claims the volume
    /// (when no other node claims it too). For CSI drivers whose volumes name no node and attach without
    /// VolumeAttachments; a compromised node can then answer for an unbound volume its own sidecar does
    /// not claim.
    SidecarClaims,
}

impl ClusterPaths {
    /// True when the path reaches the cluster.
    pub fn includes(self, path: Path) -> bool {
        matches!(
            (self, path),
            (ClusterPaths::Both, _)
                | (ClusterPaths::ApiOnly, Path::Api)
                | (ClusterPaths::GrpcOnly, Path::Grpc)
        )
    }
}

/// What a volume's replication is doing, as a sidecar reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum VolumeState {
    /// Copying every write synchronously.
    Replicating,
    /// A copy failed; writes are held until the group is frozen and released.
    Held,
    /// Suspended at an epoch; every write is held until a release at that epoch.
    Suspended,
    /// Released: writes are acknowledged primary-only and tracked as dirty.
    Running,
    /// Copying its dirty regions back to the secondary.
    Resyncing,
    /// Just started serving: I/O waits until the sidecar confirms the group, epoch and stage.
    Unconfirmed,
    /// In no group, or replication is off.
    Standalone,
}

/// Where a group stands when two groups claim one volume (DESIGN.md rule 5): the first claim wins, by the
/// hub group's creation time, then its UID. The operator and every sidecar order groups by this, so they
/// decide alike, and neither input changes over a group's life, so the decision survives restarts. A group
/// whose creation time is unknown ranks after every group whose time is known.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClaimOrder {
    /// The hub group's `metadata.creationTimestamp`, in milliseconds since the Unix epoch (`i64::MAX`
    /// when unknown).
    created_unix_ms: i64,
    /// The hub group's UID.
    group_uid: String,
}

impl ClaimOrder {
    /// The order of the hub group `group_uid`, created at `created_unix_ms` (`None` or 0: unknown).
    pub fn new(created_unix_ms: Option<i64>, group_uid: impl Into<String>) -> Self {
        Self {
            created_unix_ms: created_unix_ms.filter(|ms| *ms != 0).unwrap_or(i64::MAX),
            group_uid: group_uid.into(),
        }
    }

    /// The creation time in milliseconds since the Unix epoch, if known (0 otherwise, as the gRPC
    /// message carries it).
    pub fn created_unix_ms(&self) -> i64 {
        if self.created_unix_ms == i64::MAX {
            0
        } else {
            self.created_unix_ms
        }
    }

    /// The group's UID.
    pub fn group_uid(&self) -> &str {
        &self.group_uid
    }
}

/// The condition types a ConsistencyGroup carries.
pub mod condition {
    /// The group is doing what its spec asks, with no error.
    pub const READY: &str = "Ready";
    /// Every resolved member volume acknowledged a freeze at the current epoch.
    pub const FROZEN: &str = "Frozen";
    /// The secondaries together hold an image the application could have seen at one instant.
    pub const CONSISTENT_IMAGE: &str = "ConsistentImage";
    /// Every member in the spec is resolved to volumes and nodes.
    pub const MEMBERS_RESOLVED: &str = "MembersResolved";
    /// No secondary failed to keep the frozen image through a resync (False names the volume, its
    /// node and why, e.g. `UndoLogOutOfSpace`).
    pub const IMAGE_KEPT: &str = "ImageKept";
    /// Present once `spec.failover` is set: True when the group is frozen at exactly that epoch with a
    /// complete consistent image to fail over to; False says why the failover is refused.
    pub const FAILOVER_READY: &str = "FailoverReady";
    /// Only while the group is Degraded (the operator cannot do what it asks until a person acts): kstatus
    /// (Flux) reads it as Failed.
    pub const STALLED: &str = "Stalled";
}

/// How a replicator's refusal to keep an image for want of undo-log space begins (the reference
/// replicator's secondary says it; the primary's `CopyFailed` error carries it on).
pub const UNDO_LOG_OUT_OF_SPACE: &str = "undo log out of space";

/// Why a copy failure is a secondary failing to keep the image through a resync, if it is one: the
/// reason (CamelCase, for conditions, Events and metric labels).
pub fn kept_image_failure(copy_error: &str) -> Option<&'static str> {
    copy_error
        .contains(UNDO_LOG_OUT_OF_SPACE)
        .then_some("UndoLogOutOfSpace")
}

/// Parses a Go-style duration (`500ms`, `30s`, `1m30s`, `2h`) as Kubernetes writes them.
pub fn parse_duration(text: &str) -> Result<Duration, DomainError> {
    let error = || DomainError::Duration(text.to_owned());
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(error());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(error)?;
        if digits == 0 {
            return Err(error());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| error())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(error()),
        };
        let part = unit
            .checked_mul(u32::try_from(value).map_err(|_| error())?)
            .ok_or_else(error)?;
        total = total.checked_add(part).ok_or_else(error)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_epoch_then_stage_and_a_missing_stage_is_the_baseline() {
        let at = Position::new;
        assert!(at(1, Stage::Freeze) < at(1, Stage::Release));
        assert!(at(1, Stage::Release) < at(1, Stage::Resume));
        assert!(at(1, Stage::Resume) < at(2, Stage::Freeze));
        assert_eq!(Position::decode(3, None), at(3, Stage::Resume));
        assert!(Position::decode(3, None).is_replicating());
        assert_eq!(
            Position::decode(3, Some(Stage::Freeze)),
            at(3, Stage::Freeze)
        );
        assert_eq!(Position::START, Position::decode(0, None));
        assert_eq!(
            <(u64, Stage)>::from(at(2, Stage::Release)),
            (2, Stage::Release)
        );
        assert_eq!(at(2, Stage::Release).to_string(), "2/Release");
    }

    #[test]
    fn points_order_by_epoch_then_stage_within_one_group() {
        let at = |epoch, stage| GroupEpoch::new("g", epoch, stage).unwrap();
        assert!(at(1, Stage::Release).supersedes(&at(1, Stage::Freeze)));
        assert!(at(1, Stage::Resume).supersedes(&at(1, Stage::Release)));
        assert!(at(2, Stage::Freeze).supersedes(&at(1, Stage::Resume)));
        assert!(!at(1, Stage::Freeze).supersedes(&at(1, Stage::Freeze)));
        let other = GroupEpoch::new("h", 9, Stage::Resume).unwrap();
        assert!(
            !other.supersedes(&at(1, Stage::Freeze)),
            "epochs belong to one group"
        );
        assert_eq!(
            GroupEpoch::new("", 1, Stage::Freeze),
            Err(DomainError::MissingGroupUid)
        );
    }

    #[test]
    fn durations_parse_like_kubernetes_writes_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "30", "s", "1.5s", "-1s", "10x", "99999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn cluster_paths_say_which_path_reaches_a_cluster() {
        assert!(ClusterPaths::Both.includes(Path::Api) && ClusterPaths::Both.includes(Path::Grpc));
        assert!(
            ClusterPaths::ApiOnly.includes(Path::Api)
                && !ClusterPaths::ApiOnly.includes(Path::Grpc)
        );
        assert!(
            !ClusterPaths::GrpcOnly.includes(Path::Api)
                && ClusterPaths::GrpcOnly.includes(Path::Grpc)
        );
    }
}

/// The longest message, in bytes, a status or an Event carries for people (a copy error, a condition's
/// message): every such string in the CRDs has this `maxLength`, so one long error can never make an
/// object the API server refuses.
pub const MESSAGE_LIMIT: usize = 1024;

/// `text` cut to at most [`MESSAGE_LIMIT`] bytes, on a character boundary, ending with a marker that says
/// how long it was; shorter text is returned as it is.
pub fn bounded_message(text: &str) -> String {
    if text.len() <= MESSAGE_LIMIT {
        return text.to_owned();
    }
    let marker = format!(" … [truncated, {} bytes in all]", text.len());
    let mut end = MESSAGE_LIMIT.saturating_sub(marker.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &text[..end])
}

#[cfg(test)]
mod message_tests {
    use super::*;

    #[test]
    fn a_long_message_is_cut_to_the_limit_with_a_marker_and_a_short_one_kept() {
        assert_eq!(bounded_message("link cut"), "link cut");
        let long = "é".repeat(2 * 1024 * 1024);
        let cut = bounded_message(&long);
        assert!(cut.len() <= MESSAGE_LIMIT, "{} bytes", cut.len());
        assert!(cut.ends_with(&format!("[truncated, {} bytes in all]", long.len())));
        assert!(cut.starts_with("éé"));
        let exact = "x".repeat(MESSAGE_LIMIT);
        assert_eq!(bounded_message(&exact), exact);
    }
}
