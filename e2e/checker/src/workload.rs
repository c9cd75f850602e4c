//! The dependent-write workload: strict chains of self-describing 4 KiB writes across several volumes.
//!
//! The workload runs one or more *lanes* concurrently. Within a lane, write `seq + 1` is issued only
//! after write `seq` was acknowledged, so if the secondaries ever hold `seq + 1` without `seq`,
//! replication broke dependent-write consistency. Every write also records what every other lane had
//! acknowledged when it was issued, so a write on the secondaries without one of those is caught too.
//! With several lanes the workload keeps writing to the volumes that still acknowledge while one lane
//! waits on a held write — what a freeze must cope with. Placement follows [`Layout`]; each lane has its
//! own NBD connection to every volume, in the volume order of the layout.
//!
//! On a failed write a lane either stops the workload or retries *the same* write until it is
//! acknowledged ([`OnError`]): skipping to the next one would issue a write that does not depend on its
//! predecessor and break the chain the checker relies on. Progress is published on a `watch` channel so
//! a test can act while the workload runs; a [`CancellationToken`] stops it.

use crate::block;
use crate::layout::{Layout, LayoutError};
use crate::nbd::{NbdAddress, NbdClient, NbdError};
use futures::future::join_all;
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
    /// Placement and lanes; its volume count must equal the number of addresses.
    pub layout: Layout,
    /// Per lane, the last write already written (to continue a run); missing entries are 0.
    pub start_after: Vec<u64>,
    /// How many writes each lane issues; `None` runs until cancelled.
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
    /// Options for a new run with a fresh run id: `writes` writes per lane, stopping at the first failure.
    pub fn new(layout: Layout, writes: Option<u64>) -> Self {
        Self {
            run_id: fresh_run_id(),
            layout,
            start_after: Vec::new(),
            writes,
            fua: false,
            on_error: OnError::Stop,
            retry_backoff: Duration::from_millis(50),
            flush_at_end: true,
        }
    }

    fn start(&self, lane: u32) -> u64 {
        self.start_after.get(lane as usize).copied().unwrap_or(0)
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
    /// Its lane.
    pub lane: u32,
    /// The write.
    pub seq: u64,
    /// Its volume.
    pub volume: u32,
    /// Why it failed.
    pub error: String,
    /// Per lane, the last write acknowledged when it failed.
    pub acked_before: Vec<u64>,
}

/// The workload's progress, published after every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Per lane, the last write acknowledged (0 before any; `start_after` when continuing a run).
    pub last_acked: Vec<u64>,
    /// Per lane, the write issued and not yet answered.
    pub in_flight: Vec<Option<u64>>,
    /// Writes acknowledged in this run of the workload, all lanes together.
    pub acked: u64,
    /// The first failed write.
    pub first_failure: Option<WriteFailure>,
    /// Failed attempts in all.
    pub failures: u64,
    /// The workload has finished.
    pub done: bool,
}

impl Progress {
    /// The last write acknowledged by `lane`.
    pub fn last_acked(&self, lane: u32) -> u64 {
        self.last_acked.get(lane as usize).copied().unwrap_or(0)
    }
}

/// Why the workload stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every lane issued every write it was asked for.
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
    /// Per lane, the last write before this run of the workload.
    pub start_after: Vec<u64>,
    /// Per lane, the last write acknowledged.
    pub last_acked: Vec<u64>,
    /// Writes acknowledged, all lanes together.
    pub acked: u64,
    /// The first failed write.
    pub first_failure: Option<WriteFailure>,
    /// Failed attempts in all.
    pub failures: u64,
    /// Per lane, a write cancelled while in flight (its fate is unknown).
    pub in_flight_at_stop: Vec<Option<u64>>,
    /// Why it stopped.
    pub stopped: StopReason,
}

