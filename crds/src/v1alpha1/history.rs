//! A group's freeze history: the last [`FREEZE_HISTORY`] freezes, kept in its status for `kubectl
//! lockstep timeline` and for people, since Events expire after about an hour.
//!
//! Times are RFC 3339 with milliseconds ([`MilliTime`]): Kubernetes' own `Time` keeps only seconds, and a
//! freeze takes milliseconds.

use std::borrow::Cow;

use k8s_openapi::jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How many freezes a group's status keeps: the oldest goes when a freeze begins beyond it.
pub const FREEZE_HISTORY: usize = 10;

/// An instant written RFC 3339 in UTC with milliseconds (`2026-12-05T19:04:13.123Z`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MilliTime(pub Timestamp);

impl MilliTime {
    /// Milliseconds from `earlier` to this instant (negative when this one is earlier).
    pub fn millis_since(&self, earlier: &MilliTime) -> i64 {
        self.0.as_millisecond() - earlier.0.as_millisecond()
    }
}

impl std::fmt::Display for MilliTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%S%.3fZ", self.0)
            .map_err(|_| std::fmt::Error)?;
        f.write_str(&text)
    }
}

impl From<Timestamp> for MilliTime {
    fn from(timestamp: Timestamp) -> Self {
        Self(timestamp)
    }
}

impl Serialize for MilliTime {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MilliTime {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse::<Timestamp>().map(MilliTime).map_err(|error| {
            serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {error}"))
        })
    }
}

impl JsonSchema for MilliTime {
    fn schema_name() -> Cow<'static, str> {
        "MilliTime".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "format": "date-time",
            "maxLength": 64,
        })
    }
}

/// How a freeze ended, or where it stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FreezeOutcome {
    /// Still collecting the member volumes' acknowledgements.
    Freezing,
    /// Every member volume is frozen and its writes stay held until a person releases them
    /// (FreezeAndStop: `spec.release.epoch`) or resynchronises the group.
    AwaitingRelease,
    /// Held writes failed with an I/O error at the hold timeout before the release.
    HoldTimeout,
    /// The held writes were released: the primaries run unreplicated.
    Released,
    /// A resync started: the members copy their dirty regions.
    Resyncing,
    /// Every member replicates in sync again.
    Resynced,
    /// A newer freeze began before this one was resynced.
    Superseded,
}

impl std::fmt::Display for FreezeOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// One freeze of the group, as the operator decided it: what triggered it and when each step happened.
/// Written with the status writes the freeze makes anyway (the decision, acknowledgements, release,
/// resync): a step's time is when the operator persisted it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FreezeRecord {
    /// The epoch the freeze raised the group to.
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,
    /// What started it: the reason, the volume and node, the path that brought it first, the
    /// replicator's error.
    pub trigger: super::FreezeTrigger,
    /// When the operator heard the trigger (and sent the freeze).
    pub triggered_at: MilliTime,
    /// When a first member volume acknowledged the freeze (its replication suspended, writes held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_at: Option<MilliTime>,
    /// When every member volume had acknowledged the freeze: the group was Frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_at: Option<MilliTime>,
    /// When the held writes were released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<MilliTime>,
    /// When the resync began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_started_at: Option<MilliTime>,
    /// When every member replicated in sync again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resynced_at: Option<MilliTime>,
    /// Held writes that failed with an I/O error at the hold timeout during this freeze.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_writes_failed: u64,
    /// How the freeze ended, or where it stands.
    pub outcome: FreezeOutcome,
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_keep_milliseconds_and_read_back() {
        let time: MilliTime =
            serde_json::from_value(serde_json::json!("2026-12-05T19:04:13.1234Z"))
                .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(
            serde_json::to_value(time).unwrap_or_default(),
            serde_json::json!("2026-12-05T19:04:13.123Z")
        );
        let later: MilliTime = serde_json::from_value(serde_json::json!("2026-12-05T19:04:14Z"))
            .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(later.millis_since(&time), 877);
        let refused = serde_json::from_value::<MilliTime>(serde_json::json!("yesterday"));
        assert!(
            refused
                .as_ref()
                .is_err_and(|error| error.to_string().contains("not an RFC 3339 time")),
            "{refused:?}"
        );
    }
}
