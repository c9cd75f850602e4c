//! The dependent-write workload: a strict chain of self-describing 4 KiB writes across several volumes.
//!
//! Write `seq + 1` is issued only after write `seq` was acknowledged, so if the secondaries ever hold
//! `seq + 1` without `seq`, replication broke dependent-write consistency. Placement follows [`Layout`];
//! one NBD connection per volume, in the volume order of the layout.
//!
//! On a failed write the workload either stops or retries *the same* write until it is acknowledged
//! ([`OnError`]): skipping to the next one would issue a write that does not depend on its predecessor
//! and break the chain the checker relies on. Progress is published on a `watch` channel so a test can
//! act while the workload runs; a [`CancellationToken`] stops it.

use crate::block;
use crate::layout::{Layout, LayoutError};
use crate::nbd::{NbdAddress, NbdClient, NbdError};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What to do when a write fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop at the first failed write.
    #[default]
    Stop,
    /// Retry the failed write (reconnecting if the connection is lost) until it is acknowledged or the
    /// workload is cancelled.
    Retry,
}

/// How to run the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadOptions {
    /// Identifies this run's blocks.
    pub run_id: u64,
    /// Placement; its volume count must equal the number of addresses.
    pub layout: Layout,
    /// The first sequence to write (1 for a new run; later to continue a run).
    pub first_seq: u64,
    /// How many writes to issue; `None` runs until cancelled.
    pub writes: Option<u64>,
    /// Send every write with FUA.
    pub fua: bool,
    /// What to do when a write fails.
    pub on_error: OnError,
    /// Pause between retries of a failed write.
    pub retry_backoff: Duration,
    /// Flush every volume after the last write.
    pub flush_at_end: bool,
}

impl WorkloadOptions {
    /// Options for a new run with a fresh run id: `writes` writes, stopping at the first failure.
    pub fn new(layout: Layout, writes: Option<u64>) -> Self {
        Self {
            run_id: fresh_run_id(),
            layout,
            first_seq: 1,
            writes,
            fua: false,
            on_error: OnError::Stop,
            retry_backoff: Duration::from_millis(50),
            flush_at_end: true,
        }
    }
}

/// A run id that differs between runs: the clock mixed with the process id.
pub fn fresh_run_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A failed write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFailure {
    /// The write.
    pub seq: u64,
    /// Its volume.
    pub volume: u32,
    /// Why it failed.
    pub error: String,
    /// The last write acknowledged before it.
    pub last_acked_before: u64,
}

/// The workload's progress, published after every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The last write acknowledged (0 before any; `first_seq - 1` when continuing a run).
    pub last_acked: u64,
    /// The write issued and not yet answered.
    pub in_flight: Option<u64>,
    /// Writes acknowledged in this run of the workload.
    pub acked: u64,
    /// The first failed write.
    pub first_failure: Option<WriteFailure>,
    /// Failed attempts in all.
    pub failures: u64,
    /// The workload has finished.
    pub done: bool,
}

/// Why the workload stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It issued every write it was asked for.
    Completed,
    /// It was cancelled.
    Cancelled,
    /// A write failed and [`OnError::Stop`] was asked for.
    Failed,
}

/// What the workload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadReport {
    /// The run.
    pub run_id: u64,
    /// Its layout.
    pub layout: Layout,
    /// The first sequence written.
    pub first_seq: u64,
    /// The last write acknowledged.
    pub last_acked: u64,
    /// Writes acknowledged.
    pub acked: u64,
    /// The first failed write.
    pub first_failure: Option<WriteFailure>,
    /// Failed attempts in all.
    pub failures: u64,
    /// A write cancelled while in flight (its fate is unknown).
    pub in_flight_at_stop: Option<u64>,
    /// Why it stopped.
    pub stopped: StopReason,
}

impl std::fmt::Display for WorkloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {:#x} ({} volumes, {} slots each, region at block {}): {:?} after {} acknowledged writes; last acknowledged write {}",
            self.run_id,
            self.layout.volumes(),
            self.layout.slots(),
            self.layout.base(),
            self.stopped,
            self.acked,
            self.last_acked
        )?;
        if let Some(seq) = self.in_flight_at_stop {
            write!(f, "; write {seq} was in flight when stopped")?;
        }
        if let Some(fl) = &self.first_failure {
            write!(
                f,
                "; first failed write {} on volume {} ({}), {} failed attempts in all",
                fl.seq, fl.volume, fl.error, self.failures
            )?;
        }
        Ok(())
    }
}

