//! Standard Kubernetes conditions, set the way kube-apiserver's own controllers set them: the transition
//! time moves only when the status changes, and every condition names the generation it observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition to set: type, status, a CamelCase reason and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionUpdate<'a> {
    /// The condition type, e.g. `Frozen`.
    pub type_: &'a str,
    /// True or false.
    pub status: bool,
    /// A CamelCase reason, e.g. `AllMembersAcknowledged`.
    pub reason: &'a str,
    /// A sentence for people.
    pub message: String,
}

/// Sets a condition in `conditions`, keeping its transition time when its status did not change; the
/// message is cut to [`crate::domain::MESSAGE_LIMIT`] bytes.
pub fn set(
    conditions: &mut Vec<Condition>,
    update: ConditionUpdate<'_>,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if update.status { "True" } else { "False" };
    let existing = conditions
        .iter_mut()
        .find(|condition| condition.type_ == update.type_);
    match existing {
        Some(condition) => {
            if condition.status != status {
                condition.last_transition_time = now.clone();
                condition.status = status.to_owned();
            }
            condition.reason = update.reason.to_owned();
            condition.message = crate::domain::bounded_message(&update.message);
            condition.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: update.type_.to_owned(),
            status: status.to_owned(),
            reason: update.reason.to_owned(),
            message: crate::domain::bounded_message(&update.message),
            observed_generation: generation,
            last_transition_time: now.clone(),
        }),
    }
}

/// The status of a condition, if set: `Some(true)` for True.
pub fn status_of(conditions: &[Condition], type_: &str) -> Option<bool> {
    conditions
        .iter()
        .find(|condition| condition.type_ == type_)
        .map(|condition| condition.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
    }

    fn update(status: bool, reason: &str) -> ConditionUpdate<'_> {
        ConditionUpdate {
            type_: "Frozen",
            status,
            reason,
            message: format!("because {reason}"),
        }
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            update(false, "Replicating"),
            Some(1),
            &at(10),
        );
        set(
            &mut conditions,
            update(false, "StillReplicating"),
            Some(2),
            &at(20),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(10));
        assert_eq!(conditions[0].reason, "StillReplicating");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set(
            &mut conditions,
            update(true, "AllAcknowledged"),
            Some(2),
            &at(30),
        );
        assert_eq!(conditions[0].last_transition_time, at(30));
        assert_eq!(status_of(&conditions, "Frozen"), Some(true));
        assert_eq!(status_of(&conditions, "Ready"), None);
    }
}
