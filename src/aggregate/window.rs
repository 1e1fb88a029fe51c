//! Exactly-once bookkeeping for one delta source stream: the set of time intervals already
//! applied, kept as disjoint half-open ranges `[start, end)` in nanoseconds.
//!
//! The Collector's `spanmetrics` connector emits contiguous deltas, so the set is normally one
//! range and, with the fingerprint below, costs 24 bytes; holes appear only while a retried
//! batch is still on its way.
//!
//! The late window is a horizon `newest_end - late_delta_window`: a delta that starts before it
//! is refused as too late. That is slightly stricter than "ends before the window" (a delta
//! straddling the horizon is refused too), and it is what makes forgetting safe: any range that
//! ends at or before the horizon can be dropped, because nothing that could overlap it can be
//! applied any more.
//!
//! A true retry repeats an applied delta exactly: the same interval and the same values. So the
//! window also keeps a fingerprint of the newest applied delta's values (4 bytes, in what would
//! otherwise be the window's padding); an overlapping delta that ends where the newest one did
//! but carries other values comes from a second writer with the same identity (a sidecar
//! without a pod identity) and is a conflict, not a duplicate. Other overlaps cannot be told
//! apart and are duplicates. A fingerprint of 0 means "unknown" (a restored window, a caller
//! without one).
//!
//! A window holds at most [`MAX_HOLES`] holes, whatever a client sends: past that the oldest
//! hole is given up, filled as if applied. A delta for it that comes later is then dropped as
//! a duplicate: the stream may undercount by what that hole would have held, never double
//! count. Without the limit, a client sending disjoint one-nanosecond deltas would grow one
//! stream's window without bound and make every record re-sort all of it.

use std::num::NonZeroU32;

/// Holes one window may hold. A sidecar whose every other export is lost for a whole late
/// window leaves about 60 at 5 s intervals and 600 s; the holes of a retried batch still on
/// its way are a handful. A full window costs about 300 bytes instead of 24.
pub const MAX_HOLES: usize = 16;

/// What to do with one delta point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New interval, contiguous with (or the first of) the stream: apply.
    Apply,
    /// New interval that starts after the newest end: apply, and count the gap upstream.
    ApplyAfterGap,
    /// New interval that fills a hole behind the newest end: apply, and count it late.
    ApplyLate,
    /// Overlaps an interval already applied: drop, count.
    Duplicate,
    /// Starts before the late horizon: refuse, count.
    TooLate,
    /// Overlaps the newest applied delta but is not its exact retry: a second writer.
    Conflict,
}

impl Verdict {
    pub fn applies(self) -> bool {
        matches!(self, Self::Apply | Self::ApplyAfterGap | Self::ApplyLate)
    }
}

/// Applied intervals of one stream: 24 bytes while they are one range (a delta stream's
/// whole state in the common case, kept for millions of streams), a box while there are holes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window(Ranges);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ranges {
    /// One range; `fp` has a niche (never 0), so the enum needs no tag of its own.
    One {
        head: (u64, u64),
        fp: Fp,
    },
    Holes(Box<Holes>),
}

/// A window with holes: rare, and only while a retried batch is on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holes {
    /// The newest range (the one with the greatest end).
    head: (u64, u64),
    /// Older disjoint ranges, sorted, never empty.
    older: Vec<(u64, u64)>,
    fp: Fp,
}

/// The fingerprint of the newest applied delta's values, stored never 0: "unknown" (0) is kept
/// as an even number, which [`crate::aggregate::series::fingerprint`] never returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fp(NonZeroU32);

const UNKNOWN: NonZeroU32 = match NonZeroU32::new(u32::MAX - 1) {
    Some(n) => n,
    None => NonZeroU32::MAX,
};

impl Fp {
    fn new(fp: u32) -> Self {
        Self(NonZeroU32::new(fp).unwrap_or(UNKNOWN))
    }

    fn get(self) -> u32 {
        if self.0 == UNKNOWN {
            0
        } else {
            self.0.get()
        }
    }
}

impl Window {
    /// A window holding one applied interval, whose values have fingerprint `fp`.
    pub fn new(start: u64, end: u64, fp: u32) -> Self {
        Self(Ranges::One {
            head: (start, end),
            fp: Fp::new(fp),
        })
    }

