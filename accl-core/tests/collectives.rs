//! The collective suite over every transport, ranks as threads: every collective x dtype x op x
//! size (0, 1, odd, around chunk/lane/segment boundaries, several MiB) x rank count x in/out of
//! place, against a serial reference (see `accl_core::testkit`).

mod common;

use accl_core::testkit::{run_suite, SuiteOptions};
use accl_core::{Config, TransportKind};
use common::{registered_memory_checks, run_ranks, test_config};

/// TCP with flow labels: one simplex connection per direction and lane.
fn simplex() -> Config {
    Config { flow_label: 0x3a000, ..test_config(TransportKind::Tcp) }
}

/// Ranks that yield their core after each reduction of 16 KiB or more (what `ACCL_YIELD=auto`
/// does with more ranks than cores), with segments large enough to reach that size.
fn yielding() -> Config {
    Config { yield_cpu: Some(true), segment_size: Some(32 << 10), ..test_config(TransportKind::Tcp) }
}

fn suite(config: Config, nranks: usize) {
    let opts = SuiteOptions::around(config.chunk_size);
    let results = run_ranks(nranks, config, move |rank, mut comm| {
        run_suite(&mut comm, &opts).map_err(|e| format!("rank {rank}: {e}"))
    });
    for r in results {
        let calls = r.unwrap_or_else(|e| panic!("{e}"));
        assert!(calls > 1000, "suite ran only {calls} calls");
    }
}

macro_rules! suite_tests {
    ($($name:ident: $config:expr, $n:expr;)*) => {$(
        #[test]
        fn $name() {
            suite($config, $n);
        }
    )*};
}

suite_tests! {
    mem_1_rank: test_config(TransportKind::Mem), 1;
    mem_2_ranks: test_config(TransportKind::Mem), 2;
    mem_3_ranks: test_config(TransportKind::Mem), 3;
    mem_4_ranks: test_config(TransportKind::Mem), 4;
    mem_5_ranks: test_config(TransportKind::Mem), 5;
    mem_8_ranks: test_config(TransportKind::Mem), 8;
    tcp_1_rank: test_config(TransportKind::Tcp), 1;
    tcp_2_ranks: test_config(TransportKind::Tcp), 2;
    tcp_3_ranks: test_config(TransportKind::Tcp), 3;
    tcp_4_ranks: test_config(TransportKind::Tcp), 4;
    tcp_5_ranks: test_config(TransportKind::Tcp), 5;
    tcp_8_ranks: test_config(TransportKind::Tcp), 8;
    tcp_simplex_3_ranks: simplex(), 3;
    tcp_simplex_4_ranks: simplex(), 4;
    tcp_yielding_4_ranks: yielding(), 4;
}

#[test]
fn registered_memory_on_every_transport() {
    for transport in [TransportKind::Mem, TransportKind::Tcp] {
        // 3 ranks, a count that is no multiple of anything: partial chunks and segments.
        let results = run_ranks(3, test_config(transport), |_, mut comm| registered_memory_checks(&mut comm, 50_001));
        for (rank, r) in results.into_iter().enumerate() {
            assert!(r.is_ok(), "{transport:?} rank {rank}: {r:?}");
        }
    }
}
