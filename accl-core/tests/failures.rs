//! Failure handling, ranks as threads: a dead rank, a rank that never arrives or never calls,
//! mismatched collectives, bad arguments, abort. Each must end in the expected error within
//! the timeout, on every rank, never in a hang or in wrong data.

mod common;

use std::time::{Duration, Instant};

use accl_core::{CollArgs, Collective, Communicator, Config, DataType, Error, ReduceOp, TransportKind, UniqueId};
use common::{run_ranks, test_config};

const TIMEOUT: Duration = Duration::from_secs(2);
/// How much later than the timeout an error may arrive (scheduling on a loaded 2-core box).
const SLACK: Duration = Duration::from_secs(3);

/// A transport setting under test: in-process, TCP with duplex lanes, TCP with one simplex
/// connection per direction (chosen when flow labels are set).
#[derive(Clone, Copy, Debug)]
enum Mode {
    Mem,
    Tcp,
    TcpSimplex,
}

impl From<TransportKind> for Mode {
    fn from(t: TransportKind) -> Mode {
        match t {
            TransportKind::Mem => Mode::Mem,
            TransportKind::Tcp => Mode::Tcp,
            other => panic!("no failure tests for {other:?} here (see tests/verbs.rs)"),
        }
    }
}

fn config(mode: impl Into<Mode>) -> Config {
    match mode.into() {
        Mode::Mem => Config { timeout: TIMEOUT, ..test_config(TransportKind::Mem) },
        Mode::Tcp => Config { timeout: TIMEOUT, ..test_config(TransportKind::Tcp) },
        Mode::TcpSimplex => Config { timeout: TIMEOUT, flow_label: 0x5a000, ..test_config(TransportKind::Tcp) },
    }
}

const TRANSPORTS: [Mode; 3] = [Mode::Mem, Mode::Tcp, Mode::TcpSimplex];

/// Runs `body` on n ranks; returns (rank, result, elapsed) per rank.
fn ranks<F>(transport: impl Into<Mode>, n: usize, body: F) -> Vec<(usize, Result<(), Error>, Duration)>
where
    F: Fn(usize, &mut Communicator) -> Result<(), Error> + Send + Sync + Clone + 'static,
{
    run_ranks(n, config(transport), move |rank, mut comm| {
        let t0 = Instant::now();
        let r = body(rank, &mut comm);
        (rank, r, t0.elapsed())
    })
}

#[test]
fn dead_rank_is_named_by_every_other_rank() {
    for transport in TRANSPORTS {
        let results = ranks(transport, 4, |rank, comm| {
            let mut buf = vec![1.0f32; 100_000];
            comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)?;
            if rank == 2 {
                // Dies: its connections close, as when the process is killed.
                let dead = std::mem::replace(comm, dummy());
                drop(dead);
                return Ok(());
            }
            loop {
                comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)?;
            }
        });
        for (rank, result, elapsed) in results.into_iter().filter(|(r, _, _)| *r != 2) {
            let err = result.expect_err("allreduce with a dead rank must fail");
            assert_eq!(err.blamed_rank(), Some(2), "{transport:?} rank {rank}: {err}");
            assert!(elapsed < TIMEOUT + SLACK, "{transport:?} rank {rank} took {elapsed:?}");
        }
    }
}

#[test]
fn ranks_that_finish_and_leave_at_once_are_no_error() {
    // A rank whose last collective is done may exit while the others still take its last data
    // in; that is a normal end, not a dead peer. Repeated: the exit races with the receive.
    for transport in TRANSPORTS {
        for round in 0..5 {
            let results = ranks(transport, 4, |rank, comm| {
                let mut buf = vec![rank as f32; 70_000];
                comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)?;
                match rank {
                    3 => comm.send(&buf, 1)?,
                    1 => comm.recv(&mut buf, 3)?,
                    _ => {}
                }
                assert!(buf.iter().all(|&x| x == 6.0), "rank {rank}: wrong sum");
                let leaving = std::mem::replace(comm, dummy());
                drop(leaving);
                Ok(())
            });
            for (rank, result, _) in results {
                assert!(result.is_ok(), "{transport:?} round {round} rank {rank}: {result:?}");
            }
        }
    }
}

/// A stand-in left behind by the "dead" rank: a one-rank communicator of its own.
fn dummy() -> Communicator {
    let id = UniqueId::new().unwrap();
    Communicator::init(&id, 0, 1, Config { transport: TransportKind::Mem, ..Config::default() }).unwrap()
}

