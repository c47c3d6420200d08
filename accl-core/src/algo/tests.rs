//! Runs every rank's schedule against a simulated network (no sockets, no threads, no clock)
//! and checks the results: algorithm bugs show up here before any transport is involved.
#![allow(clippy::needless_range_loop, clippy::ptr_arg)]

use std::collections::VecDeque;

use super::*;

/// Runs all ranks' schedules to completion; u64 elements, wrapping sum. Runs them twice: with
/// sends that complete as soon as they are posted (sockets with room in their buffers), and
/// with sends that complete only once the receiver has taken the data (the in-process
/// transport; RDMA without free receive slots), where a receive that waits for this rank's own
/// unfinished send can stall every rank.
fn simulate(plans: &[Plan], inputs: &[Vec<u64>], out_len: usize) -> Vec<Vec<u64>> {
    let eager = run(plans, inputs, out_len, false);
    let rendezvous = run(plans, inputs, out_len, true);
    assert_eq!(eager, rendezvous, "results differ between eager and rendezvous sends");
    eager
}

/// A message on the simulated network: its data (eager) or where it lies (rendezvous), and
/// the sending step.
type InFlight = (Result<Vec<u8>, Region>, usize);

fn run(plans: &[Plan], inputs: &[Vec<u64>], out_len: usize, rendezvous: bool) -> Vec<Vec<u64>> {
    let n = plans.len();
    let scheds: Vec<Schedule> = plans.iter().map(Plan::schedule).collect();
    let mut output: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; out_len * 8]).collect();
    let input: Vec<Vec<u8>> = inputs.iter().map(|v| v.iter().flat_map(|x| x.to_ne_bytes()).collect()).collect();
    for r in 0..n {
        if plans[r].in_place {
            // The caller's data sits in the output buffer (at the collective's offset).
            let off = match plans[r].coll {
                Collective::AllGather => r * plans[r].count * 8,
                _ => 0,
            };
            output[r][off..off + input[r].len()].copy_from_slice(&input[r]);
        }
    }
    let mut scratch: Vec<Vec<u8>> = scheds.iter().map(|s| vec![0u8; s.scratch_len]).collect();
    // Messages in flight: the data (eager) or where it lies (rendezvous: read when received,
    // so a sender that overwrites it too early is caught), and the sending step.
    let mut net: Vec<Vec<VecDeque<InFlight>>> = vec![vec![VecDeque::new(); n]; n];
    let mut deps: Vec<Vec<u32>> = scheds.iter().map(|s| s.dep_count.clone()).collect();
    let mut done: Vec<Vec<bool>> = scheds.iter().map(|s| vec![false; s.steps.len()]).collect();
    // Sends handed to the network (done too, unless rendezvous).
    let mut posted: Vec<Vec<bool>> = scheds.iter().map(|s| vec![false; s.steps.len()]).collect();
    let complete = |done: &mut Vec<Vec<bool>>, deps: &mut Vec<Vec<u32>>, r: usize, i: usize| {
        done[r][i] = true;
        for &d in &scheds[r].dependents[i] {
            deps[r][d as usize] -= 1;
        }
    };
    loop {
        let mut progressed = false;
        for r in 0..n {
            let s = &scheds[r];
            for i in 0..s.steps.len() {
                if done[r][i] || posted[r][i] || deps[r][i] > 0 {
                    continue;
                }
                // Network steps are posted in program order per peer and direction.
                let blocked = s.steps[..i].iter().enumerate().any(|(j, st)| {
                    !done[r][j]
                        && !posted[r][j]
                        && match (st, &s.steps[i]) {
                            (Step::Send { peer: a, .. }, Step::Send { peer: b, .. }) => a == b,
                            (Step::Recv { peer: a, .. }, Step::Recv { peer: b, .. }) => a == b,
                            _ => false,
                        }
                });
                if blocked {
                    continue;
                }
                let read = |reg: Region, output: &Vec<Vec<u8>>, scratch: &Vec<Vec<u8>>| -> Vec<u8> {
                    let buf = match reg.buf {
                        Buf::Input => &input[r],
                        Buf::Output => &output[r],
                        Buf::Scratch => &scratch[r],
                    };
                    buf[reg.off..reg.off + reg.len].to_vec()
                };
                let write = |reg: Region, data: &[u8], output: &mut Vec<Vec<u8>>, scratch: &mut Vec<Vec<u8>>| {
                    let buf = match reg.buf {
                        Buf::Input => panic!("rank {r} step {i} writes its input"),
                        Buf::Output => &mut output[r],
                        Buf::Scratch => &mut scratch[r],
                    };
                    buf[reg.off..reg.off + reg.len].copy_from_slice(data);
                };
                let sum = |a: &[u8], b: &[u8]| -> Vec<u8> {
                    a.chunks(8)
                        .zip(b.chunks(8))
                        .flat_map(|(x, y)| {
                            u64::from_ne_bytes(x.try_into().unwrap())
                                .wrapping_add(u64::from_ne_bytes(y.try_into().unwrap()))
                                .to_ne_bytes()
                        })
                        .collect()
                };
                match s.steps[i] {
                    Step::Send { peer, src } => {
                        let data = if rendezvous { Err(src) } else { Ok(read(src, &output, &scratch)) };
                        net[r][peer].push_back((data, i));
                        if rendezvous {
                            posted[r][i] = true;
                            progressed = true;
                            continue;
                        }
                    }
                    Step::Recv { peer, dst } => {
                        let Some((data, send)) = net[peer][r].pop_front() else {
                            continue;
                        };
                        let msg = data.unwrap_or_else(|src| {
                            let buf = match src.buf {
                                Buf::Input => &input[peer],
                                Buf::Output => &output[peer],
                                Buf::Scratch => &scratch[peer],
                            };
                            buf[src.off..src.off + src.len].to_vec()
                        });
                        assert_eq!(msg.len(), dst.len, "rank {r} step {i}: message from {peer} has the wrong length");
                        write(dst, &msg, &mut output, &mut scratch);
                        if rendezvous {
                            complete(&mut done, &mut deps, peer, send);
                        }
                    }
                    Step::Reduce { dst, src } => {
                        let v = sum(&read(dst, &output, &scratch), &read(src, &output, &scratch));
                        write(dst, &v, &mut output, &mut scratch);
                    }
                    Step::ReduceInto { dst, a, b, .. } => {
                        let v = sum(&read(a, &output, &scratch), &read(b, &output, &scratch));
                        write(dst, &v, &mut output, &mut scratch);
                    }
                    Step::Copy { dst, src } => {
                        let v = read(src, &output, &scratch);
                        write(dst, &v, &mut output, &mut scratch);
                    }
                    Step::Divide { buf } => {
                        let v: Vec<u8> = read(buf, &output, &scratch)
                            .chunks(8)
                            .flat_map(|x| (u64::from_ne_bytes(x.try_into().unwrap()) / n as u64).to_ne_bytes())
                            .collect();
                        write(buf, &v, &mut output, &mut scratch);
                    }
                }
                complete(&mut done, &mut deps, r, i);
                progressed = true;
            }
        }
        if done.iter().all(|d| d.iter().all(|x| *x)) {
            break;
        }
        assert!(progressed, "schedules deadlocked: {:?}", plans[0]);
    }
    for r in 0..n {
        for (a, b) in net[r].iter().enumerate() {
            assert!(b.is_empty(), "rank {r} left a message for {a} unreceived");
        }
    }
    output.into_iter().map(|o| o.chunks(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap())).collect()).collect()
}

