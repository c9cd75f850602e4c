//! A real Kubernetes control plane on loopback, for tests: etcd and kube-apiserver (and, where a test
//! needs it, kube-controller-manager) built from source by `scripts/build-kube.sh`, at the version the
//! wrapper module `e2e/kube/go/kubernetes/go.mod` pins.
//!
//! [`RealCluster::start`] runs etcd on free ports with its data in a temporary directory (fsync on unless
//! [`ClusterOptions::etcd_unsafe_no_fsync`]), then kube-apiserver with TLS (its own self-signed serving
//! certificate, whose CA the kubeconfig trusts), RBAC, ServiceAccount token signing and an admin
//! identity (a static token in `system:masters`); writes a kubeconfig and waits for `/readyz`. Dropping
//! the cluster stops every process it started and removes its files.
//!
//! For faults: [`RealCluster::restart_apiserver`], [`RealCluster::stop_etcd`] and
//! [`RealCluster::start_etcd`], and clients through a link-cut proxy ([`RealCluster::cuttable_client`]).
//! Identities: [`RealCluster::service_account_on_node`] (TokenRequest, bound to a Pod on a Node).
//!
//! With [`ClusterOptions::controller_manager`], kube-controller-manager runs too (namespace deletion
//! needs it).
//!
//! [`KubeBinaries::locate`] finds the binaries: `LOCKSTEP_KUBE_BIN`, else the cache `build-kube.sh`
//! builds into. [`KubeBinaries::for_tests`] is how tests take them: a missing build is a failure when
//! `CI` is set and a skip, said out loud, elsewhere.
//!
//! Shared test scaffolding beside it: [`backend::ApiServer`] (the test API server or a real one, as
//! `LOCKSTEP_APISERVER` says), [`crds::install_crds`] (the project's CRDs, Established) and
//! [`fixtures`]; a node's replication and `eventually` are in `lockstep_replicator::testing`.

pub mod backend;
pub mod crds;
pub mod fixtures;

use std::fmt;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tracing::instrument::WithSubscriber as _;
use tracing::{debug, info, warn};

/// The wrapper module that pins the Kubernetes release (read for its version).
const KUBERNETES_GO_MOD: &str = include_str!("../go/kubernetes/go.mod");

/// The admin's user name (member of `system:masters`).
pub const ADMIN_USER: &str = "lockstep-admin";

/// How long a start may take before it is given up (kube-apiserver on a busy 2-core machine needs
/// tens of seconds to run its post-start hooks).
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// How long a process gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What can go wrong finding the binaries or starting a cluster.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The binaries have not been built.
    #[error(
        "{binary} not found in {dir} (Kubernetes {version}): run ./scripts/build-kube.sh (or \
         `source \"$(./scripts/install-tools.sh)\"`), or point LOCKSTEP_KUBE_BIN at a directory \
         holding kube-apiserver, kube-controller-manager and etcd"
    )]
    BinariesMissing {
        /// The binary looked for.
        binary: &'static str,
        /// Where it was looked for.
        dir: PathBuf,
        /// The pinned Kubernetes version.
        version: String,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// A process exited during start-up.
    #[error("{process} exited during start-up ({status}); the end of its log ({log}):\n{tail}")]
    Exited {
        /// The process.
        process: &'static str,
        /// How it exited.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// The cluster did not become ready in time.
    #[error("{process} not ready after {waited:?}: {last}; the end of its log ({log}):\n{tail}")]
    NotReady {
        /// The process waited for.
        process: &'static str,
        /// How long it was waited for.
        waited: Duration,
        /// The last answer or error.
        last: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// The kubeconfig written could not be loaded.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The serving certificate kube-apiserver wrote has no CA certificate in it.
    #[error("no CA certificate in {0}")]
    NoCaCertificate(PathBuf),
    /// A request to the cluster failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The error.
        source: kube::Error,
    },
    /// A ServiceAccount signing key could not be made.
    #[error("could not generate the ServiceAccount signing key")]
    KeyGeneration,
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
    let what = what.into();
    move |source| KubeError::Api { what, source }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> KubeError {
    let what = what.into();
    move |source| KubeError::Io { what, source }
}

/// The pinned Kubernetes version (`v1.34.N`), as `e2e/kube/go/kubernetes/go.mod` requires it.
pub fn pinned_version() -> &'static str {
    KUBERNETES_GO_MOD
        .lines()
        .map(str::split_whitespace)
        .filter_map(|mut words| {
            let first = words.next()?;
            let (module, version) = if first == "require" {
                (words.next()?, words.next()?)
            } else {
                (first, words.next()?)
            };
            (module == "k8s.io/kubernetes" && version.starts_with('v')).then_some(version)
        })
        .next()
        .unwrap_or("unknown")
}

/// The built binaries.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    /// kube-apiserver.
    pub apiserver: PathBuf,
    /// kube-controller-manager.
    pub controller_manager: PathBuf,
    /// etcd.
    pub etcd: PathBuf,
}

