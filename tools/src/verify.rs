//! Data patterns and result checks of `accl-perf -c 1`.
//!
//! Every value is a small integer, exact in every data type, that any rank can compute for any
//! rank:
//! - reductions (allreduce, reduce, reduce_scatter): element `i` of rank `r` is
//!   `1 + (r + i) % 3` (sum, avg, min, max) or `2 if (r + i) % 3 == 0 else 1` (prod), so the
//!   expected result only depends on `i % 3`;
//! - data movement (broadcast, allgather, alltoall, sendrecv): element `i` of rank `r` is
//!   `(31 r + i) % 127`, which tells the source rank and position apart.
//!
//! Integer results are compared exactly, computed with the data type's own wrapping arithmetic
//! (avg: wrapping sum divided by nranks, truncated). Floating-point sums and averages are
//! compared with the exact value within a relative tolerance of 1e-2 (half, bfloat16) or 1e-6
//! (float, double); products, minima and maxima exactly.

use accl_core::{bf16, f16, Collective, DataType, ReduceOp};

/// One rank's side of one collective call, as accl-perf runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    pub coll: Collective,
    pub dtype: DataType,
    pub op: ReduceOp,
    pub rank: usize,
    pub nranks: usize,
    /// `CollArgs::count`: elements per rank (per block for allgather, reduce_scatter, alltoall).
    pub count: usize,
    /// Root of reduce and broadcast.
    pub root: usize,
}

impl Case {
    /// Whether the collective combines values with `op`.
    pub fn reduces(&self) -> bool {
        matches!(self.coll, Collective::AllReduce | Collective::Reduce | Collective::ReduceScatter)
    }

    /// sendrecv runs as a ring shift: each rank receives from the previous one.
    pub fn recv_from(&self) -> usize {
        (self.rank + self.nranks - 1) % self.nranks
    }

    /// Elements of this rank's input.
    pub fn input_len(&self) -> usize {
        let (c, n) = (self.count, self.nranks);
        match self.coll {
            Collective::AllReduce | Collective::Reduce | Collective::AllGather => c,
            Collective::SendRecv => c,
            Collective::Broadcast => {
                if self.rank == self.root {
                    c
                } else {
                    0
                }
            }
            Collective::ReduceScatter | Collective::AllToAll => n * c,
            Collective::Barrier => 0,
        }
    }

    /// Elements of this rank's output that carry a result (0 on non-root ranks of reduce).
    pub fn output_len(&self) -> usize {
        let (c, n) = (self.count, self.nranks);
        match self.coll {
            Collective::AllReduce | Collective::Broadcast | Collective::ReduceScatter => c,
            Collective::SendRecv => c,
            Collective::Reduce => {
                if self.rank == self.root {
                    c
                } else {
                    0
                }
            }
            Collective::AllGather | Collective::AllToAll => n * c,
            Collective::Barrier => 0,
        }
    }

    /// Input element `idx` of rank `src`.
    pub fn value(&self, src: usize, idx: usize) -> i64 {
        if self.reduces() {
            reduce_input(self.op, src, idx)
        } else {
            data_value(src, idx)
        }
    }

    /// Writes this rank's input into `buf` (`input_len()` elements; longer is fine).
    pub fn fill_input(&self, buf: &mut [u8]) {
        let bytes = self.input_len() * self.dtype.size();
        accl_core::dispatch_dtype!(self.dtype, fill(self, &mut buf[..bytes]))
    }

    /// Counts the wrong elements among the `output_len()` result elements at the start of `buf`.
    pub fn check_output(&self, buf: &[u8]) -> u64 {
        let bytes = self.output_len() * self.dtype.size();
        accl_core::dispatch_dtype!(self.dtype, check(self, &buf[..bytes]))
    }
}

/// Fills `buf` with a pattern (all bits set) that no result of [`Case`] data can have, so that
/// elements a collective forgot to write are counted as wrong.
pub fn poison(buf: &mut [u8]) {
    buf.fill(0xFF);
}

fn reduce_input(op: ReduceOp, src: usize, idx: usize) -> i64 {
    let k = (src + idx) % 3;
    match op {
        ReduceOp::Prod => {
            if k == 0 {
                2
            } else {
                1
            }
        }
        _ => 1 + k as i64,
    }
}

fn data_value(src: usize, idx: usize) -> i64 {
    ((src % 127 * 31 + idx % 127) % 127) as i64
}

/// The element types, with the arithmetic accl uses for them.
trait Num: Copy + 'static {
    const FLOAT: bool;
    fn from_i64(v: i64) -> Self;
    fn to_f64(self) -> f64;
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    fn div_n(self, n: usize) -> Self;
    fn same(self, o: Self) -> bool;
}

