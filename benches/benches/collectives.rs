//! Collectives as criterion measures them: ranks are threads of this process over the TCP
//! transport on [::1] (and the in-process one), each measurement runs `iters` calls on every
//! rank and reports the slowest rank's time. `accl-perf` is the tool for nccl-tests style
//! tables; this bench tracks regressions.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use accl_core::{Communicator, Config, ReduceOp, TransportKind, UniqueId};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// A group of rank threads that run `iters` allreduces of `count` f32 on command.
struct Ranks {
    commands: Vec<mpsc::Sender<Option<u64>>>,
    results: mpsc::Receiver<Duration>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl Ranks {
    fn start(n: usize, transport: TransportKind, count: usize) -> Ranks {
        let id = UniqueId::new().expect("rendezvous");
        let (done_tx, results) = mpsc::channel();
        let mut commands = Vec::new();
        let mut handles = Vec::new();
        for rank in 0..n {
            let (tx, rx) = mpsc::channel::<Option<u64>>();
            commands.push(tx);
            let done = done_tx.clone();
            handles.push(thread::spawn(move || {
                let config = Config { transport, ..Config::from_env().expect("ACCL_* settings") };
                let mut comm = Communicator::init(&id, rank, n, config).expect("init");
                let mut buf = vec![1.0f32; count];
                while let Ok(Some(iters)) = rx.recv() {
                    comm.barrier().expect("barrier");
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).expect("allreduce");
                    }
                    done.send(t0.elapsed()).expect("report");
                }
            }));
        }
        Ranks { commands, results, handles }
    }

    fn run(&self, iters: u64) -> Duration {
        for c in &self.commands {
            c.send(Some(iters)).expect("command");
        }
        (0..self.commands.len()).map(|_| self.results.recv().expect("result")).max().unwrap_or_default()
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &self.commands {
            let _ = c.send(None);
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn allreduce(c: &mut Criterion) {
    let mut group = c.benchmark_group("allreduce_f32_sum");
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for (transport, name) in [(TransportKind::Tcp, "tcp"), (TransportKind::Mem, "mem")] {
        for n in [2, 4] {
            for bytes in [8usize, 64 << 10, 4 << 20] {
                let ranks = Ranks::start(n, transport, bytes / 4);
                group.throughput(Throughput::Bytes(bytes as u64));
                group.bench_with_input(BenchmarkId::new(format!("{name}/{n}ranks"), bytes), &bytes, |b, _| {
                    b.iter_custom(|iters| ranks.run(iters))
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, allreduce);
criterion_main!(benches);