fn plan(coll: Collective, algo: Algorithm, rank: usize, nranks: usize, count: usize, in_place: bool) -> Plan {
    Plan {
        coll,
        algo,
        rank,
        nranks,
        count,
        elem: 8,
        op: ReduceOp::Sum,
        root: nranks / 2,
        src: 0,
        in_place,
        segment: 64,
        window: 2,
        stream_min: 0,
        p2p_send: false,
        p2p_recv: false,
    }
}

fn value(rank: usize, i: usize) -> u64 {
    (rank as u64 + 1) * 1000 + i as u64
}

// 33 with 2 ranks: blocks of 17 and 16 elements, cut into 3 and 2 segments of 8.
const COUNTS: [usize; 8] = [0, 1, 3, 8, 33, 37, 100, 1000];

#[test]
fn all_reduce_every_algorithm() {
    for algo in [Algorithm::Ring, Algorithm::HalvingDoubling, Algorithm::RecursiveDoubling] {
        for n in 1..=9 {
            for count in COUNTS {
                for in_place in [false, true] {
                    let plans: Vec<_> =
                        (0..n).map(|r| plan(Collective::AllReduce, algo, r, n, count, in_place)).collect();
                    let inputs: Vec<Vec<u64>> = (0..n).map(|r| (0..count).map(|i| value(r, i)).collect()).collect();
                    let out = simulate(&plans, &inputs, count);
                    let want: Vec<u64> = (0..count).map(|i| (0..n).map(|r| value(r, i)).sum()).collect();
                    for (r, o) in out.iter().enumerate() {
                        assert_eq!(o, &want, "{algo} n={n} count={count} in_place={in_place} rank {r}");
                    }
                }
            }
        }
    }
}