    /// A window of these ranges, sorted and disjoint, the last the newest.
    fn of(head: (u64, u64), older: Vec<(u64, u64)>, fp: u32) -> Self {
        if older.is_empty() {
            Self::new(head.0, head.1, fp)
        } else {
            Self(Ranges::Holes(Box::new(Holes {
                head,
                older,
                fp: Fp::new(fp),
            })))
        }
    }

    fn head(&self) -> (u64, u64) {
        match &self.0 {
            Ranges::One { head, .. } => *head,
            Ranges::Holes(h) => h.head,
        }
    }

    fn last_fp(&self) -> u32 {
        match &self.0 {
            Ranges::One { fp, .. } => fp.get(),
            Ranges::Holes(h) => h.fp.get(),
        }
    }

    fn older(&self) -> &[(u64, u64)] {
        match &self.0 {
            Ranges::One { .. } => &[],
            Ranges::Holes(h) => &h.older,
        }
    }

    pub fn newest_end(&self) -> u64 {
        self.head().1
    }

    /// Every applied range, oldest first (the head last).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.older()
            .iter()
            .copied()
            .chain(std::iter::once(self.head()))
    }

    /// Classifies `[start, end)` with values of fingerprint `fp` without changing anything.
    /// `late_ns` is the late window.
    pub fn classify(&self, start: u64, end: u64, late_ns: u64, fp: u32) -> Verdict {
        if self.ranges().any(|(s, e)| start < e && end > s) {
            let last = self.last_fp();
            let known = fp != 0 && last != 0;
            if known && end == self.newest_end() && fp != last {
                return Verdict::Conflict;
            }
            return Verdict::Duplicate;
        }
        let newest = self.newest_end();
        if start >= newest {
            return if start == newest {
                Verdict::Apply
            } else {
                Verdict::ApplyAfterGap
            };
        }
        if start < newest.saturating_sub(late_ns) {
            return Verdict::TooLate;
        }
        Verdict::ApplyLate
    }

    /// Records `[start, end)` as applied (call only after `classify` said it applies), merging
    /// touching ranges and forgetting those that fell out of the late window. Returns the holes
    /// given up to stay within [`MAX_HOLES`] (0 or 1).
    pub fn record(&mut self, start: u64, end: u64, late_ns: u64, fp: u32) -> usize {
        let fp = if end >= self.newest_end() {
            fp
        } else {
            self.last_fp()
        };
        match &mut self.0 {
            Ranges::One { head, fp: last } if start == head.1 => {
                head.1 = end;
                *last = Fp::new(fp);
            }
            Ranges::One { head, fp: last } if end == head.0 => {
                head.0 = start;
                *last = Fp::new(fp);
            }
            _ => {
                let mut all: Vec<(u64, u64)> = self.ranges().collect();
                all.push((start, end));
                all.sort_unstable();
                let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
                for r in all {
                    match merged.last_mut() {
                        Some(last) if last.1 >= r.0 => last.1 = last.1.max(r.1),
                        _ => merged.push(r),
                    }
                }
                // The last range has the greatest end: ranges are disjoint and sorted.
                let head = merged.pop().unwrap_or((start, end));
                // Forgotten first: a hole that fell out of the window is not given up.
                let horizon = head.1.saturating_sub(late_ns);
                merged.retain(|&(_, e)| e > horizon);
                let given_up = give_up_oldest(&mut merged);
                // Holes are rare and short-lived: hold exactly what they need.
                merged.shrink_to_fit();
                *self = Self::of(head, merged, fp);
                return given_up;
            }
        }
        // One range growing at either end: no hole to forget.
        0
    }

    /// A window holding these applied ranges (as a checkpoint stored them); `None` if they are
    /// empty, unsorted, overlapping or inverted. Holes past [`MAX_HOLES`] are given up.
    pub fn from_ranges(ranges: &[(u64, u64)]) -> Option<Self> {
        let (&head, older) = ranges.split_last()?;
        let ok = ranges.iter().all(|&(s, e)| s <= e) && ranges.windows(2).all(|w| w[0].1 < w[1].0);
        let mut older = older.to_vec();
        give_up_oldest(&mut older);
        // The newest delta's fingerprint is not kept across a restore.
        ok.then(|| Self::of(head, older, 0))
    }

    /// Number of disjoint ranges held (1 when the stream is contiguous).
    pub fn ranges_held(&self) -> usize {
        1 + self.older().len()
    }
}