macro_rules! int_num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const FLOAT: bool = false;
            fn from_i64(v: i64) -> Self { v as $t }
            fn to_f64(self) -> f64 { self as f64 }
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn min(self, o: Self) -> Self { Ord::min(self, o) }
            fn max(self, o: Self) -> Self { Ord::max(self, o) }
            fn div_n(self, n: usize) -> Self {
                match <$t>::try_from(n) { Ok(d) => self.wrapping_div(d), Err(_) => 0 }
            }
            fn same(self, o: Self) -> bool { self == o }
        }
    )*};
}
int_num!(i8, u8, i32, u32, i64, u64);

macro_rules! float_num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const FLOAT: bool = true;
            fn from_i64(v: i64) -> Self { v as $t }
            fn to_f64(self) -> f64 { self as f64 }
            fn add(self, o: Self) -> Self { self + o }
            fn mul(self, o: Self) -> Self { self * o }
            fn min(self, o: Self) -> Self { <$t>::min(self, o) }
            fn max(self, o: Self) -> Self { <$t>::max(self, o) }
            fn div_n(self, n: usize) -> Self { self / n as $t }
            fn same(self, o: Self) -> bool { self == o }
        }
    )*};
}
float_num!(f32, f64);

macro_rules! half_num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const FLOAT: bool = true;
            fn from_i64(v: i64) -> Self { <$t>::from_f64(v as f64) }
            fn to_f64(self) -> f64 { <$t>::to_f64(self) }
            fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            fn min(self, o: Self) -> Self { <$t>::from_f32(self.to_f32().min(o.to_f32())) }
            fn max(self, o: Self) -> Self { <$t>::from_f32(self.to_f32().max(o.to_f32())) }
            fn div_n(self, n: usize) -> Self { <$t>::from_f32(self.to_f32() / n as f32) }
            fn same(self, o: Self) -> bool { self.to_f32() == o.to_f32() }
        }
    )*};
}
half_num!(f16, bf16);

/// Relative tolerance of floating-point sums and averages.
fn tolerance(dtype: DataType) -> f64 {
    match dtype {
        DataType::F16 | DataType::Bf16 => 1e-2,
        _ => 1e-6,
    }
}

fn typed_mut<T: Num>(buf: &mut [u8]) -> &mut [T] {
    // SAFETY: T is a plain number type, valid for any bit pattern.
    let (pre, mid, post) = unsafe { buf.align_to_mut::<T>() };
    assert!(pre.is_empty() && post.is_empty(), "buffer not aligned or not a whole number of elements");
    mid
}

fn typed<T: Num>(buf: &[u8]) -> &[T] {
    // SAFETY: as in typed_mut.
    let (pre, mid, post) = unsafe { buf.align_to::<T>() };
    assert!(pre.is_empty() && post.is_empty(), "buffer not aligned or not a whole number of elements");
    mid
}

fn fill<T: Num>(case: &Case, buf: &mut [u8]) {
    let rank = case.rank;
    for (i, x) in typed_mut::<T>(buf).iter_mut().enumerate() {
        *x = T::from_i64(case.value(rank, i));
    }
}

/// The expected reduction of element `idx`, indexed by `idx % 3`: in `T` arithmetic, and
/// exactly (in f64).
fn reduction_table<T: Num>(case: &Case) -> ([T; 3], [f64; 3]) {
    let n = case.nranks;
    let mut exact = [0.0; 3];
    let table = std::array::from_fn(|k| {
        let vals = (0..n).map(|r| reduce_input(case.op, r, k));
        let mut acc = T::from_i64(reduce_input(case.op, 0, k));
        for v in vals.clone().skip(1) {
            let v = T::from_i64(v);
            acc = match case.op {
                ReduceOp::Sum | ReduceOp::Avg => acc.add(v),
                ReduceOp::Prod => acc.mul(v),
                ReduceOp::Min => acc.min(v),
                ReduceOp::Max => acc.max(v),
            };
        }
        let sum: i64 = vals.sum();
        exact[k] = match case.op {
            ReduceOp::Avg => sum as f64 / n as f64,
            _ => sum as f64,
        };
        if case.op == ReduceOp::Avg {
            acc.div_n(n)
        } else {
            acc
        }
    });
    (table, exact)
}

