//! One-line, `kubectl get`-like summaries of Lockstep objects, for the demo's timeline: the same columns
//! the CRDs declare as printer columns.

use lockstep_api::conditions::status_of;
use lockstep_api::domain::condition;
use lockstep_api::v1alpha1::{ConsistencyGroup, MemberCluster};

/// `NAME PHASE EPOCH MEMBERS FROZEN` of a group, as `kubectl get cg` prints them (without AGE).
pub fn cg_line(group: &ConsistencyGroup) -> String {
    let status = group.status.as_ref();
    let phase = status
        .and_then(|s| s.phase)
        .map_or_else(|| "<none>".to_owned(), |p| p.to_string());
    let epoch = status.map_or(0, |s| s.epoch);
    let members = status.map_or(0, |s| s.member_count);
    let frozen = status
        .and_then(|s| status_of(&s.conditions, condition::FROZEN))
        .map_or("<none>", |f| if f { "True" } else { "False" });
    format!(
        "cg/{} phase={phase} epoch={epoch} members={members} frozen={frozen}",
        group.metadata.name.as_deref().unwrap_or("?")
    )
}

/// `NAME PATHS NETWORK` of a member cluster.
pub fn mc_line(cluster: &MemberCluster) -> String {
    let spec = &cluster.spec;
    let mut line = format!(
        "mc/{} paths={:?} network={}",
        cluster.metadata.name.as_deref().unwrap_or("?"),
        spec.paths,
        spec.network.as_deref().unwrap_or("<none>")
    );
    if spec.local {
        line.push_str(" (the hub itself)");
    }
    if let Some(secret) = &spec.kubeconfig_secret_ref {
        line.push_str(&format!(
            " kubeconfig=secret/{}/{}",
            secret.namespace, secret.name
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_api::v1alpha1::ConsistencyGroupSpec;

    #[test]
    fn a_new_group_has_no_phase() {
        let spec: ConsistencyGroupSpec = serde_json::from_value(serde_json::json!({
            "members": [{"cluster": "east", "namespace": "orders", "pvcNames": ["a"]}],
        }))
        .unwrap();
        let group = ConsistencyGroup::new("g", spec);
        assert_eq!(
            cg_line(&group),
            "cg/g phase=<none> epoch=0 members=0 frozen=<none>"
        );
    }
}
