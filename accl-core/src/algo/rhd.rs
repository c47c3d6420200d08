//! Allreduce by recursive halving-doubling (Rabenseifner) and by recursive doubling.
//!
//! Both work on the largest power of two p <= n: with `rem = n - p`, ranks below `2*rem` pair
//! up first (each even rank hands its whole buffer to the odd rank above it and sits out),
//! the p remaining ranks run the power-of-two algorithm, and the odd ranks hand the result back.

use super::schedule::{segments, Builder, Region, Schedule, Step};
use super::Plan;

/// Power-of-two folding of n ranks.
struct Fold {
    p: usize,
    rem: usize,
}

impl Fold {
    fn new(n: usize) -> Fold {
        let p = if n.is_power_of_two() { n } else { n.next_power_of_two() / 2 };
        Fold { p, rem: n - p }
    }

    /// This rank's index among the p participants, or None for a rank that sits out.
    fn virtual_rank(&self, r: usize) -> Option<usize> {
        if r < 2 * self.rem {
            (r % 2 == 1).then_some(r / 2)
        } else {
            Some(r - self.rem)
        }
    }

    fn real_rank(&self, v: usize) -> usize {
        if v < self.rem {
            2 * v + 1
        } else {
            v + self.rem
        }
    }
}

/// Sends `src` and receives into a scratch slot, then reduces into `dst` with `a`, segment by
/// segment so that reduction overlaps the transfer. `src` and the received data have the same
/// length only for recursive doubling; halving exchanges halves of different lengths.
/// With `src` None nothing is sent (the receiving half of the fold).
#[allow(clippy::too_many_arguments)]
fn exchange_reduce(
    b: &mut Builder,
    p: &Plan,
    peer: usize,
    src: Option<Region>,
    recv_len: usize,
    dst: Region,
    a: Region,
    slot: Region,
) {
    let e = p.elem;
    let src_len = src.map_or(0, |s| s.len);
    let seg = p.seg_elems(src_len.max(recv_len) / e);
    let sends: Vec<_> = src.map(|_| segments(0, src_len / e, seg).collect()).unwrap_or_default();
    let recvs: Vec<_> = segments(0, recv_len / e, seg).collect();
    let src = src.unwrap_or(dst);
    for g in 0..sends.len().max(recvs.len()) {
        if let Some(&(s, l)) = sends.get(g) {
            b.push(Step::Send { peer, src: sub(src, s * e, l * e) });
        }
        if let Some(&(s, l)) = recvs.get(g) {
            let slot = sub(slot, s * e, l * e);
            b.push(Step::Recv { peer, dst: slot });
            b.push(Step::ReduceInto {
                dst: sub(dst, s * e, l * e),
                a: sub(a, s * e, l * e),
                b: slot,
                streaming: false,
            });
        }
    }
}

fn sub(r: Region, off: usize, len: usize) -> Region {
    Region { buf: r.buf, off: r.off + off, len }
}

/// Allreduce: `halving` selects Rabenseifner, otherwise recursive doubling.
pub fn all_reduce(p: &Plan, halving: bool) -> Schedule {
    let (n, r, e, count) = (p.nranks, p.rank, p.elem, p.count);
    let bytes = count * e;
    let mut b = p.builder(0);
    let whole_out = b.output(0, bytes);
    let whole_in = b.input(0, bytes);
    let fold = Fold::new(n);
    // `cur` holds this rank's running result: the input until something was reduced into the output.
    let mut cur = whole_in;
    if r < 2 * fold.rem {
        if r % 2 == 0 {
            // Segmented exactly as the receiving half of exchange_reduce expects.
            for (s, l) in segments(0, count, p.seg_elems(count)) {
                b.push(Step::Send { peer: r + 1, src: sub(whole_in, s * e, l * e) });
            }
            b.push(Step::Recv { peer: r + 1, dst: whole_out });
            return b.build();
        }
        let slot = b.scratch(bytes);
        exchange_reduce(&mut b, p, r - 1, None, bytes, whole_out, whole_in, slot);
        cur = whole_out;
    }
    let v = fold.virtual_rank(r).expect("participant");
    let rounds = fold.p.trailing_zeros() as usize;
    if halving {
        let slot = b.scratch(count.div_ceil(2) * e);
        // Element range [lo, hi) this rank is responsible for; history for the way back.
        let (mut lo, mut hi) = (0usize, count);
        let mut history = Vec::new();
        for k in 0..rounds {
            let mask = fold.p >> (k + 1);
            let peer = fold.real_rank(v ^ mask);
            let mid = lo + (hi - lo) / 2;
            let (keep, give) = if v & mask == 0 { ((lo, mid), (mid, hi)) } else { ((mid, hi), (lo, mid)) };
            let region = |b: &Builder, buf_is_out: bool, (s, t): (usize, usize)| {
                if buf_is_out {
                    b.output(s * e, (t - s) * e)
                } else {
                    Region { off: cur.off + s * e, len: (t - s) * e, ..cur }
                }
            };
            let src = region(&b, false, give);
            let dst = region(&b, true, keep);
            let a = region(&b, false, keep);
            exchange_reduce(&mut b, p, peer, Some(src), dst.len, dst, a, slot);
            history.push((peer, (lo, hi), keep));
            (lo, hi) = keep;
            cur = whole_out;
        }
        if rounds == 0 {
            b.push(Step::Copy { dst: whole_out, src: cur });
        }
        let owned = b.output(lo * e, (hi - lo) * e);
        p.finish_avg(&mut b, owned);
        for &(peer, (plo, phi), keep) in history.iter().rev() {
            let other = if keep.0 == plo { (keep.1, phi) } else { (plo, keep.0) };
            b.push(Step::Send { peer, src: b.output(keep.0 * e, (keep.1 - keep.0) * e) });
            b.push(Step::Recv { peer, dst: b.output(other.0 * e, (other.1 - other.0) * e) });
        }
    } else {
        let slot = b.scratch(bytes);
        for k in 0..rounds {
            let peer = fold.real_rank(v ^ (1 << k));
            exchange_reduce(&mut b, p, peer, Some(cur), bytes, whole_out, cur, slot);
            cur = whole_out;
        }
        if rounds == 0 {
            b.push(Step::Copy { dst: whole_out, src: cur });
        }
        p.finish_avg(&mut b, whole_out);
    }
    if r < 2 * fold.rem {
        b.push(Step::Send { peer: r - 1, src: whole_out });
    }
    b.build()
}