impl KubeBinaries {
    /// The directory the binaries are looked for in: `LOCKSTEP_KUBE_BIN`, else
    /// `${LOCKSTEP_KUBE_CACHE:-$HOME/.cache/lockstep/kube}/<pinned version>/bin` (where
    /// `scripts/build-kube.sh` puts them).
    pub fn dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("LOCKSTEP_KUBE_BIN") {
            return PathBuf::from(dir);
        }
        let cache = std::env::var_os("LOCKSTEP_KUBE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_default();
                home.join(".cache/lockstep/kube")
            });
        cache.join(pinned_version()).join("bin")
    }

    /// Finds the three binaries in [`KubeBinaries::dir`].
    pub fn locate() -> Result<Self, KubeError> {
        let dir = Self::dir();
        let find = |binary: &'static str| {
            let path = dir.join(binary);
            if path.is_file() {
                Ok(path)
            } else {
                Err(KubeError::BinariesMissing {
                    binary,
                    dir: dir.clone(),
                    version: pinned_version().to_string(),
                })
            }
        };
        Ok(Self {
            apiserver: find("kube-apiserver")?,
            controller_manager: find("kube-controller-manager")?,
            etcd: find("etcd")?,
        })
    }

    /// For tests: the binaries; `Ok(None)` (after saying why on stderr) when they are missing and `CI`
    /// is not set, so a developer without Go still runs the rest; an error when they are missing in CI,
    /// where a test that needs them must never pass by skipping.
    pub fn for_tests() -> Result<Option<Self>, KubeError> {
        match Self::locate() {
            Ok(binaries) => Ok(Some(binaries)),
            Err(error) if std::env::var_os("CI").is_none_or(|v| v.is_empty()) => {
                eprintln!("SKIPPED (CI is not set): {error}");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }
}

/// How to start a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Run etcd with `--unsafe-no-fsync` (only for benchmarks that say so).
    pub etcd_unsafe_no_fsync: bool,
    /// Also run kube-controller-manager with the controllers of [`CONTROLLERS`] (namespace deletion,
    /// default ServiceAccounts, their legacy token Secrets, garbage collection).
    pub controller_manager: bool,
    /// Keep kube-apiserver's audit log (every request at the Metadata level), read with
    /// [`RealCluster::audit_events`]: how a test proves the real RBAC authorizer refused nothing.
    pub audit: bool,
}

/// The audit policy of [`ClusterOptions::audit`]: every request's metadata, once it has been answered.
const AUDIT_POLICY: &str = r#"{"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
 "omitStages": ["RequestReceived", "ResponseStarted"],
 "rules": [{"level": "Metadata"}]}"#;

/// One request as kube-apiserver's audit log records it (the fields a test reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Who asked.
    pub user: String,
    /// The verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, ...).
    pub verb: String,
    /// The request's path and query.
    pub uri: String,
    /// The answer's HTTP status code.
    pub code: u16,
    /// Whether the authorizer refused it (`authorization.k8s.io/decision: forbid`).
    pub forbidden: bool,
    /// Why the authorizer decided as it did, or the refusal's message.
    pub reason: String,
}

