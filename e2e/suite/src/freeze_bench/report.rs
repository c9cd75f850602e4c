//! The benchmark's figures: percentiles of each cell's trials, printed as a table, written as CSV, and
//! drawn as an SVG of p99 against the volume count, one line per path (written by hand: a few lines).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use super::PathChoice;
use super::fleet::SteadyState;
use super::replicator::TrialMarks;
use super::sizes::Largest;

/// p50, p99 and max of one measure, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spread {
    /// The median.
    pub p50: f64,
    /// The 99th percentile (nearest rank: with 50 trials, the largest).
    pub p99: f64,
    /// The largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `samples` (nearest-rank percentiles); zeros when there are none.
    pub fn of(samples: &[Duration]) -> Spread {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |q: f64| -> f64 {
            if ms.is_empty() {
                return 0.0;
            }
            let index = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
            ms[index]
        };
        Spread {
            p50: rank(0.50),
            p99: rank(0.99),
            max: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// One cell's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct CellResult {
    /// The API servers: `test` (the test API server) or `kube` (kube-apiserver on etcd).
    pub apiserver: &'static str,
    /// Volumes in the cell.
    pub volumes: usize,
    /// Groups they form (above 1, the figures are per group: a trial cuts one node's link).
    pub groups: usize,
    /// The paths that reached the members.
    pub paths: PathChoice,
    /// Member clusters.
    pub clusters: usize,
    /// Nodes (sidecars) in all.
    pub nodes: usize,
    /// Trials that completed.
    pub trials: usize,
    /// Trials that did not complete within the deadline (left out of the figures).
    pub lost: usize,
    /// Copy failed → every volume suspended at the new epoch (replicator side).
    pub suspended: Spread,
    /// Copy failed → the hub's group at the new epoch, stage Release: every volume's freeze
    /// acknowledged and the release decided and persisted (the freeze latency).
    pub frozen: Spread,
    /// Copy failed → the held write released at its replicator (the workload's stall).
    pub stall: Spread,
    /// What the cell's API servers were asked to write while the group sat replicating after its last
    /// trial (nothing failing, nothing asked).
    pub steady: SteadyState,
    /// The largest object of each kind written during the cell.
    pub largest: BTreeMap<&'static str, Largest>,
}

fn since(start: Option<Instant>, end: Option<Instant>) -> Option<Duration> {
    Some(end?.saturating_duration_since(start?))
}

impl CellResult {
    /// Summarises the trials of a cell.
    pub fn from_trials(
        apiserver: &'static str,
        volumes: usize,
        paths: PathChoice,
        clusters: usize,
        nodes: usize,
        trials: &[TrialMarks],
    ) -> CellResult {
        let complete: Vec<&TrialMarks> = trials.iter().filter(|t| t.complete()).collect();
        let measure = |end: fn(&TrialMarks) -> Option<Instant>| -> Vec<Duration> {
            complete
                .iter()
                .filter_map(|t| since(t.started, end(t)))
                .collect()
        };
        CellResult {
            apiserver,
            volumes,
            groups: 1,
            paths,
            clusters,
            nodes,
            trials: complete.len(),
            lost: trials.len() - complete.len(),
            suspended: Spread::of(&measure(|t| t.all_suspended)),
            frozen: Spread::of(&measure(|t| t.frozen)),
            stall: Spread::of(&measure(|t| t.held_write_released)),
            steady: SteadyState::default(),
            largest: BTreeMap::new(),
        }
    }
}

impl CellResult {
    /// Summarises a many-groups cell: `frozen` holds, per group of every measured trial, how long from
    /// the link cut until it was frozen (`None`: not within the deadline, counted as lost). Only the
    /// freeze is measured per group; suspended and stall stay zero.
    #[allow(clippy::too_many_arguments)]
    pub fn from_groups(
        apiserver: &'static str,
        volumes: usize,
        groups: usize,
        paths: PathChoice,
        clusters: usize,
        nodes: usize,
        trials: usize,
        frozen: &[Option<Duration>],
    ) -> CellResult {
        let measured: Vec<Duration> = frozen.iter().flatten().copied().collect();
        CellResult {
            apiserver,
            volumes,
            groups,
            paths,
            clusters,
            nodes,
            trials,
            lost: frozen.len() - measured.len(),
            suspended: Spread::default(),
            frozen: Spread::of(&measured),
            stall: Spread::default(),
            steady: SteadyState::default(),
            largest: BTreeMap::new(),
        }
    }

    /// Writes in steady state, Lease renewals excepted (the target is none).
    pub fn steady_writes(&self) -> u64 {
        self.steady.writes_beyond_leases().values().sum()
    }

    /// The largest object written in the cell, of any kind, in bytes.
    pub fn largest_bytes(&self) -> usize {
        self.largest.values().map(|l| l.bytes).max().unwrap_or(0)
    }

    /// The cell's lines beyond the table: steady-state writes per second, and the largest objects.
    pub fn details(&self) -> String {
        let mut out = String::new();
        let seconds = self.steady.window.as_secs_f64();
        let rates: Vec<String> = [
            ("groups", "consistencygroups"),
            ("shards", "consistencygroupshards"),
            ("replicationnodes", "replicationnodes"),
            ("events", "events"),
            ("leases", "leases"),
        ]
        .iter()
        .map(|(label, resource)| format!("{label} {:.2}", self.steady.per_second(resource)))
        .collect();
        let _ = writeln!(
            out,
            "  steady state ({seconds:.1} s, after {:.1} s idle): writes/s {} (groups counts the hub's and \
             the mirrors); beyond leases: {}; operator CPU {}",
            self.steady.idle_before.as_secs_f64(),
            rates.join(", "),
            if self.steady_writes() == 0 {
                "none".to_owned()
            } else {
                format!("{:?}", self.steady.writes_beyond_leases())
            },
            match self.steady.operator_cpu {
                Some(cpu) => format!(
                    "{:.1} % of a core",
                    100.0 * cpu.as_secs_f64() / self.steady.window.as_secs_f64().max(f64::EPSILON)
                ),
                None => "not measured".to_owned(),
            }
        );
        let largest: Vec<String> = self
            .largest
            .iter()
            .map(|(kind, l)| format!("{kind} {:.1} KiB ({})", l.bytes as f64 / 1024.0, l.name))
            .collect();
        let _ = writeln!(out, "  largest objects written: {}", largest.join(", "));
        out
    }
}

const HEADER: [&str; 19] = [
    "apiserver",
    "volumes",
    "paths",
    "clusters",
    "nodes",
    "trials",
    "lost",
    "suspended_p50_ms",
    "suspended_p99_ms",
    "suspended_max_ms",
    "frozen_p50_ms",
    "frozen_p99_ms",
    "frozen_max_ms",
    "stall_p50_ms",
    "stall_p99_ms",
    "stall_max_ms",
    "steady_writes",
    "largest_object_bytes",
    "groups",
];

fn fields(row: &CellResult) -> [String; 19] {
    let ms = |v: f64| format!("{v:.1}");
    [
        row.apiserver.to_string(),
        row.volumes.to_string(),
        row.paths.to_string(),
        row.clusters.to_string(),
        row.nodes.to_string(),
        row.trials.to_string(),
        row.lost.to_string(),
        ms(row.suspended.p50),
        ms(row.suspended.p99),
        ms(row.suspended.max),
        ms(row.frozen.p50),
        ms(row.frozen.p99),
        ms(row.frozen.max),
        ms(row.stall.p50),
        ms(row.stall.p99),
        ms(row.stall.max),
        row.steady_writes().to_string(),
        row.largest_bytes().to_string(),
        row.groups.to_string(),
    ]
}

/// The rows as CSV, with a header line.
pub fn csv(rows: &[CellResult]) -> String {
    let mut out = HEADER.join(",");
    out.push('\n');
    for row in rows {
        out.push_str(&fields(row).join(","));
        out.push('\n');
    }
    out
}

/// The rows as an aligned table for people.
pub fn table(rows: &[CellResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>9} {:>7} {:>6} {:>5} {:>8} {:>5} {:>6} {:>4} | {:^23} | {:^23} | {:^23}",
        "apiserver",
        "volumes",
        "groups",
        "paths",
        "clusters",
        "nodes",
        "trials",
        "lost",
        "suspended ms p50/p99/max",
        "frozen ms p50/p99/max",
        "stall ms p50/p99/max"
    );
    for row in rows {
        let spread = |s: &Spread| format!("{:>7.1}{:>8.1}{:>8.1}", s.p50, s.p99, s.max);
        let _ = writeln!(
            out,
            "{:>9} {:>7} {:>6} {:>5} {:>8} {:>5} {:>6} {:>4} | {} | {} | {}",
            row.apiserver,
            row.volumes,
            row.groups,
            row.paths,
            row.clusters,
            row.nodes,
            row.trials,
            row.lost,
            spread(&row.suspended),
            spread(&row.frozen),
            spread(&row.stall)
        );
    }
    out
}