#[test]
fn rank_that_never_arrives_is_named_at_rendezvous() {
    let id = UniqueId::new().unwrap();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..3)
        .map(|rank| {
            std::thread::spawn(move || {
                Communicator::init(&id, rank, 4, config(TransportKind::Tcp)).err().expect("must fail")
            })
        })
        .collect();
    for h in handles {
        match h.join().unwrap() {
            Error::RendezvousTimeout { missing, nranks, .. } => {
                assert_eq!(missing, vec![3]);
                assert_eq!(nranks, 4);
            }
            other => panic!("expected a rendezvous timeout, got {other}"),
        }
    }
    assert!(t0.elapsed() < TIMEOUT + SLACK);
}

#[test]
fn unreachable_root_times_out() {
    // Nothing listens on this port: the rank retries until its timeout.
    let port = std::net::TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap().port();
    let id = UniqueId::from_addr(format!("[::1]:{port}").parse().unwrap());
    let t0 = Instant::now();
    let err = Communicator::init(&id, 1, 2, config(TransportKind::Tcp)).err().unwrap();
    assert!(matches!(err, Error::RendezvousTimeout { .. }), "{err}");
    assert!(t0.elapsed() >= TIMEOUT && t0.elapsed() < TIMEOUT + SLACK);
}

#[test]
fn rank_that_never_calls_is_named_after_the_timeout() {
    for transport in TRANSPORTS {
        let results = ranks(transport, 2, |rank, comm| {
            if rank == 1 {
                std::thread::sleep(TIMEOUT + SLACK);
                return Ok(());
            }
            let mut buf = vec![1u32; 1000];
            comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)
        });
        let (_, result, elapsed) = &results[0];
        match result {
            Err(Error::Timeout { waiting_for, rank: 0, .. }) => assert_eq!(waiting_for, &vec![1]),
            other => panic!("{transport:?}: expected a timeout naming rank 1, got {other:?}"),
        }
        assert!(*elapsed >= TIMEOUT && *elapsed < TIMEOUT + SLACK, "{elapsed:?}");
    }
}

#[test]
fn four_ranks_with_one_silent_all_fail_in_time() {
    let results = ranks(TransportKind::Tcp, 4, |rank, comm| {
        if rank == 3 {
            std::thread::sleep(TIMEOUT + SLACK);
            return Ok(());
        }
        let mut buf = vec![1u32; 1 << 16];
        comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)
    });
    for (rank, result, elapsed) in results.into_iter().filter(|(r, _, _)| *r != 3) {
        let err = result.expect_err("must fail");
        assert!(matches!(err, Error::Timeout { .. } | Error::RemoteFailure { .. }), "rank {rank}: {err}");
        assert!(elapsed < TIMEOUT + SLACK, "rank {rank} took {elapsed:?}");
    }
}

/// Every rank must fail (no rank may return wrong data) within the timeout.
fn expect_all_fail(what: &str, results: Vec<(usize, Result<(), Error>, Duration)>) {
    for (rank, result, elapsed) in results {
        let err = result.err().unwrap_or_else(|| panic!("{what}: rank {rank} succeeded"));
        assert!(elapsed < TIMEOUT + SLACK, "{what}: rank {rank} took {elapsed:?} ({err})");
    }
}

#[test]
fn mismatched_collectives_fail_on_every_rank() {
    for transport in TRANSPORTS {
        let t = format!("{transport:?}");
        expect_all_fail(
            &format!("{t} count"),
            ranks(transport, 3, |rank, comm| {
                let mut buf = vec![1.0f32; 1000 + rank];
                comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)
            }),
        );
        expect_all_fail(
            &format!("{t} op"),
            ranks(transport, 3, |rank, comm| {
                let mut buf = vec![1.0f32; 1000];
                comm.all_reduce_in_place(&mut buf, if rank == 1 { ReduceOp::Max } else { ReduceOp::Sum })
            }),
        );
        expect_all_fail(
            &format!("{t} dtype"),
            ranks(transport, 3, |rank, comm| {
                if rank == 0 {
                    comm.all_reduce_in_place(&mut [0i32; 64], ReduceOp::Sum)
                } else {
                    comm.all_reduce_in_place(&mut [0f32; 64], ReduceOp::Sum)
                }
            }),
        );
        expect_all_fail(
            &format!("{t} collective"),
            ranks(transport, 2, |rank, comm| {
                let mut buf = vec![1u8; 4096];
                if rank == 0 {
                    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum)?;
                } else {
                    // The broadcast root needs nothing back, so its call may complete.
                    comm.broadcast_in_place(&mut buf, 1)?;
                }
                comm.barrier()
            }),
        );
        // A non-root whose own part went through may only learn of the failure at its next
        // call: it must fail there, with nothing wrong returned.
        expect_all_fail(
            &format!("{t} root"),
            ranks(transport, 3, |rank, comm| {
                let mut buf = vec![1u8; 4096];
                comm.reduce_in_place(&mut buf, ReduceOp::Sum, usize::from(rank == 2))?;
                comm.barrier()
            }),
        );
        expect_all_fail(
            &format!("{t} order"),
            ranks(transport, 2, |rank, comm| {
                let mut a = vec![1u64; 512];
                let mut b = vec![2u64; 512];
                if rank == 0 {
                    comm.all_reduce_in_place(&mut a, ReduceOp::Sum)?;
                    comm.all_gather_in_place(&mut b)
                } else {
                    comm.all_gather_in_place(&mut b)?;
                    comm.all_reduce_in_place(&mut a, ReduceOp::Sum)
                }
            }),
        );
    }
}

