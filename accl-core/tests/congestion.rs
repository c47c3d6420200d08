//! `ACCL_TCP_CONGESTION`: which congestion control the TCP lanes' sockets use, read back from
//! the sockets themselves (`getsockopt(TCP_CONGESTION)` through `Communicator::lane_info`).

mod common;

use std::time::{Duration, Instant};

use accl_core::config::TcpCongestion;
use accl_core::{Communicator, Config, Error, ReduceOp, TransportKind, UniqueId};
use common::{run_ranks, test_config};
use socket2::{Domain, Protocol, Socket, Type};

/// The congestion control of every lane of every rank, after an allreduce that checks the
/// lanes carry data.
fn lane_congestion(config: Config) -> Vec<Vec<Option<String>>> {
    run_ranks(3, config, |rank, mut comm| {
        let mut buf = vec![rank as f32 + 1.0; 100_000];
        comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
        assert!(buf.iter().all(|v| *v == 6.0), "rank {rank}: wrong sum");
        comm.lane_info().into_iter().map(|l| l.congestion).collect()
    })
}

/// Whether this process may give a socket `name`.
fn permitted(name: &str) -> bool {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).unwrap();
    sock.set_tcp_congestion(name.as_bytes()).is_ok()
}

fn tcp(cc: TcpCongestion) -> Config {
    Config { tcp_congestion: cc, ..test_config(TransportKind::Tcp) }
}

fn assert_every_lane(all: &[Vec<Option<String>>], want: &str) {
    for (rank, lanes) in all.iter().enumerate() {
        assert_eq!(lanes.len(), 2 * 3, "rank {rank}: 2 peers x 3 lanes");
        for (i, cc) in lanes.iter().enumerate() {
            assert_eq!(cc.as_deref(), Some(want), "rank {rank} lane {i}");
        }
    }
}

#[test]
fn same_host_lanes_default_to_a_congestion_control_that_does_not_pace() {
    let want = if permitted("cubic") { "cubic" } else { "reno" };
    assert_every_lane(&lane_congestion(tcp(TcpCongestion::Auto)), want);
}

#[test]
fn a_named_congestion_control_is_used_on_every_lane() {
    assert_every_lane(&lane_congestion(tcp(TcpCongestion::Named("reno".into()))), "reno");
}

#[test]
fn system_keeps_the_kernel_default() {
    let default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap();
    assert_every_lane(&lane_congestion(tcp(TcpCongestion::System)), default.trim());
}

#[test]
fn an_unknown_congestion_control_fails_every_rank_at_once() {
    let id = UniqueId::new().unwrap();
    let config = Config { timeout: Duration::from_secs(30), ..tcp(TcpCongestion::Named("no_such_cc".into())) };
    let start = Instant::now();
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let config = config.clone();
            std::thread::spawn(move || Communicator::init(&id, rank, 2, config).err())
        })
        .collect();
    for (rank, h) in handles.into_iter().enumerate() {
        match h.join().unwrap() {
            Some(Error::InvalidConfig { name, value, reason }) => {
                assert_eq!((name.as_str(), value.as_str()), ("ACCL_TCP_CONGESTION", "no_such_cc"), "rank {rank}");
                assert!(reason.contains("not available"), "rank {rank}: {reason}");
            }
            other => panic!("rank {rank}: expected an invalid setting, got {other:?}"),
        }
    }
    // Both ranks refuse it before any lane connects, so neither waits for the other.
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

#[test]
fn in_process_lanes_have_no_congestion_control() {
    let all = run_ranks(2, test_config(TransportKind::Mem), |_, comm| comm.lane_info());
    assert!(all.iter().flatten().all(|l| l.congestion.is_none()));
}