/// Errors that prevent or end the workload (a failed write is not one: see [`WorkloadReport`]).
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The layout's volume count does not match the addresses.
    #[error("the layout has {layout} volumes but {addresses} addresses were given")]
    VolumeCount {
        /// Volumes in the layout.
        layout: u32,
        /// Addresses given.
        addresses: usize,
    },
    /// Bad layout parameters.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The first sequence is 0.
    #[error("sequences start at 1")]
    FirstSeq,
    /// A volume could not be opened at start-up.
    #[error("volume {volume} ({address}): {source}")]
    Connect {
        /// Volume index.
        volume: u32,
        /// Its address.
        address: NbdAddress,
        /// Why.
        source: NbdError,
    },
    /// A volume is too small for the layout's region.
    #[error("volume {volume} ({address}) has {size} bytes, the layout needs {required}")]
    TooSmall {
        /// Volume index.
        volume: u32,
        /// Its address.
        address: NbdAddress,
        /// Its size.
        size: u64,
        /// What the layout needs.
        required: u64,
    },
    /// A volume cannot take the writes asked for.
    #[error("volume {volume} ({address}) does not support {what}")]
    Unsupported {
        /// Volume index.
        volume: u32,
        /// Its address.
        address: NbdAddress,
        /// What.
        what: &'static str,
    },
    /// The final flush failed.
    #[error("flushing volume {volume}: {source}")]
    Flush {
        /// Volume index.
        volume: u32,
        /// Why.
        source: NbdError,
    },
    /// The workload task panicked or was aborted.
    #[error("workload task ended abnormally: {0}")]
    Task(String),
}

/// Runs the workload against `addresses` (one per volume, in layout order) until it has issued its writes,
/// stopped on a failure, or `cancel` fires.
pub async fn run_workload(
    addresses: &[NbdAddress],
    options: &WorkloadOptions,
    progress: &watch::Sender<Progress>,
    cancel: &CancellationToken,
) -> Result<WorkloadReport, WorkloadError> {
    let layout = options.layout;
    if addresses.len() != layout.volumes() as usize {
        return Err(WorkloadError::VolumeCount {
            layout: layout.volumes(),
            addresses: addresses.len(),
        });
    }
    if options.first_seq == 0 {
        return Err(WorkloadError::FirstSeq);
    }
    let mut clients: Vec<Option<NbdClient>> = Vec::with_capacity(addresses.len());
    for (v, address) in addresses.iter().enumerate() {
        let volume = v as u32;
        let client =
            NbdClient::connect(address)
                .await
                .map_err(|source| WorkloadError::Connect {
                    volume,
                    address: address.clone(),
                    source,
                })?;
        let info = client.info();
        if info.size < layout.required_volume_size() {
            return Err(WorkloadError::TooSmall {
                volume,
                address: address.clone(),
                size: info.size,
                required: layout.required_volume_size(),
            });
        }
        let unsupported = |what| WorkloadError::Unsupported {
            volume,
            address: address.clone(),
            what,
        };
        if info.read_only() {
            return Err(unsupported("writes (read-only)"));
        }
        if options.fua && !info.can_fua() {
            return Err(unsupported("FUA"));
        }
        clients.push(Some(client));
    }

    let mut last_acked = options.first_seq - 1;
    let mut acked = 0u64;
    let mut failures = 0u64;
    let mut first_failure: Option<WriteFailure> = None;
    progress.send_modify(|p| {
        *p = Progress {
            last_acked,
            ..Progress::default()
        }
    });
    let end = options.writes.map(|n| options.first_seq.saturating_add(n));
    let mut seq = options.first_seq;
    let mut in_flight_at_stop = None;

    let stopped = 'run: loop {
        if end.is_some_and(|e| seq >= e) {
            break StopReason::Completed;
        }
        if cancel.is_cancelled() {
            break StopReason::Cancelled;
        }
        let loc = layout.locate(seq);
        let data = block::encode(options.run_id, seq, layout);
        progress.send_modify(|p| p.in_flight = Some(seq));
        loop {
            let v = loc.volume as usize;
            let attempt = async {
                if clients[v].is_none() {
                    clients[v] = Some(NbdClient::connect(&addresses[v]).await?);
                }
                match clients[v].as_mut() {
                    Some(c) => c.write(loc.offset, &data, options.fua).await,
                    None => Err(NbdError::Broken),
                }
            };
            let result = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    in_flight_at_stop = Some(seq);
                    break 'run StopReason::Cancelled;
                }
                r = attempt => r,
            };
            match result {
                Ok(()) => {
                    last_acked = seq;
                    acked += 1;
                    progress.send_modify(|p| {
                        p.last_acked = seq;
                        p.acked = acked;
                        p.in_flight = None;
                    });
                    break;
                }
                Err(e) => {
                    tracing::warn!(seq, volume = loc.volume, error = %e, "workload write failed");
                    if e.connection_lost() {
                        clients[v] = None;
                    }
                    failures += 1;
                    let failure = WriteFailure {
                        seq,
                        volume: loc.volume,
                        error: e.to_string(),
                        last_acked_before: last_acked,
                    };
                    if first_failure.is_none() {
                        first_failure = Some(failure.clone());
                    }
                    progress.send_modify(|p| {
                        p.failures = failures;
                        p.first_failure.get_or_insert(failure);
                    });
                    if options.on_error == OnError::Stop {
                        break 'run StopReason::Failed;
                    }
                    tokio::select! {
                        () = cancel.cancelled() => break 'run StopReason::Cancelled,
                        () = tokio::time::sleep(options.retry_backoff) => {}
                    }
                }
            }
        }
        seq += 1;
    };

    let mut flush_error = None;
    if stopped == StopReason::Completed && options.flush_at_end {
        for (v, client) in clients.iter_mut().enumerate() {
            if let Some(c) = client.as_mut().filter(|c| c.info().can_flush())
                && let Err(source) = c.flush().await
            {
                flush_error.get_or_insert(WorkloadError::Flush {
                    volume: v as u32,
                    source,
                });
            }
        }
    }
    for client in clients.into_iter().flatten() {
        if let Err(e) = client.disconnect().await {
            tracing::debug!(error = %e, "NBD disconnect failed at the end of the workload");
        }
    }
    progress.send_modify(|p| {
        p.in_flight = None;
        p.done = true;
    });
    if let Some(e) = flush_error {
        return Err(e);
    }
    Ok(WorkloadReport {
        run_id: options.run_id,
        layout,
        first_seq: options.first_seq,
        last_acked,
        acked,
        first_failure,
        failures,
        in_flight_at_stop,
        stopped,
    })
}

