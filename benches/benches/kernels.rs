//! Reduction-kernel throughput against a `memcpy` baseline.
//!
//! Every figure is reported as bytes of the destination buffer per second (one buffer's size,
//! the same convention as the `memcpy` baseline), so `reduce_inplace/f32-sum/32MiB` at 70% of
//! `memcpy/32MiB` means the kernel runs at 70% of copy speed.
//!
//! Run with `cargo bench -p accl-benches --bench kernels`; pass a filter such as `f32` to run a
//! subset.

use std::hint::black_box;
use std::time::Duration;

use accl_core::reduce::{reduce_inplace, reduce_into, reduce_into_streaming};
use accl_core::{DataType, ReduceOp};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};

/// Out of cache (32 MiB) and in L2 (256 KiB).
const SIZES: [(usize, &str); 2] = [(32 << 20, "32MiB"), (256 << 10, "256KiB")];

/// A buffer of `len` bytes holding small values of `dtype` (floats in [1, 2), no NaN or
/// subnormals; integers below 64).
fn buffer(dtype: DataType, len: usize, seed: u32) -> Vec<u8> {
    let n = len / dtype.size();
    let mut out = Vec::with_capacity(len);
    for i in 0..n {
        let v = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) % 64;
        let x = 1.0 + v as f32 / 64.0;
        match dtype {
            DataType::I8 | DataType::U8 => out.push(v as u8),
            DataType::I32 | DataType::U32 => out.extend(v.to_ne_bytes()),
            DataType::I64 | DataType::U64 => out.extend((v as u64).to_ne_bytes()),
            DataType::F16 => out.extend(half::f16::from_f32(x).to_ne_bytes()),
            DataType::Bf16 => out.extend(half::bf16::from_f32(x).to_ne_bytes()),
            DataType::F32 => out.extend(x.to_ne_bytes()),
            DataType::F64 => out.extend((x as f64).to_ne_bytes()),
        }
    }
    out
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, len: usize) {
    group.throughput(Throughput::Bytes(len as u64));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(if len >= 1 << 20 { 10 } else { 20 });
}

fn memcpy(c: &mut Criterion) {
    let mut group = c.benchmark_group("memcpy");
    for (len, name) in SIZES {
        configure(&mut group, len);
        let src = buffer(DataType::U8, len, 1);
        let mut dst = buffer(DataType::U8, len, 2);
        group.bench_function(name, |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&mut dst);
            })
        });
    }
    group.finish();
}

/// `reduce_inplace` repeatedly accumulates `src` into `dst`. For `Prod` on floats the values
/// (in [1, 2)) grow to inf over many iterations; with plain IEEE ops that costs nothing extra.
fn bench_inplace(c: &mut Criterion, dtype: DataType, op: ReduceOp) {
    let mut group = c.benchmark_group("reduce_inplace");
    for (len, size) in SIZES {
        configure(&mut group, len);
        let src = buffer(dtype, len, 1);
        let mut dst = buffer(dtype, len, 2);
        group.bench_function(format!("{}-{}/{size}", dtype_name(dtype), op.name()), |b| {
            b.iter(|| reduce_inplace(dtype, op, black_box(&mut dst), black_box(&src)))
        });
    }
    group.finish();
}

fn dtype_name(dtype: DataType) -> &'static str {
    match dtype {
        DataType::I8 => "i8",
        DataType::U8 => "u8",
        DataType::I32 => "i32",
        DataType::U32 => "u32",
        DataType::I64 => "i64",
        DataType::U64 => "u64",
        DataType::F16 => "f16",
        DataType::Bf16 => "bf16",
        DataType::F32 => "f32",
        DataType::F64 => "f64",
    }
}

fn inplace_sum_all_dtypes(c: &mut Criterion) {
    for dtype in DataType::ALL {
        bench_inplace(c, dtype, ReduceOp::Sum);
    }
}

fn inplace_f32_all_ops(c: &mut Criterion) {
    for op in [ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max, ReduceOp::Avg] {
        bench_inplace(c, DataType::F32, op);
    }
}

fn into_f32_sum(c: &mut Criterion) {
    let mut group = c.benchmark_group("reduce_into");
    for (len, size) in SIZES {
        configure(&mut group, len);
        let a = buffer(DataType::F32, len, 1);
        let b = buffer(DataType::F32, len, 2);
        let mut dst = vec![0u8; len];
        group.bench_function(format!("f32-sum/{size}"), |bench| {
            bench.iter(|| reduce_into(DataType::F32, ReduceOp::Sum, black_box(&mut dst), black_box(&a), black_box(&b)))
        });
        group.bench_function(format!("f32-sum-streaming/{size}"), |bench| {
            bench.iter(|| {
                reduce_into_streaming(DataType::F32, ReduceOp::Sum, black_box(&mut dst), black_box(&a), black_box(&b))
            })
        });
    }
    group.finish();
}

/// Short runs without plots: the whole file takes about two minutes on a 2-core machine.
fn config() -> Criterion {
    Criterion::default().without_plots().nresamples(20_000)
}

criterion_group! {
    name = kernels;
    config = config();
    targets = memcpy, inplace_sum_all_dtypes, inplace_f32_all_ops, into_f32_sum
}
criterion_main!(kernels);
