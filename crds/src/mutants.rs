//! Defects planted on purpose in the operator's freeze core and the sidecar's enforcement core,
//! compiled only with the `mutants` feature: the simulator (`e2e/sim`) plants one per seed to show its
//! invariants catch it. Nothing else may enable the feature; without it none of this exists and the
//! cores are exactly as shipped.

use std::cell::Cell;

/// A planted defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// Operator: `advance` decides a release with one member volume still unacknowledged.
    ReleaseWithOneUnacknowledged,
    /// Operator: `record_ack` records an acknowledgement for epoch e as one for e + 1.
    AckCountedForNextEpoch,
    /// Operator: `record_ack` matches an acknowledgement by volume handle in every member cluster.
    AckMatchedAcrossClusters,
    /// Operator: `adopt` takes any higher epoch a member names, not only the one after the persisted epoch.
    AdoptAnyHigherEpoch,
    /// Sidecar: a directive at the fail-safe's own epoch lifts it (only a higher epoch may), and the
    /// volumes it suspended follow that directive.
    FailSafeLiftedAtSameEpoch,
    /// Sidecar: a volume two groups list is served to both instead of to the first claim only.
    SecondGroupClaimHonoured,
    /// Sidecar: a volume it resumes is reported replicating (in sync) until a listing says it
    /// resynchronises, instead of resynchronising until a listing says it is done.
    ResumedReportedInSync,
}

impl Mutant {
    /// Every planted defect.
    pub const ALL: [Self; 7] = [
        Self::ReleaseWithOneUnacknowledged,
        Self::AckCountedForNextEpoch,
        Self::AckMatchedAcrossClusters,
        Self::AdoptAnyHigherEpoch,
        Self::FailSafeLiftedAtSameEpoch,
        Self::SecondGroupClaimHonoured,
        Self::ResumedReportedInSync,
    ];
}

thread_local! {
    static ACTIVE: Cell<Option<Mutant>> = const { Cell::new(None) };
}

/// Plants `mutant` (or none) for everything this thread runs from now on.
pub fn plant(mutant: Option<Mutant>) {
    ACTIVE.with(|active| active.set(mutant));
}

/// Whether `mutant` is planted on this thread.
pub fn active(mutant: Mutant) -> bool {
    ACTIVE.with(|active| active.get() == Some(mutant))
}
