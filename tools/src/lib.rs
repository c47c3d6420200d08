//! Shared code of the accl command-line tools.
//!
//! - [`launch`]: starts N local ranks of a program with the `ACCL_*` environment a
//!   [`accl_core::Communicator::from_env`] expects (used by `accl-run` and `accl-perf --ranks`).
//! - [`verify`]: the data patterns and checks of `accl-perf -c 1`.

pub mod launch;
pub mod verify;
