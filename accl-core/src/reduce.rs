//! Reduction kernels over raw byte buffers.
//!
//! Collectives move untyped bytes; these kernels interpret them as elements of a [`DataType`]
//! (native byte order, exactly as the element type is laid out in memory) and combine them
//! elementwise with a [`ReduceOp`].
//!
//! * [`reduce_inplace`]: `dst[i] = op(dst[i], src[i])`.
//! * [`reduce_into`]: `dst[i] = op(a[i], b[i])` (saves a copy in out-of-place collectives).
//! * [`reduce_into_streaming`]: the same, writing `dst` past the caches, for results that are
//!   not read again soon.
//! * [`divide`]: `buf[i] /= n`, the final step of [`ReduceOp::Avg`] (which combines as `Sum`).
//! * [`Reducer`]: the same reductions, split over a small private rayon pool for large buffers.
//!
//! # Semantics and precision
//!
//! * **Integers**: `Sum` and `Prod` wrap on overflow; `Min`/`Max` are the usual ones. [`divide`]
//!   truncates toward zero (`-7 / 2 == -3`).
//! * **`f32`/`f64`**: plain IEEE-754 arithmetic in the type. `Min`/`Max` follow IEEE-754-2019
//!   `minimum`/`maximum`: if either operand is NaN the result is NaN (payload unspecified), and
//!   `-0.0` is smaller than `+0.0`, so the result never depends on operand order.
//! * **`f16`/`bf16`**: both operands are widened to `f32` (exact), combined in `f32`, and the
//!   result is rounded **once** back to the 16-bit type with round-to-nearest-even. A reduction
//!   over `n` ranks therefore rounds once per pairwise combination, never keeps an `f32`
//!   accumulator across steps, and gives the same result whatever the chunking. `Min`/`Max` are
//!   exact. [`divide`] also divides in `f32` and rounds once.
//!
//! Buffers are normally aligned to the element size; unaligned buffers are handled correctly
//! (through small aligned stack buffers), only slower.
//!
//! # Performance
//!
//! Each (type, op) pair is a separate monomorphized loop that LLVM auto-vectorizes for baseline
//! x86-64 (SSE2); no `target-cpu` flag is needed. Large `f32`/integer reductions run at about
//! memcpy speed (they are memory-bound). On x86-64, f16 uses F16C conversions and bf16 an AVX2
//! build of the same loop when the CPU has them (detected at run time, bit-identical results).
//!
//! # Example
//!
//! ```
//! use accl_core::reduce::{divide, reduce_inplace};
//! use accl_core::{DataType, ReduceOp};
//!
//! let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
//! let mut acc = bytes(&[1.0, 2.0, 3.0]);
//! reduce_inplace(DataType::F32, ReduceOp::Avg, &mut acc, &bytes(&[3.0, 4.0, 6.0]));
//! divide(DataType::F32, &mut acc, 2);
//! assert_eq!(acc, bytes(&[2.0, 3.0, 4.5]));
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::mem::size_of;

use rayon::prelude::*;

use crate::dtype::{DataType, ReduceOp};

/// Elements per block in the unaligned paths (stack buffers of this many elements).
const BLOCK: usize = 256;

/// Default size above which a multi-threaded [`Reducer`] splits a reduction.
pub const DEFAULT_MIN_PARALLEL_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------------------------

/// A binary combining operator on `T`, as a zero-sized type so kernels monomorphize per op.
trait Op<T>: 'static {
    fn apply(a: T, b: T) -> T;
}

struct OpSum;
struct OpProd;
struct OpMin;
struct OpMax;

macro_rules! int_ops {
    ($($t:ty),*) => {$(
        impl Op<$t> for OpSum {
            #[inline(always)]
            fn apply(a: $t, b: $t) -> $t { a.wrapping_add(b) }
        }
        impl Op<$t> for OpProd {
            #[inline(always)]
            fn apply(a: $t, b: $t) -> $t { a.wrapping_mul(b) }
        }
        impl Op<$t> for OpMin {
            #[inline(always)]
            fn apply(a: $t, b: $t) -> $t { if b < a { b } else { a } }
        }
        impl Op<$t> for OpMax {
            #[inline(always)]
            fn apply(a: $t, b: $t) -> $t { if b > a { b } else { a } }
        }
    )*};
}
int_ops!(i8, u8, i32, u32, i64, u64);

macro_rules! float_ops {
    ($($t:ty),*) => {$(
        impl Op<$t> for OpSum {
            #[inline(always)]
            fn apply(a: $t, b: $t) -> $t { a + b }
        }
        impl Op<$t> for OpProd {
            #[inline(always)]
            fn apply(a: $t, b: $t) -> $t { a * b }
        }
        impl Op<$t> for OpMin {
            /// IEEE-754-2019 `minimum`: NaN if either is NaN, and `-0.0 < +0.0`.
            ///
            /// Written as two selects so that it vectorizes: when neither operand is smaller
            /// they are equal (OR keeps a `-0.0` sign bit) or one is NaN (OR of a NaN with
            /// anything is still a NaN: all exponent bits and a mantissa bit stay set).
            #[inline(always)]
            fn apply(a: $t, b: $t) -> $t {
                if a < b {
                    a
                } else if b < a {
                    b
                } else {
                    <$t>::from_bits(a.to_bits() | b.to_bits())
                }
            }
        }
        impl Op<$t> for OpMax {
            /// IEEE-754-2019 `maximum`: `max(a, b) == -min(-a, -b)`.
            #[inline(always)]
            fn apply(a: $t, b: $t) -> $t {
                -<OpMin as Op<$t>>::apply(-a, -b)
            }
        }
    )*};
}
float_ops!(f32, f64);

// ---------------------------------------------------------------------------------------------
// Typed kernels
// ---------------------------------------------------------------------------------------------

/// A typed reduction kernel for one (element type, op) pair.
trait Kern: 'static {
    /// The in-memory element type.
    type T: Copy + Default + Send + Sync + 'static;
    /// `dst[i] = op(dst[i], src[i])`; the slices have equal length.
    fn inplace(dst: &mut [Self::T], src: &[Self::T]);
    /// `dst[i] = op(a[i], b[i])`; the slices have equal length.
    fn into(dst: &mut [Self::T], a: &[Self::T], b: &[Self::T]);
    /// As [`Kern::into`], with non-temporal stores where the kernel has them.
    fn into_streaming(dst: &mut [Self::T], a: &[Self::T], b: &[Self::T]) {
        <Self as Kern>::into(dst, a, b)
    }
}

/// Kernel for types whose arithmetic is done in the type itself (integers, f32, f64).
///
/// On x86-64 CPUs with AVX2 the same loops run compiled for AVX2 (twice the vector width, which
/// matters for in-cache buffers; identical results, as no operation here is contracted or
/// reassociated).
struct Native<T, O>(PhantomData<(T, O)>);

impl<T, O> Kern for Native<T, O>
where
    T: Copy + Default + Send + Sync + 'static,
    O: Op<T>,
{
    type T = T;

    #[inline(always)]
    fn inplace(dst: &mut [T], src: &[T]) {
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            // SAFETY: the CPU supports AVX2.
            return unsafe { x86::avx2_native_inplace::<T, O>(dst, src) };
        }
        native_inplace::<T, O>(dst, src)
    }

    #[inline(always)]
    fn into(dst: &mut [T], a: &[T], b: &[T]) {
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            // SAFETY: the CPU supports AVX2.
            return unsafe { x86::avx2_native_into::<T, O>(dst, a, b) };
        }
        native_into::<T, O>(dst, a, b)
    }

    #[inline(always)]
    fn into_streaming(dst: &mut [T], a: &[T], b: &[T]) {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx512f() {
                // SAFETY: the CPU supports AVX-512F.
                return unsafe { x86::avx512_native_into_streaming::<T, O>(dst, a, b) };
            }
            if x86::has_avx2() {
                // SAFETY: the CPU supports AVX2.
                return unsafe { x86::avx2_native_into_streaming::<T, O>(dst, a, b) };
            }
        }
        <Self as Kern>::into(dst, a, b)
    }
}

/// `dst[i] = op(dst[i], src[i])`: a plain zip loop that LLVM vectorizes.
#[inline(always)]
fn native_inplace<T: Copy, O: Op<T>>(dst: &mut [T], src: &[T]) {
    let src = &src[..dst.len()];
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = O::apply(*d, s);
    }
}

/// `dst[i] = op(a[i], b[i])`.
#[inline(always)]
fn native_into<T: Copy, O: Op<T>>(dst: &mut [T], a: &[T], b: &[T]) {
    let n = dst.len();
    let (a, b) = (&a[..n], &b[..n]);
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = O::apply(x, y);
    }
}

