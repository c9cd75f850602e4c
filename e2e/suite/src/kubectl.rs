//! The real `kubectl`, run against the simulated clusters ([`Kubectl`]): every command is said on the
//! timeline as a person would type it, with its output. Also one-line, `kubectl get`-like summaries of
//! Lockstep objects for the timeline ([`cg_line`], [`mc_line`]): the columns the CRDs declare as printer
//! columns.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lockstep_testapi::kubectl::{KubectlNotFound, Pick};

use crate::timeline::Timeline;

use lockstep_api::conditions::status_of;
use lockstep_api::domain::condition;
use lockstep_api::v1alpha1::{ConsistencyGroup, MemberCluster};

/// `NAME PHASE EPOCH MEMBERS FROZEN` of a group, as `kubectl get cg` prints them (without AGE).
pub fn cg_line(group: &ConsistencyGroup) -> String {
    let status = group.status.as_ref();
    let phase = status
        .and_then(|s| s.phase)
        .map_or_else(|| "<none>".to_owned(), |p| p.to_string());
    let epoch = status.map_or(0, |s| s.epoch);
    let members = status.map_or(0, |s| s.member_count);
    let frozen = status
        .and_then(|s| status_of(&s.conditions, condition::FROZEN))
        .map_or("<none>", |f| if f { "True" } else { "False" });
    format!(
        "cg/{} phase={phase} epoch={epoch} members={members} frozen={frozen}",
        group.metadata.name.as_deref().unwrap_or("?")
    )
}

/// `NAME PATHS NETWORK` of a member cluster.
pub fn mc_line(cluster: &MemberCluster) -> String {
    let spec = &cluster.spec;
    let mut line = format!(
        "mc/{} paths={:?} network={}",
        cluster.metadata.name.as_deref().unwrap_or("?"),
        spec.paths,
        spec.network.as_deref().unwrap_or("<none>")
    );
    if spec.local {
        line.push_str(" (the hub itself)");
    }
    if let Some(secret) = &spec.kubeconfig_secret_ref {
        line.push_str(&format!(
            " kubeconfig=secret/{}/{}",
            secret.namespace, secret.name
        ));
    }
    line
}

/// How long one kubectl command may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// Why a kubectl command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    /// No kubectl on this machine.
    #[error(transparent)]
    NotFound(#[from] KubectlNotFound),
    /// kubectl could not be started.
    #[error("{cluster}: kubectl {command}: {source}")]
    Spawn {
        /// The cluster.
        cluster: String,
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// kubectl did not finish in time.
    #[error("{cluster}: kubectl {command} did not finish within {within:?}")]
    Timeout {
        /// The cluster.
        cluster: String,
        /// The command line.
        command: String,
        /// How long.
        within: Duration,
    },
    /// kubectl failed.
    #[error("{cluster}: kubectl {command} failed ({status}): {stderr}")]
    Failed {
        /// The cluster.
        cluster: String,
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
}

/// The real kubectl binary, run from the repository's root (so `-f crds/…` and `-f examples/…` name the
/// repository's files) with its discovery cache in a directory of the caller's.
#[derive(Debug, Clone)]
pub struct Kubectl {
    binary: PathBuf,
    cache_dir: PathBuf,
}

impl Kubectl {
    /// The newest kubectl of the machine (see [`lockstep_testapi::kubectl`]); its cache goes to
    /// `cache_dir`.
    pub fn find(cache_dir: &Path) -> Result<Self, KubectlError> {
        Ok(Self {
            binary: lockstep_testapi::kubectl::find(Pick::Newest)?,
            cache_dir: cache_dir.to_path_buf(),
        })
    }

    /// The binary run.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The repository's root: where commands run.
    pub fn repository() -> PathBuf {
        manifest_dir().join("../..")
    }

    /// Runs `kubectl <args>` against the API server of `kubeconfig` (cluster `cluster`), saying the
    /// command and then its output on `timeline`; returns the output.
    pub async fn run(
        &self,
        cluster: &str,
        kubeconfig: &Path,
        args: &[&str],
        timeline: &Timeline,
    ) -> Result<String, KubectlError> {
        let command = args
            .iter()
            .map(|a| shell_word(a))
            .collect::<Vec<_>>()
            .join(" ");
        let output = tokio::process::Command::new(&self.binary)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .args(args)
            .current_dir(Self::repository())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(COMMAND_DEADLINE, output)
            .await
            .map_err(|_| KubectlError::Timeout {
                cluster: cluster.to_owned(),
                command: command.clone(),
                within: COMMAND_DEADLINE,
            })?
            .map_err(|source| KubectlError::Spawn {
                cluster: cluster.to_owned(),
                command: command.clone(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            return Err(KubectlError::Failed {
                cluster: cluster.to_owned(),
                command,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let shown = stdout.trim_end();
        timeline.say(if shown.is_empty() {
            format!("{cluster}$ kubectl {command}")
        } else {
            format!("{cluster}$ kubectl {command}\n{shown}")
        });
        Ok(stdout)
    }
}

/// `word` as a shell would need it typed: quoted when it holds anything but plain characters.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// The crate's directory: where cargo says it is when it runs this (a binary reused from a build in
/// another checkout of the same tree would otherwise read that checkout's files), else where it was built.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_api::v1alpha1::ConsistencyGroupSpec;

    #[test]
    fn commands_are_shown_as_they_would_be_typed() {
        assert_eq!(
            shell_word("crds/lockstep.dev_x.yaml"),
            "crds/lockstep.dev_x.yaml"
        );
        assert_eq!(shell_word(r#"{"spec":{}}"#), r#"'{"spec":{}}'"#);
        assert_eq!(shell_word("it's"), r#"'it'\''s'"#);
    }

    #[test]
    fn a_new_group_has_no_phase() {
        let spec: ConsistencyGroupSpec = serde_json::from_value(serde_json::json!({
            "members": [{"cluster": "east", "namespace": "orders", "pvcNames": ["a"]}],
        }))
        .unwrap();
        let group = ConsistencyGroup::new("g", spec);
        assert_eq!(
            cg_line(&group),
            "cg/g phase=<none> epoch=0 members=0 frozen=<none>"
        );
    }
}
