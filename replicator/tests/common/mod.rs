//! Shared test fixtures: an in-process primary and secondary on loopback, a minimal raw NBD client
//! (for requests real clients never send), and `qemu-io` / `qemu-img` wrappers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[allow(unused_imports)]
pub use lockstep_replicator::testing::eventually;

use lockstep_replicator::linkcut::LinkCut;
use lockstep_replicator::nbd::proto;
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::{CopyConfig, Primary, PrimaryConfig, VolumeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const MIB: u64 = 1024 * 1024;
/// The hold timeout of the fixtures' volumes: a held write fails with EIO after it.
pub const HOLD_TIMEOUT: Duration = Duration::from_millis(300);

/// A primary replicating to a secondary, optionally through a [`LinkCut`].
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub secondary: Secondary,
    pub link: Option<LinkCut>,
    pub primary: Primary,
    /// What the primary was started with, to start it again.
    pub primary_config: PrimaryConfig,
}

impl Pair {
    pub fn primary_file(&self, volume: &str) -> PathBuf {
        self.dir.path().join("primary").join(volume)
    }
    pub fn secondary_file(&self, volume: &str) -> PathBuf {
        self.dir.path().join("secondary").join(volume)
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }
    pub fn tcp_url(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.primary.nbd_addr().unwrap())
    }
    pub fn unix_url(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.socket().display())
    }
    pub fn nbd_addr(&self) -> SocketAddr {
        self.primary.nbd_addr().unwrap()
    }
}

/// Starts a secondary and a primary serving `volumes` (name, size) replicated to it, over TCP and a unix
/// socket. With `cut`, the link goes through a [`LinkCut`].
pub async fn start_pair(volumes: &[(&str, u64)], cut: bool, timeout: Duration) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("primary")).unwrap();
    let secondary = Secondary::start(SecondaryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: dir.path().join("secondary"),
        security: lockstep_replicator::LinkSecurity::Plaintext,
    })
    .await
    .unwrap();
    let link = if cut {
        Some(LinkCut::start(secondary.local_addr()).await.unwrap())
    } else {
        None
    };
    let target = link
        .as_ref()
        .map_or(secondary.local_addr(), LinkCut::addr)
        .to_string();
    let primary_config = PrimaryConfig {
        volumes: volumes
            .iter()
            .map(|(name, size)| VolumeConfig {
                hold_timeout: HOLD_TIMEOUT,
                ..VolumeConfig::new(
                    name,
                    dir.path().join("primary").join(name),
                    Some(*size),
                    Some(CopyConfig {
                        secondary: target.clone(),
                        timeout,
                        security: lockstep_replicator::LinkSecurity::Plaintext,
                    }),
                )
            })
            .collect(),
        nbd_listen: Some("127.0.0.1:0".parse().unwrap()),
        nbd_socket: Some(dir.path().join("nbd.sock")),
        record_latency: false,
        control_socket: None,
    };
    let primary = Primary::start(primary_config.clone()).await.unwrap();
    Pair {
        dir,
        secondary,
        link,
        primary,
        primary_config,
    }
}

/// Output of a qemu tool.
#[derive(Debug)]
pub struct ToolOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl ToolOutput {
    /// Whether qemu-io reported any failed command or pattern mismatch.
    pub fn clean(&self) -> bool {
        let all = format!("{}{}", self.stdout, self.stderr);
        self.success
            && !all.contains("failed")
            && !all.contains("error")
            && !all.contains("Pattern verification")
    }
}

pub async fn tool(program: &str, args: &[&str]) -> ToolOutput {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} did not finish"))
    .unwrap_or_else(|e| panic!("{program}: {e}"));
    ToolOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `qemu-io -f raw URL -c CMD...`.
pub async fn qemu_io(url: &str, commands: &[&str]) -> ToolOutput {
    let mut args = vec!["-f", "raw", url];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    tool("qemu-io", &args).await
}

/// `qemu-img compare` of two raw images (files or NBD URLs).
pub async fn qemu_img_compare(a: &str, b: &str) -> ToolOutput {
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", a, b]).await
}

