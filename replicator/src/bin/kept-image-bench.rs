//! Resync throughput with and without the kept image (issue 32): a secondary on loopback receives a
//! resync of a whole volume in 1 MiB writes (as the primary's resync driver sends them, 16 in flight),
//! once with no image kept and once keeping the image (every block saved to the undo log and the log
//! synced before the overwrite). Each resync writes bytes the volume does not hold yet. Prints MiB/s
//! for each, their medians' ratio and the median of the rounds' ratios (each round runs both cases back
//! to back, so that ratio is less moved by other load on the machine).
//!
//! `cargo run --release -p lockstep-replicator --bin kept-image-bench -- [SIZE_MIB] [ROUNDS]`

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use lockstep_replicator::secondary::{Secondary, SecondaryConfig};
use lockstep_replicator::wire::{Frame, FrameCodec};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const PIECE: u64 = 1024 * 1024;
const WINDOW: u64 = 16;

/// One resync of the whole volume over a fresh connection; returns how long it took.
async fn resync(
    addr: std::net::SocketAddr,
    volume: &str,
    size: u64,
    first_seq: u64,
    keep: Option<u64>,
    fill: u8,
) -> anyhow::Result<Duration> {
    let mut link = Framed::new(TcpStream::connect(addr).await?, FrameCodec);
    link.send(Frame::Hello {
        volume: volume.into(),
        size,
        first_seq,
        keep,
        drop_image: None,
    })
    .await?;
    match link.next().await {
        Some(Ok(Frame::Welcome { kept, .. })) if kept == keep => {}
        other => bail!("unexpected welcome {other:?}"),
    }
    let pieces = size / PIECE;
    let data = Bytes::from(vec![fill; PIECE as usize]);
    let started = Instant::now();
    let mut sent = 0;
    let mut acked = 0;
    while acked < pieces {
        while sent < pieces && sent - acked < WINDOW {
            link.send(Frame::Write {
                seq: first_seq + sent,
                offset: sent * PIECE,
                data: data.clone(),
            })
            .await?;
            sent += 1;
        }
        match link.next().await {
            Some(Ok(Frame::Ack { seq })) => acked = seq + 1 - first_seq,
            other => bail!("unexpected answer {other:?}"),
        }
    }
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args.next().map_or(Ok(256), |a| a.parse())?;
    let rounds: u64 = args.next().map_or(Ok(3), |a| a.parse())?;
    let size = size_mib * PIECE;
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))
        .context("a scratch directory (BENCH_DIR, default .)")?;
    let secondary = Secondary::start(SecondaryConfig {
        listen: "127.0.0.1:0".parse()?,
        dir: dir.path().to_path_buf(),
        security: lockstep_replicator::LinkSecurity::Plaintext,
    })
    .await?;
    println!(
        "resync of a {size_mib} MiB volume in 1 MiB writes, {WINDOW} in flight, on {}",
        dir.path().display()
    );
    let (mut plain, mut kept, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // The volume holds an image first (so the log saves real bytes, not holes).
        let volume = format!("v{round}");
        // Each resync writes bytes the volume does not hold yet, so every block really changes.
        resync(secondary.local_addr(), &volume, size, 1, None, 0x11).await?;
        let t = resync(secondary.local_addr(), &volume, size, 1_000_000, None, 0x22).await?;
        plain.push(size_mib as f64 / t.as_secs_f64());
        let t = resync(
            secondary.local_addr(),
            &volume,
            size,
            2_000_000,
            Some(1),
            0x33,
        )
        .await?;
        kept.push(size_mib as f64 / t.as_secs_f64());
        ratios.push(kept[round as usize] / plain[round as usize]);
        let log =
            std::fs::metadata(lockstep_replicator::undo::log_path(dir.path(), &volume))?.len();
        println!(
            "round {round}: without the kept image {:.0} MiB/s, keeping it {:.0} MiB/s (undo log {} MiB)",
            plain[round as usize],
            kept[round as usize],
            log / PIECE
        );
        std::fs::remove_file(dir.path().join(&volume))?;
        std::fs::remove_file(lockstep_replicator::undo::log_path(dir.path(), &volume))?;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, k, r) = (median(&mut plain), median(&mut kept), median(&mut ratios));
    println!(
        "median: without {p:.0} MiB/s, with the kept image {k:.0} MiB/s: {:.2}x (median of the rounds' ratios {r:.2}x)",
        k / p
    );
    Ok(())
}