/// Fills the oldest holes of `older` (sorted, disjoint; each range is followed by a hole)
/// until at most [`MAX_HOLES`] are left: the oldest ranges become one spanning them. Returns
/// how many holes were filled.
fn give_up_oldest(older: &mut Vec<(u64, u64)>) -> usize {
    let excess = older.len().saturating_sub(MAX_HOLES);
    if let Some(&(start, _)) = older.first().filter(|_| excess > 0) {
        older.drain(..excess);
        if let Some(first) = older.first_mut() {
            first.0 = start;
        }
    }
    excess
}

#[cfg(test)]
mod tests {
    use super::*;

    const LATE: u64 = 600;

    fn apply(w: &mut Window, s: u64, e: u64) -> Verdict {
        apply_fp(w, s, e, 0)
    }

    fn apply_fp(w: &mut Window, s: u64, e: u64, fp: u32) -> Verdict {
        let v = w.classify(s, e, LATE, fp);
        if v.applies() {
            w.record(s, e, LATE, fp);
        }
        v
    }

    #[test]
    fn contiguous_deltas_stay_one_range() {
        let mut w = Window::new(0, 10, 0);
        for i in 1..100 {
            assert_eq!(apply(&mut w, i * 10, i * 10 + 10), Verdict::Apply);
        }
        assert_eq!(w.ranges_held(), 1);
        assert_eq!(w.newest_end(), 1000);
    }

    #[test]
    fn a_retried_delta_is_a_duplicate() {
        let mut w = Window::new(0, 10, 0);
        apply(&mut w, 10, 20);
        assert_eq!(apply(&mut w, 10, 20), Verdict::Duplicate);
        assert_eq!(apply(&mut w, 0, 10), Verdict::Duplicate);
        assert_eq!(apply(&mut w, 5, 15), Verdict::Duplicate);
    }

    #[test]
    fn a_late_delta_filling_a_hole_is_applied_once() {
        let mut w = Window::new(0, 10, 0);
        assert_eq!(apply(&mut w, 20, 30), Verdict::ApplyAfterGap);
        assert_eq!(w.ranges_held(), 2);
        assert_eq!(apply(&mut w, 10, 20), Verdict::ApplyLate);
        assert_eq!(w.ranges_held(), 1);
        assert_eq!(apply(&mut w, 10, 20), Verdict::Duplicate);
    }

    #[test]
    fn a_delta_ending_before_the_window_is_too_late() {
        let mut w = Window::new(0, 10, 0);
        apply(&mut w, 1000, 1010);
        assert_eq!(apply(&mut w, 100, 200), Verdict::TooLate);
        assert_eq!(apply(&mut w, 500, 600), Verdict::ApplyLate);
    }

    #[test]
    fn forgotten_history_is_never_applied_again() {
        let mut w = Window::new(0, 10, 0);
        apply(&mut w, 2000, 2010); // horizon 1410: forgets [0, 10)
        assert_eq!(w.ranges_held(), 1);
        // Reaches back over the forgotten range: refusing is the only safe answer.
        assert_eq!(apply(&mut w, 5, 1500), Verdict::TooLate);
        assert_eq!(apply(&mut w, 0, 10), Verdict::TooLate);
        assert_eq!(apply(&mut w, 1500, 1600), Verdict::ApplyLate);
    }

    #[test]
    fn a_delta_straddling_the_horizon_is_too_late() {
        let mut w = Window::new(1000, 1010, 0);
        assert_eq!(
            apply(&mut w, 300, 500),
            Verdict::TooLate,
            "starts before 410"
        );
        assert_eq!(apply(&mut w, 410, 500), Verdict::ApplyLate);
    }

    #[test]
    fn a_second_writer_is_told_apart_from_a_retry() {
        let mut w = Window::new(0, 10, 5);
        assert_eq!(apply_fp(&mut w, 10, 20, 7), Verdict::Apply);
        assert_eq!(
            apply_fp(&mut w, 10, 20, 7),
            Verdict::Duplicate,
            "a true retry"
        );
        assert_eq!(
            apply_fp(&mut w, 10, 20, 8),
            Verdict::Conflict,
            "other values"
        );
        assert_eq!(
            apply_fp(&mut w, 12, 20, 8),
            Verdict::Conflict,
            "ending where the newest did"
        );
        assert_eq!(
            apply_fp(&mut w, 12, 22, 7),
            Verdict::Duplicate,
            "a shifted interval cannot be judged"
        );
        // Older intervals are merged: an overlap there cannot be judged.
        assert_eq!(apply_fp(&mut w, 0, 10, 9), Verdict::Duplicate);
        // Unknown fingerprints (a restored window) never claim a conflict.
        let mut r = Window::from_ranges(&[(0, 20)]).unwrap();
        assert_eq!(apply_fp(&mut r, 10, 20, 8), Verdict::Duplicate);
        assert_eq!(apply_fp(&mut r, 20, 30, 8), Verdict::Apply);
        assert_eq!(apply_fp(&mut r, 20, 30, 9), Verdict::Conflict);
    }