#[test]
fn reduce_and_broadcast_by_tree_and_chain() {
    for algo in [Algorithm::Tree, Algorithm::Chain] {
        for n in 1..=9 {
            for count in COUNTS {
                for in_place in [false, true] {
                    let root = n / 2;
                    let inputs: Vec<Vec<u64>> = (0..n).map(|r| (0..count).map(|i| value(r, i)).collect()).collect();
                    let plans: Vec<_> = (0..n).map(|r| plan(Collective::Reduce, algo, r, n, count, in_place)).collect();
                    let out = simulate(&plans, &inputs, count);
                    let want: Vec<u64> = (0..count).map(|i| (0..n).map(|r| value(r, i)).sum()).collect();
                    assert_eq!(out[root], want, "reduce {algo} n={n} count={count}");
                    let plans: Vec<_> =
                        (0..n).map(|r| plan(Collective::Broadcast, algo, r, n, count, in_place)).collect();
                    let out = simulate(&plans, &inputs, count);
                    for o in &out {
                        assert_eq!(o, &inputs[root], "broadcast {algo} n={n} count={count}");
                    }
                }
            }
        }
    }
}

#[test]
fn gather_scatter_alltoall_barrier() {
    for n in 1..=9 {
        for count in COUNTS {
            for in_place in [false, true] {
                let plans: Vec<_> =
                    (0..n).map(|r| plan(Collective::AllGather, Algorithm::Ring, r, n, count, in_place)).collect();
                let inputs: Vec<Vec<u64>> = (0..n).map(|r| (0..count).map(|i| value(r, i)).collect()).collect();
                let out = simulate(&plans, &inputs, n * count);
                let want: Vec<u64> = inputs.concat();
                for o in &out {
                    assert_eq!(o, &want, "allgather n={n} count={count} in_place={in_place}");
                }

                let plans: Vec<_> =
                    (0..n).map(|r| plan(Collective::ReduceScatter, Algorithm::Ring, r, n, count, in_place)).collect();
                let inputs: Vec<Vec<u64>> = (0..n).map(|r| (0..n * count).map(|i| value(r, i)).collect()).collect();
                let out = simulate(&plans, &inputs, if in_place { n * count } else { count });
                for (r, o) in out.iter().enumerate() {
                    let want: Vec<u64> = (0..count).map(|i| (0..n).map(|q| value(q, r * count + i)).sum()).collect();
                    let got = if in_place { &o[r * count..(r + 1) * count] } else { &o[..] };
                    assert_eq!(got, &want[..], "reduce_scatter n={n} count={count} in_place={in_place} rank {r}");
                }

                let plans: Vec<_> =
                    (0..n).map(|r| plan(Collective::AllToAll, Algorithm::Pairwise, r, n, count, in_place)).collect();
                let out = simulate(&plans, &inputs, n * count);
                for (r, o) in out.iter().enumerate() {
                    let want: Vec<u64> = (0..n).flat_map(|q| inputs[q][r * count..(r + 1) * count].to_vec()).collect();
                    assert_eq!(o, &want, "alltoall n={n} count={count} in_place={in_place} rank {r}");
                }
            }
        }
        let plans: Vec<_> =
            (0..n).map(|r| plan(Collective::Barrier, Algorithm::Dissemination, r, n, 0, false)).collect();
        simulate(&plans, &vec![Vec::new(); n], 0);
    }
}

