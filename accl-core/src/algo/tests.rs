//! Runs every rank's schedule against a simulated network (no sockets, no threads, no clock)
//! and checks the results: algorithm bugs show up here before any transport is involved.
#![allow(clippy::needless_range_loop, clippy::ptr_arg)]

use std::collections::VecDeque;

use super::*;

/// Runs all ranks' schedules to completion; u64 elements, wrapping sum.
fn simulate(plans: &[Plan], inputs: &[Vec<u64>], out_len: usize) -> Vec<Vec<u64>> {
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
    let mut net: Vec<Vec<VecDeque<Vec<u8>>>> = vec![vec![VecDeque::new(); n]; n];
    let mut deps: Vec<Vec<u32>> = scheds.iter().map(|s| s.dep_count.clone()).collect();
    let mut done: Vec<Vec<bool>> = scheds.iter().map(|s| vec![false; s.steps.len()]).collect();
    loop {
        let mut progressed = false;
        for r in 0..n {
            let s = &scheds[r];
            for i in 0..s.steps.len() {
                if done[r][i] || deps[r][i] > 0 {
                    continue;
                }
                // Network steps go in program order per peer and direction.
                let blocked = s.steps[..i].iter().enumerate().any(|(j, st)| {
                    !done[r][j]
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
                    Step::Send { peer, src } => net[r][peer].push_back(read(src, &output, &scratch)),
                    Step::Recv { peer, dst } => {
                        let Some(msg) = net[peer][r].pop_front() else {
                            continue;
                        };
                        assert_eq!(msg.len(), dst.len, "rank {r} step {i}: message from {peer} has the wrong length");
                        write(dst, &msg, &mut output, &mut scratch);
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
                done[r][i] = true;
                for &d in &s.dependents[i] {
                    deps[r][d as usize] -= 1;
                }
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

/// Streaming stores only for the ring's reduce-scatter sums of large messages, with 3 or more
/// ranks for allreduce (with 2, each sum is sent back while still in cache).
#[test]
fn streaming_stores_only_for_large_ring_reductions() {
    let streams = |p: &Plan| p.schedule().steps.iter().any(|s| matches!(s, Step::ReduceInto { streaming: true, .. }));
    for (coll, n, count, stream_min, want) in [
        (Collective::AllReduce, 4, 1000, 8000, true),
        (Collective::AllReduce, 4, 999, 8000, false),
        (Collective::AllReduce, 4, 1000, 0, false),
        (Collective::AllReduce, 3, 1000, 8000, true),
        (Collective::AllReduce, 2, 1000, 8000, false),
        (Collective::ReduceScatter, 4, 250, 8000, true),
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
