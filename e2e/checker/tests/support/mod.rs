//! Test support: real `qemu-nbd` servers on sparse files, started as children and killed at the end.

#![allow(dead_code)]

use lockstep_checker::{NbdAddress, NbdClient};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How long a server may take to come up.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// A sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> std::io::Result<()> {
    std::fs::File::create(path)?.set_len(size)
}

/// A `qemu-nbd` serving one file.
pub struct QemuNbd {
    child: Child,
    pub address: NbdAddress,
    pub file: PathBuf,
    read_only: bool,
}

impl QemuNbd {
    /// Serves `file` as export `name` on a unix socket `socket`.
    pub async fn unix(
        file: &Path,
        name: &str,
        socket: &Path,
        read_only: bool,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let address = NbdAddress::Unix {
            socket: socket.to_owned(),
            export: name.to_owned(),
        };
        Self::start(file, address, read_only).await
    }

    /// Serves `file` as export `name` on a free loopback TCP port.
    pub async fn tcp(
        file: &Path,
        name: &str,
        read_only: bool,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let address = NbdAddress::Tcp {
            host: "127.0.0.1".into(),
            port,
            export: name.to_owned(),
        };
        Self::start(file, address, read_only).await
    }

    async fn start(
        file: &Path,
        address: NbdAddress,
        read_only: bool,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let mut cmd = Command::new("/usr/bin/qemu-nbd");
        cmd.args([
            "-f",
            "raw",
            "--persistent",
            "-e",
            "8",
            "-x",
            address.export(),
        ]);
        match &address {
            NbdAddress::Unix { socket, .. } => {
                // A socket left by a killed server would make the bind fail.
                let _ = std::fs::remove_file(socket);
                cmd.arg("-k").arg(socket);
            }
            NbdAddress::Tcp { host, port, .. } => {
                cmd.args(["-b", host, "-p", &port.to_string()]);
            }
        }
        if read_only {
            cmd.arg("-r");
        }
        cmd.arg(file).stdin(Stdio::null()).kill_on_drop(true);
        let child = cmd.spawn()?;
        let mut server = Self {
            child,
            address,
            file: file.to_owned(),
            read_only,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// Polls until the export can be opened, with a deadline.
    async fn wait_ready(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("qemu-nbd for {} exited: {status}", self.address).into());
            }
            match NbdClient::connect(&self.address).await {
                Ok(c) => {
                    c.disconnect().await?;
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("qemu-nbd for {} not ready: {e}", self.address).into());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub async fn kill(mut self) -> std::io::Result<()> {
        self.child.kill().await
    }

    /// Starts the same server again (same file, address and mode).
    pub async fn restart(
        file: &Path,
        address: &NbdAddress,
        read_only: bool,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        Self::start(file, address.clone(), read_only).await
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// Servers for `n` sparse volumes of `size` bytes in `dir`, on unix sockets.
pub async fn unix_volumes(
    dir: &Path,
    n: usize,
    size: u64,
) -> Result<Vec<QemuNbd>, Box<dyn std::error::Error>> {
    let mut servers = Vec::with_capacity(n);
    for i in 0..n {
        let file = dir.join(format!("vol{i}.img"));
        sparse_file(&file, size)?;
        servers.push(
            QemuNbd::unix(
                &file,
                &format!("vol{i}"),
                &dir.join(format!("vol{i}.sock")),
                false,
            )
            .await?,
        );
    }
    Ok(servers)
}

/// Copies each server's file into `dir/<tag>-volN.img` and returns the copies' paths.
pub fn copy_files(servers: &[QemuNbd], dir: &Path, tag: &str) -> std::io::Result<Vec<PathBuf>> {
    servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let to = dir.join(format!("{tag}-vol{i}.img"));
            std::fs::copy(&s.file, &to)?;
            Ok(to)
        })
        .collect()
}

/// A fake NBD server on a unix socket that negotiates like a real one, then *holds* every request: it
/// never replies (like a replicator holding I/O on a suspended volume). Stops when dropped.
pub struct HoldingServer {
    pub address: NbdAddress,
    task: tokio::task::JoinHandle<()>,
}

impl HoldingServer {
    /// Serves an export of `size` bytes named `name` on `socket`.
    pub fn start(socket: &Path, name: &str, size: u64) -> std::io::Result<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(socket)?;
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let serve = async {
                        let mut hello = b"NBDMAGICIHAVEOPT".to_vec();
                        hello.extend_from_slice(&3u16.to_be_bytes());
                        s.write_all(&hello).await?;
                        let mut flags = [0u8; 4];
                        s.read_exact(&mut flags).await?;
                        let mut opt = [0u8; 16];
                        s.read_exact(&mut opt).await?;
                        let len = u32::from_be_bytes([opt[12], opt[13], opt[14], opt[15]]);
                        let mut data = vec![0u8; len as usize];
                        s.read_exact(&mut data).await?;
                        let reply = |kind: u32, payload: &[u8]| {
                            let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
                            r.extend_from_slice(&7u32.to_be_bytes());
                            r.extend_from_slice(&kind.to_be_bytes());
                            r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                            r.extend_from_slice(payload);
                            r
                        };
                        let mut info = 0u16.to_be_bytes().to_vec();
                        info.extend_from_slice(&size.to_be_bytes());
                        info.extend_from_slice(&(1u16 | 4 | 8).to_be_bytes());
                        s.write_all(&reply(3, &info)).await?;
                        s.write_all(&reply(1, &[])).await?;
                        // Transmission: read requests and their data, answer nothing.
                        loop {
                            let mut h = [0u8; 28];
                            s.read_exact(&mut h).await?;
                            if u16::from_be_bytes([h[6], h[7]]) == 1 {
                                let n = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
                                let mut payload = vec![0u8; n as usize];
                                s.read_exact(&mut payload).await?;
                            }
                        }
                        #[allow(unreachable_code)]
                        Ok::<(), std::io::Error>(())
                    };
                    let _ = serve.await;
                });
            }
        });
        let address = NbdAddress::Unix {
            socket: socket.to_owned(),
            export: name.to_owned(),
        };
        Ok(Self { address, task })
    }
}

impl Drop for HoldingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
