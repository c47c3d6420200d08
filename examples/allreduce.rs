//! Averages a "gradient" across ranks, the way a data-parallel training step does.
//!
//! ```text
//! cargo build --release -p accl-tools -p accl-examples --examples
//! target/release/accl-run -n 4 -- target/release/examples/allreduce
//! ```

use accl_core::{Communicator, ReduceOp};

fn main() -> Result<(), accl_core::Error> {
    // ACCL_RANK, ACCL_NRANKS and ACCL_ROOT come from accl-run (or any launcher).
    let mut comm = Communicator::from_env()?;
    let (rank, n) = (comm.rank(), comm.nranks());
    let mut grads: Vec<f32> = (0..1_000_000).map(|i| (rank * 1000 + i % 1000) as f32).collect();
    comm.all_reduce_in_place(&mut grads, ReduceOp::Avg)?;
    // Every rank now holds the mean over ranks: 1000 * (n - 1) / 2 + i % 1000.
    let expect = 1000.0 * (n as f32 - 1.0) / 2.0;
    assert!((grads[0] - expect).abs() < 1e-3, "rank {rank}: {} != {expect}", grads[0]);
    let mut total = [0u64];
    comm.all_reduce(&[grads.len() as u64], &mut total, ReduceOp::Sum)?;
    if rank == 0 {
        println!(
            "averaged {} floats over {n} ranks via {} ({} lanes)",
            total[0] / n as u64,
            comm.transport_name(),
            comm.lanes()
        );
    }
    Ok(())
}
