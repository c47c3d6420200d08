//! accl-run: starts N local ranks of a program, like `mpirun -np N` or `torchrun`.
//!
//! ```text
//! accl-run -n 4 -- ./train --epochs 3
//! ```
//!
//! Each rank gets `ACCL_RANK`, `ACCL_NRANKS`, `ACCL_ROOT` (a free port on `[::1]`, unless
//! `ACCL_ROOT` is set), `ACCL_LOCAL_RANK` and `ACCL_LOCAL_NRANKS`, so that
//! `Communicator::from_env()` works. accl-run exits with 0 when every rank did, else with the
//! status of the first rank that failed (128 + signal for a signal).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "accl-run", version, about = "Start N local ranks of an accl program", trailing_var_arg = true)]
struct Args {
    /// Number of ranks to start
    #[arg(short = 'n', long = "nranks", value_parser = clap::value_parser!(u64).range(1..))]
    nranks: u64,
    /// The program and its arguments
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true, value_name = "PROGRAM")]
    command: Vec<OsString>,
}

fn main() {
    let args = Args::parse();
    let program = PathBuf::from(&args.command[0]);
    match accl_tools::launch::launch(args.nranks as usize, &program, &args.command[1..], &[]) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("accl-run: {e}");
            std::process::exit(127);
        }
    }
}