impl AuditEvent {
    /// One line of the audit log (`None` for a line that is not an event).
    fn parse(line: &str) -> Option<Self> {
        let event: serde_json::Value = serde_json::from_str(line).ok()?;
        let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_owned();
        let decision = &event["annotations"]["authorization.k8s.io/decision"];
        let reason = match event["responseStatus"]["message"].as_str() {
            Some(message) if !message.is_empty() => message.to_owned(),
            _ => text(&event["annotations"]["authorization.k8s.io/reason"]),
        };
        Some(Self {
            user: text(&event["user"]["username"]),
            verb: text(&event["verb"]),
            uri: text(&event["requestURI"]),
            code: u16::try_from(event["responseStatus"]["code"].as_u64()?).ok()?,
            forbidden: decision.as_str() == Some("forbid"),
            reason,
        })
    }
}

/// The controllers kube-controller-manager runs when [`ClusterOptions::controller_manager`] is set.
pub const CONTROLLERS: &str = "namespace-controller,serviceaccount-controller,serviceaccount-token-controller,garbage-collector-controller";

/// A process of the cluster, stopped on drop; it can be started again with the same arguments.
struct Process {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    child: Child,
    log: PathBuf,
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Process {
    fn spawn(
        name: &'static str,
        program: &Path,
        args: Vec<String>,
        dir: &Path,
    ) -> Result<Self, KubeError> {
        let log = dir.join(format!("{name}.log"));
        let child = Self::run(name, program, &args, &log)?;
        Ok(Self {
            name,
            program: program.to_path_buf(),
            args,
            child,
            log,
        })
    }

    /// Starts the program, its output appended to `log`.
    fn run(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Child, KubeError> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_error(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_error(format!("opening {}", log.display())))?;
        debug!(%name, ?args, "starting");
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_error(format!("starting {}", program.display())))
    }

    /// Stops the process if it runs, then starts it again with the same arguments.
    fn restart(&mut self) -> Result<(), KubeError> {
        self.stop();
        self.child = Self::run(self.name, &self.program, &self.args, &self.log)?;
        Ok(())
    }

