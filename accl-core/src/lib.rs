//! accl: collective communication for AI training clusters.
//!
//! A [`Communicator`] runs allreduce, reduce, all2all, broadcast, allgather, reduce_scatter,
//! barrier and send/recv across processes on one or many hosts. The collectives are
//! [schedules](algo) that run unchanged on every [transport]; today that is IPv6 TCP
//! (one socket per lane, optional flow label per lane) and an in-process transport for tests.
//!
//! ```no_run
//! use accl_core::{Communicator, Config, ReduceOp, UniqueId};
//! // Rank 0 creates the id and hands its string to the others out of band.
//! let id = UniqueId::new()?;
//! let mut comm = Communicator::init(&id, 0, 1, Config::from_env()?)?;
//! let send = vec![1.0f32; 1 << 20];
//! let mut recv = vec![0.0f32; 1 << 20];
//! comm.all_reduce(&send, &mut recv, ReduceOp::Sum)?;
//! # Ok::<(), accl_core::Error>(())
//! ```

pub mod addr;
pub mod algo;
pub mod bootstrap;
pub mod comm;
pub mod config;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod reduce;
pub mod testkit;
pub mod transport;

pub use algo::{Algorithm, Collective};
pub use bootstrap::UniqueId;
pub use comm::{AbortHandle, CollArgs, Communicator, LaneInfo};
pub use config::{Config, TransportKind};
pub use dtype::{DataType, Element, ReduceOp};
pub use error::{Error, Result};
pub use half::{bf16, f16};
