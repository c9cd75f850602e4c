//! The generated gRPC code for the two protocols (`crds/proto/`).
//!
//! `control::v1` is the path-2 protocol between sidecars and the operator; `replicator::v1` is how a
//! sidecar controls the volume replicator on its node. Conversions to the domain types live here too.

/// The Control protocol (`lockstep.control.v1`).
pub mod control {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("lockstep.control.v1");
    }
}

/// The Replicator protocol (`lockstep.replicator.v1`).
pub mod replicator {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("lockstep.replicator.v1");
    }
}

use crate::domain::{DomainError, GroupEpoch, Stage, VolumeState};

impl From<VolumeState> for control::v1::ReplicationState {
    fn from(state: VolumeState) -> Self {
        match state {
            VolumeState::Replicating => Self::Replicating,
            VolumeState::Held => Self::Held,
            VolumeState::Suspended => Self::Suspended,
            VolumeState::Running => Self::Running,
            VolumeState::Resyncing => Self::Resyncing,
            VolumeState::Unconfirmed => Self::Unconfirmed,
            VolumeState::Standalone => Self::Standalone,
        }
    }
}

impl control::v1::ReplicationState {
    /// The domain state, or `None` for an unset one (a malformed message).
    pub fn to_domain(self) -> Option<VolumeState> {
        Some(match self {
            Self::Unspecified => return None,
            Self::Replicating => VolumeState::Replicating,
            Self::Held => VolumeState::Held,
            Self::Suspended => VolumeState::Suspended,
            Self::Running => VolumeState::Running,
            Self::Resyncing => VolumeState::Resyncing,
            Self::Unconfirmed => VolumeState::Unconfirmed,
            Self::Standalone => VolumeState::Standalone,
        })
    }
}

impl From<Stage> for control::v1::Stage {
    fn from(stage: Stage) -> Self {
        match stage {
            Stage::Freeze => Self::Freeze,
            Stage::Release => Self::Release,
            Stage::Resume => Self::Resume,
        }
    }
}

impl TryFrom<control::v1::Stage> for Stage {
    type Error = DomainError;
    fn try_from(stage: control::v1::Stage) -> Result<Self, DomainError> {
        match stage {
            control::v1::Stage::Freeze => Ok(Stage::Freeze),
            control::v1::Stage::Release => Ok(Stage::Release),
            control::v1::Stage::Resume => Ok(Stage::Resume),
            control::v1::Stage::Unspecified => Err(DomainError::StageUnspecified),
        }
    }
}

impl From<Stage> for replicator::v1::Stage {
    fn from(stage: Stage) -> Self {
        match stage {
            Stage::Freeze => Self::Freeze,
            Stage::Release => Self::Release,
            Stage::Resume => Self::Resume,
        }
    }
}

impl TryFrom<replicator::v1::Stage> for Stage {
    type Error = DomainError;
    fn try_from(stage: replicator::v1::Stage) -> Result<Self, DomainError> {
        match stage {
            replicator::v1::Stage::Freeze => Ok(Stage::Freeze),
            replicator::v1::Stage::Release => Ok(Stage::Release),
            replicator::v1::Stage::Resume => Ok(Stage::Resume),
            replicator::v1::Stage::Unspecified => Err(DomainError::StageUnspecified),
        }
    }
}

impl From<&GroupEpoch> for control::v1::GroupEpoch {
    fn from(point: &GroupEpoch) -> Self {
        Self {
            group_uid: point.group_uid.clone(),
            epoch: point.epoch,
            stage: control::v1::Stage::from(point.stage).into(),
        }
    }
}

impl TryFrom<&control::v1::GroupEpoch> for GroupEpoch {
    type Error = DomainError;
    /// Refuses a message with no group UID or an unknown or unset stage: malformed input is an error,
    /// never a default.
    fn try_from(message: &control::v1::GroupEpoch) -> Result<Self, DomainError> {
        let stage = control::v1::Stage::try_from(message.stage)
            .map_err(|_| DomainError::StageUnknown(message.stage))?;
        GroupEpoch::new(&message.group_uid, message.epoch, Stage::try_from(stage)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_beyond_2_53_are_refused_on_the_wire() {
        for epoch in [crate::domain::MAX_EPOCH + 1, i64::MAX as u64, u64::MAX] {
            let message = control::v1::GroupEpoch {
                group_uid: "uid-1".into(),
                epoch,
                stage: control::v1::Stage::Freeze.into(),
            };
            assert!(
                GroupEpoch::try_from(&message).is_err(),
                "epoch {epoch} accepted"
            );
        }
        let largest = control::v1::GroupEpoch {
            group_uid: "uid-1".into(),
            epoch: crate::domain::MAX_EPOCH,
            stage: control::v1::Stage::Freeze.into(),
        };
        assert!(GroupEpoch::try_from(&largest).is_ok());
    }

    #[test]
    fn group_epoch_round_trips_and_malformed_messages_are_refused() {
        let point = GroupEpoch::new("uid-1", 7, Stage::Release).unwrap();
        let message = control::v1::GroupEpoch::from(&point);
        assert_eq!(GroupEpoch::try_from(&message).unwrap(), point);

        let unset = control::v1::GroupEpoch {
            stage: 0,
            ..message.clone()
        };
        assert_eq!(
            GroupEpoch::try_from(&unset),
            Err(DomainError::StageUnspecified)
        );
        let unknown = control::v1::GroupEpoch {
            stage: 42,
            ..message.clone()
        };
        assert_eq!(
            GroupEpoch::try_from(&unknown),
            Err(DomainError::StageUnknown(42))
        );
        let anonymous = control::v1::GroupEpoch {
            group_uid: String::new(),
            ..message
        };
        assert_eq!(
            GroupEpoch::try_from(&anonymous),
            Err(DomainError::MissingGroupUid)
        );
    }
}
