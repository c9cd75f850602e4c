//! A small NBD client: the checker's own, so it depends on no server it tests.
//!
//! [`proto`] is the wire format without I/O; [`client`] does the I/O over TCP or a unix socket, and
//! [`address`] parses `nbd://` and `nbd+unix://` URIs.

pub mod address;
pub mod client;
pub mod proto;

pub use address::{AddressError, NbdAddress};
pub use client::{NbdClient, NbdError};
