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
        segment_size: 8 << 10,
        timeout: Duration::from_secs(20),
        spin: Duration::from_micros(20),
        reduce_threads: 1,
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