/// A workload running on its own task.
#[derive(Debug)]
pub struct WorkloadHandle {
    /// Progress, updated after every write.
    pub progress: watch::Receiver<Progress>,
    /// Cancels the workload.
    pub cancel: CancellationToken,
    task: JoinHandle<Result<WorkloadReport, WorkloadError>>,
}

/// The workload did not reach a write in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("workload did not acknowledge write {wanted} within {within:?} (progress: {progress:?})")]
pub struct WaitError {
    /// The write waited for.
    pub wanted: u64,
    /// How long.
    pub within: Duration,
    /// Progress when the wait ended.
    pub progress: Progress,
}

impl WorkloadHandle {
    /// Starts the workload on a new task.
    pub fn spawn(addresses: Vec<NbdAddress>, options: WorkloadOptions) -> Self {
        let (tx, progress) = watch::channel(Progress::default());
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let task =
            tokio::spawn(async move { run_workload(&addresses, &options, &tx, &token).await });
        Self {
            progress,
            cancel,
            task,
        }
    }

    /// The latest progress.
    pub fn current(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Waits until write `seq` is acknowledged, the workload ends, or `within` passes.
    pub async fn wait_for_acked(
        &mut self,
        seq: u64,
        within: Duration,
    ) -> Result<Progress, WaitError> {
        let waited = tokio::time::timeout(
            within,
            self.progress.wait_for(|p| p.last_acked >= seq || p.done),
        )
        .await
        .map(|r| r.map(|p| p.clone()));
        let progress = match waited {
            Ok(Ok(p)) => p,
            _ => self.current(),
        };
        if progress.last_acked >= seq {
            Ok(progress)
        } else {
            Err(WaitError {
                wanted: seq,
                within,
                progress,
            })
        }
    }

    /// Asks the workload to stop.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Waits for the workload to end.
    pub async fn join(self) -> Result<WorkloadReport, WorkloadError> {
        self.task
            .await
            .map_err(|e| WorkloadError::Task(e.to_string()))?
    }

    /// Stops the workload and waits for it to end.
    pub async fn stop_and_join(self) -> Result<WorkloadReport, WorkloadError> {
        self.stop();
        self.join().await
    }
}
