//! NCCL-style set-up: rank 0 creates a `UniqueId`, hands its string to the others (here:
//! threads of one process; in real jobs: any out-of-band channel), and every rank joins.
//!
//! ```text
//! cargo run --release -p accl-examples --example unique_id
//! ```

use accl_core::{Communicator, Config, ReduceOp, UniqueId};

fn main() -> Result<(), accl_core::Error> {
    let n = 3;
    let id = UniqueId::new()?; // starts the rendezvous service on [::1] (or ACCL_LISTEN_ADDR)
    let text = id.to_string();
    println!("unique id: {text}");
    let ranks: Vec<_> = (0..n)
        .map(|rank| {
            let text = text.clone();
            std::thread::spawn(move || -> Result<i64, accl_core::Error> {
                let id: UniqueId = text.parse()?;
                let mut comm = Communicator::init(&id, rank, n, Config::from_env()?)?;
                let mut v = [rank as i64 + 1];
                comm.all_reduce_in_place(&mut v, ReduceOp::Prod)?;
                comm.barrier()?;
                Ok(v[0])
            })
        })
        .collect();
    for (rank, h) in ranks.into_iter().enumerate() {
        println!("rank {rank}: product = {}", h.join().expect("rank thread")?);
    }
    Ok(())
}