    fn tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// An error if the process has exited.
    fn check_running(&mut self) -> Result<(), KubeError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(KubeError::Exited {
                process: self.name,
                status: status.to_string(),
                log: self.log.clone(),
                tail: self.tail(),
            }),
            Err(e) => Err(io_error(format!("waiting for {}", self.name))(e)),
        }
    }

    fn not_ready(&self, waited: Duration, last: String) -> KubeError {
        KubeError::NotReady {
            process: self.name,
            waited,
            last,
            log: self.log.clone(),
            tail: self.tail(),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_GRACE`].
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        warn!(name = self.name, "did not stop on SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port free on 127.0.0.1 now (the OS's pick; the process that takes it binds it right after).
fn free_port() -> Result<u16, KubeError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_error("finding a free port on 127.0.0.1"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io_error("finding a free port on 127.0.0.1"))
}

/// A fresh random token.
fn random_token() -> Result<String, KubeError> {
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| KubeError::KeyGeneration)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A PEM file's text.
fn pem(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// The DER prefix of a P-256 SubjectPublicKeyInfo, before the 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A new ECDSA P-256 key pair for signing ServiceAccount tokens: the private key (PKCS#8 PEM, for
/// `--service-account-signing-key-file`) and the public key (PKIX PEM, for
/// `--service-account-key-file`, which reads no PKCS#8 private keys).
fn service_account_keys() -> Result<(String, String), KubeError> {
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| KubeError::KeyGeneration)?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, document.as_ref(), &rng)
        .map_err(|_| KubeError::KeyGeneration)?;
    let public = [P256_SPKI_PREFIX.as_slice(), pair.public_key().as_ref()].concat();
    Ok((
        pem("PRIVATE KEY", document.as_ref()),
        pem("PUBLIC KEY", &public),
    ))
}

/// The last certificate of a PEM bundle: kube-apiserver's self-signed `apiserver.crt` holds the
/// serving certificate followed by the CA that signed it.
fn last_certificate(bundle: &str) -> Option<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let begin = bundle.rfind("-----BEGIN CERTIFICATE-----")?;
    let end = bundle[begin..].find(END)? + begin + END.len();
    let first_begin = bundle.find("-----BEGIN CERTIFICATE-----")?;
    (first_begin != begin).then(|| format!("{}\n", &bundle[begin..end]))
}

/// A real control plane on loopback: etcd and kube-apiserver. Dropping it stops both and removes its
/// directory.
pub struct RealCluster {
    // Field order is drop order: the processes stop before their directory goes.
    controller_manager: Option<Process>,
    // Locked only for a moment (a start, a stop, a liveness check): faults need no `&mut` of the cluster.
    apiserver: Mutex<Process>,
    etcd: Mutex<Process>,
    client: kube::Client,
    port: u16,
    url: String,
    kubeconfig: PathBuf,
    ca_pem: String,
    admin_token: String,
    service_account_key: PathBuf,
    dir: tempfile::TempDir,
}

impl fmt::Debug for RealCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RealCluster")
            .field("url", &self.url)
            .field("dir", &self.dir.path())
            .field("apiserver", &self.apiserver)
            .field("etcd", &self.etcd)
            .finish_non_exhaustive()
    }
}

impl RealCluster {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers `ok`. A port picked free can be
    /// taken by another process before etcd or kube-apiserver binds it (the pick and the bind are two
    /// steps): a start that fails so is tried again on new ports, up to three times.
    #[tracing::instrument(skip_all)]
    pub async fn start(
        binaries: &KubeBinaries,
        options: &ClusterOptions,
    ) -> Result<Self, KubeError> {
        let mut attempt = 1;
        loop {
            match Self::start_once(binaries, options).await {
                Err(KubeError::Exited { process, tail, .. })
                    if attempt < 3 && tail.contains("address already in use") =>
                {
                    warn!(
                        process,
                        attempt,
                        "a port picked free was taken before it was bound; starting again on new ports"
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(
        binaries: &KubeBinaries,
        options: &ClusterOptions,
    ) -> Result<Self, KubeError> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("lockstep-kube-")
            .tempdir()
            .map_err(io_error("creating the cluster's directory"))?;
        let root = dir.path().to_path_buf();

        let etcd = start_etcd(binaries, options, &root)?;

        let token = random_token()?;
        let tokens = root.join("tokens.csv");
        fs::write(
            &tokens,
            format!("{token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n"),
        )
        .map_err(io_error("writing the token file"))?;
        let (private_key, public_key) = service_account_keys()?;
        let sa_key = root.join("service-account.key");
        let sa_public_key = root.join("service-account.pub");
        fs::write(&sa_key, private_key).map_err(io_error("writing the ServiceAccount key"))?;
        fs::write(&sa_public_key, public_key)
            .map_err(io_error("writing the ServiceAccount key"))?;
        let cert_dir = root.join("pki");
        let port = free_port()?;
        let args = vec![
            format!("--etcd-servers={}", etcd.url),
            format!("--cert-dir={}", cert_dir.display()),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            "--service-cluster-ip-range=10.0.0.0/24".to_string(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            format!("--service-account-key-file={}", sa_public_key.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--authorization-mode=RBAC".to_string(),
            format!("--token-auth-file={}", tokens.display()),
            "--allow-privileged=true".to_string(),
            "--profiling=false".to_string(),
        ];
        let mut args = args;
        if options.audit {
            let policy = root.join("audit-policy.json");
            fs::write(&policy, AUDIT_POLICY).map_err(io_error("writing the audit policy"))?;
            args.push(format!("--audit-policy-file={}", policy.display()));
            args.push(format!(
                "--audit-log-path={}",
                root.join("audit.log").display()
            ));
            args.push("--audit-log-format=json".to_string());
            args.push("--audit-log-mode=blocking".to_string());
        }
        let mut apiserver = Process::spawn("kube-apiserver", &binaries.apiserver, args, &root)?;
        let url = format!("https://127.0.0.1:{port}");

        // The serving certificate appears once kube-apiserver has generated it.
        let cert_file = cert_dir.join("apiserver.crt");
        let ca_pem = loop {
            apiserver.check_running()?;
            if let Ok(bundle) = fs::read_to_string(&cert_file)
                && let Some(ca) = last_certificate(&bundle)
            {
                break ca;
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(
                    apiserver.not_ready(started.elapsed(), format!("no {}", cert_file.display()))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };

        let kubeconfig = root.join("kubeconfig");
        fs::write(
            &kubeconfig,
            kubeconfig_yaml(&url, &ca_pem, ADMIN_USER, &token),
        )
        .map_err(io_error("writing the kubeconfig"))?;
        let client = client_from(&kubeconfig).await?;

        let (apiserver, etcd) = (Mutex::new(apiserver), Mutex::new(etcd.process));
        wait_ready(&client, &apiserver, &etcd, started).await?;
        let controller_manager = if options.controller_manager {
            let ca_file = root.join("ca.crt");
            fs::write(&ca_file, &ca_pem).map_err(io_error("writing the CA certificate"))?;
            let args = vec![
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--controllers={CONTROLLERS}"),
                format!("--service-account-private-key-file={}", sa_key.display()),
                format!("--root-ca-file={}", ca_file.display()),
                "--leader-elect=false".to_string(),
                "--secure-port=0".to_string(),
            ];
            let mut process = Process::spawn(
                "kube-controller-manager",
                &binaries.controller_manager,
                args,
                &root,
            )?;
            process.check_running()?;
            Some(process)
        } else {
            None
        };
        info!(%url, elapsed = ?started.elapsed(), "real cluster ready");
        Ok(Self {
            controller_manager,
            apiserver,
            etcd,
            client,
            port,
            url,
            kubeconfig,
            ca_pem,
            admin_token: token,
            service_account_key: sa_key,
            dir,
        })
    }

    /// A client with the admin identity.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL (`https://127.0.0.1:PORT`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The PEM of the CA that signed the API server's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The admin's bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The private key that signs ServiceAccount tokens (for kube-controller-manager).
    pub fn service_account_key(&self) -> &Path {
        &self.service_account_key
    }

    /// The cluster's directory (logs, kubeconfig, keys, etcd's data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a kubeconfig for another identity, authenticated by a bearer token, and returns a
    /// client for it.
    pub async fn kubeconfig_for_token(
        &self,
        name: &str,
        token: &str,
    ) -> Result<(PathBuf, kube::Client), KubeError> {
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        fs::write(&path, kubeconfig_yaml(&self.url, &self.ca_pem, name, token))
            .map_err(io_error(format!("writing {}", path.display())))?;
        let client = client_from(&path).await?;
        Ok((path, client))
    }

    /// The identity of ServiceAccount `namespace/service_account` in a Pod on `node`, as a kubelet would
    /// give it: creates the Node (if missing) and a Pod `<service_account>-<node>` bound to it, then a
    /// token from TokenRequest bound to that Pod (so the server adds the node's name to the identity);
    /// writes a kubeconfig with it and returns a client. No kubelet runs the Pod, nor confirms its end:
    /// delete it with grace period 0 (the token dies with it), or a deletion of its namespace waits.
    pub async fn service_account_on_node(
        &self,
        namespace: &str,
        service_account: &str,
        node: &str,
    ) -> Result<Identity, KubeError> {
        use k8s_openapi::api::authentication::v1::BoundObjectReference;
        use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec};
        use kube::api::{Api, ObjectMeta, PostParams};

        let nodes: Api<Node> = Api::all(self.client.clone());
        if nodes
            .get_opt(node)
            .await
            .map_err(api_error(format!("reading Node {node}")))?
            .is_none()
        {
            let object = Node {
                metadata: ObjectMeta {
                    name: Some(node.to_string()),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            };
            nodes
                .create(&PostParams::default(), &object)
                .await
                .map_err(api_error(format!("creating Node {node}")))?;
        }
        let pod_name = format!("{service_account}-{node}");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = match pods
            .get_opt(&pod_name)
            .await
            .map_err(api_error(format!("reading Pod {namespace}/{pod_name}")))?
        {
            Some(pod) => pod,
            None => {
                let object = Pod {
                    metadata: ObjectMeta {
                        name: Some(pod_name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(PodSpec {
                        node_name: Some(node.to_string()),
                        service_account_name: Some(service_account.to_string()),
                        containers: vec![Container {
                            name: "identity".into(),
                            image: Some("lockstep.invalid/identity".into()),
                            ..Container::default()
                        }],
                        ..PodSpec::default()
                    }),
                    ..Pod::default()
                };
                pods.create(&PostParams::default(), &object)
                    .await
                    .map_err(api_error(format!("creating Pod {namespace}/{pod_name}")))?
            }
        };
        let bound = BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod_name.clone()),
            uid: pod.metadata.uid.clone(),
        };
        self.mint(namespace, service_account, Some(bound), &pod_name)
            .await
    }

    /// The identity of ServiceAccount `namespace/service_account` as `kubectl create token` gives it
    /// (a token from TokenRequest, bound to no object): how a Deployment's Pod signs in, as far as RBAC
    /// can tell. Writes a kubeconfig with it and returns a client.
    pub async fn service_account(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<Identity, KubeError> {
        self.mint(namespace, service_account, None, service_account)
            .await
    }

    /// A token from TokenRequest for `namespace/service_account`, bound to `bound` if given.
    async fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        bound: Option<k8s_openapi::api::authentication::v1::BoundObjectReference>,
        name: &str,
    ) -> Result<Identity, KubeError> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;
        use kube::api::{Api, PostParams};

        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(3600),
                bound_object_ref: bound,
            },
            ..TokenRequest::default()
        };
        let minted = Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .map_err(api_error(format!(
                "TokenRequest for ServiceAccount {namespace}/{service_account}"
            )))?;
        let token = minted.status.map(|s| s.token).unwrap_or_default();
        let user = format!("system:serviceaccount:{namespace}:{service_account}");
        let (kubeconfig, client) = self.kubeconfig_for_token(name, &token).await?;
        Ok(Identity {
            user,
            token,
            kubeconfig,
            client,
        })
    }

    /// Faults: a client (and its kubeconfig) for the bearer token `token`, whose connections to the
    /// API server run through a link-cut proxy that the caller cuts with
    /// [`LinkCut::set_mode`](lockstep_replicator::linkcut::LinkCut::set_mode). (kube's default read
    /// timeout is minutes: a `Blackhole` leaves requests waiting that long.)
    pub async fn cuttable_client(
        &self,
        name: &str,
        token: &str,
    ) -> Result<CuttableClient, KubeError> {
        let link =
            lockstep_replicator::linkcut::LinkCut::start((Ipv4Addr::LOCALHOST, self.port).into())
                .await
                .map_err(io_error(
                    "starting a link-cut proxy in front of kube-apiserver",
                ))?;
        let url = format!("https://{}", link.addr());
        let kubeconfig = self.dir.path().join(format!("kubeconfig-{name}-via-link"));
        fs::write(
            &kubeconfig,
            kubeconfig_yaml(&url, &self.ca_pem, name, token),
        )
        .map_err(io_error(format!("writing {}", kubeconfig.display())))?;
        let client = client_from(&kubeconfig).await?;
        Ok(CuttableClient {
            link,
            client,
            kubeconfig,
        })
    }

    /// Faults: stops kube-apiserver and starts it again (same port, certificate and etcd), then waits
    /// until it is ready. Clients keep their configuration.
    pub async fn restart_apiserver(&self) -> Result<(), KubeError> {
        lock(&self.apiserver).restart()?;
        self.wait_ready().await
    }

    /// Faults: stops kube-apiserver (etcd keeps running); [`RealCluster::start_apiserver`] brings it back.
    pub fn stop_apiserver(&self) {
        lock(&self.apiserver).stop();
    }

    /// Faults: starts kube-apiserver again (same port, certificate and etcd) and waits until it is ready.
    pub async fn start_apiserver(&self) -> Result<(), KubeError> {
        self.restart_apiserver().await
    }

    /// Every request the audit log holds so far (with [`ClusterOptions::audit`]; empty without).
    pub fn audit_events(&self) -> Result<Vec<AuditEvent>, KubeError> {
        let path = self.dir.path().join("audit.log");
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.lines().filter_map(AuditEvent::parse).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_error(format!("reading {}", path.display()))(e)),
        }
    }

    /// Faults: stops etcd (kube-apiserver keeps running and stops being ready).
    pub fn stop_etcd(&self) {
        lock(&self.etcd).stop();
    }

    /// Faults: starts etcd again on its data and ports, then waits until kube-apiserver is ready.
    pub async fn start_etcd(&self) -> Result<(), KubeError> {
        lock(&self.etcd).restart()?;
        self.wait_ready().await
    }

    async fn wait_ready(&self) -> Result<(), KubeError> {
        wait_ready(&self.client, &self.apiserver, &self.etcd, Instant::now()).await
    }

    /// Stops kube-controller-manager, kube-apiserver, then etcd (the same as dropping the cluster).
    pub fn stop(mut self) {
        if let Some(process) = &mut self.controller_manager {
            process.stop();
        }
        lock(&self.apiserver).stop();
        lock(&self.etcd).stop();
    }
}