/// An SVG line chart of the freeze latency's p99 (and the stall's, dashed) against the volume count
/// (log scale), one colour per path.
pub fn svg(rows: &[CellResult]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 150.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 50.0;
    let mut volumes: Vec<usize> = rows.iter().map(|r| r.volumes).collect();
    volumes.sort_unstable();
    volumes.dedup();
    let log = |v: usize| (v.max(1) as f64).log10();
    let (x_min, x_max) = match (volumes.first(), volumes.last()) {
        (Some(&a), Some(&b)) if a != b => (log(a), log(b)),
        (Some(&a), _) => (log(a) - 0.5, log(a) + 0.5),
        _ => (0.0, 1.0),
    };
    let y_top = rows
        .iter()
        .map(|r| r.frozen.p99.max(r.stall.p99))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let x = |v: usize| LEFT + (log(v) - x_min) / (x_max - x_min) * (W - LEFT - RIGHT);
    let y = |ms: f64| H - BOTTOM - ms / y_top * (H - TOP - BOTTOM);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">Freeze latency p99 (solid) and held-write stall p99 (dashed)</text>"#,
        W / 2.0
    );
    let (x0, y0) = (LEFT, H - BOTTOM);
    let _ = writeln!(
        out,
        r#"<path d="M{x0},{TOP} V{y0} H{}" stroke="black" fill="none"/>"#,
        W - RIGHT
    );
    for &v in &volumes {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{v}</text>"#,
            x(v),
            y0 + 18.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">volumes in the group</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 10.0
    );
    for step in 0..=4 {
        let ms = y_top / 4.0 * f64::from(step);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{ms:.0}</text><path d="M{x0},{:.1} h-4" stroke="black"/>"#,
            LEFT - 6.0,
            y(ms) + 4.0,
            y(ms)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">milliseconds</text>"#,
        (TOP + y0) / 2.0,
        (TOP + y0) / 2.0
    );
    let colours = [
        (PathChoice::Both, "#1f77b4"),
        (PathChoice::Api, "#d62728"),
        (PathChoice::Grpc, "#2ca02c"),
    ];
    let mut legend = TOP;
    // The test API server's cells in full colour with round marks; real kube-apiserver's paler, square.
    for (apiserver, style) in [("test", ""), ("kube", r#" stroke-opacity="0.5""#)] {
        for (path, colour) in colours {
            let mut series: Vec<&CellResult> = rows
                .iter()
                .filter(|r| r.paths == path && r.apiserver == apiserver)
                .collect();
            if series.is_empty() {
                continue;
            }
            series.sort_by_key(|r| r.volumes);
            for (measure, dash) in [(0, ""), (1, r#" stroke-dasharray="5,4""#)] {
                let value = |r: &CellResult| {
                    if measure == 0 {
                        r.frozen.p99
                    } else {
                        r.stall.p99
                    }
                };
                let points: Vec<String> = series
                    .iter()
                    .map(|r| format!("{:.1},{:.1}", x(r.volumes), y(value(r))))
                    .collect();
                let _ = writeln!(
                    out,
                    r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}{style}/>"#,
                    points.join(" ")
                );
                for r in &series {
                    let (cx, cy) = (x(r.volumes), y(value(r)));
                    let _ = if apiserver == "kube" {
                        writeln!(
                            out,
                            r#"<rect x="{:.1}" y="{:.1}" width="6" height="6" fill="{colour}"/>"#,
                            cx - 3.0,
                            cy - 3.0
                        )
                    } else {
                        writeln!(
                            out,
                            r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="3" fill="{colour}"/>"#
                        )
                    };
                }
            }
            let _ = writeln!(
                out,
                r#"<path d="M{},{legend} h24" stroke="{colour}" stroke-width="2"{style}/><text x="{}" y="{}">{path} ({apiserver})</text>"#,
                W - RIGHT + 16.0,
                W - RIGHT + 46.0,
                legend + 4.0
            );
            legend += 20.0;
        }
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        let spread = Spread::of(&ms(&samples));
        assert_eq!(spread.p50, 50.0);
        assert_eq!(spread.p99, 99.0);
        assert_eq!(spread.max, 100.0);
        let fifty: Vec<u64> = (1..=50).collect();
        assert_eq!(Spread::of(&ms(&fifty)).p99, 50.0);
        assert_eq!(Spread::of(&[]), Spread::default());
    }

    #[test]
    fn the_csv_has_a_header_and_a_line_per_cell() {
        let row = CellResult {
            apiserver: "test",
            volumes: 10,
            paths: PathChoice::Grpc,
            clusters: 3,
            nodes: 6,
            trials: 50,
            lost: 0,
            suspended: Spread::of(&ms(&[1, 2])),
            frozen: Spread::of(&ms(&[3, 4])),
            stall: Spread::of(&ms(&[5, 6])),
            groups: 1,
            steady: SteadyState {
                window: Duration::from_secs(2),
                idle_before: Duration::from_secs(3),
                writes: BTreeMap::from([
                    ("update leases".to_owned(), 4),
                    ("patch consistencygroups/status".to_owned(), 1),
                ]),
                operator_cpu: Some(Duration::from_millis(50)),
            },
            largest: BTreeMap::from([(
                "ConsistencyGroupShard",
                Largest {
                    bytes: 2048,
                    name: "hub/bench.east.east-node-0".to_owned(),
                },
            )]),
        };
        let text = csv(std::slice::from_ref(&row));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("apiserver,volumes,paths,clusters"));
        assert_eq!(
            lines[1],
            "test,10,grpc,3,6,50,0,1.0,2.0,2.0,3.0,4.0,4.0,5.0,6.0,6.0,1,2048,1"
        );
        // Lease renewals are not counted as steady-state writes; the status patch is.
        assert_eq!(row.steady_writes(), 1);
        assert_eq!(row.steady.per_second("consistencygroups"), 0.5);
        assert!(row.details().contains("ConsistencyGroupShard 2.0 KiB"));
        let drawing = svg(&[row]);
        assert!(drawing.starts_with("<svg") && drawing.trim_end().ends_with("</svg>"));
        assert!(drawing.contains("grpc"));
    }
}
