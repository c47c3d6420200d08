//! accl-check: runs the collective correctness suite (or a failure scenario) on a communicator
//! built from the environment, so that `accl-run -n N -- accl-check` tests a real multi-process
//! job over TCP the way the thread tests test one process.
//!
//! ```text
//! accl-check                 every collective x dtype x op x size x in/out of place, checked
//! accl-check --die R         rank R kills itself (SIGKILL) after one allreduce; the others
//!                            must each fail, naming rank R, within ACCL_TIMEOUT
//! accl-check --absent R      rank R never joins; the others must fail naming it
//! accl-check --absent R --late L
//!                            as --absent, and rank L joins only after the rendezvous timed out:
//!                            it too must fail naming R (not the root it found late)
//! accl-check --mismatch      rank 1 calls allreduce with another count; all must fail
//! ```
//! Exits 0 when the suite passes or the scenario ends as expected on this rank.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use accl_core::testkit::{run_suite, SuiteOptions};
use accl_core::{Communicator, Config, Error, ReduceOp};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rank: usize = std::env::var("ACCL_RANK").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let arg_rank = |i: usize| args.get(i + 1).and_then(|v| v.parse::<usize>().ok());
    let result = match args.first().map(String::as_str) {
        None => suite(rank),
        Some("--die") => match arg_rank(0) {
            Some(victim) => die(rank, victim),
            None => Err("--die needs a rank".into()),
        },
        Some("--absent") => match arg_rank(0) {
            Some(absent) => match (args.get(2).map(String::as_str), arg_rank(2)) {
                (None, _) => absent_rank(rank, absent, None),
                (Some("--late"), Some(late)) => absent_rank(rank, absent, Some(late)),
                _ => Err("--absent R takes only --late L after it".into()),
            },
            None => Err("--absent needs a rank".into()),
        },
        Some("--mismatch") => mismatch(rank),
        Some(other) => Err(format!("unknown argument {other:?}; see the source's doc comment for usage")),
    };
    match result {
        Ok(msg) => {
            println!("accl-check: rank {rank}: {msg}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            println!("accl-check: rank {rank}: FAIL: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn timeout() -> Duration {
    Config::from_env().map(|c| c.timeout).unwrap_or(Duration::from_secs(60))
}

/// Errors must arrive within the timeout plus this much (start-up and scheduling).
const SLACK: Duration = Duration::from_secs(5);

fn suite(rank: usize) -> Result<String, String> {
    let mut comm = Communicator::from_env().map_err(|e| format!("init: {e}"))?;
    let opts = SuiteOptions::around(comm.config().chunk_size);
    let t0 = Instant::now();
    let calls = run_suite(&mut comm, &opts).map_err(|e| e.to_string())?;
    let _ = rank;
    Ok(format!(
        "PASS {calls} calls, {} ranks, transport {}, {} lanes, {:.1} s",
        comm.nranks(),
        comm.transport_name(),
        comm.lanes(),
        t0.elapsed().as_secs_f64()
    ))
}

/// Checks that `err` arrived in time and blames `culprit`.
fn expect_blame(err: Error, culprit: usize, started: Instant) -> Result<String, String> {
    let elapsed = started.elapsed();
    if err.blamed_rank() != Some(culprit) {
        return Err(format!("error does not name rank {culprit}: {err}"));
    }
    if elapsed > timeout() + SLACK {
        return Err(format!("error came after {elapsed:?}: {err}"));
    }
    Ok(format!("expected error after {} ms naming rank {culprit}: {err}", elapsed.as_millis()))
}

fn die(rank: usize, victim: usize) -> Result<String, String> {
    let mut comm = Communicator::from_env().map_err(|e| format!("init: {e}"))?;
    let mut buf = vec![1.0f32; 1 << 18];
    let started = Instant::now();
    if rank == victim {
        comm.all_reduce_in_place(&mut buf, ReduceOp::Sum).map_err(|e| e.to_string())?;
        // SAFETY: kill(2) on our own pid.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!("SIGKILL returned");
    }
    // The victim may die while a survivor is still in the first call (a killed process's
    // unsent data is lost), so every call counts.
    loop {
        if let Err(e) = comm.all_reduce_in_place(&mut buf, ReduceOp::Sum) {
            return expect_blame(e, victim, started);
        }
    }
}

fn absent_rank(rank: usize, absent: usize, late: Option<usize>) -> Result<String, String> {
    if rank == absent {
        return Ok("staying away".into());
    }
    if late == Some(rank) {
        // Past the root's deadline (it starts when the first rank arrives), well within its grace.
        std::thread::sleep(timeout() + Duration::from_millis(300));
    }
    let started = Instant::now();
    match Communicator::from_env() {
        Ok(_) => Err("init succeeded without every rank".into()),
        Err(e @ Error::RendezvousTimeout { .. }) => expect_blame(e, absent, started),
        Err(e) => Err(format!("unexpected error: {e}")),
    }
}

fn mismatch(rank: usize) -> Result<String, String> {
    let mut comm = Communicator::from_env().map_err(|e| format!("init: {e}"))?;
    let started = Instant::now();
    let mut buf = vec![1i64; 4096 + usize::from(rank == 1)];
    match comm.all_reduce_in_place(&mut buf, ReduceOp::Sum) {
        Ok(()) => Err("a mismatched allreduce succeeded".into()),
        Err(e) if started.elapsed() <= timeout() + SLACK => Ok(format!("expected error: {e}")),
        Err(e) => Err(format!("error came after {:?}: {e}", started.elapsed())),
    }
}