/// A process's lock (a panic while it was held leaves the process as it was: still usable).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An identity signed in to the cluster.
#[derive(Clone)]
pub struct Identity {
    /// Its user name (`system:serviceaccount:NAMESPACE:NAME`).
    pub user: String,
    /// Its bearer token.
    pub token: String,
    /// A kubeconfig that signs in as it.
    pub kubeconfig: PathBuf,
    /// A client that signs in as it.
    pub client: kube::Client,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("user", &self.user)
            .field("kubeconfig", &self.kubeconfig)
            .finish_non_exhaustive()
    }
}

/// A client whose connections run through a link-cut proxy (see [`RealCluster::cuttable_client`]).
pub struct CuttableClient {
    /// The proxy: switch its mode to cut or restore the link.
    pub link: lockstep_replicator::linkcut::LinkCut,
    /// The client.
    pub client: kube::Client,
    /// A kubeconfig through the proxy (for kubectl, helm or another process).
    pub kubeconfig: PathBuf,
}

impl fmt::Debug for CuttableClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CuttableClient")
            .field("link", &self.link)
            .field("kubeconfig", &self.kubeconfig)
            .finish_non_exhaustive()
    }
}

struct Etcd {
    process: Process,
    url: String,
}

fn start_etcd(
    binaries: &KubeBinaries,
    options: &ClusterOptions,
    root: &Path,
) -> Result<Etcd, KubeError> {
    let client_port = free_port()?;
    let peer_port = free_port()?;
    let url = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut args = vec![
        "--name=lockstep".to_string(),
        format!("--data-dir={}", root.join("etcd").display()),
        format!("--listen-client-urls={url}"),
        format!("--advertise-client-urls={url}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=lockstep={peer}"),
        "--log-level=warn".to_string(),
    ];
    if options.etcd_unsafe_no_fsync {
        args.push("--unsafe-no-fsync".to_string());
    }
    let process = Process::spawn("etcd", &binaries.etcd, args, root)?;
    Ok(Etcd { process, url })
}

