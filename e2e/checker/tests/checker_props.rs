//! Property tests of the block format and of the checker's logic against synthetic secondaries.

use lockstep_checker::block::{self, BlockHeader, Content};
use lockstep_checker::check::{Found, LinkState, Problem};
use lockstep_checker::synth::{self, History};
use lockstep_checker::{CheckOptions, Image, Layout, Verdict, check};
use proptest::prelude::*;

fn layouts() -> impl Strategy<Value = Layout> {
    (1u32..=4, 1u64..=6, 0u64..=3)
        .prop_filter_map("valid layout", |(v, s, b)| Layout::new(v, s, b).ok())
}

/// A layout and a prefix length that may wrap the region a few times.
fn layout_and_prefix() -> impl Strategy<Value = (Layout, u64)> {
    layouts().prop_flat_map(|l| {
        let period = u64::from(l.volumes()) * l.slots();
        (Just(l), 0..=3 * period + 2)
    })
}

fn images(bytes: &[Vec<u8>]) -> Vec<Image> {
    bytes
        .iter()
        .enumerate()
        .map(|(i, b)| Image::from_bytes(format!("vol{i}"), b))
        .collect()
}

fn run_check(bytes: &[Vec<u8>], acked: u64) -> Verdict {
    match check(&images(bytes), &CheckOptions::new(acked)) {
        Ok(v) => v,
        Err(e) => panic!("check failed to run: {e}"),
    }
}

