//! All-to-all by pairwise exchange, the dissemination barrier, and point-to-point messages.

use super::schedule::{Schedule, Step};
use super::Plan;

/// All-to-all: block j of rank i's input becomes block i of rank j's output. At step s rank r
/// sends to r+s and receives from r-s; at most `window` steps are in flight. In place, the input
/// is first copied aside, since a received block may land where an unsent one still sits.
pub fn all_to_all(p: &Plan) -> Schedule {
    let (n, r, e, count) = (p.nranks, p.rank, p.elem, p.count);
    let blk = count * e;
    let mut b = p.builder(0);
    let mut source = b.input(0, n * blk);
    if b.in_place() && n > 1 {
        let aside = b.scratch(n * blk);
        b.push(Step::Copy { dst: aside, src: source });
        source = aside;
    }
    let block_of = |region: super::Region, j: usize| super::Region { off: region.off + j * blk, len: blk, ..region };
    let own = block_of(source, r);
    let dst = b.output(r * blk, blk);
    b.push(Step::Copy { dst, src: own });
    let mut steps: Vec<(u32, u32)> = Vec::new();
    for s in 1..n {
        let (to, from) = ((r + s) % n, (r + n - s) % n);
        let gate: Vec<u32> = match s.checked_sub(p.window.max(1)).filter(|old| *old >= 1) {
            Some(old) => {
                let (a, c) = steps[old - 1];
                vec![a, c]
            }
            None => Vec::new(),
        };
        let send = b.push_after(Step::Send { peer: to, src: block_of(source, to) }, &gate);
        let recv = b.push_after(Step::Recv { peer: from, dst: b.output(from * blk, blk) }, &gate);
        steps.push((send, recv));
    }
    b.build()
}

/// Dissemination barrier: in round k rank r signals r + 2^k and waits for r - 2^k.
pub fn barrier(p: &Plan) -> Schedule {
    let (n, r) = (p.nranks, p.rank);
    let mut b = p.builder(0);
    let empty = b.output(0, 0);
    let mut prev: Vec<u32> = Vec::new();
    let mut k = 1;
    while k < n {
        let send = b.push_after(Step::Send { peer: (r + k) % n, src: empty }, &prev);
        let recv = b.push_after(Step::Recv { peer: (r + n - k) % n, dst: empty }, &prev);
        prev = vec![send, recv];
        k <<= 1;
    }
    b.build()
}

/// Send `count` elements of the input to `root` and/or receive `count` from `src`.
pub fn send_recv(p: &Plan) -> Schedule {
    let bytes = p.count * p.elem;
    let mut b = p.builder(0);
    if p.p2p_send {
        let mut src = b.input(0, bytes);
        if b.in_place() && p.p2p_recv {
            // The receive overwrites what is being sent, and a rendezvous transport completes
            // the send only once the peer receives: stage the outgoing data first.
            let staged = b.scratch(bytes);
            b.push(Step::Copy { dst: staged, src });
            src = staged;
        }
        b.push(Step::Send { peer: p.root, src });
    }
    if p.p2p_recv {
        let dst = b.output(0, bytes);
        b.push(Step::Recv { peer: p.src, dst });
    }
    b.build()
}