/// Waits until kube-apiserver's `/readyz` answers `ok` (etcd reachable, post-start hooks done).
async fn wait_ready(
    client: &kube::Client,
    apiserver: &Mutex<Process>,
    etcd: &Mutex<Process>,
    since: Instant,
) -> Result<(), KubeError> {
    loop {
        lock(apiserver).check_running()?;
        lock(etcd).check_running()?;
        let request = http::Request::get("/readyz").body(Vec::new());
        let last = match request {
            // kube's client logs every failed request at ERROR: until the server is ready, a 500 from
            // /readyz is the expected answer, not an error to show.
            Ok(request) => match client
                .request_text(request)
                .with_subscriber(tracing::subscriber::NoSubscriber::default())
                .await
            {
                Ok(text) if text.trim() == "ok" => return Ok(()),
                Ok(text) => text,
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if since.elapsed() > START_TIMEOUT {
            return Err(lock(apiserver).not_ready(since.elapsed(), last));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn kubeconfig_yaml(url: &str, ca_pem: &str, user: &str, token: &str) -> String {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lockstep", "cluster": {
            "server": url,
            "certificate-authority-data": BASE64.encode(ca_pem),
        }}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "lockstep", "user": user}}],
        "current-context": user,
    });
    // JSON is YAML; kubectl and kube read it either way.
    config.to_string()
}

async fn client_from(path: &Path) -> Result<kube::Client, KubeError> {
    let error = |message: String| KubeError::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| error(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| error(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| error(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_version_is_a_1_34_release() {
        assert!(
            pinned_version().starts_with("v1.34."),
            "{}",
            pinned_version()
        );
    }

    #[test]
    fn the_ca_is_the_last_certificate_of_a_bundle() {
        let bundle = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\
                      -----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            last_certificate(bundle).as_deref(),
            Some("-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n")
        );
        let single = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(last_certificate(single), None);
    }
}
