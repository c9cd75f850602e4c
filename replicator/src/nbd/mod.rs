//! NBD: the protocol codec ([`proto`], pure) and the server ([`server`], the I/O).

pub mod proto;
pub mod server;

pub use server::{Exports, LatencyRecorder, NbdError, NbdServer};
