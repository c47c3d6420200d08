//! TEMPORARY naive kernels (replaced by the vectorized module).
use crate::dtype::{DataType, ReduceOp};
use half::{bf16, f16};

macro_rules! each {
    ($dt:expr, $f:ident, $($args:expr),*) => {
        match $dt {
            DataType::I8 => $f::<i8>($($args),*), DataType::U8 => $f::<u8>($($args),*),
            DataType::I32 => $f::<i32>($($args),*), DataType::U32 => $f::<u32>($($args),*),
            DataType::I64 => $f::<i64>($($args),*), DataType::U64 => $f::<u64>($($args),*),
            DataType::F16 => $f::<f16>($($args),*), DataType::Bf16 => $f::<bf16>($($args),*),
            DataType::F32 => $f::<f32>($($args),*), DataType::F64 => $f::<f64>($($args),*),
        }
    };
}
trait E: Copy {
    fn comb(a: Self, b: Self, op: ReduceOp) -> Self;
    fn div(a: Self, n: usize) -> Self;
}
macro_rules! int { ($($t:ty),*) => {$(impl E for $t {
    fn comb(a: Self, b: Self, op: ReduceOp) -> Self { match op { ReduceOp::Sum|ReduceOp::Avg => a.wrapping_add(b), ReduceOp::Prod => a.wrapping_mul(b), ReduceOp::Min => a.min(b), ReduceOp::Max => a.max(b) } }
    fn div(a: Self, n: usize) -> Self { a / (n as $t) }
})*}}
int!(i8, u8, i32, u32, i64, u64);
macro_rules! flt { ($($t:ty),*) => {$(impl E for $t {
    fn comb(a: Self, b: Self, op: ReduceOp) -> Self { match op { ReduceOp::Sum|ReduceOp::Avg => a + b, ReduceOp::Prod => a * b, ReduceOp::Min => a.min(b), ReduceOp::Max => a.max(b) } }
    fn div(a: Self, n: usize) -> Self { a / (n as $t) }
})*}}
flt!(f32, f64);
macro_rules! hlf { ($($t:ty),*) => {$(impl E for $t {
    fn comb(a: Self, b: Self, op: ReduceOp) -> Self { <$t>::from_f32(f32::comb(a.to_f32(), b.to_f32(), op)) }
    fn div(a: Self, n: usize) -> Self { <$t>::from_f32(a.to_f32() / n as f32) }
})*}}
hlf!(f16, bf16);
fn rd<T: E>(dst: *mut u8, a: *const u8, b: *const u8, n: usize, op: ReduceOp) {
    for i in 0..n {
        unsafe {
            let x = (a as *const T).add(i).read_unaligned();
            let y = (b as *const T).add(i).read_unaligned();
            (dst as *mut T).add(i).write_unaligned(T::comb(x, y, op));
        }
    }
}
fn dv<T: E>(dst: *mut u8, n: usize, k: usize) {
    for i in 0..n {
        unsafe {
            let x = (dst as *const T).add(i).read_unaligned();
            (dst as *mut T).add(i).write_unaligned(T::div(x, k));
        }
    }
}
pub fn reduce_inplace(dtype: DataType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    let n = dst.len() / dtype.size();
    let p = dst.as_mut_ptr();
    each!(dtype, rd, p, p as *const u8, src.as_ptr(), n, op)
}
pub fn reduce_into(dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) {
    let n = dst.len() / dtype.size();
    each!(dtype, rd, dst.as_mut_ptr(), a.as_ptr(), b.as_ptr(), n, op)
}
pub fn divide(dtype: DataType, buf: &mut [u8], n: usize) {
    let c = buf.len() / dtype.size();
    each!(dtype, dv, buf.as_mut_ptr(), c, n)
}
pub struct Reducer;
impl Reducer {
    pub fn new(_t: usize) -> Reducer {
        Reducer
    }
    pub fn reduce_inplace(&self, dtype: DataType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
        reduce_inplace(dtype, op, dst, src)
    }
    pub fn reduce_into(&self, dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) {
        reduce_into(dtype, op, dst, a, b)
    }
}
