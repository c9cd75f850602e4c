//! `kubectl lockstep freeze|release|resync GROUP`: the person-driven intents. Each names the epoch it is
//! meant for (`spec.<intent>.epoch`), so that a value left in Git never acts twice; this fills in the
//! group's current epoch, prints the patch, and refuses one that is stale (`--epoch` is not the current
//! epoch), ambiguous (the operator has not caught up with the spec yet, or the group changed while the
//! patch was being written) or would not act in the group's phase.

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use lockstep_api::{
    domain::{Phase, Stage},
    v1alpha1::ConsistencyGroup,
};
use serde::Serialize;

use crate::{PluginError, connect::Connection, output::Report};

/// How often a patch refused because the group changed since it was read is planned again.
const ATTEMPTS: usize = 3;

/// The flags of `freeze`, `release` and `resync`.
#[derive(Debug, Clone, clap::Args)]
pub struct IntentArgs {
    /// The ConsistencyGroup.
    pub group: String,
    /// The epoch you expect the group to be at: refused if it is not the current one.
    #[arg(long)]
    pub epoch: Option<u64>,
    /// Print the patch without writing it.
    #[arg(long)]
    pub dry_run: bool,
}

/// Which intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Intent {
    /// spec.freeze: a planned freeze.
    Freeze,
    /// spec.release: release the held writes of a frozen group.
    Release,
    /// spec.resync: resynchronise a frozen or released group.
    Resync,
}

impl Intent {
    fn field(self) -> &'static str {
        match self {
            Intent::Freeze => "freeze",
            Intent::Release => "release",
            Intent::Resync => "resync",
        }
    }

    fn current(self, group: &ConsistencyGroup) -> Option<u64> {
        let intent = match self {
            Intent::Freeze => group.spec.freeze,
            Intent::Release => group.spec.release,
            Intent::Resync => group.spec.resync,
        };
        intent.map(|intent| intent.epoch)
    }
}

/// What `freeze|release|resync` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IntentReport {
    /// The group.
    pub group: String,
    /// The intent.
    pub intent: Intent,
    /// The epoch it names: the group's current epoch.
    pub epoch: u64,
    /// The merge patch (with the resourceVersion it was planned on).
    pub patch: serde_json::Value,
    /// Whether it was written (not with --dry-run, nor when the spec already asks for it).
    pub applied: bool,
    /// What happens next, in a sentence.
    pub message: String,
}

/// What to write, planned from the group as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The epoch the intent names.
    pub epoch: u64,
    /// The merge patch.
    pub patch: serde_json::Value,
    /// True when the spec already names this epoch: nothing to write.
    pub already: bool,
    /// What the operator will do, in a sentence.
    pub effect: String,
}

/// Plans `intent` on `group` as read, or says in one sentence why it would be stale, ambiguous or not act.
pub fn plan(
    group: &ConsistencyGroup,
    intent: Intent,
    expected: Option<u64>,
) -> Result<Plan, String> {
    let name = group.metadata.name.as_deref().unwrap_or_default();
    let Some(status) = &group.status else {
        return Err(format!(
            "group {name} has no status yet: the operator has not looked at it, so its epoch is not known"
        ));
    };
    if let (Some(generation), observed) = (group.metadata.generation, status.observed_generation)
        && observed != Some(generation)
    {
        return Err(format!(
            "group {name} is ambiguous right now: the operator has not yet acted on generation {generation} of its spec (its status reflects {}); wait a moment and try again",
            observed.map_or_else(|| "none".to_owned(), |observed| observed.to_string())
        ));
    }
    let (epoch, stage) = group.position();
    let phase = status.phase.unwrap_or(Phase::Replicating);
    if let Some(expected) = expected
        && expected != epoch
    {
        return Err(format!(
            "epoch {expected} is stale: group {name} is at epoch {epoch} ({phase}, stage {stage}); nothing was written"
        ));
    }
    let effect = match (intent, stage, phase) {
        (Intent::Freeze, Stage::Resume, _) => format!(
            "the operator freezes every member, raising the epoch to {}",
            epoch + 1
        ),
        (Intent::Freeze, _, _) => {
            return Err(format!(
                "group {name} is already frozen at epoch {epoch} ({phase}): resync it before a planned freeze"
            ));
        }
        (Intent::Release, Stage::Freeze, Phase::Frozen) => format!(
            "the operator releases the held writes of epoch {epoch}; the primaries then run unreplicated"
        ),
        (Intent::Release, Stage::Freeze, _) => {
            return Err(format!(
                "group {name} is still {phase} at epoch {epoch}: not every member volume acknowledged the freeze, so a release would not act yet"
            ));
        }
        (Intent::Release, Stage::Release, _) => {
            return Err(format!(
                "group {name} was already released at epoch {epoch} ({phase}): resync it to replicate again"
            ));
        }
        (Intent::Release, Stage::Resume, _) => {
            return Err(format!(
                "group {name} is not frozen ({phase} at epoch {epoch}): there are no held writes to release"
            ));
        }
        (Intent::Resync, Stage::Freeze, Phase::Frozen) | (Intent::Resync, Stage::Release, _) => {
            format!(
                "the operator resynchronises every member after epoch {epoch}; the secondaries are inconsistent until every member is in sync"
            )
        }
        (Intent::Resync, Stage::Freeze, _) => {
            return Err(format!(
                "group {name} is still {phase} at epoch {epoch}: a resync acts once every member volume acknowledged the freeze"
            ));
        }
        (Intent::Resync, Stage::Resume, _) => {
            return Err(format!(
                "group {name} is not frozen ({phase} at epoch {epoch}): there is nothing to resync from"
            ));
        }
    };
    let mut patch = serde_json::json!({ "spec": { intent.field(): { "epoch": epoch } } });
    if let Some(version) = &group.metadata.resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": version });
    }
    Ok(Plan {
        epoch,
        patch,
        already: intent.current(group) == Some(epoch),
        effect,
    })
}