#[test]
fn bad_arguments_are_rejected_and_reported_to_peers() {
    let results = ranks(TransportKind::Tcp, 3, |rank, comm| {
        let send = vec![1.0f32; 30];
        let mut recv = vec![0.0f32; if rank == 1 { 5 } else { 10 }];
        comm.reduce_scatter(&send, &mut recv, ReduceOp::Sum)
    });
    for (rank, result, elapsed) in results {
        let err = result.expect_err("must fail");
        if rank == 1 {
            // 30 elements = 3 blocks of 10 on the others, but rank 1 asked for blocks of 5: its
            // send buffer is fine and the receive buffer sets the count, so the call reaches
            // the wire and the peers see a count mismatch.
            assert!(matches!(err, Error::Mismatch { .. } | Error::RemoteFailure { .. }), "{err}");
        }
        assert!(elapsed < TIMEOUT + SLACK);
    }

    let results = ranks(TransportKind::Mem, 2, |rank, comm| {
        let send = vec![1u32; 7];
        let mut recv = vec![0u32; if rank == 0 { 13 } else { 14 }];
        comm.all_gather(&send, &mut recv)
    });
    match &results[0].1 {
        Err(Error::BufferTooSmall { buffer: "receive", needed: 56, got: 52, count: 7, dtype: DataType::U32 }) => {}
        other => panic!("expected BufferTooSmall, got {other:?}"),
    }
    match &results[1].1 {
        Err(e) => assert_eq!(e.blamed_rank(), Some(0), "{e}"),
        Ok(()) => panic!("rank 1 must learn that rank 0 failed"),
    }

    let results = ranks(TransportKind::Mem, 2, |_, comm| {
        let err = comm.broadcast_in_place(&mut [0u8; 4], 2).unwrap_err();
        assert!(matches!(err, Error::InvalidRank { what: "root", rank: 2, nranks: 2 }), "{err}");
        Ok(())
    });
    assert!(results.iter().all(|(_, r, _)| r.is_ok()));

    let results = ranks(TransportKind::Mem, 1, |_, comm| {
        let args = CollArgs::new(Collective::AllReduce, usize::MAX / 2, DataType::F64);
        // SAFETY: rejected before any pointer is used.
        let err = unsafe { comm.run_raw(&args, std::ptr::null(), std::ptr::null_mut()) }.unwrap_err();
        assert!(matches!(err, Error::CountOverflow { dtype: DataType::F64, .. }), "{err}");
        Ok(())
    });
    assert!(results[0].1.is_ok());

    let results = ranks(TransportKind::Mem, 2, |_, comm| {
        let err = comm.all_to_all_in_place(&mut [0u8; 5]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let err = comm.send(&[1u8], 7).unwrap_err();
        assert!(matches!(err, Error::Failed(_) | Error::InvalidRank { rank: 7, .. }), "{err}");
        Ok(())
    });
    assert!(results.iter().all(|(_, r, _)| r.is_ok()));
}

#[test]
fn abort_from_another_thread_ends_a_wait() {
    for transport in TRANSPORTS {
        let results =
            run_ranks(2, Config { timeout: Duration::from_secs(60), ..config(transport) }, |rank, mut comm| {
                if rank == 1 {
                    std::thread::sleep(Duration::from_secs(1));
                    return None;
                }
                let handle = comm.abort_handle();
                let aborter = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(200));
                    handle.abort();
                });
                let t0 = Instant::now();
                let err = comm.all_reduce_in_place(&mut [1.0f64; 16], ReduceOp::Sum).unwrap_err();
                aborter.join().unwrap();
                let after = comm.barrier().unwrap_err();
                Some((err, t0.elapsed(), after))
            });
        let (err, elapsed, after) = results.into_iter().next().flatten().unwrap();
        assert!(matches!(err, Error::Aborted { rank: 0 }), "{err}");
        assert!(elapsed < Duration::from_millis(900), "abort took {elapsed:?}");
        assert!(matches!(after, Error::Failed(_)), "{after}");
    }
}
