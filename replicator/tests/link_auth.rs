//! The authenticated replication link, over real sockets with real certificates (rcgen, ring): a
//! secondary refuses a client without a certificate or with one from another CA, refuses a second
//! primary for a volume another primary owns (with a message naming the volume and both) while the
//! owner's writes keep flowing, keeps the ownership across a restart, and replicates real bytes with
//! TLS on. Two sites: the primaries' CA ("east") and the secondary's ("west").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use lockstep_replicator::link_tls::{ClientStream, SiteCa};
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::wire::{Frame, FrameCodec};
use lockstep_replicator::{
    CopyConfig, LinkSecurity, LinkTls, Primary, PrimaryConfig, ReplMode, VolumeConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const OWNER: &str = "east-node-1";
const OTHER: &str = "east-node-2";

/// The two sites' CAs.
struct Sites {
    east: SiteCa,
    west: SiteCa,
}

impl Sites {
    fn new() -> Sites {
        Sites {
            east: SiteCa::new("east replication CA").unwrap(),
            west: SiteCa::new("west replication CA").unwrap(),
        }
    }

    /// A primary's TLS (east certificate, trusting west).
    fn primary(&self, identity: &str) -> Arc<LinkTls> {
        self.east.link_tls(identity, &[], &self.west).unwrap()
    }

    /// The secondary's TLS (west certificate for the loopback address, trusting east).
    fn secondary(&self) -> LinkSecurity {
        LinkSecurity::Tls(
            self.west
                .link_tls("west-secondary", &["127.0.0.1"], &self.east)
                .unwrap(),
        )
    }
}

async fn start_secondary(dir: &Path, security: LinkSecurity) -> Secondary {
    Secondary::start(SecondaryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: dir.to_path_buf(),
        security,
    })
    .await
    .unwrap()
}

/// A primary serving `volume` (1 MiB, file in `dir`) copied to `secondary` over `security`.
async fn start_primary(
    dir: &Path,
    volume: &str,
    secondary: SocketAddr,
    security: LinkSecurity,
) -> Primary {
    std::fs::create_dir_all(dir).unwrap();
    Primary::start(PrimaryConfig {
        volumes: vec![VolumeConfig {
            hold_timeout: HOLD_TIMEOUT,
            ..VolumeConfig::new(
                volume,
                dir.join(volume),
                Some(MIB),
                Some(CopyConfig {
                    secondary: secondary.to_string(),
                    timeout: Duration::from_secs(5),
                    security,
                }),
            )
        }],
        nbd_listen: Some("127.0.0.1:0".parse().unwrap()),
        nbd_socket: None,
        record_latency: false,
        control_socket: None,
    })
    .await
    .unwrap()
}

fn hello(volume: &str, first_seq: u64) -> Frame {
    Frame::Hello {
        volume: volume.to_owned(),
        size: MIB,
        first_seq,
        keep: None,
        drop_image: None,
    }
}