fn check<T: Num>(case: &Case, buf: &[u8]) -> u64 {
    let out = typed::<T>(buf);
    let (c, rank) = (case.count, case.rank);
    let mut wrong = 0u64;
    if case.reduces() {
        let (table, exact) = reduction_table::<T>(case);
        let approx = T::FLOAT && matches!(case.op, ReduceOp::Sum | ReduceOp::Avg);
        let tol = tolerance(case.dtype);
        let base = if case.coll == Collective::ReduceScatter { rank * c } else { 0 };
        for (o, &got) in out.iter().enumerate() {
            let k = (base + o) % 3;
            let ok = if approx {
                let (g, w) = (got.to_f64(), exact[k]);
                (g - w).abs() <= tol * w.abs()
            } else {
                got.same(table[k])
            };
            wrong += u64::from(!ok);
        }
        return wrong;
    }
    let src_idx = |o: usize| -> (usize, usize) {
        match case.coll {
            Collective::Broadcast => (case.root, o),
            Collective::AllGather => (o / c, o % c),
            Collective::AllToAll => (o / c, rank * c + o % c),
            _ => (case.recv_from(), o),
        }
    };
    for (o, &got) in out.iter().enumerate() {
        let (src, idx) = src_idx(o);
        wrong += u64::from(!got.same(T::from_i64(data_value(src, idx))));
    }
    wrong
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `coll` naively over every rank's input (in f64: every value is a small integer)
    /// and returns every rank's output as `T` bytes.
    fn simulate(case: Case) -> Vec<Vec<u8>> {
        let n = case.nranks;
        let c = case.count;
        let elem = case.dtype.size();
        let inputs: Vec<Vec<f64>> = (0..n)
            .map(|r| {
                let rc = Case { rank: r, ..case };
                (0..rc.input_len()).map(|i| rc.value(r, i) as f64).collect()
            })
            .collect();
        let reduce = |idx: usize| -> f64 {
            let vals = inputs.iter().map(|v| v[idx]);
            match case.op {
                ReduceOp::Sum => vals.sum(),
                ReduceOp::Avg => {
                    let s: f64 = vals.sum();
                    if case.dtype.is_float() {
                        s / n as f64
                    } else {
                        (s as i64 / n as i64) as f64
                    }
                }
                ReduceOp::Prod => vals.product(),
                ReduceOp::Min => vals.fold(f64::INFINITY, f64::min),
                ReduceOp::Max => vals.fold(f64::NEG_INFINITY, f64::max),
            }
        };
        (0..n)
            .map(|r| {
                let rc = Case { rank: r, ..case };
                let vals: Vec<f64> = (0..rc.output_len())
                    .map(|o| match case.coll {
                        Collective::AllReduce | Collective::Reduce => reduce(o),
                        Collective::ReduceScatter => reduce(r * c + o),
                        Collective::Broadcast => inputs[case.root][o],
                        Collective::AllGather => inputs[o / c][o % c],
                        Collective::AllToAll => inputs[o / c][r * c + o % c],
                        Collective::SendRecv => inputs[(r + n - 1) % n][o],
                        Collective::Barrier => unreachable!(),
                    })
                    .collect();
                let mut bytes = vec![0u8; vals.len() * elem];
                for (i, v) in vals.iter().enumerate() {
                    let b = &mut bytes[i * elem..(i + 1) * elem];
                    match case.dtype {
                        DataType::F32 => b.copy_from_slice(&(*v as f32).to_ne_bytes()),
                        DataType::Bf16 => b.copy_from_slice(&bf16::from_f64(*v).to_ne_bytes()),
                        DataType::I8 => b.copy_from_slice(&(*v as i8).to_ne_bytes()),
                        DataType::U64 => b.copy_from_slice(&(*v as u64).to_ne_bytes()),
                        _ => unreachable!(),
                    }
                }
                bytes
            })
            .collect()
    }

    #[test]
    fn correct_results_pass_and_corruption_is_counted() {
        let colls = [
            Collective::AllReduce,
            Collective::Reduce,
            Collective::ReduceScatter,
            Collective::Broadcast,
            Collective::AllGather,
            Collective::AllToAll,
            Collective::SendRecv,
        ];
        for coll in colls {
            for dtype in [DataType::F32, DataType::Bf16, DataType::I8, DataType::U64] {
                for op in ReduceOp::ALL {
                    for n in [1, 3, 4] {
                        let case = Case { coll, dtype, op, rank: 0, nranks: n, count: 10, root: n - 1 };
                        let outs = simulate(case);
                        for (r, out) in outs.iter().enumerate() {
                            let rc = Case { rank: r, ..case };
                            // Aligned copy.
                            let mut words = vec![0u64; out.len().div_ceil(8) + 1];
                            let bytes = &mut bytemuck_bytes(&mut words)[..out.len()];
                            bytes.copy_from_slice(out);
                            assert_eq!(rc.check_output(bytes), 0, "{rc:?}");
                            if !out.is_empty() {
                                poison(&mut bytes[..dtype.size()]);
                                assert_eq!(rc.check_output(bytes), 1, "{rc:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    fn bytemuck_bytes(words: &mut [u64]) -> &mut [u8] {
        // SAFETY: u64 -> u8 view of the same memory.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8) }
    }

    #[test]
    fn integer_wrapping_is_modelled() {
        // 64 ranks of int8 sums: 1 + (r+i)%3 summed wraps past 127.
        let case = Case {
            coll: Collective::AllReduce,
            dtype: DataType::I8,
            op: ReduceOp::Sum,
            rank: 0,
            nranks: 64,
            count: 3,
            root: 0,
        };
        let (table, _) = reduction_table::<i8>(&case);
        let sum0: i64 = (0..64).map(|r| 1 + (r % 3) as i64).sum();
        assert_eq!(table[0], sum0 as i8);
    }
}
