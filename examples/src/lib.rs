//! Example programs for accl: see `allreduce.rs` and `unique_id.rs` beside this crate.