/// Writes of `1..=k` still visible after the prefix (not overwritten by a later write ≤ k).
fn visible(l: Layout, k: u64) -> Vec<u64> {
    (1..=k)
        .filter(|&s| {
            let loc = l.locate(0, s);
            l.newest_at_or_before(0, loc.volume, loc.slot, k) == Some(s)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn encode_decode_round_trip(l in layouts(), run in any::<u64>(), seq in 1u64..u64::MAX / 2) {
        let b = block::encode(run, 0, seq, l, &[]);
        prop_assert_eq!(b.len() as u64, lockstep_checker::BLOCK_SIZE);
        prop_assert_eq!(block::decode(&b), Content::Block(BlockHeader::new(run, 0, seq, l, &[])));
    }

    #[test]
    fn any_damaged_byte_is_detected(l in layouts(), run in any::<u64>(), seq in 1u64..1000, at in 0usize..4096, x in 1u8..=255) {
        let mut b = block::encode(run, 0, seq, l, &[]);
        b[at] ^= x;
        prop_assert!(!matches!(block::decode(&b), Content::Block(_)));
    }

    #[test]
    fn any_prefix_passes((l, k) in layout_and_prefix(), run in any::<u64>(), acked_frac in 0u64..=100) {
        let acked = k * acked_frac / 100;
        let v = run_check(&synth::prefix_images(l, run, k), acked);
        if k == 0 {
            prop_assert!(!v.is_consistent());
            prop_assert_eq!(v.problems(), &[Problem::Empty]);
        } else {
            prop_assert_eq!(v.prefix_end(), Some(k), "{}", v);
        }
    }

    #[test]
    fn acked_beyond_the_prefix_fails((l, k) in layout_and_prefix(), run in any::<u64>(), more in 1u64..10) {
        prop_assume!(k > 0);
        let v = run_check(&synth::prefix_images(l, run, k), k + more);
        prop_assert!(!v.is_consistent());
        prop_assert!(v.gaps().is_empty());
        prop_assert_eq!(v.problems(), &[Problem::Behind { lane: 0, prefix_end: k, required: k + more }]);
    }

    #[test]
    fn any_prefix_with_a_hole_fails((l, k) in layout_and_prefix(), run in any::<u64>(), pick in any::<prop::sample::Index>()) {
        // A hole: a visible write h < k reverted to what its slot held before it.
        let candidates: Vec<u64> = visible(l, k).into_iter().filter(|&s| s < k).collect();
        prop_assume!(!candidates.is_empty());
        let h = candidates[pick.index(candidates.len())];
        let mut imgs = synth::prefix_images(l, run, k);
        let loc = l.locate(0, h);
        let history = History::single_lane(l, run, k);
        synth::put(&mut imgs[loc.volume as usize], loc.offset, &history.block_before(h as usize - 1));
        let v = run_check(&imgs, 0);
        prop_assert!(!v.is_consistent(), "hole at {} not found: {}", h, v);
        prop_assert_eq!(v.gaps().len(), 1);
        let g = &v.gaps()[0];
        prop_assert_eq!(g.missing, h);
        prop_assert_eq!(g.location, loc);
        let expected_found = if h > l.period() {
            Found::Older { seq: h - l.period() }
        } else {
            Found::Zero
        };
        prop_assert_eq!(&g.found, &expected_found);
        // The evidence names a later write that is present.
        prop_assert!(g.chain.iter().any(|c| c.seq > h && c.state == LinkState::Present));
        prop_assert!(g.chain.iter().any(|c| c.seq == h && c.state == LinkState::Missing));
        let text = v.to_string();
        let needle = format!("write {h} is missing");
        prop_assert!(text.contains(&needle), "{}", text);
        match &v {
            Verdict::Inconsistent(r) => prop_assert_eq!(&r.contiguous_through, &vec![h - 1]),
            Verdict::Consistent(_) => prop_assert!(false),
        }
    }

    #[test]
    fn a_lost_volume_fails((l, k) in layout_and_prefix(), run in any::<u64>(), lost in any::<prop::sample::Index>()) {
        prop_assume!(l.volumes() > 1 && k > u64::from(l.volumes()));
        let mut imgs = synth::prefix_images(l, run, k);
        let lost = lost.index(imgs.len());
        imgs[lost].iter_mut().for_each(|b| *b = 0);
        let v = run_check(&imgs, 0);
        prop_assert!(!v.is_consistent(), "{}", v);
    }

    #[test]
    fn a_torn_frontier_is_tolerated_and_elsewhere_is_not((l, k) in layout_and_prefix(), run in any::<u64>(), at in 0usize..4096) {
        prop_assume!(k > 0);
        let mut imgs = synth::prefix_images(l, run, k);
        // Write k + 1 torn: half of it landed over whatever its slot held.
        let f = l.locate(0, k + 1);
        let new = block::encode(run, 0, k + 1, l, &[]);
        let at = at.max(8);
        let off = f.offset as usize;
        imgs[f.volume as usize][off..off + at].copy_from_slice(&new[..at]);
        let v = run_check(&imgs, k);
        prop_assert_eq!(v.prefix_end(), Some(k), "{}", v);

        // The same damage on a visible write other than the frontier's slot is a gap.
        let mut imgs = synth::prefix_images(l, run, k);
        // (Damage to write k itself is legitimate: it reads as prefix k - 1 with write k torn.)
        let others: Vec<u64> = visible(l, k).into_iter().filter(|&s| s != k && l.locate(0, s) != f).collect();
        prop_assume!(!others.is_empty());
        let s = others[at % others.len()];
        let loc = l.locate(0, s);
        let off = loc.offset as usize;
        imgs[loc.volume as usize][off + 100] ^= 0xff;
        let v = run_check(&imgs, 0);
        prop_assert!(!v.is_consistent(), "{}", v);
    }

    #[test]
    fn swapped_volumes_fail((l, k) in layout_and_prefix(), run in any::<u64>()) {
        prop_assume!(l.volumes() > 1 && k >= u64::from(l.volumes()));
        let mut imgs = synth::prefix_images(l, run, k);
        imgs.swap(0, 1);
        let v = run_check(&imgs, 0);
        prop_assert!(!v.is_consistent());
        let misplaced = v.problems().iter().any(|p| matches!(p, Problem::Misplaced { .. }));
        prop_assert!(misplaced, "{}", v);
    }
}

#[test]
fn another_runs_leftovers_are_ignored_where_this_run_has_not_written()
-> Result<(), Box<dyn std::error::Error>> {
    let l = Layout::new(2, 4, 0)?;
    // An older run filled every slot; the new run wrote 1..=3 over it.
    let mut imgs = synth::prefix_images(l, 7, 8);
    let new = synth::prefix_images(l, 9, 3);
    for seq in 1..=3 {
        let loc = l.locate(0, seq);
        let off = loc.offset as usize;
        let v = loc.volume as usize;
        imgs[v][off..off + 4096].copy_from_slice(&new[v][off..off + 4096]);
    }
    let ambiguous = check(&images(&imgs), &CheckOptions::new(3));
    assert!(ambiguous.is_err());
    let v = check(&images(&imgs), &CheckOptions::new(3).run(9))?;
    assert_eq!(v.prefix_end(), Some(3), "{v}");
    Ok(())
}

#[test]
fn empty_secondaries_fail_and_say_so() -> Result<(), Box<dyn std::error::Error>> {
    let imgs = vec![vec![0u8; 8192]; 2];
    let v = check(&images(&imgs), &CheckOptions::default())?;
    assert!(!v.is_consistent());
    assert!(v.to_string().contains("empty"), "{v}");
    Ok(())
}

/// A multi-lane layout and a schedule: which lane writes next, each write acknowledged before the next.
fn lanes_and_schedule() -> impl Strategy<Value = (Layout, Vec<u32>)> {
    (1u32..=3, 2u32..=4, 1u32..=3, 1u64..=4)
        .prop_filter_map("valid layout", |(v, n, span, s)| {
            Layout::with_span(v, n, span.min(v), s, 1).ok()
        })
        .prop_flat_map(|l| {
            let lanes = l.lanes();
            (Just(l), prop::collection::vec(0..lanes, 0..60))
        })
}

/// Whether the cut `ends` of `history` is a state the application could have seen: no present write
/// depends on a write beyond its lane's cut. (A lane's newest write dominates its earlier ones' deps.)
fn oracle(history: &History, ends: &[u64]) -> bool {
    history
        .writes()
        .iter()
        .filter(|w| ends[w.lane as usize] == w.seq)
        .all(|w| w.deps.iter().zip(ends).all(|(d, e)| d <= e))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_moment_of_a_multi_lane_history_passes((l, schedule) in lanes_and_schedule(), run in any::<u64>(), cut in any::<prop::sample::Index>()) {
        let h = History::sequential(l, run, schedule.iter().copied());
        let n = cut.index(schedule.len() + 1);
        let frontier = h.frontier_after(n);
        let v = run_check_lanes(&h.images_after(n), frontier.clone());
        if n == 0 {
            prop_assert_eq!(v.problems(), &[Problem::Empty]);
        } else {
            prop_assert_eq!(v.prefix_ends(), Some(&frontier[..]), "{}", v);
        }
    }

    #[test]
    fn any_cut_passes_exactly_when_no_dependency_is_missing((l, schedule) in lanes_and_schedule(), run in any::<u64>(), fracs in prop::collection::vec(0u64..=100, 4)) {
        let h = History::sequential(l, run, schedule.iter().copied());
        let totals = h.frontier_after(schedule.len());
        let ends: Vec<u64> = totals.iter().zip(&fracs).map(|(t, f)| t * f / 100).collect();
        prop_assume!(ends.iter().any(|&e| e > 0));
        let v = run_check_lanes(&h.images_for(&ends), Vec::new());
        prop_assert_eq!(v.is_consistent(), oracle(&h, &ends), "ends {:?}: {}", ends, v);
        if !v.is_consistent() {
            prop_assert!(v.problems().iter().all(|p| matches!(p, Problem::Dependency { .. })), "{}", v);
        }
    }
}

fn run_check_lanes(bytes: &[Vec<u8>], acked: Vec<u64>) -> Verdict {
    match check(&images(bytes), &CheckOptions::lanes(acked)) {
        Ok(v) => v,
        Err(e) => panic!("check failed to run: {e}"),
    }
}

#[test]
fn a_volume_that_acknowledged_without_copying_is_caught() -> Result<(), Box<dyn std::error::Error>>
{
    // Three volumes, three lanes. Volume 1's secondary stops receiving at some moment (as if suspended
    // volume 1 acknowledged new writes without holding them) while the others keep copying.
    let l = Layout::with_lanes(3, 3, 8, 0)?;
    let h = History::sequential(l, 5, (0..60).map(|i| i % 3));
    let early = h.images_after(20);
    let mut late = h.images_after(60);
    late[1] = early[1].clone();
    let v = check(&images(&late), &CheckOptions::default())?;
    assert!(!v.is_consistent(), "{v}");
    let text = v.to_string();
    assert!(
        text.contains("problem: write") && text.contains("was issued after write"),
        "{text}"
    );
    Ok(())
}
