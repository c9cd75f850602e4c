//! [`Timeline`]: what a scenario says as it happens, each line stamped with the time since the start
//! (`[  0.42s] east: API server up at http://127.0.0.1:PORT`).
//!
//! The demo prints the lines; tests keep them (to show on failure) without printing.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Something a control system saw, stamped with the moment it saw it: the demo prints these relative to
/// the failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Milestone {
    /// When.
    pub at: Instant,
    /// What, for people.
    pub what: String,
}

/// A shared, cheaply cloned log of stamped lines.
#[derive(Debug, Clone)]
pub struct Timeline {
    start: Instant,
    print: bool,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Timeline {
    /// A timeline starting now; `print` sends every line to standard output as it is said.
    pub fn new(print: bool) -> Self {
        Self {
            start: Instant::now(),
            print,
            lines: Arc::default(),
        }
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Says one line, stamped. Continuation lines of a multi-line text are indented under the stamp.
    pub fn say(&self, text: impl AsRef<str>) {
        let stamp = format!("[{:>7.2}s] ", self.elapsed().as_secs_f64());
        let pad = " ".repeat(stamp.len());
        let mut out = String::new();
        for (i, line) in text.as_ref().lines().enumerate() {
            if i > 0 {
                out.push('\n');
                out.push_str(&pad);
            } else {
                out.push_str(&stamp);
            }
            out.push_str(line);
        }
        if out.is_empty() {
            out = stamp;
        }
        if self.print {
            println!("{out}");
        }
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(out);
    }

    /// Everything said so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Everything said so far, one line each.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }
}

/// Ends the whole test process when a scenario outlives its time limit, printing its timeline first: a
/// scenario stuck on something without a timeout of its own would otherwise hold the test binary (and CI)
/// until CI's own limit, with nothing said about where it stood. Disarmed when dropped.
#[derive(Debug)]
pub struct Watchdog {
    disarm: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watchdog {
    /// Disarms it: the watching thread ends at once, and is waited for.
    fn drop(&mut self) {
        self.disarm.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Watchdog {
    /// The default limit of a scenario; `LOCKSTEP_E2E_LIMIT_SECS` overrides it.
    pub const DEFAULT_LIMIT: Duration = Duration::from_secs(600);

    /// Watches a scenario described by `timeline` for `LOCKSTEP_E2E_LIMIT_SECS` (default
    /// [`Self::DEFAULT_LIMIT`]).
    pub fn from_env(timeline: &Timeline) -> Self {
        let limit = std::env::var("LOCKSTEP_E2E_LIMIT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Self::DEFAULT_LIMIT, Duration::from_secs);
        Self::new(timeline, limit)
    }

    /// Watches a scenario described by `timeline` for `limit`.
    pub fn new(timeline: &Timeline, limit: Duration) -> Self {
        let (disarm, disarmed) = std::sync::mpsc::channel::<()>();
        let timeline = timeline.clone();
        let thread = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(limit) {
                // Straight to the process's stderr: the test harness's capture is lost with the abort.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "scenario still running after {:.1} s: ending the test process\n{}",
                    limit.as_secs_f64(),
                    timeline.text()
                );
                std::process::abort();
            }
        });
        Self {
            disarm: Some(disarm),
            thread: Some(thread),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_stamped_and_continuations_indented() {
        let t = Timeline::new(false);
        t.say("one");
        t.say("two\nthree");
        let lines = t.lines();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with('[') && lines[0].ends_with("s] one"));
        let (first, second) = lines[1].split_once('\n').unwrap();
        assert!(first.ends_with("s] two"));
        assert_eq!(second.trim_start(), "three");
        assert_eq!(second.len() - "three".len(), first.len() - "two".len());
    }

    #[test]
    fn a_watchdog_dropped_in_time_ends_its_thread_without_aborting() {
        let timeline = Timeline::new(false);
        let watchdog = Watchdog::new(&timeline, Duration::from_secs(3600));
        let started = std::time::Instant::now();
        // Dropping joins the watching thread: it ended on the disarm, not at the limit.
        drop(watchdog);
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    /// Run as a child of the test below: a scenario that outlives its watchdog.
    #[test]
    fn watchdog_child_overrunning_scenario() {
        if std::env::var_os("LOCKSTEP_WATCHDOG_CHILD").is_none() {
            return;
        }
        let timeline = Timeline::new(false);
        timeline.say("step one done");
        let _watchdog = Watchdog::new(&timeline, Duration::from_millis(200));
        std::thread::sleep(Duration::from_secs(30));
    }

    #[test]
    fn a_scenario_past_its_limit_ends_the_process_with_its_timeline() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "timeline::tests::watchdog_child_overrunning_scenario",
            ])
            .env("LOCKSTEP_WATCHDOG_CHILD", "1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("still running after 0.2 s"), "{stderr}");
        assert!(stderr.contains("step one done"), "{stderr}");
    }
}
