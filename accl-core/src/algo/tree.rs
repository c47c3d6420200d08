//! Pipelined reduce and broadcast over a binomial tree (latency: log2(n) hops) or a chain
//! (bandwidth: every link carries the data once).
//!
//! Ranks are renumbered relative to the root (`v = (r - root) mod n`), so the root is v = 0.

use super::schedule::{segments, Schedule, Step};
use super::Plan;

/// Parent and children (largest subtree first) of virtual rank `v` in the tree or chain.
fn topology(v: usize, n: usize, chain: bool) -> (Option<usize>, Vec<usize>) {
    if chain {
        let parent = v.checked_sub(1);
        let child = (v + 1 < n).then_some(v + 1);
        return (parent, child.into_iter().collect());
    }
    // Binomial tree: the parent clears v's lowest set bit; the children set lower bits.
    let low = if v == 0 { n.next_power_of_two() } else { 1 << v.trailing_zeros() };
    let parent = (v != 0).then(|| v - low);
    let mut children = Vec::new();
    let mut m = low >> 1;
    while m > 0 {
        if v + m < n {
            children.push(v + m);
        }
        m >>= 1;
    }
    (parent, children)
}

/// Broadcast `count` elements from the root's input into everyone's output.
pub fn broadcast(p: &Plan, chain: bool) -> Schedule {
    let (n, e, count) = (p.nranks, p.elem, p.count);
    let v = (p.rank + n - p.root) % n;
    let real = |x: usize| (x + p.root) % n;
    let mut b = p.builder(0);
    let (parent, children) = topology(v, n, chain);
    let seg = p.seg_elems(count);
    if parent.is_none() {
        let (dst, src) = (b.output(0, count * e), b.input(0, count * e));
        b.push(Step::Copy { dst, src });
    }
    for (s, l) in segments(0, count, seg) {
        let here = match parent {
            Some(par) => {
                let dst = b.output(s * e, l * e);
                b.push(Step::Recv { peer: real(par), dst });
                dst
            }
            // The root forwards from its input, so sends need not wait for the local copy.
            None => b.input(s * e, l * e),
        };
        for &c in &children {
            b.push(Step::Send { peer: real(c), src: here });
        }
    }
    b.build()
}

/// Reduce everyone's `count` input elements into the root's output.
pub fn reduce(p: &Plan, chain: bool) -> Schedule {
    let (n, e, count) = (p.nranks, p.elem, p.count);
    let v = (p.rank + n - p.root) % n;
    let real = |x: usize| (x + p.root) % n;
    let mut b = p.builder(0);
    let (parent, children) = topology(v, n, chain);
    let seg = p.seg_elems(count);
    let slots: Vec<_> = (0..4).map(|_| b.scratch(seg * e)).collect();
    let mut next_slot = 0;
    // Non-root ranks accumulate in scratch; the root in its output.
    let acc_all = if parent.is_none() { b.output(0, count * e) } else { b.scratch(count * e) };
    for (s, l) in segments(0, count, seg) {
        let input = b.input(s * e, l * e);
        let acc = super::Region { off: acc_all.off + s * e, len: l * e, ..acc_all };
        let mut have = input;
        // Smallest subtrees first: they finish first.
        for &c in children.iter().rev() {
            let mut slot = slots[next_slot % slots.len()];
            next_slot += 1;
            slot.len = l * e;
            b.push(Step::Recv { peer: real(c), dst: slot });
            b.push(Step::ReduceInto { dst: acc, a: have, b: slot, streaming: false });
            have = acc;
        }
        match parent {
            Some(par) => {
                b.push(Step::Send { peer: real(par), src: have });
            }
            None => {
                if have != acc {
                    b.push(Step::Copy { dst: acc, src: have });
                }
                p.finish_avg(&mut b, acc);
            }
        }
    }
    b.build()
}