/// Streaming stores only for the ring reduce_scatter's sums of large messages; the ring
/// allreduce sends its sums on while they are in cache.
#[test]
fn streaming_stores_only_for_large_ring_reductions() {
    let streams = |p: &Plan| p.schedule().steps.iter().any(|s| matches!(s, Step::ReduceInto { streaming: true, .. }));
    for (coll, n, count, stream_min, want) in [
        (Collective::AllReduce, 4, 1000, 8, false),
        (Collective::AllReduce, 3, 1000, 8, false),
        (Collective::AllReduce, 2, 1000, 8, false),
        (Collective::ReduceScatter, 4, 250, 8000, true),
        (Collective::ReduceScatter, 4, 249, 8000, false),
        (Collective::ReduceScatter, 4, 250, 0, false),
        (Collective::ReduceScatter, 2, 250, 8000, false),
        (Collective::ReduceScatter, 2, 500, 8000, true),
    ] {
        for rank in 0..n {
            let p = Plan { stream_min, ..plan(coll, Algorithm::Ring, rank, n, count, false) };
            assert_eq!(streams(&p), want, "{coll} n={n} count={count} stream_min={stream_min} rank {rank}");
        }
    }
    for algo in [Algorithm::HalvingDoubling, Algorithm::RecursiveDoubling] {
        assert!(!streams(&Plan { stream_min: 8, ..plan(Collective::AllReduce, algo, 0, 4, 1000, false) }));
    }
}

/// The ring allreduce stages its partial sums in scratch: out of place, it writes the output
/// only with the final sums of its own block and with the blocks the allgather receives, and
/// each reduce-scatter step after the first sends from scratch.
#[test]
fn ring_allreduce_writes_output_once() {
    for n in [3, 4, 5, 8] {
        for count in [8 * n, 1000] {
            for rank in 0..n {
                let s = plan(Collective::AllReduce, Algorithm::Ring, rank, n, count, false).schedule();
                let mut written = vec![0u32; count];
                for step in &s.steps {
                    let dst = match *step {
                        Step::Recv { dst, .. } | Step::ReduceInto { dst, .. } | Step::Copy { dst, .. } => dst,
                        _ => continue,
                    };
                    if dst.buf == Buf::Output {
                        for w in &mut written[dst.off / 8..(dst.off + dst.len) / 8] {
                            *w += 1;
                        }
                    }
                }
                assert!(written.iter().all(|w| *w == 1), "n={n} count={count} rank {rank}: {written:?}");
                let sends: Vec<Buf> = s
                    .steps
                    .iter()
                    .filter_map(|st| if let Step::Send { src, .. } = st { Some(src.buf) } else { None })
                    .collect();
                let from_scratch = sends.iter().filter(|b| **b == Buf::Scratch).count();
                let blk = |i: usize| schedule::segments(0, schedule::block(count, n, i).1, 8).count();
                // Reduce-scatter steps 1..n-2 send the blocks r-1 .. r-n+2, all staged.
                let staged: usize = (1..n - 1).map(|s| blk((rank + n - s) % n)).sum();
                assert_eq!(from_scratch, staged, "n={n} count={count} rank {rank}");
            }
        }
    }
}

/// The ring allreduce cuts blocks into 64 KiB segments by default, the other schedules into
/// 256 KiB ones; a block is cut into at most `MAX_SEGMENTS` segments.
#[test]
fn segment_sizes() {
    assert_eq!(default_segment(Collective::AllReduce, Algorithm::Ring), 64 << 10);
    assert_eq!(default_segment(Collective::AllReduce, Algorithm::HalvingDoubling), 256 << 10);
    assert_eq!(default_segment(Collective::AllGather, Algorithm::Ring), 256 << 10);
    let p = |count: usize| Plan {
        elem: 4,
        segment: 64 << 10,
        ..plan(Collective::AllReduce, Algorithm::Ring, 0, 4, count, false)
    };
    // 32 MiB of f32 over 4 ranks: blocks of 8 MiB, 128 segments of 64 KiB.
    assert_eq!(p(8 << 20).seg_elems(2 << 20), 16 << 10);
    // 1 GiB: blocks of 256 MiB, at most 256 segments of 1 MiB.
    assert_eq!(p(256 << 20).seg_elems(64 << 20), 256 << 10);
}
