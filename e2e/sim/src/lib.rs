//! `lockstep-sim`: deterministic simulation of Lockstep's freeze under seeded fault schedules.
//!
//! One seed builds a world of member clusters, nodes and volumes in one group (see [`world`]), drives the
//! operator's real freeze core, every sidecar's real enforcement core and every primary's real hold state
//! machine through messages that the seed loses, duplicates, delays and reorders, cuts replication links,
//! paths and API servers, restarts the operator (even between sending a freeze and persisting it), sidecars
//! and replicators (from their state files, some of whose writes fail), and checks after every step:
//! the secondaries are dependent-write consistent (their kept image during a resync), a release is decided
//! only when every member volume is suspended at that epoch, epochs never go back and a volume's point
//! never moves back. After the fault window comes a heal phase in which people thaw the group; the group
//! must then be replicating again with no write held, every secondary holding every write of its primary.
//!
//! A failing seed replays exactly: `cargo run -p lockstep-sim -- --replay SEED`.

pub mod rng;
pub mod world;

pub use world::{Config, Mutant, Summary, Violation, run};
