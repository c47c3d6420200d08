//! A correctness suite that any rank runs against any communicator: every collective, dtype
//! and op, in and out of place, compared with a serial reference that each rank computes for
//! itself (every rank can generate every other rank's input).
//!
//! Integers are compared exactly (sums and products wrap, as the library defines them). Floats
//! are compared within a bound: for sum and avg `n * eps * sum(|x|)`, for prod
//! `2 * (n + 1) * eps * |ref|`, where `eps` is the unit roundoff of the type (2^-11 for f16,
//! 2^-8 for bf16, 2^-24 for f32, 2^-53 for f64) and `n` the number of ranks: each rank-to-rank
//! combination rounds once. Min and max are exact. Allreduce results must also be bitwise
//! identical on every rank.

use std::fmt;

use crate::algo::{AlgoChoice, Algorithm, Collective};
use crate::comm::{CollArgs, Communicator};
use crate::dtype::{DataType, ReduceOp};

/// What to cover.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    /// Element counts to try.
    pub counts: Vec<usize>,
    /// Element counts tried only with f32 and i32 (large sizes).
    pub large_counts: Vec<usize>,
    /// Whether to run every allreduce/reduce/broadcast algorithm (else only the automatic one).
    pub all_algorithms: bool,
}

impl SuiteOptions {
    /// Counts around the chunk and segment sizes of `chunk_bytes`, plus 0, 1 and an odd count.
    pub fn around(chunk_bytes: usize) -> SuiteOptions {
        // In elements of 4 bytes; other element sizes shift the boundaries, which is fine.
        let c = chunk_bytes / 4;
        SuiteOptions {
            counts: vec![0, 1, 7, c - 1, c + 1, 3 * c + 5],
            large_counts: vec![(3 << 20) / 4 + 3],
            all_algorithms: true,
        }
    }
}

/// A failed check.
#[derive(Debug)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

fn hash(rank: usize, i: usize, salt: u64) -> u64 {
    // splitmix64
    let mut z =
        (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ salt;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element access for the suite, one impl per dtype.
trait Val: Copy + PartialEq + fmt::Debug {
    const FLOAT: bool;
    const EPS: f64;
    fn gen(h: u64, op: ReduceOp) -> Self;
    fn wrap_combine(a: Self, b: Self, op: ReduceOp) -> Self;
    fn div(a: Self, n: usize) -> Self;
    fn f64(self) -> f64;
    fn from_bytes(b: &[u8]) -> Self;
    fn put(self, out: &mut [u8]);
}

macro_rules! int_val {
    ($($t:ty),*) => {$(
        impl Val for $t {
            const FLOAT: bool = false;
            const EPS: f64 = 0.0;
            fn gen(h: u64, _op: ReduceOp) -> Self { h as $t }
            fn wrap_combine(a: Self, b: Self, op: ReduceOp) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                }
            }
            fn div(a: Self, n: usize) -> Self { a / (n as $t) }
            fn f64(self) -> f64 { self as f64 }
            fn from_bytes(b: &[u8]) -> Self { <$t>::from_ne_bytes(b.try_into().expect("element size")) }
            fn put(self, out: &mut [u8]) { out.copy_from_slice(&self.to_ne_bytes()) }
        }
    )*};
}
int_val!(i8, u8, i32, u32, i64, u64);

macro_rules! float_val {
    ($($t:ty, $eps:expr, $from:expr, $to:expr);*) => {$(
        impl Val for $t {
            const FLOAT: bool = true;
            const EPS: f64 = $eps;
            fn gen(h: u64, op: ReduceOp) -> Self {
                let x = if op == ReduceOp::Prod { 0.5 + (h % 1000) as f64 / 1000.0 } else { ((h % 8001) as f64 - 4000.0) / 1000.0 };
                $from(x)
            }
            fn wrap_combine(a: Self, _b: Self, _op: ReduceOp) -> Self { a }
            fn div(a: Self, _n: usize) -> Self { a }
            fn f64(self) -> f64 { $to(self) }
            fn from_bytes(b: &[u8]) -> Self { <$t>::from_ne_bytes(b.try_into().expect("element size")) }
            fn put(self, out: &mut [u8]) { out.copy_from_slice(&self.to_ne_bytes()) }
        }
    )*};
}
float_val!(
    f32, 1.0 / (1u64 << 24) as f64, |x: f64| x as f32, |v: f32| v as f64;
    f64, 1.0 / (1u64 << 53) as f64, |x: f64| x, |v: f64| v;
    half::f16, 1.0 / 2048.0, half::f16::from_f64, |v: half::f16| v.to_f64();
    half::bf16, 1.0 / 256.0, half::bf16::from_f64, |v: half::bf16| v.to_f64()
);