/// Says hello for `volume` as `tls`'s identity; the framed stream on a welcome, else what refused it.
async fn open(
    tls: &LinkTls,
    secondary: SocketAddr,
    volume: &str,
    first_seq: u64,
) -> Result<Framed<ClientStream, FrameCodec>, String> {
    let tcp = TcpStream::connect(secondary).await.unwrap();
    let stream = tls
        .connect(tcp, &secondary.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let mut framed = Framed::new(stream, FrameCodec);
    framed
        .send(hello(volume, first_seq))
        .await
        .map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(Duration::from_secs(10), framed.next())
        .await
        .expect("an answer within 10 s");
    match answer {
        Some(Ok(Frame::Welcome { .. })) => Ok(framed),
        Some(Ok(Frame::Error { message, .. })) => Err(message),
        Some(Ok(other)) => panic!("unexpected {other:?}"),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("closed".into()),
    }
}

/// Writes `data` at `offset` as sequence `seq` and waits for its acknowledgement.
async fn write_acked(
    framed: &mut Framed<ClientStream, FrameCodec>,
    seq: u64,
    offset: u64,
    data: &[u8],
) {
    framed
        .send(Frame::Write {
            seq,
            offset,
            data: bytes::Bytes::copy_from_slice(data),
        })
        .await
        .unwrap();
    loop {
        match framed.next().await {
            Some(Ok(Frame::Ack { seq: acked })) if acked >= seq => return,
            Some(Ok(Frame::Ack { .. })) => {}
            other => panic!("expected the ack of {seq}, got {other:?}"),
        }
    }
}

/// Reads until the connection ends: nothing the secondary sent may be a frame (a TLS alert is fine).
async fn assert_refused<S: tokio::io::AsyncRead + Unpin>(mut stream: S) {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the secondary closes within 10 s");
    assert!(
        !answer.starts_with(&lockstep_replicator::wire::FRAME_MAGIC.to_be_bytes()),
        "the secondary answered an unauthenticated hello with a frame ({read:?}, {answer:?})"
    );
}

/// The error a volume holds its writes for, once its copy failed.
async fn held_error(primary: &Primary, volume: &str) -> String {
    let volume = primary.volume(volume).unwrap();
    eventually("the copy to fail", || async {
        match volume.status().replication.mode {
            ReplMode::Held { error, .. } => Some(error),
            _ => None,
        }
    })
    .await
}

fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A recognisable 4 KiB pattern per write.
fn pattern(i: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|j| (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let sites = Sites::new();
    let dir = tempfile::tempdir().unwrap();
    let secondary = start_secondary(dir.path(), sites.secondary()).await;
    let addr = secondary.local_addr();

    // TLS that trusts the secondary but presents no client certificate.
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for ca in rustls_pki_types::CertificateDer::pem_slice_iter(sites.west.pem().as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    if let Ok(mut stream) = tokio_rustls::TlsConnector::from(Arc::new(anonymous))
        .connect(name, tcp)
        .await
    {
        // TLS 1.3: the client finishes first and learns of the refusal on its next read.
        let mut bytes = bytes::BytesMut::new();
        tokio_util::codec::Encoder::encode(&mut FrameCodec, hello("vol1", 1), &mut bytes).unwrap();
        let _ = stream.write_all(&bytes).await;
        assert_refused(stream).await;
    }

    // Plaintext frames to a TLS secondary: refused before any frame is read.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    let mut bytes = bytes::BytesMut::new();
    tokio_util::codec::Encoder::encode(&mut FrameCodec, hello("vol1", 1), &mut bytes).unwrap();
    plain.write_all(&bytes).await.unwrap();
    assert_refused(plain).await;

    // A primary configured for plaintext fails its copy; nothing reached the secondary.
    let primary = start_primary(
        &dir.path().join("primary"),
        "vol1",
        addr,
        LinkSecurity::Plaintext,
    )
    .await;
    let mut client = RawClient::connect(primary.nbd_addr().unwrap(), "vol1").await;
    assert_ne!(
        client.write(0, &[0xab; 4096]).await,
        Some(0),
        "the write must not be acknowledged"
    );
    let failed = held_error(&primary, "vol1").await;
    assert!(failed.contains("replication link"), "{failed}");
    assert!(
        !dir.path().join("vol1").exists(),
        "no volume file was created"
    );
    assert!(
        lockstep_replicator::owners::owner(dir.path(), "vol1")
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_both_ways() {
    let sites = Sites::new();
    let rogue = SiteCa::new("rogue CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secondary = start_secondary(dir.path(), sites.secondary()).await;

    // The owner's very name, but signed by another CA: refused, and it owns nothing.
    let impostor = rogue.link_tls(OWNER, &[], &sites.west).unwrap();
    let refused = open(&impostor, secondary.local_addr(), "vol1", 1)
        .await
        .expect_err("a certificate from another CA is refused");
    assert!(!refused.is_empty());
    assert!(
        lockstep_replicator::owners::owner(dir.path(), "vol1")
            .unwrap()
            .is_none()
    );
    // The real primary streams it.
    let mut owner = open(&sites.primary(OWNER), secondary.local_addr(), "vol1", 1)
        .await
        .unwrap();
    write_acked(&mut owner, 1, 0, &pattern(1)).await;

    // The other way: a secondary whose certificate the primary's bundle does not sign fails the copy.
    let fake_dir = tempfile::tempdir().unwrap();
    let fake = start_secondary(
        fake_dir.path(),
        LinkSecurity::Tls(
            rogue
                .link_tls("west-secondary", &["127.0.0.1"], &sites.east)
                .unwrap(),
        ),
    )
    .await;
    let primary = start_primary(
        &dir.path().join("primary"),
        "vol2",
        fake.local_addr(),
        LinkSecurity::Tls(sites.primary(OWNER)),
    )
    .await;
    let mut client = RawClient::connect(primary.nbd_addr().unwrap(), "vol2").await;
    assert_ne!(client.write(0, &[0xcd; 4096]).await, Some(0));
    let failed = held_error(&primary, "vol2").await;
    assert!(
        failed.contains("TLS handshake with the secondary"),
        "{failed}"
    );
    assert!(!fake_dir.path().join("vol2").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_primary_is_refused_while_the_owners_writes_keep_flowing() {
    let sites = Sites::new();
    let dir = tempfile::tempdir().unwrap();
    let secondary_dir = dir.path().join("secondary");
    let secondary = start_secondary(&secondary_dir, sites.secondary()).await;
    let addr = secondary.local_addr();
    let owner = start_primary(
        &dir.path().join("owner"),
        "vol1",
        addr,
        LinkSecurity::Tls(sites.primary(OWNER)),
    )
    .await;
    let mut owner_client = RawClient::connect(owner.nbd_addr().unwrap(), "vol1").await;
    assert_eq!(owner_client.write(0, &pattern(0)).await, Some(0));

    // A second primary with a valid certificate of the same site, for the same volume.
    let other = start_primary(
        &dir.path().join("other"),
        "vol1",
        addr,
        LinkSecurity::Tls(sites.primary(OTHER)),
    )
    .await;
    let mut other_client = RawClient::connect(other.nbd_addr().unwrap(), "vol1").await;
    let expected = format!("volume vol1 belongs to primary {OWNER}; primary {OTHER} is refused");
    // Its write is held, then fails: it was never copied.
    assert_ne!(other_client.write(8192, &[0xee; 4096]).await, Some(0));
    let failed = held_error(&other, "vol1").await;
    assert!(failed.contains(&expected), "{failed}");
    assert_eq!(
        other
            .volume("vol1")
            .unwrap()
            .status()
            .replication
            .last_acked,
        None
    );

    // The refusal as a frame, word for word.
    let message = open(&sites.primary(OTHER), addr, "vol1", 1)
        .await
        .expect_err("refused");
    assert!(message.starts_with(&expected), "{message}");
    assert!(message.contains("release-volume"), "{message}");

    // The owner's stream was not taken over: its writes keep flowing, byte for byte.
    for i in 1..32u64 {
        assert_eq!(
            owner_client.write(i * 4096, &pattern(i)).await,
            Some(0),
            "write {i}"
        );
    }
    assert_eq!(
        file_bytes(&dir.path().join("owner").join("vol1")),
        file_bytes(&secondary_dir.join("vol1")),
        "the secondary holds exactly the owner's bytes"
    );
    assert_eq!(
        lockstep_replicator::owners::owner(&secondary_dir, "vol1")
            .unwrap()
            .as_deref(),
        Some(OWNER)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_survives_a_restart_and_is_released_on_purpose() {
    let sites = Sites::new();
    let dir = tempfile::tempdir().unwrap();
    let (owner, other) = (sites.primary(OWNER), sites.primary(OTHER));
    let secondary = start_secondary(dir.path(), sites.secondary()).await;
    let mut first = open(&owner, secondary.local_addr(), "vol1", 1)
        .await
        .unwrap();
    write_acked(&mut first, 1, 0, &pattern(1)).await;
    // The owner's reconnect takes over its own older stream (which the secondary closes).
    let mut second = open(&owner, secondary.local_addr(), "vol1", 2)
        .await
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(10), first.next())
            .await
            .unwrap(),
        None | Some(Err(_))
    ));
    write_acked(&mut second, 2, 4096, &pattern(2)).await;
    drop((first, second));
    drop(secondary);

    // A new secondary process on the same directory: the volume still belongs to its primary.
    let secondary = start_secondary(dir.path(), sites.secondary()).await;
    let refused = open(&other, secondary.local_addr(), "vol1", 3)
        .await
        .expect_err("refused after the restart");
    assert!(
        refused.starts_with(&format!(
            "volume vol1 belongs to primary {OWNER}; primary {OTHER} is refused"
        )),
        "{refused}"
    );
    let mut again = open(&owner, secondary.local_addr(), "vol1", 3)
        .await
        .unwrap();
    write_acked(&mut again, 3, 8192, &pattern(3)).await;
    drop(again);
    assert_eq!(
        read_file_at(&dir.path().join("vol1"), 4096, 4096),
        pattern(2)
    );

    // Re-assigned on purpose: released, the next primary to stream it owns it.
    let released = lockstep_replicator::owners::release(dir.path(), "vol1").unwrap();
    assert_eq!(released.as_deref(), Some(OWNER));
    let mut new_owner = open(&other, secondary.local_addr(), "vol1", 4)
        .await
        .unwrap();
    write_acked(&mut new_owner, 4, 0, &pattern(4)).await;
    assert!(
        open(&owner, secondary.local_addr(), "vol1", 5)
            .await
            .is_err()
    );
    assert_eq!(
        lockstep_replicator::owners::owner(dir.path(), "vol1")
            .unwrap()
            .as_deref(),
        Some(OTHER)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_replicates_real_bytes_through_a_volume() {
    let sites = Sites::new();
    let dir = tempfile::tempdir().unwrap();
    let secondary_dir = dir.path().join("secondary");
    let secondary = start_secondary(&secondary_dir, sites.secondary()).await;
    let primary = start_primary(
        &dir.path().join("primary"),
        "vol1",
        secondary.local_addr(),
        LinkSecurity::Tls(sites.primary(OWNER)),
    )
    .await;
    let mut client = RawClient::connect(primary.nbd_addr().unwrap(), "vol1").await;
    // Scattered writes, some overwriting others, and one large one.
    for i in 0..64u64 {
        let offset = (i * 7919 * 512) % (MIB - 4096);
        assert_eq!(
            client.write(offset, &pattern(i)).await,
            Some(0),
            "write {i}"
        );
    }
    let large: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(client.write(512 * 1024, &large).await, Some(0));
    let status = primary.volume("vol1").unwrap().status();
    assert_eq!(
        status.replication.last_acked,
        Some(status.replication.next_seq - 1)
    );
    assert_eq!(
        file_bytes(&dir.path().join("primary").join("vol1")),
        file_bytes(&secondary_dir.join("vol1")),
        "the secondary holds the primary's bytes"
    );
    assert_eq!(
        read_file_at(&secondary_dir.join("vol1"), 512 * 1024, large.len()),
        large
    );
}

/// The replicator binary serving as a secondary on `port` with `flags` for the link.
fn spawn_secondary(dir: &Path, port: u16, flags: &[&std::ffi::OsStr]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_lockstep-replicator"))
        .args([
            "secondary",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dir",
        ])
        .arg(dir)
        .args(flags)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Says hello as `tls` until the binary listens; its answer.
async fn open_when_up(
    tls: &LinkTls,
    addr: SocketAddr,
    volume: &str,
) -> Result<Framed<ClientStream, FrameCodec>, String> {
    eventually("the secondary to listen", || async {
        std::net::TcpStream::connect(addr).ok()
    })
    .await;
    open(tls, addr, volume, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_needs_certificates_or_insecure_and_releases_a_volume() {
    let sites = Sites::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("secondary");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Neither certificates nor --insecure-plaintext: it does not start, and says what it needs.
    let refused = spawn_secondary(&data, port, &[])
        .wait_with_output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("--link-cert") && said.contains("--insecure-plaintext"),
        "{said}"
    );

    // Its certificate files, as a Secret volume holds them.
    let (cert, key) = sites.west.issue("west-secondary", &["127.0.0.1"]).unwrap();
    let files = ["link.crt", "link.key", "primary-site-ca.crt"].map(|f| dir.path().join(f));
    for (path, text) in files
        .iter()
        .zip([cert.as_str(), key.as_str(), sites.east.pem()])
    {
        std::fs::write(path, text).unwrap();
    }
    let flags = [
        "--link-cert".as_ref(),
        files[0].as_os_str(),
        "--link-key".as_ref(),
        files[1].as_os_str(),
        "--link-ca".as_ref(),
        files[2].as_os_str(),
    ];
    let mut secondary = spawn_secondary(&data, port, &flags);
    let (owner, other) = (sites.primary(OWNER), sites.primary(OTHER));
    let mut stream = open_when_up(&owner, addr, "vol1").await.unwrap();
    write_acked(&mut stream, 1, 0, &pattern(1)).await;
    drop(stream);
    let refused = open(&other, addr, "vol1", 2)
        .await
        .expect_err("not the owner");
    assert!(
        refused.contains("belongs to primary east-node-1"),
        "{refused}"
    );
    secondary.kill().unwrap();
    secondary.wait().unwrap();

    // Re-assigned on purpose with the binary, then the other primary owns it.
    let released = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep-replicator"))
        .args(["release-volume", "--volume", "vol1", "--dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(released.status.success(), "{released:?}");
    assert_eq!(
        String::from_utf8_lossy(&released.stdout).trim(),
        "vol1: released from primary east-node-1; the next primary to stream it owns it"
    );
    let mut secondary = spawn_secondary(&data, port, &flags);
    let mut stream = open_when_up(&other, addr, "vol1").await.unwrap();
    write_acked(&mut stream, 1, 4096, &pattern(2)).await;
    drop(stream);
    secondary.kill().unwrap();
    secondary.wait().unwrap();
    assert_eq!(read_file_at(&data.join("vol1"), 0, 4096), pattern(1));
    assert_eq!(read_file_at(&data.join("vol1"), 4096, 4096), pattern(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_certs_sh_link_makes_certificates_the_link_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/certs.sh");
    let certs = |site: &str, args: &[&str]| {
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(["link"])
            .arg(dir.path())
            .arg(site)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    certs("east", &["--identity", OWNER]);
    certs(
        "west",
        &["--identity", "west-secondary", "--ip", "127.0.0.1"],
    );
    let file = |name: &str| dir.path().join(name);
    let secondary_tls = LinkTls::load(
        &file("west-secondary.crt"),
        &file("west-secondary.key"),
        &file("east-link-ca.crt"),
    )
    .unwrap();
    let primary_tls = LinkTls::load(
        &file(&format!("{OWNER}.crt")),
        &file(&format!("{OWNER}.key")),
        &file("west-link-ca.crt"),
    )
    .unwrap();
    assert_eq!(primary_tls.identity(), OWNER);

    let data = dir.path().join("secondary");
    let secondary = start_secondary(&data, LinkSecurity::Tls(Arc::new(secondary_tls))).await;
    let mut stream = open(&primary_tls, secondary.local_addr(), "vol1", 1)
        .await
        .unwrap();
    write_acked(&mut stream, 1, 0, &pattern(7)).await;
    assert_eq!(read_file_at(&data.join("vol1"), 0, 4096), pattern(7));
    assert_eq!(
        lockstep_replicator::owners::owner(&data, "vol1")
            .unwrap()
            .as_deref(),
        Some(OWNER)
    );
}
