//! Communicator set-up: IPv4 as well as IPv6 rendezvous, unique ids as strings, settings that
//! must agree across ranks.

use std::time::Duration;

use accl_core::{Communicator, Config, Error, ReduceOp, TransportKind, UniqueId};

fn config() -> Config {
    Config { transport: TransportKind::Tcp, timeout: Duration::from_secs(10), ..Config::default() }
}

fn allreduce_over(
    id: UniqueId,
    n: usize,
    config_of: impl Fn(usize) -> Config + Send + Sync + Copy + 'static,
) -> Vec<Result<u64, Error>> {
    let text = id.to_string();
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let text = text.clone();
            std::thread::spawn(move || {
                let id: UniqueId = text.parse()?;
                let mut comm = Communicator::init(&id, rank, n, config_of(rank))?;
                let mut v = [rank as u64 + 1];
                comm.all_reduce_in_place(&mut v, ReduceOp::Sum)?;
                Ok(v[0])
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn ipv6_and_ipv4_rendezvous() {
    for addr in ["[::1]:0", "127.0.0.1:0"] {
        let id = UniqueId::serve(addr.parse().unwrap()).unwrap();
        assert_eq!(id.addr().is_ipv6(), addr.starts_with('['));
        for r in allreduce_over(id, 3, |_| config()) {
            assert_eq!(r.unwrap(), 6, "over {addr}");
        }
    }
}

#[test]
fn ranks_must_agree_on_lanes() {
    let id = UniqueId::new().unwrap();
    let results = allreduce_over(id, 2, |rank| Config { lanes: 1 + rank, ..config() });
    for r in results {
        match r {
            Err(Error::InvalidConfig { name, .. }) => assert!(name.contains("ACCL_LANES")),
            other => panic!("expected a settings mismatch, got {other:?}"),
        }
    }
}

#[test]
fn rank_out_of_range_is_rejected() {
    let id = UniqueId::new().unwrap();
    let err = Communicator::init(&id, 3, 3, config()).err().unwrap();
    assert!(matches!(err, Error::InvalidRank { rank: 3, nranks: 3, .. }), "{err}");
}