/// Reads the group, plans the intent, prints and (unless `--dry-run`) writes the patch: a merge patch
/// whose resourceVersion makes the API server refuse it if the group changed since it was read, in
/// which case it is planned again on the fresh group.
pub async fn apply(
    connection: &Connection,
    intent: Intent,
    args: &IntentArgs,
) -> Result<IntentReport, PluginError> {
    let api = Api::<ConsistencyGroup>::all(connection.client.clone());
    for _ in 0..ATTEMPTS {
        let group = connection.group(&args.group).await?;
        let plan = plan(&group, intent, args.epoch).map_err(PluginError::Refused)?;
        let report = |applied: bool, message: String| IntentReport {
            group: args.group.clone(),
            intent,
            epoch: plan.epoch,
            patch: plan.patch.clone(),
            applied,
            message,
        };
        if plan.already {
            return Ok(report(
                false,
                format!(
                    "spec.{}.epoch is already {}: nothing to write ({})",
                    intent.field(),
                    plan.epoch,
                    plan.effect
                ),
            ));
        }
        if args.dry_run {
            return Ok(report(
                false,
                format!("dry run, not written: {}", plan.effect),
            ));
        }
        match api
            .patch(
                &args.group,
                &PatchParams::default(),
                &Patch::Merge(&plan.patch),
            )
            .await
        {
            Ok(_) => return Ok(report(true, plan.effect)),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => {
                return Err(PluginError::api(
                    format!("patching ConsistencyGroup {}", args.group),
                    error,
                ));
            }
        }
    }
    Err(PluginError::Refused(format!(
        "group {} kept changing while the patch was written ({ATTEMPTS} attempts): nothing was written; try again",
        args.group
    )))
}

impl Report for IntentReport {
    fn table(&self) -> String {
        let patch = serde_json::json!({ "spec": self.patch["spec"].clone() });
        let done = if self.applied {
            format!(
                "consistencygroup.lockstep.dev/{} patched: {} at epoch {}",
                self.group,
                self.intent.field(),
                self.epoch
            )
        } else {
            format!("consistencygroup.lockstep.dev/{} not patched", self.group)
        };
        format!("patch: {patch}\n{done}\n{}\n", self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_api::v1alpha1::{ConsistencyGroupSpec, ConsistencyGroupStatus, EpochIntent};

    fn group(epoch: u64, stage: Stage, phase: Phase) -> ConsistencyGroup {
        let spec: ConsistencyGroupSpec = serde_json::from_value(serde_json::json!({
            "members": [{"cluster": "east", "namespace": "orders", "pvcNames": ["a"]}],
            "policy": "FreezeAndStop",
        }))
        .unwrap_or_else(|error| panic!("{error}"));
        let mut group = ConsistencyGroup::new("orders-db", spec);
        group.metadata.generation = Some(2);
        group.metadata.resource_version = Some("41".into());
        group.status = Some(ConsistencyGroupStatus {
            epoch,
            stage: Some(stage),
            phase: Some(phase),
            observed_generation: Some(2),
            ..ConsistencyGroupStatus::default()
        });
        group
    }

    #[test]
    fn the_current_epoch_is_filled_in_with_the_read_version() {
        let frozen = group(3, Stage::Freeze, Phase::Frozen);
        let plan = plan(&frozen, Intent::Release, None).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(
            plan.patch,
            serde_json::json!({"spec": {"release": {"epoch": 3}}, "metadata": {"resourceVersion": "41"}})
        );
        assert!(!plan.already);
        let replicating = group(3, Stage::Resume, Phase::Replicating);
        assert_eq!(plan_epoch(&replicating, Intent::Freeze), Ok(3));
        assert_eq!(
            plan_epoch(&group(3, Stage::Release, Phase::Running), Intent::Resync),
            Ok(3)
        );
    }

    fn plan_epoch(group: &ConsistencyGroup, intent: Intent) -> Result<u64, String> {
        plan(group, intent, None).map(|plan| plan.epoch)
    }

    #[test]
    fn stale_ambiguous_and_pointless_intents_are_refused_in_one_sentence() {
        let frozen = group(3, Stage::Freeze, Phase::Frozen);
        let stale = plan(&frozen, Intent::Release, Some(2)).unwrap_err();
        assert!(
            stale.starts_with("epoch 2 is stale: group orders-db is at epoch 3"),
            "{stale}"
        );
        let mut behind = frozen.clone();
        behind.metadata.generation = Some(3);
        let ambiguous = plan(&behind, Intent::Release, None).unwrap_err();
        assert!(
            ambiguous.contains("not yet acted on generation 3"),
            "{ambiguous}"
        );
        let freezing = plan(
            &group(3, Stage::Freeze, Phase::Freezing),
            Intent::Release,
            None,
        )
        .unwrap_err();
        assert!(freezing.contains("still Freezing at epoch 3"), "{freezing}");
        let twice = plan(&frozen, Intent::Freeze, None).unwrap_err();
        assert!(twice.contains("already frozen at epoch 3"), "{twice}");
        for refused in [stale, ambiguous, freezing, twice] {
            assert!(!refused.contains('\n'), "{refused}");
        }
        let mut asked = frozen;
        asked.spec.release = Some(EpochIntent { epoch: 3 });
        assert!(plan(&asked, Intent::Release, None).is_ok_and(|plan| plan.already));
    }
}
