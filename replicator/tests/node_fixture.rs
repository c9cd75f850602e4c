//! The shared node fixture (`lockstep_replicator::testing`) as its users rely on it: writes over NBD
//! reach the secondary's file over a mutually authenticated TLS link, a cut link holds only its own
//! volume's writes, and unknown volumes are refused with an error that names them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use lockstep_replicator::ReplMode;
use lockstep_replicator::linkcut::LinkMode;
use lockstep_replicator::testing::{NodeError, NodeSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tls_node_copies_each_volume_through_its_own_cuttable_link() {
    let mut spec = NodeSpec::new(&["vol1", "vol2"], MIB).tls("east", "east-node-1");
    spec.require_confirmation = false;
    spec.control_socket = false;
    let node = spec.start().await.unwrap();
    assert!(node.control_socket().is_none());
    assert!(matches!(
        node.nbd_url("vol9"),
        Err(NodeError::NoVolume(name)) if name == "vol9"
    ));

    let mut vol1 = RawClient::connect(node.nbd_addr().unwrap(), "vol1").await;
    assert_eq!(vol1.write(0, &[1u8; 4096]).await, Some(0));
    assert_eq!(
        read_file_at(&node.secondary_file("vol1"), 0, 4096),
        [1u8; 4096]
    );
    assert_eq!(
        read_file_at(&node.primary_file("vol1"), 0, 4096),
        [1u8; 4096]
    );

    // vol2's link cut: its write is held, vol1 still copies.
    node.cut("vol2", LinkMode::Reset).unwrap();
    let addr = node.nbd_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut vol2 = RawClient::connect(addr, "vol2").await;
        vol2.write(0, &[2u8; 4096]).await
    });
    let vol2 = Arc::clone(node.primary.volume("vol2").unwrap());
    eventually("vol2's write held", || async {
        matches!(vol2.status().replication.mode, ReplMode::Held { .. }).then_some(())
    })
    .await;
    assert_eq!(vol1.write(4096, &[3u8; 4096]).await, Some(0));
    assert_eq!(
        read_file_at(&node.secondary_file("vol1"), 4096, 4096),
        [3u8; 4096]
    );
    assert!(
        !held.is_finished(),
        "a write on a cut link was acknowledged"
    );
    assert_eq!(node.link("vol2").unwrap().mode(), LinkMode::Reset);
    node.heal("vol2").unwrap();
    assert_eq!(node.link("vol2").unwrap().mode(), LinkMode::Pass);
}
