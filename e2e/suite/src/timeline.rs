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
}