impl std::fmt::Display for WorkloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {:#x} ({} volumes, {} lanes, {} slots per lane, region at block {}): {:?} after {} acknowledged \
             writes; last acknowledged per lane {:?}",
            self.run_id,
            self.layout.volumes(),
            self.layout.lanes(),
            self.layout.slots(),
            self.layout.base(),
            self.stopped,
            self.acked,
            self.last_acked
        )?;
        for (lane, seq) in self.in_flight_at_stop.iter().enumerate() {
            if let Some(seq) = seq {
                write!(f, "; write {seq} of lane {lane} was in flight when stopped")?;
            }
        }
        if let Some(fl) = &self.first_failure {
            write!(
                f,
                "; first failed write {} of lane {} on volume {} ({}), {} failed attempts in all",
                fl.seq, fl.lane, fl.volume, fl.error, self.failures
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
    /// The workload was cancelled while it was still opening its volumes.
    #[error("cancelled before every volume was open")]
    CancelledBeforeStart,
    /// The workload task panicked or was aborted.
    #[error("workload task ended abnormally: {0}")]
    Task(String),
}

/// Runs the workload against `addresses` (one per volume, in layout order) until every lane has issued
/// its writes, a write failed under [`OnError::Stop`], or `cancel` fires.
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
    let lanes = layout.lanes();
    let connect_all = async {
        let mut connections: Vec<Vec<Option<NbdClient>>> = Vec::with_capacity(lanes as usize);
        for _ in 0..lanes {
            let mut clients = Vec::with_capacity(addresses.len());
            for (v, address) in addresses.iter().enumerate() {
                clients.push(Some(open(v as u32, address, options).await?));
            }
            connections.push(clients);
        }
        Ok::<_, WorkloadError>(connections)
    };
    let connections = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(WorkloadError::CancelledBeforeStart),
        c = connect_all => c?,
    };

    let start: Vec<u64> = (0..lanes).map(|l| options.start(l)).collect();
    progress.send_modify(|p| {
        *p = Progress {
            last_acked: start.clone(),
            in_flight: vec![None; lanes as usize],
            ..Progress::default()
        }
    });
    let stop = cancel.child_token();
    let lane_runs = connections.into_iter().enumerate().map(|(lane, clients)| {
        let lane = Lane {
            lane: lane as u32,
            addresses,
            options,
            progress,
            stop: &stop,
            clients,
        };
        lane.run()
    });
    let outcomes = join_all(lane_runs).await;

    let mut flush_error = None;
    let mut stopped = StopReason::Completed;
    let mut in_flight_at_stop = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        stopped = match (stopped, outcome.stopped) {
            (StopReason::Failed, _) | (_, StopReason::Failed) => StopReason::Failed,
            (StopReason::Cancelled, _) | (_, StopReason::Cancelled) => StopReason::Cancelled,
            _ => StopReason::Completed,
        };
        in_flight_at_stop.push(outcome.in_flight);
        let mut clients = outcome.clients;
        if outcome.stopped == StopReason::Completed && options.flush_at_end {
            for (v, client) in clients.iter_mut().enumerate() {
                let Some(c) = client.as_mut().filter(|c| c.info().can_flush()) else {
                    continue;
                };
                // A server may hold the flush (a suspended volume): cancelling skips it.
                let flushed = tokio::select! {
                    biased;
                    () = cancel.cancelled() => break,
                    r = c.flush() => r,
                };
                if let Err(source) = flushed {
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
    }
    progress.send_modify(|p| {
        p.in_flight.iter_mut().for_each(|f| *f = None);
        p.done = true;
    });
    if let Some(e) = flush_error {
        return Err(e);
    }
    let last = progress.borrow().clone();
    Ok(WorkloadReport {
        run_id: options.run_id,
        layout,
        start_after: start,
        last_acked: last.last_acked,
        acked: last.acked,
        first_failure: last.first_failure,
        failures: last.failures,
        in_flight_at_stop,
        stopped,
    })
}

/// Opens volume `volume` and checks it can take the run.
async fn open(
    volume: u32,
    address: &NbdAddress,
    options: &WorkloadOptions,
) -> Result<NbdClient, WorkloadError> {
    let client = NbdClient::connect(address)
        .await
        .map_err(|source| WorkloadError::Connect {
            volume,
            address: address.clone(),
            source,
        })?;
    let info = client.info();
    let required = options.layout.required_volume_size();
    if info.size < required {
        return Err(WorkloadError::TooSmall {
            volume,
            address: address.clone(),
            size: info.size,
            required,
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
    Ok(client)
}

/// One lane: a strict chain of writes over its own connections.
struct Lane<'a> {
    lane: u32,
    addresses: &'a [NbdAddress],
    options: &'a WorkloadOptions,
    progress: &'a watch::Sender<Progress>,
    stop: &'a CancellationToken,
    clients: Vec<Option<NbdClient>>,
}

/// How a lane ended.
struct LaneOutcome {
    stopped: StopReason,
    in_flight: Option<u64>,
    clients: Vec<Option<NbdClient>>,
}

impl Lane<'_> {
    async fn run(mut self) -> LaneOutcome {
        let (stopped, in_flight) = self.chain().await;
        LaneOutcome {
            stopped,
            in_flight,
            clients: self.clients,
        }
    }

    async fn chain(&mut self) -> (StopReason, Option<u64>) {
        let (lane, layout) = (self.lane, self.options.layout);
        let first = self.options.start(lane) + 1;
        let end = self.options.writes.map(|n| first.saturating_add(n));
        let mut seq = first;
        loop {
            if end.is_some_and(|e| seq >= e) {
                return (StopReason::Completed, None);
            }
            if self.stop.is_cancelled() {
                return (StopReason::Cancelled, None);
            }
            let loc = layout.locate(lane, seq);
            let v = loc.volume as usize;
            // What every lane has acknowledged now: this write depends on all of it.
            let deps = self.progress.borrow().last_acked.clone();
            let data = block::encode(self.options.run_id, lane, seq, layout, &deps);
            self.progress
                .send_modify(|p| p.in_flight[lane as usize] = Some(seq));
            loop {
                let (client, address) = (&mut self.clients[v], &self.addresses[v]);
                let attempt = async {
                    if client.is_none() {
                        *client = Some(NbdClient::connect(address).await?);
                    }
                    match client.as_mut() {
                        Some(c) => c.write(loc.offset, &data, self.options.fua).await,
                        None => Err(NbdError::Broken),
                    }
                };
                let result = tokio::select! {
                    biased;
                    () = self.stop.cancelled() => return (StopReason::Cancelled, Some(seq)),
                    r = attempt => r,
                };
                match result {
                    Ok(()) => {
                        self.progress.send_modify(|p| {
                            p.last_acked[lane as usize] = seq;
                            p.acked += 1;
                            p.in_flight[lane as usize] = None;
                        });
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(lane, seq, volume = loc.volume, error = %e, "workload write failed");
                        if e.connection_lost() {
                            self.clients[v] = None;
                        }
                        self.progress.send_modify(|p| {
                            p.failures += 1;
                            let acked_before = p.last_acked.clone();
                            p.first_failure.get_or_insert(WriteFailure {
                                lane,
                                seq,
                                volume: loc.volume,
                                error: e.to_string(),
                                acked_before,
                            });
                        });
                        if self.options.on_error == OnError::Stop {
                            self.stop.cancel();
                            return (StopReason::Failed, None);
                        }
                        tokio::select! {
                            () = self.stop.cancelled() => return (StopReason::Cancelled, Some(seq)),
                            () = tokio::time::sleep(self.options.retry_backoff) => {}
                        }
                    }
                }
            }
            seq += 1;
        }
    }
}

/// A workload running on its own task.
#[derive(Debug)]
pub struct WorkloadHandle {
    /// Progress, updated after every write.
    pub progress: watch::Receiver<Progress>,
    /// Cancels the workload.
    pub cancel: CancellationToken,
    task: JoinHandle<Result<WorkloadReport, WorkloadError>>,
    /// Cancels the workload when the handle is dropped (e.g. by a failing test).
    _guard: tokio_util::sync::DropGuard,
}

/// The workload did not reach a goal in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("workload did not reach {wanted} within {within:?} (progress: {progress:?})")]
pub struct WaitError {
    /// The goal waited for.
    pub wanted: String,
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
        let _guard = cancel.clone().drop_guard();
        Self {
            progress,
            cancel,
            task,
            _guard,
        }
    }

    /// The latest progress.
    pub fn current(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Waits until `n` writes (all lanes together) are acknowledged, the workload ends, or `within`
    /// passes.
    pub async fn wait_for_acked(
        &mut self,
        n: u64,
        within: Duration,
    ) -> Result<Progress, WaitError> {
        self.wait_until(
            &format!("{n} acknowledged writes"),
            |p| p.acked >= n,
            within,
        )
        .await
    }

    /// Waits until `goal(progress)` holds, or fails when the workload ends first or `within` passes;
    /// `wanted` describes the goal in the error.
    pub async fn wait_until(
        &mut self,
        wanted: &str,
        goal: impl Fn(&Progress) -> bool,
        within: Duration,
    ) -> Result<Progress, WaitError> {
        let waited = tokio::time::timeout(within, self.progress.wait_for(|p| goal(p) || p.done))
            .await
            .map(|r| r.map(|p| p.clone()));
        let progress = match waited {
            Ok(Ok(p)) => p,
            _ => self.current(),
        };
        if goal(&progress) {
            Ok(progress)
        } else {
            Err(WaitError {
                wanted: wanted.to_owned(),
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