/// Reads `len` bytes at `offset` of a file.
pub fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// A minimal NBD client speaking the fixed newstyle handshake and simple replies, one request at a time.
pub struct RawClient {
    pub stream: TcpStream,
    pub size: u64,
}

pub struct Reply {
    pub error: u32,
    pub cookie: u64,
    pub data: Vec<u8>,
}

impl RawClient {
    /// Connects and negotiates `export` with `NBD_OPT_GO`.
    pub async fn connect(addr: SocketAddr, export: &str) -> RawClient {
        let mut stream = Self::greet(addr).await;
        let data = proto::encode_info_request(&proto::InfoRequest {
            name: export.to_owned(),
            items: vec![proto::INFO_BLOCK_SIZE],
        });
        send_option(&mut stream, proto::OPT_GO, &data).await;
        let mut size = None;
        loop {
            let (reply_type, data) = read_option_reply(&mut stream).await;
            match reply_type {
                proto::REP_INFO => {
                    if u16::from_be_bytes([data[0], data[1]]) == proto::INFO_EXPORT {
                        size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                    }
                }
                proto::REP_ACK => break,
                other => panic!("unexpected option reply {other:#x}"),
            }
        }
        RawClient {
            stream,
            size: size.unwrap(),
        }
    }

    /// Connects and reads the greeting, sending fixed-newstyle + no-zeroes client flags.
    pub async fn greet(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).await.unwrap();
        assert_eq!(greeting, proto::server_greeting());
        stream
            .write_all(
                &(proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES).to_be_bytes(),
            )
            .await
            .unwrap();
        stream
    }

    /// Sends a request header (and payload), returns the reply, or `None` if the server closed.
    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Option<Reply> {
        let cookie = rand_cookie(offset, command);
        let h = proto::RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut buf = proto::encode_request_header(&h).to_vec();
        buf.extend_from_slice(payload);
        if self.stream.write_all(&buf).await.is_err() {
            return None;
        }
        let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut header).await.ok()?;
        let reply = proto::parse_simple_reply(&header).unwrap();
        assert_eq!(reply.cookie, cookie);
        let mut data = Vec::new();
        if reply.error == 0 && command == proto::CMD_READ {
            data.resize(length as usize, 0);
            self.stream.read_exact(&mut data).await.ok()?;
        }
        Some(Reply {
            error: reply.error,
            cookie: reply.cookie,
            data,
        })
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Option<u32> {
        self.request(proto::CMD_WRITE, 0, offset, data.len() as u32, data)
            .await
            .map(|r| r.error)
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Option<Reply> {
        self.request(proto::CMD_READ, 0, offset, len, &[]).await
    }

    /// Whether the server closed the connection (reads EOF within a deadline).
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn rand_cookie(offset: u64, command: u16) -> u64 {
    offset.rotate_left(17) ^ u64::from(command) ^ 0x5eed_c00c_1e00_0000
}

pub async fn send_option(stream: &mut TcpStream, option: u32, data: &[u8]) {
    let h = proto::encode_option_header(&proto::OptionHeader {
        option,
        length: data.len() as u32,
    });
    stream.write_all(&h).await.unwrap();
    stream.write_all(data).await.unwrap();
}

pub async fn read_option_reply(stream: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    stream.read_exact(&mut h).await.unwrap();
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().unwrap()),
        proto::OPTION_REPLY_MAGIC
    );
    let reply_type = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data).await.unwrap();
    (reply_type, data)
}

/// Counts panics on every thread: a server task that panics only drops its connection, which a client
/// cannot tell from a refusal.
#[derive(Debug, Clone)]
pub struct PanicWatch(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl PanicWatch {
    /// Panics so far, in this test binary.
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Starts counting panics (once per test binary; the panics are still printed).
pub fn watch_panics() -> PanicWatch {
    static PANICS: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicUsize>> =
        std::sync::OnceLock::new();
    let count = PANICS.get_or_init(|| {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            previous(info);
        }));
        count
    });
    PanicWatch(count.clone())
}

