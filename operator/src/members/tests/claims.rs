//! Tests of the claim order between groups on one volume (DESIGN.md rule 5).

use super::*;

fn resolved(cluster: &str, pvc: &str, handle: &str) -> MemberVolumeStatus {
    MemberVolumeStatus {
        cluster: cluster.into(),
        namespace: "orders".into(),
        pvc: pvc.into(),
        persistent_volume: None,
        volume_handle: Some(handle.into()),
        node: Some("node-a".into()),
        state: None,
        acknowledged: None,
        image_epoch: None,
    }
}

fn claimant<'a>(
    name: &'a str,
    order: &'a ClaimOrder,
    spec_members: &'a [GroupMember],
    status_members: &'a [MemberVolumeStatus],
    replicating: bool,
) -> Claimant<'a> {
    Claimant {
        name,
        order,
        spec_members,
        status_members,
        replicating,
    }
}

fn key(cluster: &str, handle: &str) -> (String, String) {
    (cluster.to_owned(), handle.to_owned())
}

#[test]
fn an_older_group_claims_its_volumes_before_it_has_resolved_them() {
    // After an operator restart (or right after both were applied) the older group may not have
    // resolved yet: its claim stands on its spec, not on its status.
    let clusters = BTreeMap::from([("east".to_owned(), east())]);
    let (first, later) = (
        ClaimOrder::new(Some(1_000), "uid-first"),
        ClaimOrder::new(Some(2_000), "uid-later"),
    );
    let first_spec = [by_names("east", &["wal", "data"])];
    let later_spec = [by_label("east", "orders")];
    let first = claimant("first", &first, &first_spec, &[], true);
    let later = claimant("later", &later, &later_spec, &[], true);
    let claimed = claimed_elsewhere(&later, &[first], &clusters);
    assert_eq!(
        claimed,
        BTreeMap::from([
            (key("east", "vol-data"), "first".to_owned()),
            (key("east", "vol-wal"), "first".to_owned()),
        ])
    );
    let resolution = resolve(&later_spec, &clusters, &[], &claimed);
    assert!(!resolution.resolved);
    assert!(
        resolution
            .members
            .iter()
            .all(|member| member.volume_handle.is_none()),
        "the later group counts none of the first group's volumes: {:?}",
        resolution.members
    );
    assert!(
        claimed_elsewhere(&first, &[later], &clusters).is_empty(),
        "the first group yields nothing to the later one"
    );
}

#[test]
fn the_first_claim_wins_by_creation_time_then_uid_never_by_name() {
    let clusters = BTreeMap::from([("east".to_owned(), east())]);
    let spec = [by_names("east", &["wal"])];
    let held = [resolved("east", "wal", "vol-wal")];
    // Created later but named and UID'd to sort first: still the later claim.
    let (older, younger) = (
        ClaimOrder::new(Some(1_000), "uid-9"),
        ClaimOrder::new(Some(2_000), "uid-1"),
    );
    let zeta = claimant("zeta", &older, &spec, &held, true);
    let alpha = claimant("alpha", &younger, &spec, &held, true);
    assert!(claimed_elsewhere(&zeta, &[alpha], &clusters).is_empty());
    assert_eq!(
        claimed_elsewhere(&alpha, &[zeta], &clusters).get(&key("east", "vol-wal")),
        Some(&"zeta".to_owned())
    );
    // Created in the same instant (creation times have a second's grain): the smaller UID wins,
    // whatever the names.
    let (small_uid, large_uid) = (
        ClaimOrder::new(Some(1_000), "uid-1"),
        ClaimOrder::new(Some(1_000), "uid-9"),
    );
    let zeta = claimant("zeta", &small_uid, &spec, &held, true);
    let alpha = claimant("alpha", &large_uid, &spec, &held, true);
    assert!(claimed_elsewhere(&zeta, &[alpha], &clusters).is_empty());
    assert_eq!(
        claimed_elsewhere(&alpha, &[zeta], &clusters).get(&key("east", "vol-wal")),
        Some(&"zeta".to_owned())
    );
}

#[test]
fn a_same_named_volume_in_another_cluster_is_another_volume() {
    let mut west = east();
    west.node_of_volume
        .insert("vol-wal".into(), "west-node".into());
    let clusters = BTreeMap::from([("east".to_owned(), east()), ("west".to_owned(), west)]);
    let (first, later) = (
        ClaimOrder::new(Some(1_000), "uid-first"),
        ClaimOrder::new(Some(2_000), "uid-later"),
    );
    let first_spec = [by_names("east", &["wal"])];
    let later_spec = [by_names("west", &["wal"])];
    let held = [resolved("east", "wal", "vol-wal")];
    let first = claimant("first", &first, &first_spec, &held, true);
    let later = claimant("later", &later, &later_spec, &[], true);
    let claimed = claimed_elsewhere(&later, &[first], &clusters);
    let resolution = resolve(&later_spec, &clusters, &[], &claimed);
    assert!(resolution.resolved, "{:?}", resolution.problems);
    assert_eq!(
        resolution.members[0].volume_handle.as_deref(),
        Some("vol-wal")
    );
}

#[test]
fn a_volume_changes_group_only_once_its_old_group_replicates() {
    // The later group holds the volume (it had it before the first group's selector matched it) and
    // is frozen: the volume stays with it until it replicates again.
    let clusters = BTreeMap::from([("east".to_owned(), east())]);
    let (first, later) = (
        ClaimOrder::new(Some(1_000), "uid-first"),
        ClaimOrder::new(Some(2_000), "uid-later"),
    );
    let first_spec = [by_names("east", &["wal", "data"])];
    let first_held = [resolved("east", "data", "vol-data")];
    let later_spec = [by_names("east", &["wal"])];
    let later_held = [resolved("east", "wal", "vol-wal")];
    let first = claimant("first", &first, &first_spec, &first_held, true);
    let frozen = claimant("later", &later, &later_spec, &later_held, false);
    assert_eq!(
        claimed_elsewhere(&first, &[frozen], &clusters),
        BTreeMap::from([(key("east", "vol-wal"), "later".to_owned())]),
        "the frozen group has not let the volume go"
    );
    let replicating = claimant("later", &later, &later_spec, &later_held, true);
    assert!(
        claimed_elsewhere(&first, &[replicating], &clusters).is_empty(),
        "at a replicating point the first claim takes it"
    );
    // A group keeps what it holds against a later group, frozen or not.
    let first_holding_wal = [resolved("east", "wal", "vol-wal")];
    let first = claimant("first", first.order, &first_spec, &first_holding_wal, true);
    assert!(claimed_elsewhere(&first, &[frozen], &clusters).is_empty());
}
