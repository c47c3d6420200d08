//! Shared helpers: run n ranks as threads of this test process.
#![allow(dead_code)]

use std::time::Duration;

use accl_core::{Communicator, Config, TransportKind, UniqueId};

/// A configuration with small chunks and segments, so that modest sizes cross chunk, lane and
/// segment boundaries, and a timeout short enough for failure tests.
pub fn test_config(transport: TransportKind) -> Config {
    Config {
        transport,
        lanes: 3,
        chunk_size: 16 << 10,
        segment_size: Some(8 << 10),
        timeout: Duration::from_secs(20),
        spin: Duration::from_micros(20),
        reduce_threads: 1,
        // Low enough that the suite's larger sizes take the streaming-store reductions.
        stream_min: Some(32 << 10),
        ..Config::default()
    }
}

/// Runs `body(rank, comm)` on n threads with communicators built from `config`; returns each
/// rank's result in rank order.
pub fn run_ranks<R: Send + 'static>(
    n: usize,
    config: Config,
    body: impl Fn(usize, Communicator) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let id = UniqueId::new().expect("rendezvous root");
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let (config, body) = (config.clone(), body.clone());
            std::thread::Builder::new()
                .name(format!("rank{rank}"))
                .spawn(move || {
                    let comm =
                        Communicator::init(&id, rank, n, config).unwrap_or_else(|e| panic!("rank {rank}: init: {e}"));
                    body(rank, comm)
                })
                .expect("spawn rank thread")
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
}

/// Collectives from registered memory (zero-copy sends where the transport has them), then
/// the same buffers after deregistering, with exact results; and the registration rules.
/// Every rank calls it; `count` elements per rank.
pub fn registered_memory_checks(comm: &mut Communicator, count: usize) -> Result<(), accl_core::Error> {
    use accl_core::{Error, ReduceOp};
    let (rank, n) = (comm.rank(), comm.nranks());
    let send: Vec<f32> = (0..count).map(|i| (rank + i % 7) as f32).collect();
    let mut recv = vec![0f32; count];
    let bytes = count * 4;
    // SAFETY: both vectors outlive the registrations (deregistered below).
    unsafe {
        comm.register_memory(send.as_ptr() as *const u8, bytes)?;
        comm.register_memory(recv.as_ptr() as *const u8, bytes)?;
        // Inside a registered range: not registered again.
        comm.register_memory(send.as_ptr().add(count / 2) as *const u8, bytes / 4)?;
    }
    assert_eq!(comm.registered_memory().len(), 2, "rank {rank}: a covered range was registered again");
    let sum = |i: usize| (0..n).map(|r| (r + i % 7) as f32).sum::<f32>();
    for round in 0..2 {
        recv.fill(0.0);
        comm.all_reduce(&send, &mut recv, ReduceOp::Sum)?;
        assert!(recv.iter().enumerate().all(|(i, &x)| x == sum(i)), "rank {rank} round {round}: allreduce");
        comm.all_reduce_in_place(&mut recv, ReduceOp::Max)?;
        assert!(recv.iter().enumerate().all(|(i, &x)| x == sum(i)), "rank {rank} round {round}: in place");
        let (to, from) = ((rank + 1) % n, (rank + n - 1) % n);
        comm.send_recv(&send, to, &mut recv, from)?;
        assert!(
            recv.iter().enumerate().all(|(i, &x)| x == (from + i % 7) as f32),
            "rank {rank} round {round}: sendrecv"
        );
        if round == 0 {
            comm.deregister_memory(send.as_ptr() as *const u8)?;
            comm.deregister_memory(recv.as_ptr() as *const u8)?;
            assert!(comm.registered_memory().is_empty());
        }
    }
    assert!(matches!(comm.deregister_memory(send.as_ptr() as *const u8), Err(Error::InvalidArgument(_))));
    // SAFETY: rejected before anything is registered.
    let bad = unsafe { comm.register_memory(std::ptr::null(), 16) };
    assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
    Ok(())
}