    #[test]
    fn the_fingerprint_survives_holes_and_their_mending() {
        let mut w = Window::new(0, 10, 3);
        assert_eq!(apply_fp(&mut w, 20, 30, 7), Verdict::ApplyAfterGap);
        assert_eq!(w.ranges_held(), 2);
        assert_eq!(
            apply_fp(&mut w, 20, 30, 8),
            Verdict::Conflict,
            "with a hole"
        );
        assert_eq!(apply_fp(&mut w, 20, 30, 7), Verdict::Duplicate);
        // A late delta filling the hole does not become the newest.
        assert_eq!(apply_fp(&mut w, 10, 20, 5), Verdict::ApplyLate);
        assert_eq!(w.ranges_held(), 1);
        assert_eq!(apply_fp(&mut w, 25, 30, 8), Verdict::Conflict, "mended");
        // Forgetting the older ranges also keeps it.
        assert_eq!(apply_fp(&mut w, 40, 50, 11), Verdict::ApplyAfterGap);
        assert_eq!(apply_fp(&mut w, 2000, 2010, 13), Verdict::ApplyAfterGap);
        assert_eq!(w.ranges_held(), 1, "the gap fell out of the window");
        assert_eq!(apply_fp(&mut w, 2000, 2010, 12), Verdict::Conflict);
        // Unknown stays unknown: no conflict is claimed against it.
        let mut u = Window::new(0, 10, 0);
        assert_eq!(apply_fp(&mut u, 0, 10, 9), Verdict::Duplicate);
    }

    #[test]
    fn holes_are_bounded_and_one_given_up_is_never_applied_twice() {
        let late = 1 << 40;
        let mut w = Window::new(0, 1, 0);
        let mut given_up = 0;
        // Disjoint one-nanosecond deltas, each leaving a hole behind it.
        for i in 1..=1000u64 {
            assert_eq!(
                w.classify(2 * i, 2 * i + 1, late, 0),
                Verdict::ApplyAfterGap
            );
            given_up += w.record(2 * i, 2 * i + 1, late, 0);
            assert!(w.ranges_held() <= MAX_HOLES + 1);
        }
        assert_eq!(given_up, 1000 - MAX_HOLES);
        let held: Vec<_> = w.ranges().collect();
        assert_eq!(held.len(), MAX_HOLES + 1);
        assert_eq!(
            held[0],
            (0, 2 * (1000 - MAX_HOLES as u64) + 1),
            "oldest spans what it gave up"
        );
        // A late delta for a hole given up is dropped; one for a hole still held is applied.
        assert_eq!(w.classify(1, 2, late, 0), Verdict::Duplicate);
        assert_eq!(w.classify(1999, 2000, late, 0), Verdict::ApplyLate);
        assert_eq!(w.record(1997, 1998, late, 0), 0, "fills a hole");
        assert_eq!(w.ranges_held(), MAX_HOLES, "one hole less");
        // Splitting a hole in two, when the window is full, gives up the oldest.
        let mut f = Window::new(0, 1, 0);
        for i in 1..=MAX_HOLES as u64 {
            assert_eq!(f.record(10 * i, 10 * i + 1, late, 0), 0);
        }
        assert_eq!(f.classify(5, 6, late, 0), Verdict::ApplyLate);
        assert_eq!(f.record(5, 6, late, 0), 1);
        assert_eq!(f.ranges().next(), Some((0, 6)));
        assert_eq!(f.ranges_held(), MAX_HOLES + 1);
        // A checkpoint written with more holes is read back within the limit.
        let many: Vec<_> = (0..100u64).map(|i| (3 * i, 3 * i + 1)).collect();
        let r = Window::from_ranges(&many).unwrap();
        assert_eq!(r.ranges_held(), MAX_HOLES + 1);
        assert_eq!(
            r.ranges().next(),
            Some((0, 3 * (99 - MAX_HOLES as u64) + 1))
        );
    }

    #[test]
    fn the_common_case_is_small() {
        assert_eq!(std::mem::size_of::<Window>(), 24);
    }
}