/// A 16-bit float format (stored as its `u16` bits), converted to and from `f32`.
///
/// `to_f32`/`from_f32` are branch-free so that loops over them vectorize, and bit-exact with
/// `half`'s conversions (round-to-nearest-even, overflow to infinity, subnormals kept) except
/// that NaN payloads may differ; the tests check this exhaustively for `to_f32` and on every
/// rounding boundary for `from_f32` (and an ignored test checks all 2^32 inputs).
///
/// The slice loops (`zip_inplace`, `zip_into`, `map`) have portable defaults; a format may
/// override them to dispatch at run time to faster x86-64 code (F16C for f16, AVX2 for bf16),
/// which rounds identically. We do not use `half`'s slice helpers: on x86-64 they convert a few
/// elements per out-of-line call (one per call for bf16), which caps f16/bf16 reductions near
/// 1 GB/s.
trait HalfFormat: Send + Sync + 'static {
    fn to_f32(h: u16) -> f32;
    fn from_f32(x: f32) -> u16;

    /// `dst[i] = round(c(dst[i], src[i]))`, equal lengths.
    #[inline(always)]
    fn zip_inplace<C: Fn(f32, f32) -> f32 + Copy>(dst: &mut [u16], src: &[u16], c: C) {
        portable_inplace::<Self, C>(dst, src, c)
    }

    /// `dst[i] = round(c(a[i], b[i]))`, equal lengths.
    #[inline(always)]
    fn zip_into<C: Fn(f32, f32) -> f32 + Copy>(dst: &mut [u16], a: &[u16], b: &[u16], c: C) {
        portable_into::<Self, C>(dst, a, b, c)
    }

    /// `buf[i] = round(f(buf[i]))`.
    #[inline(always)]
    fn map<M: Fn(f32) -> f32 + Copy>(buf: &mut [u16], f: M) {
        portable_map::<Self, M>(buf, f)
    }
}

#[inline(always)]
fn portable_inplace<F: HalfFormat + ?Sized, C: Fn(f32, f32) -> f32>(dst: &mut [u16], src: &[u16], c: C) {
    let src = &src[..dst.len()];
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = F::from_f32(c(F::to_f32(*d), F::to_f32(s)));
    }
}

#[inline(always)]
fn portable_into<F: HalfFormat + ?Sized, C: Fn(f32, f32) -> f32>(dst: &mut [u16], a: &[u16], b: &[u16], c: C) {
    let n = dst.len();
    let (a, b) = (&a[..n], &b[..n]);
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = F::from_f32(c(F::to_f32(x), F::to_f32(y)));
    }
}

#[inline(always)]
fn portable_map<F: HalfFormat + ?Sized, M: Fn(f32) -> f32>(buf: &mut [u16], f: M) {
    for x in buf {
        *x = F::from_f32(f(F::to_f32(*x)));
    }
}

/// IEEE-754 binary16 (`half::f16`).
struct F16Fmt;
/// bfloat16 (`half::bf16`): the top half of an `f32`.
struct Bf16Fmt;

impl HalfFormat for F16Fmt {
    #[inline(always)]
    fn to_f32(h: u16) -> f32 {
        let h = h as u32;
        // Exponent and mantissa, in f32 position.
        let em = (h & 0x7fff) << 13;
        let exp = em & 0x0f80_0000;
        // Normal numbers: rebias the exponent.
        let normal = em + ((127 - 15) << 23);
        // Inf/NaN: exponent all ones.
        let special = em + ((255 - 31) << 23);
        // Zero and subnormals: the float 2^-14 * (1 + m/1024), minus 2^-14, is m * 2^-24.
        let magic = f32::from_bits(113 << 23);
        let sub = (f32::from_bits(em + (113 << 23)) - magic).to_bits();
        let o = if exp == 0x0f80_0000 {
            special
        } else if exp == 0 {
            sub
        } else {
            normal
        };
        f32::from_bits(o | ((h & 0x8000) << 16))
    }

    #[inline(always)]
    fn from_f32(x: f32) -> u16 {
        let x = x.to_bits();
        let sign = x & 0x8000_0000;
        let a = x ^ sign;
        // |x| >= 65536 (or inf/NaN): inf, or a quiet NaN keeping the top payload bits.
        let big = if a > 0x7f80_0000 { 0x7e00 | ((a >> 13) & 0x3ff) } else { 0x7c00 };
        // |x| < 2^-14: subnormal or zero. Adding 0.5 (ulp 2^-24, the f16 subnormal step)
        // rounds to nearest even in hardware; the low bits are then the f16 mantissa.
        let half = f32::from_bits(126 << 23);
        let sub = (f32::from_bits(a) + half).to_bits().wrapping_sub(126 << 23);
        // Normal: rebias, then round to nearest even on the 13 dropped bits.
        let odd = (a >> 13) & 1;
        let norm = a.wrapping_sub(112 << 23).wrapping_add(0xfff + odd) >> 13;
        let o = if a >= 143 << 23 {
            big
        } else if a < 113 << 23 {
            sub
        } else {
            norm
        };
        (o | (sign >> 16)) as u16
    }

    #[inline(always)]
    fn zip_inplace<C: Fn(f32, f32) -> f32 + Copy>(dst: &mut [u16], src: &[u16], c: C) {
        #[cfg(target_arch = "x86_64")]
        if x86::has_f16c() {
            // SAFETY: the CPU supports AVX and F16C.
            return unsafe { x86::f16_inplace(dst, src, c) };
        }
        portable_inplace::<Self, C>(dst, src, c)
    }

    #[inline(always)]
    fn zip_into<C: Fn(f32, f32) -> f32 + Copy>(dst: &mut [u16], a: &[u16], b: &[u16], c: C) {
        #[cfg(target_arch = "x86_64")]
        if x86::has_f16c() {
            // SAFETY: the CPU supports AVX and F16C.
            return unsafe { x86::f16_into(dst, a, b, c) };
        }
        portable_into::<Self, C>(dst, a, b, c)
    }

    #[inline(always)]
    fn map<M: Fn(f32) -> f32 + Copy>(buf: &mut [u16], f: M) {
        #[cfg(target_arch = "x86_64")]
        if x86::has_f16c() {
            // SAFETY: the CPU supports AVX and F16C.
            return unsafe { x86::f16_map(buf, f) };
        }
        portable_map::<Self, M>(buf, f)
    }
}

impl HalfFormat for Bf16Fmt {
    #[inline(always)]
    fn to_f32(h: u16) -> f32 {
        f32::from_bits((h as u32) << 16)
    }

    #[inline(always)]
    fn from_f32(x: f32) -> u16 {
        let x = x.to_bits();
        // Round to nearest even on the 16 dropped bits (carries into the exponent correctly,
        // overflowing to inf).
        let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
        let nan = (x >> 16) | 0x0040; // quiet NaN keeping the top payload bits
        (if x & 0x7fff_ffff > 0x7f80_0000 { nan } else { rounded }) as u16
    }

    #[inline(always)]
    fn zip_inplace<C: Fn(f32, f32) -> f32 + Copy>(dst: &mut [u16], src: &[u16], c: C) {
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            // SAFETY: the CPU supports AVX2.
            return unsafe { x86::avx2_inplace::<Self, C>(dst, src, c) };
        }
        portable_inplace::<Self, C>(dst, src, c)
    }

    #[inline(always)]
    fn zip_into<C: Fn(f32, f32) -> f32 + Copy>(dst: &mut [u16], a: &[u16], b: &[u16], c: C) {
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            // SAFETY: the CPU supports AVX2.
            return unsafe { x86::avx2_into::<Self, C>(dst, a, b, c) };
        }
        portable_into::<Self, C>(dst, a, b, c)
    }

    #[inline(always)]
    fn map<M: Fn(f32) -> f32 + Copy>(buf: &mut [u16], f: M) {
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            // SAFETY: the CPU supports AVX2.
            return unsafe { x86::avx2_map::<Self, M>(buf, f) };
        }
        portable_map::<Self, M>(buf, f)
    }
}