/// The reference for element `i` of a reduction over all ranks, and the allowed error.
fn reference<T: Val>(n: usize, op: ReduceOp, i: usize, salt: u64) -> (T, f64, f64) {
    let val = |r: usize| T::gen(hash(r, i, salt), op);
    if !T::FLOAT {
        let mut acc = val(0);
        for r in 1..n {
            acc = T::wrap_combine(acc, val(r), op);
        }
        if op == ReduceOp::Avg {
            acc = T::div(acc, n);
        }
        return (acc, acc.f64(), 0.0);
    }
    let (mut sum, mut abs, mut prod, mut min, mut max) = (0.0f64, 0.0f64, 1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for r in 0..n {
        let x = val(r).f64();
        sum += x;
        abs += x.abs();
        prod *= x;
        min = min.min(x);
        max = max.max(x);
    }
    let nf = n as f64;
    let (value, bound) = match op {
        ReduceOp::Sum => (sum, nf * T::EPS * abs),
        ReduceOp::Avg => (sum / nf, (nf * T::EPS * abs) / nf + 2.0 * T::EPS * (sum / nf).abs()),
        ReduceOp::Prod => (prod, 2.0 * (nf + 1.0) * T::EPS * prod.abs()),
        ReduceOp::Min => (min, 0.0),
        ReduceOp::Max => (max, 0.0),
    };
    (val(0), value, bound)
}

fn check_reduced<T: Val>(
    what: &str,
    got: &[u8],
    n: usize,
    op: ReduceOp,
    index0: usize,
    salt: u64,
) -> Result<(), Failure> {
    let e = std::mem::size_of::<T>();
    for (k, chunk) in got.chunks_exact(e).enumerate() {
        let g = T::from_bytes(chunk);
        let (exact, value, bound) = reference::<T>(n, op, index0 + k, salt);
        let ok = if T::FLOAT { (g.f64() - value).abs() <= bound } else { g == exact };
        if !ok {
            return Err(Failure(format!("{what}: element {k} is {g:?}, expected {value} (bound {bound:e})")));
        }
    }
    Ok(())
}

fn fill<T: Val>(out: &mut [u8], rank: usize, index0: usize, op: ReduceOp, salt: u64) {
    let e = std::mem::size_of::<T>();
    for (k, chunk) in out.chunks_exact_mut(e).enumerate() {
        T::gen(hash(rank, index0 + k, salt), op).put(chunk);
    }
}

/// 8-byte aligned zeroed bytes.
fn buffer(bytes: usize) -> Vec<u64> {
    vec![0u64; bytes.div_ceil(8).max(1)]
}

fn bytes_mut(v: &mut [u64], len: usize) -> &mut [u8] {
    // SAFETY: u64 storage viewed as bytes, within its length.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, len) }
}

/// Runs the suite on `comm`; every rank must call it with the same options. Returns the number
/// of calls checked.
pub fn run_suite(comm: &mut Communicator, opts: &SuiteOptions) -> Result<usize, Box<dyn std::error::Error>> {
    let mut calls = 0;
    let reductions = [Collective::AllReduce, Collective::Reduce, Collective::ReduceScatter];
    let moves = [Collective::Broadcast, Collective::AllGather, Collective::AllToAll, Collective::SendRecv];
    for coll in reductions {
        let algos: Vec<Option<Algorithm>> = if opts.all_algorithms {
            Algorithm::ALL.into_iter().filter(|a| a.supports(coll)).map(Some).collect()
        } else {
            vec![None]
        };
        for algo in algos {
            comm.set_algorithms(
                algo.map_or_else(AlgoChoice::default, |a| AlgoChoice::parse(a.name()).expect("known algorithm")),
            );
            for dtype in DataType::ALL {
                for op in ReduceOp::ALL {
                    for &count in &opts.counts {
                        for in_place in [false, true] {
                            one_call(comm, Call { coll, dtype, op, count, in_place, salt: calls as u64 })?;
                            calls += 1;
                        }
                    }
                }
                if matches!(dtype, DataType::F32 | DataType::I32 | DataType::Bf16) {
                    for &count in &opts.large_counts {
                        for in_place in [false, true] {
                            let op = ReduceOp::Sum;
                            one_call(comm, Call { coll, dtype, op, count, in_place, salt: calls as u64 })?;
                            calls += 1;
                        }
                    }
                }
            }
        }
    }
    comm.set_algorithms(AlgoChoice::default());
    for coll in moves {
        let algos: Vec<Option<Algorithm>> = if opts.all_algorithms && coll == Collective::Broadcast {
            vec![Some(Algorithm::Tree), Some(Algorithm::Chain)]
        } else {
            vec![None]
        };
        for algo in algos {
            comm.set_algorithms(
                algo.map_or_else(AlgoChoice::default, |a| AlgoChoice::parse(a.name()).expect("known algorithm")),
            );
            for dtype in [DataType::U8, DataType::F16, DataType::F32, DataType::F64] {
                let counts =
                    opts.counts.iter().chain(if dtype == DataType::F32 { &opts.large_counts[..] } else { &[] });
                for &count in counts {
                    for in_place in [false, true] {
                        let op = ReduceOp::Sum;
                        one_call(comm, Call { coll, dtype, op, count, in_place, salt: calls as u64 })?;
                        calls += 1;
                    }
                }
            }
        }
    }
    comm.set_algorithms(AlgoChoice::default());
    comm.barrier()?;
    Ok(calls + 1)
}

/// One checked call of the suite.
#[derive(Clone, Copy)]
struct Call {
    coll: Collective,
    dtype: DataType,
    op: ReduceOp,
    count: usize,
    in_place: bool,
    /// Varies the data (and the root) from call to call.
    salt: u64,
}

fn one_call(comm: &mut Communicator, call: Call) -> Result<(), Box<dyn std::error::Error>> {
    crate::dispatch_dtype!(call.dtype, call_typed(comm, call))
}

fn call_typed<T: Val>(comm: &mut Communicator, call: Call) -> Result<(), Box<dyn std::error::Error>> {
    let Call { coll, dtype, op, count, in_place, salt } = call;
    let (r, n, e) = (comm.rank(), comm.nranks(), dtype.size());
    let root = (salt as usize) % n;
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    let args = match coll {
        Collective::SendRecv => CollArgs::new(coll, count, dtype).peers(Some(next), Some(prev)),
        _ => CollArgs::new(coll, count, dtype).op(op).root(root),
    };
    let what = format!(
        "rank {r}/{n}: {coll} {dtype} {op} count={count} {} algo={}",
        if in_place { "in-place" } else { "out-of-place" },
        comm.algorithm(&args)
    );
    let blk = count * e;
    let all = n * blk;
    let (in_len, out_len) = args.buffer_bytes(r, n)?;
    // Inputs: reductions use per-op values; data movement uses op Sum values.
    let mut input = buffer(in_len.max(all));
    let mut output = buffer(out_len.max(all));
    let in_bytes = bytes_mut(&mut input, in_len);
    fill::<T>(in_bytes, r, 0, op, salt);
    let in_ptr = input.as_ptr() as *const u8;
    let out_ptr = output.as_mut_ptr() as *mut u8;
    // SAFETY (run_raw below): buffers sized per CollArgs::buffer_bytes, live for the call.
    let result = if in_place {
        // Put the input where the in-place convention expects it, then call with aliased pointers.
        let out_all = bytes_mut(&mut output, out_len.max(in_len).max(all));
        let (send, recv): (*const u8, *mut u8) = match coll {
            Collective::AllGather => {
                out_all[r * blk..(r + 1) * blk].copy_from_slice(&bytes_mut(&mut input, blk)[..]);
                (unsafe { out_ptr.add(r * blk) } as *const u8, out_ptr)
            }
            Collective::ReduceScatter => {
                out_all[..all].copy_from_slice(&bytes_mut(&mut input, all)[..]);
                (out_ptr as *const u8, unsafe { out_ptr.add(r * blk) })
            }
            _ => {
                out_all[..in_len].copy_from_slice(&bytes_mut(&mut input, in_len)[..]);
                (out_ptr as *const u8, out_ptr)
            }
        };
        unsafe { comm.run_raw(&args, send, recv) }
    } else {
        unsafe { comm.run_raw(&args, in_ptr, out_ptr) }
    };
    result.map_err(|err| Failure(format!("{what}: {err}")))?;
    let out = bytes_mut(&mut output, out_len.max(all));
    let mut expect = vec![0u8; all.max(blk)];
    match coll {
        Collective::AllReduce => {
            check_reduced::<T>(&what, &out[..blk], n, op, 0, salt)?;
            // Every rank must hold the same bits: compare with the neighbour's.
            let mine = out[..blk].to_vec();
            let mut theirs = vec![0u8; blk];
            if n > 1 {
                comm.send_recv(&mine, next, &mut theirs, prev).map_err(|err| Failure(format!("{what}: {err}")))?;
                if theirs != mine {
                    return Err(Failure(format!("{what}: result differs bitwise from rank {prev}")).into());
                }
            }
        }
        Collective::Reduce => {
            if r == root {
                check_reduced::<T>(&what, &out[..blk], n, op, 0, salt)?;
            }
        }
        Collective::ReduceScatter => {
            let got = if in_place { &out[r * blk..(r + 1) * blk] } else { &out[..blk] };
            check_reduced::<T>(&what, got, n, op, r * count, salt)?;
        }
        Collective::Broadcast => {
            fill::<T>(&mut expect[..blk], root, 0, op, salt);
            compare(&what, &out[..blk], &expect[..blk])?;
        }
        Collective::AllGather => {
            for q in 0..n {
                fill::<T>(&mut expect[q * blk..(q + 1) * blk], q, 0, op, salt);
            }
            compare(&what, &out[..all], &expect[..all])?;
        }
        Collective::AllToAll => {
            for q in 0..n {
                fill::<T>(&mut expect[q * blk..(q + 1) * blk], q, r * count, op, salt);
            }
            compare(&what, &out[..all], &expect[..all])?;
        }
        Collective::SendRecv => {
            fill::<T>(&mut expect[..blk], prev, 0, op, salt);
            compare(&what, &out[..blk], &expect[..blk])?;
        }
        Collective::Barrier => {}
    }
    Ok(())
}

fn compare(what: &str, got: &[u8], want: &[u8]) -> Result<(), Failure> {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(Failure(format!("{what}: byte {i} is {:#04x}, expected {:#04x}", got[i], want[i]))),
    }
}