/// The next `CopyFailed` on a `WatchEvents` stream (other events skipped); panics after 30 s without
/// one.
pub async fn next_copy_failed(
    events: &mut tonic::Streaming<lockstep_api::proto::replicator::v1::ReplicationEvent>,
) -> lockstep_api::proto::replicator::v1::CopyFailed {
    use lockstep_api::proto::replicator::v1::replication_event::Kind;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("an event within 30 s")
            .unwrap()
            .expect("the event stream open");
        if let Some(Kind::CopyFailed(failed)) = event.kind {
            return failed;
        }
    }
}

/// What one call of a service fuzz did: the call, its answer, and what the service showed before and
/// after it.
pub struct FuzzStep<'a, C, S> {
    pub call: &'a C,
    pub result: &'a Result<(), tonic::Status>,
    pub before: &'a S,
    pub after: &'a S,
}

/// Runs `cases` (or `LOCKSTEP_FUZZ_CASES`) sequences of 1 to 7 `calls` against a live gRPC service on
/// `runtime`, and checks after each call: no panic on any thread, an answer within a minute, a refusal
/// that `clean` accepts and that changed nothing (`snapshot` before and after) when it was for a
/// malformed or unknown argument, and `check`. Returns how often each (`name`, outcome) was answered.
#[allow(clippy::too_many_arguments)]
pub fn fuzz_service<C, S, Snap, SnapF, Make, MakeF>(
    runtime: &tokio::runtime::Runtime,
    file: &'static str,
    cases: u32,
    calls: impl proptest::strategy::Strategy<Value = C>,
    snapshot: Snap,
    make: Make,
    name: fn(&C) -> String,
    clean: fn(&tonic::Status) -> bool,
    check: impl Fn(FuzzStep<'_, C, S>) -> Result<(), proptest::test_runner::TestCaseError>,
) -> std::collections::BTreeMap<String, usize>
where
    C: std::fmt::Debug,
    S: std::fmt::Debug + PartialEq,
    Snap: Fn() -> SnapF,
    SnapF: Future<Output = S>,
    Make: Fn(&C) -> MakeF,
    MakeF: Future<Output = Result<(), tonic::Status>>,
{
    use proptest::test_runner::{TestCaseError, TestRunner};
    let panics = watch_panics();
    let answered = std::cell::RefCell::new(std::collections::BTreeMap::<String, usize>::new());
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        source_file: Some(file),
        // Each case talks to a real server: shrinking is bounded in time, not only in steps.
        max_shrink_time: 120_000,
        ..lockstep_api::fuzz::config(cases)
    });
    runner
        .run(&proptest::collection::vec(calls, 1..8), |calls| {
            runtime.block_on(async {
                for call in &calls {
                    let panicked_before = panics.count();
                    let before = snapshot().await;
                    let result = tokio::time::timeout(Duration::from_secs(60), make(call))
                        .await
                        .map_err(|_| {
                            TestCaseError::fail(format!("{call:?} not answered within a minute"))
                        })?;
                    let after = snapshot().await;
                    proptest::prop_assert_eq!(
                        panics.count(),
                        panicked_before,
                        "a panic serving {:?}",
                        call
                    );
                    let outcome = match &result {
                        Ok(()) => format!("{} ok", name(call)),
                        Err(status) => format!("{} {:?}", name(call), status.code()),
                    };
                    *answered.borrow_mut().entry(outcome).or_default() += 1;
                    if let Err(status) = &result {
                        proptest::prop_assert!(clean(status), "{:?} answered {:?}", call, status);
                        if matches!(
                            status.code(),
                            tonic::Code::InvalidArgument | tonic::Code::NotFound
                        ) {
                            proptest::prop_assert_eq!(
                                &after,
                                &before,
                                "{:?} was refused ({:?}) but changed volumes",
                                call,
                                status
                            );
                        }
                    }
                    check(FuzzStep {
                        call,
                        result: &result,
                        before: &before,
                        after: &after,
                    })?;
                }
                Ok(())
            })
        })
        .unwrap();
    answered.into_inner()
}