/// Run-time-dispatched x86-64 loops: AVX2 builds of the portable loops, and F16C for f16.
/// Baseline x86-64 (SSE2) lacks the 16-bit shuffles and conversions that make the f16/bf16
/// loops cheap: the portable f16 loop runs at about 0.4 GB/s there, F16C at several GB/s.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{native_inplace, native_into, portable_inplace, portable_into, portable_map, F16Fmt, HalfFormat, Op};
    use std::arch::x86_64::*;

    pub(super) fn has_f16c() -> bool {
        is_x86_feature_detected!("avx") && is_x86_feature_detected!("f16c")
    }

    pub(super) fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2")
    }

    pub(super) fn has_avx512f() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// `dst = op(a, b)`, one vector `V` of `dst` at a time written with the non-temporal store
    /// `stream` (which needs `V`-aligned addresses; the unaligned head and the tail are stored
    /// normally). Each vector is computed by the plain loop over a `V`-sized tile, which LLVM
    /// keeps in a register.
    ///
    /// # Safety
    /// `stream` must be a non-temporal store of `V` to a `V`-aligned address that the CPU
    /// supports; `V` must be a SIMD vector type (any bit pattern valid).
    #[inline(always)]
    unsafe fn native_into_streaming<T: Copy, O: Op<T>, V: Copy>(
        dst: &mut [T],
        a: &[T],
        b: &[T],
        zero: V,
        stream: unsafe fn(*mut V, V),
    ) {
        let n = dst.len();
        let (a, b) = (&a[..n], &b[..n]);
        let width = size_of::<V>() / size_of::<T>();
        let head = dst.as_ptr().align_offset(size_of::<V>()).min(n);
        native_into::<T, O>(&mut dst[..head], &a[..head], &b[..head]);
        let end = head + (n - head) / width * width;
        let mut i = head;
        while i < end {
            let mut tile = zero;
            // SAFETY: `tile` is `width` elements of plain old data; `i + width <= end <= n`.
            unsafe {
                let t = std::slice::from_raw_parts_mut((&raw mut tile).cast::<T>(), width);
                native_into::<T, O>(t, a.get_unchecked(i..i + width), b.get_unchecked(i..i + width));
                stream(dst.as_mut_ptr().add(i).cast::<V>(), tile);
            }
            i += width;
        }
        // Non-temporal stores are weakly ordered: fence them before whatever reads `dst` next.
        _mm_sfence();
        native_into::<T, O>(&mut dst[end..], &a[end..], &b[end..]);
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn stream512(p: *mut __m512i, v: __m512i) {
        // SAFETY: the caller passes a 64-byte-aligned, writable address.
        unsafe { _mm512_stream_si512(p, v) }
    }

    #[target_feature(enable = "avx")]
    unsafe fn stream256(p: *mut __m256i, v: __m256i) {
        // SAFETY: the caller passes a 32-byte-aligned, writable address.
        unsafe { _mm256_stream_si256(p, v) }
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512_native_into_streaming<T: Copy, O: Op<T>>(dst: &mut [T], a: &[T], b: &[T]) {
        // SAFETY: AVX-512F is available and `stream512` stores one aligned __m512i.
        unsafe { native_into_streaming::<T, O, __m512i>(dst, a, b, _mm512_setzero_si512(), stream512) }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2_native_into_streaming<T: Copy, O: Op<T>>(dst: &mut [T], a: &[T], b: &[T]) {
        // SAFETY: AVX2 implies AVX, and `stream256` stores one aligned __m256i.
        unsafe { native_into_streaming::<T, O, __m256i>(dst, a, b, _mm256_setzero_si256(), stream256) }
    }

    /// Widens 8 f16 values (exact).
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    unsafe fn load8(h: &[u16]) -> [f32; 8] {
        assert!(h.len() >= 8);
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast())));
        out
    }

    /// Rounds 8 values to f16, to nearest even (`_MM_FROUND_TO_NEAREST_INT`, not MXCSR).
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    unsafe fn store8(h: &mut [u16], v: [f32; 8]) {
        assert!(h.len() >= 8);
        let r = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(v.as_ptr()));
        _mm_storeu_si128(h.as_mut_ptr().cast(), r);
    }

    /// # Safety
    /// The CPU must support AVX and F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_inplace<C: Fn(f32, f32) -> f32>(dst: &mut [u16], src: &[u16], c: C) {
        let src = &src[..dst.len()];
        let mut d8 = dst.chunks_exact_mut(8);
        let mut s8 = src.chunks_exact(8);
        for (d, s) in (&mut d8).zip(&mut s8) {
            let (mut x, y) = (load8(d), load8(s));
            for k in 0..8 {
                x[k] = c(x[k], y[k]);
            }
            store8(d, x);
        }
        portable_inplace::<F16Fmt, C>(d8.into_remainder(), s8.remainder(), c)
    }

    /// # Safety
    /// The CPU must support AVX and F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_into<C: Fn(f32, f32) -> f32>(dst: &mut [u16], a: &[u16], b: &[u16], c: C) {
        let n = dst.len();
        let (a, b) = (&a[..n], &b[..n]);
        let mut d8 = dst.chunks_exact_mut(8);
        let mut a8 = a.chunks_exact(8);
        let mut b8 = b.chunks_exact(8);
        for ((d, a), b) in (&mut d8).zip(&mut a8).zip(&mut b8) {
            let (mut x, y) = (load8(a), load8(b));
            for k in 0..8 {
                x[k] = c(x[k], y[k]);
            }
            store8(d, x);
        }
        portable_into::<F16Fmt, C>(d8.into_remainder(), a8.remainder(), b8.remainder(), c)
    }

    /// # Safety
    /// The CPU must support AVX and F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_map<M: Fn(f32) -> f32>(buf: &mut [u16], f: M) {
        let mut b8 = buf.chunks_exact_mut(8);
        for b in &mut b8 {
            let mut x = load8(b);
            for v in &mut x {
                *v = f(*v);
            }
            store8(b, x);
        }
        portable_map::<F16Fmt, M>(b8.into_remainder(), f)
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2_native_inplace<T: Copy, O: Op<T>>(dst: &mut [T], src: &[T]) {
        native_inplace::<T, O>(dst, src)
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2_native_into<T: Copy, O: Op<T>>(dst: &mut [T], a: &[T], b: &[T]) {
        native_into::<T, O>(dst, a, b)
    }

    /// The portable loop, compiled for AVX2 (256-bit integer ops make the bit tricks cheap).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2_inplace<F: HalfFormat, C: Fn(f32, f32) -> f32>(dst: &mut [u16], src: &[u16], c: C) {
        portable_inplace::<F, C>(dst, src, c)
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2_into<F: HalfFormat, C: Fn(f32, f32) -> f32>(dst: &mut [u16], a: &[u16], b: &[u16], c: C) {
        portable_into::<F, C>(dst, a, b, c)
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2_map<F: HalfFormat, M: Fn(f32) -> f32>(buf: &mut [u16], f: M) {
        portable_map::<F, M>(buf, f)
    }
}

/// Kernel for f16/bf16 (stored as their `u16` bits): widen both operands to `f32` (exact),
/// combine in `f32`, round once back to nearest even.
struct Half<F, O>(PhantomData<(F, O)>);

impl<F: HalfFormat, O: Op<f32>> Kern for Half<F, O> {
    type T = u16;

    #[inline(always)]
    fn inplace(dst: &mut [u16], src: &[u16]) {
        F::zip_inplace(dst, src, O::apply)
    }

    #[inline(always)]
    fn into(dst: &mut [u16], a: &[u16], b: &[u16]) {
        F::zip_into(dst, a, b, O::apply)
    }
}

// ---------------------------------------------------------------------------------------------
// Byte-level wrappers (alignment handling)
// ---------------------------------------------------------------------------------------------

/// Views `bytes` as a `[T]` if it is aligned (its length is already a multiple of the size).
#[inline]
fn typed<T: Copy + Default>(bytes: &[u8]) -> Option<&[T]> {
    // SAFETY: every `Kern::T` is plain old data (integers, floats, f16/bf16): any bit pattern is
    // a valid value, there is no padding, and `align_to` only yields a correctly aligned middle.
    let (pre, mid, post) = unsafe { bytes.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

#[inline]
fn typed_mut<T: Copy + Default>(bytes: &mut [u8]) -> Option<&mut [T]> {
    // SAFETY: as in `typed`; the `[T]` can also hold any bytes written through it.
    let (pre, mid, post) = unsafe { bytes.align_to_mut::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// Copies `bytes` (a multiple of the element size, at most `BLOCK` elements) into `buf`.
#[inline]
fn load<T: Copy>(buf: &mut [T; BLOCK], bytes: &[u8]) -> usize {
    let n = bytes.len() / size_of::<T>();
    debug_assert!(n <= BLOCK && n * size_of::<T>() == bytes.len());
    // SAFETY: `buf` holds `BLOCK * size_of::<T>() >= bytes.len()` bytes, the regions are
    // distinct, and T is plain old data, so any bytes form valid values.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.as_mut_ptr().cast::<u8>(), bytes.len()) };
    n
}

/// Copies the first `bytes.len()` bytes of `buf` into `bytes`.
#[inline]
fn store<T: Copy>(bytes: &mut [u8], buf: &[T; BLOCK]) {
    debug_assert!(bytes.len() <= BLOCK * size_of::<T>());
    // SAFETY: `buf` holds at least `bytes.len()` initialized bytes; the regions are distinct.
    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().cast::<u8>(), bytes.as_mut_ptr(), bytes.len()) };
}

fn bytes_inplace<K: Kern>(dst: &mut [u8], src: &[u8]) {
    if let Some(s) = typed::<K::T>(src) {
        if let Some(d) = typed_mut::<K::T>(dst) {
            return K::inplace(d, s);
        }
    }
    // Unaligned: go through aligned stack buffers, one block at a time.
    let step = BLOCK * size_of::<K::T>();
    let mut db = [K::T::default(); BLOCK];
    let mut sb = [K::T::default(); BLOCK];
    for (d, s) in dst.chunks_mut(step).zip(src.chunks(step)) {
        let n = load(&mut db, d);
        load(&mut sb, s);
        K::inplace(&mut db[..n], &sb[..n]);
        store(d, &db);
    }
}

fn bytes_into<K: Kern>(dst: &mut [u8], a: &[u8], b: &[u8]) {
    if let (Some(a), Some(b)) = (typed::<K::T>(a), typed::<K::T>(b)) {
        if let Some(d) = typed_mut::<K::T>(dst) {
            return K::into(d, a, b);
        }
    }
    let step = BLOCK * size_of::<K::T>();
    let mut db = [K::T::default(); BLOCK];
    let mut ab = [K::T::default(); BLOCK];
    let mut bb = [K::T::default(); BLOCK];
    for ((d, a), b) in dst.chunks_mut(step).zip(a.chunks(step)).zip(b.chunks(step)) {
        let n = load(&mut ab, a);
        load(&mut bb, b);
        K::into(&mut db[..n], &ab[..n], &bb[..n]);
        store(d, &db);
    }
}

fn bytes_into_streaming<K: Kern>(dst: &mut [u8], a: &[u8], b: &[u8]) {
    if let (Some(a), Some(b)) = (typed::<K::T>(a), typed::<K::T>(b)) {
        if let Some(d) = typed_mut::<K::T>(dst) {
            return K::into_streaming(d, a, b);
        }
    }
    bytes_into::<K>(dst, a, b)
}

/// The monomorphized byte-level entry points for one (dtype, op) pair.
#[derive(Clone, Copy)]
struct Kernel {
    inplace: fn(&mut [u8], &[u8]),
    into: fn(&mut [u8], &[u8], &[u8]),
    into_streaming: fn(&mut [u8], &[u8], &[u8]),
}

impl Kernel {
    fn of<K: Kern>() -> Kernel {
        Kernel { inplace: bytes_inplace::<K>, into: bytes_into::<K>, into_streaming: bytes_into_streaming::<K> }
    }

    /// Looks up the kernel; `Avg` combines as `Sum`.
    fn get(dtype: DataType, op: ReduceOp) -> Kernel {
        macro_rules! by_op {
            ($k:ident, $t:ty) => {
                match op.combine() {
                    ReduceOp::Sum | ReduceOp::Avg => Kernel::of::<$k<$t, OpSum>>(),
                    ReduceOp::Prod => Kernel::of::<$k<$t, OpProd>>(),
                    ReduceOp::Min => Kernel::of::<$k<$t, OpMin>>(),
                    ReduceOp::Max => Kernel::of::<$k<$t, OpMax>>(),
                }
            };
        }
        match dtype {
            DataType::I8 => by_op!(Native, i8),
            DataType::U8 => by_op!(Native, u8),
            DataType::I32 => by_op!(Native, i32),
            DataType::U32 => by_op!(Native, u32),
            DataType::I64 => by_op!(Native, i64),
            DataType::U64 => by_op!(Native, u64),
            DataType::F16 => by_op!(Half, F16Fmt),
            DataType::Bf16 => by_op!(Half, Bf16Fmt),
            DataType::F32 => by_op!(Native, f32),
            DataType::F64 => by_op!(Native, f64),
        }
    }
}

#[track_caller]
fn check_len(dtype: DataType, dst: usize, other: usize) {
    assert!(dst == other, "reduce: buffer lengths differ ({dst} vs {other} bytes)");
    assert_eq!(
        dst % dtype.size(),
        0,
        "reduce: length {dst} is not a multiple of the {dtype} element size {}",
        dtype.size()
    );
}

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// `dst[i] = op(dst[i], src[i])` elementwise over elements of `dtype`.
///
/// [`ReduceOp::Avg`] combines as `Sum`; the caller applies [`divide`] at the end.
///
/// # Panics
/// If the lengths differ or are not a multiple of `dtype.size()`.
#[track_caller]
pub fn reduce_inplace(dtype: DataType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    check_len(dtype, dst.len(), src.len());
    (Kernel::get(dtype, op).inplace)(dst, src);
}

/// `dst[i] = op(a[i], b[i])` elementwise over elements of `dtype`.
///
/// [`ReduceOp::Avg`] combines as `Sum`; the caller applies [`divide`] at the end.
///
/// # Panics
/// If the three lengths differ or are not a multiple of `dtype.size()`.
#[track_caller]
pub fn reduce_into(dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) {
    into_kernel(dtype, op, dst, a, b, false)(dst, a, b);
}

/// The checked `into` entry point for `dtype`/`op`, with streaming stores or without.
#[track_caller]
fn into_kernel(
    dtype: DataType,
    op: ReduceOp,
    dst: &[u8],
    a: &[u8],
    b: &[u8],
    streaming: bool,
) -> fn(&mut [u8], &[u8], &[u8]) {
    check_len(dtype, dst.len(), a.len());
    check_len(dtype, dst.len(), b.len());
    let k = Kernel::get(dtype, op);
    if streaming {
        k.into_streaming
    } else {
        k.into
    }
}

/// [`reduce_into`] with the same result, but writing `dst` with non-temporal (streaming)
/// stores, which skip reading the destination's cache lines before overwriting them and leave
/// the result in memory rather than in the caches. Worth it only when `dst` is large and not
/// read again soon: the ring allreduce uses it for messages of `ACCL_STREAM_MIN` and more.
///
/// Streaming stores are used on x86-64 CPUs with AVX2 or AVX-512F for the integer types, `f32`
/// and `f64`; `f16`/`bf16`, other CPUs and unaligned buffers store normally.
///
/// ```
/// use accl_core::{reduce::reduce_into_streaming, DataType, ReduceOp};
/// let (a, b) = ([1i32, 2, 3].map(i32::to_ne_bytes).concat(), [10i32, 20, 30].map(i32::to_ne_bytes).concat());
/// let mut dst = vec![0u8; 12];
/// reduce_into_streaming(DataType::I32, ReduceOp::Sum, &mut dst, &a, &b);
/// assert_eq!(dst, [11i32, 22, 33].map(i32::to_ne_bytes).concat());
/// ```
///
/// # Panics
/// As [`reduce_into`].
#[track_caller]
pub fn reduce_into_streaming(dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) {
    into_kernel(dtype, op, dst, a, b, true)(dst, a, b);
}

/// `buf[i] = buf[i] / n`, the final step of [`ReduceOp::Avg`].
///
/// Integers divide exactly as `i128` would, truncating toward zero (`-7 / 2 == -3`), even when
/// `n` does not fit the element type. `f32`/`f64` divide in the type; `f16`/`bf16` divide in
/// `f32` and round once (to nearest even).
///
/// # Panics
/// If `n == 0` or the length is not a multiple of `dtype.size()`.
#[track_caller]
pub fn divide(dtype: DataType, buf: &mut [u8], n: usize) {
    assert!(n > 0, "divide: n must be positive");
    check_len(dtype, buf.len(), buf.len());
    if n == 1 {
        return;
    }
    match dtype {
        DataType::I8 => divide_int::<i8>(buf, n),
        DataType::U8 => divide_int::<u8>(buf, n),
        DataType::I32 => divide_int::<i32>(buf, n),
        DataType::U32 => divide_int::<u32>(buf, n),
        DataType::I64 => divide_int::<i64>(buf, n),
        DataType::U64 => divide_int::<u64>(buf, n),
        DataType::F16 => divide_half::<F16Fmt>(buf, n),
        DataType::Bf16 => divide_half::<Bf16Fmt>(buf, n),
        DataType::F32 => {
            let d = n as f32;
            map_elems::<f32>(buf, |x| x / d)
        }
        DataType::F64 => {
            let d = n as f64;
            map_elems::<f64>(buf, |x| x / d)
        }
    }
}

/// An integer element type for [`divide`].
trait DivInt: Copy + Default + TryFrom<usize> + Into<i128> + TryFrom<i128> {
    fn div_trunc(self, d: Self) -> Self;
}
macro_rules! div_int {
    ($($t:ty),*) => {$(
        impl DivInt for $t {
            #[inline(always)]
            fn div_trunc(self, d: Self) -> Self { self / d }
        }
    )*};
}
div_int!(i8, u8, i32, u32, i64, u64);

fn divide_int<T: DivInt>(buf: &mut [u8], n: usize) {
    match T::try_from(n) {
        // n > 1 fits the type (and is positive), so `x / d` cannot overflow.
        Ok(d) => map_elems::<T>(buf, |x| x.div_trunc(d)),
        // n is larger than the type's maximum: the quotient is 0 or -1 and `i128` is exact.
        Err(_) => map_elems::<T>(buf, |x| {
            let q = x.into() / n as i128;
            T::try_from(q).unwrap_or_default()
        }),
    }
}

fn divide_half<F: HalfFormat>(buf: &mut [u8], n: usize) {
    let d = n as f32;
    match typed_mut::<u16>(buf) {
        Some(v) => F::map(v, |x| x / d),
        None => map_elems::<u16>(buf, |h| F::from_f32(F::to_f32(h) / d)),
    }
}

/// Applies `f` to every element of `buf` (aligned fast path, unaligned block fallback).
fn map_elems<T: Copy + Default>(buf: &mut [u8], f: impl Fn(T) -> T) {
    if let Some(v) = typed_mut::<T>(buf) {
        for x in v {
            *x = f(*x);
        }
        return;
    }
    let mut b = [T::default(); BLOCK];
    for chunk in buf.chunks_mut(BLOCK * size_of::<T>()) {
        let k = load(&mut b, chunk);
        for x in &mut b[..k] {
            *x = f(*x);
        }
        store(chunk, &b);
    }
}

/// Runs reductions, splitting large ones over a small private rayon pool.
///
/// With `threads <= 1` no pool is created and everything runs on the calling thread. With more,
/// a dedicated [`rayon::ThreadPool`] (never the global one) is built, and reductions larger than
/// [`min_parallel_bytes`](Reducer::min_parallel_bytes) are split into one cache-line-aligned,
/// element-aligned piece per thread. Results are bit-identical to the serial functions, since
/// every element is combined independently.
pub struct Reducer {
    pool: Option<rayon::ThreadPool>,
    threads: usize,
    min_parallel_bytes: usize,
}

impl Reducer {
    /// A reducer using `threads` threads (see the type docs). If the pool cannot be built the
    /// reducer falls back to running serially, and [`threads`](Reducer::threads) reports 1.
    pub fn new(threads: usize) -> Reducer {
        let pool = if threads > 1 {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("accl-reduce-{i}"))
                .build()
                .ok()
        } else {
            None
        };
        let threads = if pool.is_some() { threads } else { 1 };
        Reducer { pool, threads, min_parallel_bytes: DEFAULT_MIN_PARALLEL_BYTES }
    }

    /// Sets the size (bytes of `dst`) above which reductions are split across threads.
    pub fn with_min_parallel_bytes(mut self, bytes: usize) -> Reducer {
        self.min_parallel_bytes = bytes;
        self
    }

    /// The number of threads a reduction may use (at least 1).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The size (bytes of `dst`) above which reductions are split across threads.
    pub fn min_parallel_bytes(&self) -> usize {
        self.min_parallel_bytes
    }

    /// The pool and piece size to use for a `len`-byte reduction, or `None` to run serially.
    fn split(&self, len: usize) -> Option<(&rayon::ThreadPool, usize)> {
        let pool = self.pool.as_ref()?;
        if len <= self.min_parallel_bytes {
            return None;
        }
        // Multiple of 64 bytes: element-aligned for every dtype and cache-line friendly.
        let piece = len.div_ceil(self.threads).next_multiple_of(64);
        Some((pool, piece))
    }

    /// Same as the free [`reduce_inplace`], possibly multi-threaded.
    #[track_caller]
    pub fn reduce_inplace(&self, dtype: DataType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
        check_len(dtype, dst.len(), src.len());
        let k = Kernel::get(dtype, op);
        match self.split(dst.len()) {
            None => (k.inplace)(dst, src),
            Some((pool, piece)) => pool
                .install(|| dst.par_chunks_mut(piece).zip(src.par_chunks(piece)).for_each(|(d, s)| (k.inplace)(d, s))),
        }
    }

    /// Same as the free [`reduce_into`], possibly multi-threaded.
    #[track_caller]
    pub fn reduce_into(&self, dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) {
        self.reduce_into_with(dtype, op, dst, a, b, false)
    }

    /// Same as the free [`reduce_into_streaming`], possibly multi-threaded.
    #[track_caller]
    pub fn reduce_into_streaming(&self, dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) {
        self.reduce_into_with(dtype, op, dst, a, b, true)
    }

    /// [`Reducer::reduce_into`] or, with `streaming`, [`Reducer::reduce_into_streaming`].
    #[track_caller]
    pub fn reduce_into_with(&self, dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8], streaming: bool) {
        let into = into_kernel(dtype, op, dst, a, b, streaming);
        match self.split(dst.len()) {
            None => into(dst, a, b),
            Some((pool, piece)) => pool.install(|| {
                dst.par_chunks_mut(piece)
                    .zip(a.par_chunks(piece))
                    .zip(b.par_chunks(piece))
                    .for_each(|((d, a), b)| into(d, a, b))
            }),
        }
    }
}

impl Default for Reducer {
    /// A serial reducer (`Reducer::new(1)`).
    fn default() -> Reducer {
        Reducer::new(1)
    }
}

impl fmt::Debug for Reducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reducer")
            .field("threads", &self.threads)
            .field("min_parallel_bytes", &self.min_parallel_bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// xorshift64*: deterministic test data without extra dependencies.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// A float test value: mostly small dyadic numbers (sums/products stay interesting but
    /// finite), sometimes a special value.
    fn float_val(rng: &mut Rng) -> f64 {
        let r = rng.next();
        match r % 64 {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            5 => 1e30, // overflows f16/bf16 differently; exercises inf handling
            _ => ((r >> 8) % 20001) as f64 / 64.0 - 156.25,
        }
    }

    fn gen(dtype: DataType, n: usize, rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::with_capacity(n * dtype.size());
        for _ in 0..n {
            match dtype {
                DataType::F16 => out.extend(f16::from_f64(float_val(rng)).to_ne_bytes()),
                DataType::Bf16 => out.extend(bf16::from_f64(float_val(rng)).to_ne_bytes()),
                DataType::F32 => out.extend((float_val(rng) as f32).to_ne_bytes()),
                DataType::F64 => out.extend(float_val(rng).to_ne_bytes()),
                _ => out.extend(&rng.next().to_ne_bytes()[..dtype.size()]),
            }
        }
        out
    }

    // Naive scalar reference, written independently of the kernels.
    fn ref_int<T: Copy + PartialOrd>(op: ReduceOp, a: T, b: T, add: fn(T, T) -> T, mul: fn(T, T) -> T) -> T {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => add(a, b),
            ReduceOp::Prod => mul(a, b),
            ReduceOp::Min => {
                if a < b {
                    a
                } else {
                    b
                }
            }
            ReduceOp::Max => {
                if a > b {
                    a
                } else {
                    b
                }
            }
        }
    }

    fn ref_f64(op: ReduceOp, a: f64, b: f64) -> f64 {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => a + b,
            ReduceOp::Prod => a * b,
            ReduceOp::Min | ReduceOp::Max if a.is_nan() || b.is_nan() => f64::NAN,
            ReduceOp::Min if a == 0.0 && b == 0.0 => {
                if a.is_sign_negative() || b.is_sign_negative() {
                    -0.0
                } else {
                    0.0
                }
            }
            ReduceOp::Max if a == 0.0 && b == 0.0 => {
                if a.is_sign_positive() || b.is_sign_positive() {
                    0.0
                } else {
                    -0.0
                }
            }
            ReduceOp::Min => a.min(b),
            ReduceOp::Max => a.max(b),
        }
    }

    fn ref_f32(op: ReduceOp, a: f32, b: f32) -> f32 {
        match op {
            // Sum/Prod must be computed in f32, not via f64.
            ReduceOp::Sum | ReduceOp::Avg => a + b,
            ReduceOp::Prod => a * b,
            _ => ref_f64(op, a as f64, b as f64) as f32,
        }
    }

    fn reference(dtype: DataType, op: ReduceOp, a: &[u8], b: &[u8]) -> Vec<u8> {
        let sz = dtype.size();
        let mut out = Vec::with_capacity(a.len());
        for (x, y) in a.chunks_exact(sz).zip(b.chunks_exact(sz)) {
            macro_rules! int {
                ($t:ty) => {{
                    let x = <$t>::from_ne_bytes(x.try_into().unwrap());
                    let y = <$t>::from_ne_bytes(y.try_into().unwrap());
                    out.extend(ref_int(op, x, y, <$t>::wrapping_add, <$t>::wrapping_mul).to_ne_bytes());
                }};
            }
            macro_rules! half {
                ($t:ty) => {{
                    let x = <$t>::from_ne_bytes(x.try_into().unwrap()).to_f32();
                    let y = <$t>::from_ne_bytes(y.try_into().unwrap()).to_f32();
                    out.extend(<$t>::from_f32(ref_f32(op, x, y)).to_ne_bytes());
                }};
            }
            match dtype {
                DataType::I8 => int!(i8),
                DataType::U8 => int!(u8),
                DataType::I32 => int!(i32),
                DataType::U32 => int!(u32),
                DataType::I64 => int!(i64),
                DataType::U64 => int!(u64),
                DataType::F16 => half!(f16),
                DataType::Bf16 => half!(bf16),
                DataType::F32 => {
                    let x = f32::from_ne_bytes(x.try_into().unwrap());
                    let y = f32::from_ne_bytes(y.try_into().unwrap());
                    out.extend(ref_f32(op, x, y).to_ne_bytes());
                }
                DataType::F64 => {
                    let x = f64::from_ne_bytes(x.try_into().unwrap());
                    let y = f64::from_ne_bytes(y.try_into().unwrap());
                    out.extend(ref_f64(op, x, y).to_ne_bytes());
                }
            }
        }
        out
    }

    /// True if every element is bit-identical, or both are NaN (payloads are unspecified).
    fn same(dtype: DataType, got: &[u8], want: &[u8]) -> bool {
        let sz = dtype.size();
        got.len() == want.len()
            && got.chunks_exact(sz).zip(want.chunks_exact(sz)).all(|(g, w)| {
                g == w
                    || match dtype {
                        DataType::F16 => {
                            f16::from_ne_bytes(g.try_into().unwrap()).is_nan()
                                && f16::from_ne_bytes(w.try_into().unwrap()).is_nan()
                        }
                        DataType::Bf16 => {
                            bf16::from_ne_bytes(g.try_into().unwrap()).is_nan()
                                && bf16::from_ne_bytes(w.try_into().unwrap()).is_nan()
                        }
                        DataType::F32 => {
                            f32::from_ne_bytes(g.try_into().unwrap()).is_nan()
                                && f32::from_ne_bytes(w.try_into().unwrap()).is_nan()
                        }
                        DataType::F64 => {
                            f64::from_ne_bytes(g.try_into().unwrap()).is_nan()
                                && f64::from_ne_bytes(w.try_into().unwrap()).is_nan()
                        }
                        _ => false,
                    }
            })
    }

    /// An 8-byte-aligned scratch buffer from which slices at chosen byte offsets are taken.
    struct Buf(Vec<u64>);
    impl Buf {
        fn new(bytes: usize) -> Buf {
            Buf(vec![0; bytes / 8 + 2])
        }
        fn at(&mut self, off: usize, data: &[u8]) -> &mut [u8] {
            // SAFETY: u64 -> u8 view of the same allocation.
            let all = unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), self.0.len() * 8) };
            let s = &mut all[off..off + data.len()];
            s.copy_from_slice(data);
            s
        }
    }

    const LENS: [usize; 11] = [0, 1, 2, 3, 7, 31, 255, 256, 257, 513, 1000];
    const OFFSETS: [(usize, usize, usize); 5] = [(0, 0, 0), (1, 0, 0), (0, 3, 0), (0, 0, 5), (7, 2, 1)];

    #[test]
    fn every_dtype_and_op_matches_reference() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let par = Reducer::new(2).with_min_parallel_bytes(64);
        for dtype in DataType::ALL {
            for op in ReduceOp::ALL {
                for n in LENS {
                    let a = gen(dtype, n, &mut rng);
                    let b = gen(dtype, n, &mut rng);
                    let want = reference(dtype, op, &a, &b);
                    let ctx = format!("{dtype} {op} n={n}");
                    for (od, oa, ob) in OFFSETS {
                        let (mut bd, mut ba, mut bb) =
                            (Buf::new(a.len() + 8), Buf::new(a.len() + 8), Buf::new(a.len() + 8));

                        let d = bd.at(od, &a);
                        reduce_inplace(dtype, op, d, ba.at(oa, &b));
                        assert!(same(dtype, d, &want), "reduce_inplace {ctx} off={od},{oa}");

                        let d = bd.at(od, &vec![0xa5; a.len()]);
                        reduce_into(dtype, op, d, ba.at(oa, &a), bb.at(ob, &b));
                        assert!(same(dtype, d, &want), "reduce_into {ctx} off={od},{oa},{ob}");

                        let d = bd.at(od, &vec![0xc3; a.len()]);
                        reduce_into_streaming(dtype, op, d, ba.at(oa, &a), bb.at(ob, &b));
                        assert!(same(dtype, d, &want), "reduce_into_streaming {ctx} off={od},{oa},{ob}");

                        let d = bd.at(od, &a);
                        par.reduce_inplace(dtype, op, d, ba.at(oa, &b));
                        assert!(same(dtype, d, &want), "Reducer::reduce_inplace {ctx}");

                        let d = bd.at(od, &vec![0x5a; a.len()]);
                        par.reduce_into(dtype, op, d, ba.at(oa, &a), bb.at(ob, &b));
                        assert!(same(dtype, d, &want), "Reducer::reduce_into {ctx}");

                        let d = bd.at(od, &vec![0x3c; a.len()]);
                        par.reduce_into_streaming(dtype, op, d, ba.at(oa, &a), bb.at(ob, &b));
                        assert!(same(dtype, d, &want), "Reducer::reduce_into_streaming {ctx}");
                    }
                }
            }
        }
    }

    fn f16s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| f16::from_f32(x).to_ne_bytes()).collect()
    }
    fn bf16s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| bf16::from_f32(x).to_ne_bytes()).collect()
    }
    fn f16_vals(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(2).map(|c| f16::from_ne_bytes(c.try_into().unwrap()).to_f32()).collect()
    }
    fn bf16_vals(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(2).map(|c| bf16::from_ne_bytes(c.try_into().unwrap()).to_f32()).collect()
    }

    #[test]
    fn half_rounds_once_to_nearest_even() {
        // f16: ulp(1) = 2^-10; adding half an ulp is a tie and rounds to the even neighbour.
        let h = 2f32.powi(-11);
        let mut d = f16s(&[1.0, 1.0 + 2.0 * h, 65504.0, 3.0, 0.1]);
        reduce_inplace(DataType::F16, ReduceOp::Sum, &mut d, &f16s(&[h, h, 65504.0, -3.0, 0.2]));
        let got = f16_vals(&d);
        assert_eq!(got[..4], [1.0, 1.0 + 4.0 * h, f32::INFINITY, 0.0]);
        // 0.1 + 0.2 combined in f32 from the exact f16 inputs, then rounded once.
        let want = f16::from_f32(f16::from_f32(0.1).to_f32() + f16::from_f32(0.2).to_f32());
        assert_eq!(got[4], want.to_f32());

        // f16 products of f16 values are exact in f32, so the result is correctly rounded.
        let mut d = f16s(&[1.0 + 2.0 * h]);
        reduce_inplace(DataType::F16, ReduceOp::Prod, &mut d, &f16s(&[1.0 + 2.0 * h]));
        assert_eq!(f16_vals(&d), [f16::from_f64((1.0 + 2.0 * h as f64).powi(2)).to_f32()]);

        // bf16: ulp(1) = 2^-7.
        let h = 2f32.powi(-8);
        let mut d = bf16s(&[1.0, 1.0 + 2.0 * h, 3.0e38]);
        reduce_inplace(DataType::Bf16, ReduceOp::Sum, &mut d, &bf16s(&[h, h, 3.0e38]));
        assert_eq!(bf16_vals(&d), [1.0, 1.0 + 4.0 * h, f32::INFINITY]);

        // Two steps round twice (once per combination), not once at the end: 1 + h + h.
        let mut d = bf16s(&[1.0]);
        reduce_inplace(DataType::Bf16, ReduceOp::Sum, &mut d, &bf16s(&[h]));
        reduce_inplace(DataType::Bf16, ReduceOp::Sum, &mut d, &bf16s(&[h]));
        assert_eq!(bf16_vals(&d), [1.0]);
    }

    fn f16_ref(x: f32) -> u16 {
        f16::from_f32(x).to_bits()
    }
    fn bf16_ref(x: f32) -> u16 {
        bf16::from_f32(x).to_bits()
    }
    fn f16_is_nan(h: u16) -> bool {
        h & 0x7fff > 0x7c00
    }
    fn bf16_is_nan(h: u16) -> bool {
        h & 0x7fff > 0x7f80
    }

    /// Checks `F::from_f32(x)` against `half` (NaN payloads may differ).
    fn check_from<F: HalfFormat>(x: f32, reference: fn(f32) -> u16, is_nan: fn(u16) -> bool) {
        let (got, want) = (F::from_f32(x), reference(x));
        assert!(
            got == want || (is_nan(got) && is_nan(want)),
            "from_f32({x:e} = {:#010x}): got {got:#06x}, half gives {want:#06x}",
            x.to_bits()
        );
    }

    /// Every f16/bf16 value, the midpoints to its neighbours (ties), and one f32 ulp either side.
    fn check_from_boundaries<F: HalfFormat>(
        max_finite: u16,
        top: f64,
        reference: fn(f32) -> u16,
        is_nan: fn(u16) -> bool,
    ) {
        for h in 0..=max_finite {
            let v = F::to_f32(h) as f64;
            let next = if h == max_finite { top } else { F::to_f32(h + 1) as f64 };
            let mid = ((v + next) / 2.0) as f32; // exact: one bit more than the format has
            for x in [v as f32, mid, f32::from_bits(mid.to_bits() + 1), f32::from_bits(mid.to_bits() - 1)] {
                check_from::<F>(x, reference, is_nan);
                check_from::<F>(-x, reference, is_nan);
            }
        }
        for x in [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffc1_2345),
        ] {
            check_from::<F>(x, reference, is_nan);
        }
    }

    #[test]
    fn half_conversions_match_half_crate() {
        // to_f32: exhaustive.
        for h in 0..=u16::MAX {
            let (got, want) = (F16Fmt::to_f32(h), f16::from_bits(h).to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "f16 {h:#06x}");
            let (got, want) = (Bf16Fmt::to_f32(h), bf16::from_bits(h).to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "bf16 {h:#06x}");
        }
        // from_f32: every rounding boundary, plus a sweep over all f32 bit patterns.
        check_from_boundaries::<F16Fmt>(0x7bff, 65536.0, f16_ref, f16_is_nan);
        check_from_boundaries::<Bf16Fmt>(0x7f7f, 2f64.powi(128), bf16_ref, bf16_is_nan);
        for bits in (0..=u32::MAX).step_by(4093) {
            check_from::<F16Fmt>(f32::from_bits(bits), f16_ref, f16_is_nan);
            check_from::<Bf16Fmt>(f32::from_bits(bits), bf16_ref, bf16_is_nan);
        }
    }

    /// Every f32 bit pattern; slow in debug builds: `cargo test --release -- --ignored`.
    #[test]
    #[ignore]
    fn half_from_f32_exhaustive() {
        for bits in 0..=u32::MAX {
            check_from::<F16Fmt>(f32::from_bits(bits), f16_ref, f16_is_nan);
            check_from::<Bf16Fmt>(f32::from_bits(bits), bf16_ref, bf16_is_nan);
        }
    }

    /// The dispatched f16/bf16 loops use F16C/AVX2 where the CPU has them; check the portable
    /// loops (used elsewhere) directly against the reference as well.
    #[test]
    fn portable_half_loops_match_reference() {
        fn u16s(b: &[u8]) -> Vec<u16> {
            b.chunks_exact(2).map(|c| u16::from_ne_bytes(c.try_into().unwrap())).collect()
        }
        fn bytes(v: &[u16]) -> Vec<u8> {
            v.iter().flat_map(|x| x.to_ne_bytes()).collect()
        }
        fn check<F: HalfFormat>(dtype: DataType, rng: &mut Rng) {
            for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
                let c = |x: f32, y: f32| match op {
                    ReduceOp::Sum => <OpSum as Op<f32>>::apply(x, y),
                    ReduceOp::Prod => <OpProd as Op<f32>>::apply(x, y),
                    ReduceOp::Min => <OpMin as Op<f32>>::apply(x, y),
                    _ => <OpMax as Op<f32>>::apply(x, y),
                };
                let a = gen(dtype, 1000, rng);
                let b = gen(dtype, 1000, rng);
                let want = reference(dtype, op, &a, &b);
                let mut d = u16s(&a);
                portable_inplace::<F, _>(&mut d, &u16s(&b), c);
                assert!(same(dtype, &bytes(&d), &want), "{dtype} {op} inplace");
                let mut d = vec![0; 1000];
                portable_into::<F, _>(&mut d, &u16s(&a), &u16s(&b), c);
                assert!(same(dtype, &bytes(&d), &want), "{dtype} {op} into");
            }
            let a = gen(dtype, 1000, rng);
            let mut d = u16s(&a);
            portable_map::<F, _>(&mut d, |x| x / 3.0);
            let mut want = u16s(&a);
            F::map(&mut want, |x| x / 3.0); // dispatched (F16C/AVX2 here, if available)
            assert!(same(dtype, &bytes(&d), &bytes(&want)), "{dtype} map");
        }
        let mut rng = Rng(99);
        check::<F16Fmt>(DataType::F16, &mut rng);
        check::<Bf16Fmt>(DataType::Bf16, &mut rng);
    }

    /// The dispatched native loops use AVX2 where the CPU has it; check the baseline builds of
    /// the same loops directly against the reference as well.
    #[test]
    fn portable_native_loops_match_reference() {
        fn typed_vec<T: Copy + Default>(b: &[u8]) -> Vec<T> {
            let mut v = vec![T::default(); b.len() / size_of::<T>()];
            // SAFETY: `v` holds exactly `b.len()` bytes; T is plain old data.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr().cast(), b.len()) };
            v
        }
        fn raw<T: Copy>(v: &[T]) -> Vec<u8> {
            // SAFETY: T is plain old data without padding.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }.to_vec()
        }
        fn check<T: Copy + Default, O: Op<T>>(dtype: DataType, op: ReduceOp, rng: &mut Rng) {
            let a = gen(dtype, 1000, rng);
            let b = gen(dtype, 1000, rng);
            let want = reference(dtype, op, &a, &b);
            let mut d = typed_vec::<T>(&a);
            native_inplace::<T, O>(&mut d, &typed_vec::<T>(&b));
            assert!(same(dtype, &raw(&d), &want), "{dtype} {op} inplace");
            let mut d = vec![T::default(); 1000];
            native_into::<T, O>(&mut d, &typed_vec::<T>(&a), &typed_vec::<T>(&b));
            assert!(same(dtype, &raw(&d), &want), "{dtype} {op} into");
        }
        let mut rng = Rng(5);
        macro_rules! all_ops {
            ($($t:ty => $dt:ident),*) => {$(
                check::<$t, OpSum>(DataType::$dt, ReduceOp::Sum, &mut rng);
                check::<$t, OpProd>(DataType::$dt, ReduceOp::Prod, &mut rng);
                check::<$t, OpMin>(DataType::$dt, ReduceOp::Min, &mut rng);
                check::<$t, OpMax>(DataType::$dt, ReduceOp::Max, &mut rng);
            )*};
        }
        all_ops!(i8 => I8, u8 => U8, i32 => I32, u32 => U32, i64 => I64, u64 => U64,
            f32 => F32, f64 => F64);
    }

    #[test]
    fn integers_wrap() {
        let mut d = vec![127u8, 0x80, 255];
        reduce_inplace(DataType::I8, ReduceOp::Sum, &mut d, &[1, 0xff, 2]);
        assert_eq!(d, [0x80, 0x7f, 1]); // -128, -128 + -1 = 127, -1 + 2 = 1
        let mut d = vec![255u8, 16];
        reduce_inplace(DataType::U8, ReduceOp::Prod, &mut d, &[2, 16]);
        assert_eq!(d, [254, 0]);

        let mut d: Vec<u8> = [i32::MAX, i32::MIN].iter().flat_map(|x| x.to_ne_bytes()).collect();
        let s: Vec<u8> = [1i32, -1].iter().flat_map(|x| x.to_ne_bytes()).collect();
        reduce_inplace(DataType::I32, ReduceOp::Sum, &mut d, &s);
        assert_eq!(d, [i32::MIN, i32::MAX].iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<_>>());

        let mut d = (u64::MAX).to_ne_bytes().to_vec();
        reduce_inplace(DataType::U64, ReduceOp::Prod, &mut d, &3u64.to_ne_bytes());
        assert_eq!(d, (u64::MAX - 2).to_ne_bytes());
        let mut d = (i64::MIN).to_ne_bytes().to_vec();
        reduce_inplace(DataType::I64, ReduceOp::Avg, &mut d, &(-1i64).to_ne_bytes());
        assert_eq!(d, i64::MAX.to_ne_bytes());
    }

    #[test]
    fn float_min_max_nan_and_signed_zero() {
        let nan = f32::NAN;
        let a = [nan, 1.0, 0.0, -0.0, 2.0, f32::NEG_INFINITY];
        let b = [1.0, nan, -0.0, 0.0, 2.0, 5.0];
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        let vals =
            |v: &[u8]| -> Vec<f32> { v.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect() };
        for (x, y) in [(a, b), (b, a)] {
            let mut d = bytes(&x);
            reduce_inplace(DataType::F32, ReduceOp::Min, &mut d, &bytes(&y));
            let m = vals(&d);
            assert!(m[0].is_nan() && m[1].is_nan());
            assert_eq!(m[2].to_bits(), (-0.0f32).to_bits());
            assert_eq!(m[3].to_bits(), (-0.0f32).to_bits());
            assert_eq!(m[4..], [2.0, f32::NEG_INFINITY]);

            let mut d = bytes(&x);
            reduce_inplace(DataType::F32, ReduceOp::Max, &mut d, &bytes(&y));
            let m = vals(&d);
            assert!(m[0].is_nan() && m[1].is_nan());
            assert_eq!(m[2].to_bits(), 0.0f32.to_bits());
            assert_eq!(m[3].to_bits(), 0.0f32.to_bits());
            assert_eq!(m[4..], [2.0, 5.0]);
        }
        // f64 and f16 follow the same rule.
        let mut d = f64::NAN.to_ne_bytes().to_vec();
        reduce_inplace(DataType::F64, ReduceOp::Max, &mut d, &1.0f64.to_ne_bytes());
        assert!(f64::from_ne_bytes(d[..].try_into().unwrap()).is_nan());
        let mut d = f16s(&[1.0, 0.0]);
        reduce_inplace(DataType::F16, ReduceOp::Min, &mut d, &f16s(&[nan, -0.0]));
        let m = f16_vals(&d);
        assert!(m[0].is_nan());
        assert!(m[1] == 0.0 && m[1].is_sign_negative());
    }

    #[test]
    fn divide_truncates_and_rounds() {
        let i32s = |v: &[i32]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        let mut d = i32s(&[-7, 7, -1, 1, i32::MIN, i32::MAX, 6]);
        divide(DataType::I32, &mut d, 2);
        assert_eq!(d, i32s(&[-3, 3, 0, 0, i32::MIN / 2, i32::MAX / 2, 3]));

        // Unaligned buffer.
        let mut buf = Buf::new(16);
        let d = buf.at(1, &i32s(&[-9, 9]));
        divide(DataType::I32, d, 4);
        assert_eq!(d, &i32s(&[-2, 2])[..]);

        // n larger than the type can hold.
        let mut d = vec![0x80u8, 0x7f, 0xff]; // -128, 127, -1
        divide(DataType::I8, &mut d, 128);
        assert_eq!(d, [0xff, 0, 0]); // -1, 0, 0
        let mut d = vec![0x80u8, 0x7f];
        divide(DataType::I8, &mut d, 1000);
        assert_eq!(d, [0, 0]);
        let mut d = vec![255u8, 200];
        divide(DataType::U8, &mut d, 300);
        assert_eq!(d, [0, 0]);
        let mut d = i64::MIN.to_ne_bytes().to_vec();
        divide(DataType::I64, &mut d, 1usize << 63);
        assert_eq!(d, (-1i64).to_ne_bytes());
        let mut d = u64::MAX.to_ne_bytes().to_vec();
        divide(DataType::U64, &mut d, 3);
        assert_eq!(d, (u64::MAX / 3).to_ne_bytes());

        // Floats.
        let mut d: Vec<u8> = [7.0f32, -1.0].iter().flat_map(|x| x.to_ne_bytes()).collect();
        divide(DataType::F32, &mut d, 2);
        assert_eq!(d, [3.5f32, -0.5].iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<_>>());
        let mut d = 1.0f64.to_ne_bytes().to_vec();
        divide(DataType::F64, &mut d, 3);
        assert_eq!(d, (1.0f64 / 3.0).to_ne_bytes());
        let mut d = f16s(&[1.0, 65504.0, -3.0]);
        divide(DataType::F16, &mut d, 3);
        assert_eq!(
            f16_vals(&d),
            [f16::from_f32(1.0 / 3.0), f16::from_f32(65504.0 / 3.0), f16::from_f32(-1.0)].map(f16::to_f32)
        );
        let mut d = bf16s(&[1.0, 10.0]);
        divide(DataType::Bf16, &mut d, 3);
        assert_eq!(bf16_vals(&d), [bf16::from_f32(1.0 / 3.0).to_f32(), bf16::from_f32(10.0 / 3.0).to_f32()]);
        // Long buffers (several blocks) and n = 1.
        let mut d = f16s(&vec![6.0; 1000]);
        divide(DataType::F16, &mut d, 1);
        divide(DataType::F16, &mut d, 4);
        assert!(f16_vals(&d).iter().all(|&x| x == 1.5));
    }

    #[test]
    fn avg_combines_as_sum() {
        for dtype in DataType::ALL {
            let mut rng = Rng(7 + dtype as u64);
            let a = gen(dtype, 100, &mut rng);
            let b = gen(dtype, 100, &mut rng);
            let (mut x, mut y) = (a.clone(), a.clone());
            reduce_inplace(dtype, ReduceOp::Avg, &mut x, &b);
            reduce_inplace(dtype, ReduceOp::Sum, &mut y, &b);
            assert!(same(dtype, &x, &y), "{dtype}");
        }
    }

    #[test]
    fn reducer_threads_match_serial_on_large_buffers() {
        assert_eq!(Reducer::new(0).threads(), 1);
        assert_eq!(Reducer::new(1).threads(), 1);
        let par = Reducer::new(2);
        assert_eq!(par.threads(), 2);
        assert_eq!(par.min_parallel_bytes(), DEFAULT_MIN_PARALLEL_BYTES);
        let serial = Reducer::new(1);
        let mut rng = Rng(42);
        for (dtype, op) in [
            (DataType::F32, ReduceOp::Sum),
            (DataType::Bf16, ReduceOp::Sum),
            (DataType::I64, ReduceOp::Prod),
            (DataType::F64, ReduceOp::Max),
        ] {
            let n = (3 << 20) / dtype.size() + 5; // 3 MiB + a few odd elements
            let a = gen(dtype, n, &mut rng);
            let b = gen(dtype, n, &mut rng);
            for off in [0, 1] {
                let (mut b1, mut b2, mut bs) = (Buf::new(a.len() + 8), Buf::new(a.len() + 8), Buf::new(a.len() + 8));
                let s = bs.at(off, &b);
                let d1 = b1.at(off, &a);
                serial.reduce_inplace(dtype, op, d1, s);
                let d2 = b2.at(0, &a);
                par.reduce_inplace(dtype, op, d2, s);
                assert!(same(dtype, d1, d2), "inplace {dtype} {op} off={off}");
                let d2 = b2.at(0, &vec![0; a.len()]);
                par.reduce_into(dtype, op, d2, &a, s);
                assert!(same(dtype, d1, d2), "into {dtype} {op} off={off}");
            }
        }
    }

    /// Both streaming-store paths (AVX-512F and AVX2), whichever this CPU has, against the
    /// plain loop: unaligned heads, partial vectors at the tail, every element size.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn streaming_paths_match_plain_loop() {
        fn check<T: Copy + PartialEq + std::fmt::Debug + Default, O: Op<T>>(gen: impl Fn(usize) -> T) {
            for len in [0, 1, 15, 16, 17, 63, 64, 65, 200, 1031] {
                for skip in 0..9 {
                    let a: Vec<T> = (0..len + skip).map(&gen).collect();
                    let b: Vec<T> = (0..len + skip).map(|i| gen(i * 7 + 3)).collect();
                    let mut want = vec![T::default(); len];
                    native_into::<T, O>(&mut want, &a[skip..], &b[skip..]);
                    let mut got = vec![T::default(); len + skip];
                    if x86::has_avx512f() {
                        // SAFETY: checked just above.
                        unsafe { x86::avx512_native_into_streaming::<T, O>(&mut got[skip..], &a[skip..], &b[skip..]) };
                        assert_eq!(got[skip..], want[..], "avx512 len={len} skip={skip}");
                    }
                    got.fill(T::default());
                    if x86::has_avx2() {
                        // SAFETY: checked just above.
                        unsafe { x86::avx2_native_into_streaming::<T, O>(&mut got[skip..], &a[skip..], &b[skip..]) };
                        assert_eq!(got[skip..], want[..], "avx2 len={len} skip={skip}");
                    }
                }
            }
        }
        check::<f32, OpSum>(|i| i as f32 * 0.5 - 100.0);
        check::<f64, OpMax>(|i| (i as f64).sin());
        check::<i8, OpProd>(|i| i as i8);
        check::<u32, OpMin>(|i| (i as u32).wrapping_mul(40503));
        check::<i32, OpSum>(|i| (i as i32).wrapping_mul(-1_640_531_527));
        check::<u64, OpProd>(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn length_mismatch_panics() {
        reduce_inplace(DataType::F32, ReduceOp::Sum, &mut [0; 8], &[0; 4]);
    }

    #[test]
    #[should_panic(expected = "not a multiple")]
    fn partial_element_panics() {
        reduce_into(DataType::F32, ReduceOp::Sum, &mut [0; 6], &[0; 6], &[0; 6]);
    }

    #[test]
    #[should_panic(expected = "n must be positive")]
    fn divide_by_zero_panics() {
        divide(DataType::I32, &mut [0; 4], 0);
    }
}
