//! Element types a collective can carry, and the reduction operators.

use std::fmt;

/// The element type of a buffer.
///
/// Names follow nccl-tests (`int8`, `half`, `bfloat16`, `float`, ...); [`DataType::parse`] also
/// accepts the Rust spellings (`i8`, `f16`, `bf16`, `f32`, ...).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    I8 = 0,
    U8 = 1,
    I32 = 2,
    U32 = 3,
    I64 = 4,
    U64 = 5,
    F16 = 6,
    Bf16 = 7,
    F32 = 8,
    F64 = 9,
}

impl DataType {
    /// Every data type, in wire-code order.
    pub const ALL: [DataType; 10] = [
        DataType::I8,
        DataType::U8,
        DataType::I32,
        DataType::U32,
        DataType::I64,
        DataType::U64,
        DataType::F16,
        DataType::Bf16,
        DataType::F32,
        DataType::F64,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DataType::I8 | DataType::U8 => 1,
            DataType::F16 | DataType::Bf16 => 2,
            DataType::I32 | DataType::U32 | DataType::F32 => 4,
            DataType::I64 | DataType::U64 | DataType::F64 => 8,
        }
    }

    /// True for the floating-point types.
    pub const fn is_float(self) -> bool {
        matches!(self, DataType::F16 | DataType::Bf16 | DataType::F32 | DataType::F64)
    }

    /// The nccl-tests name (`float`, `bfloat16`, `int32`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DataType::I8 => "int8",
            DataType::U8 => "uint8",
            DataType::I32 => "int32",
            DataType::U32 => "uint32",
            DataType::I64 => "int64",
            DataType::U64 => "uint64",
            DataType::F16 => "half",
            DataType::Bf16 => "bfloat16",
            DataType::F32 => "float",
            DataType::F64 => "double",
        }
    }

    /// Parses an nccl-tests or Rust type name.
    ///
    /// ```
    /// use accl_core::DataType;
    /// assert_eq!(DataType::parse("bfloat16"), Some(DataType::Bf16));
    /// assert_eq!(DataType::parse("f32"), Some(DataType::F32));
    /// ```
    pub fn parse(name: &str) -> Option<DataType> {
        let dt = match name.to_ascii_lowercase().as_str() {
            "int8" | "i8" | "char" => DataType::I8,
            "uint8" | "u8" => DataType::U8,
            "int32" | "i32" | "int" => DataType::I32,
            "uint32" | "u32" => DataType::U32,
            "int64" | "i64" => DataType::I64,
            "uint64" | "u64" => DataType::U64,
            "half" | "f16" | "float16" | "fp16" => DataType::F16,
            "bfloat16" | "bf16" => DataType::Bf16,
            "float" | "f32" | "float32" | "fp32" => DataType::F32,
            "double" | "f64" | "float64" | "fp64" => DataType::F64,
            _ => return None,
        };
        Some(dt)
    }

    /// Decodes a wire code written by `self as u8`.
    pub fn from_code(code: u8) -> Option<DataType> {
        DataType::ALL.get(code as usize).copied()
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A reduction operator.
///
/// `Avg` is a sum followed by a division by the number of ranks. For integer types the sum wraps
/// on overflow (as `Sum` does) and the division truncates toward zero, so `Avg` of integers is
/// `wrapping_sum / nranks`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum = 0,
    Prod = 1,
    Min = 2,
    Max = 3,
    Avg = 4,
}

impl ReduceOp {
    /// Every operator, in wire-code order.
    pub const ALL: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max, ReduceOp::Avg];

    /// The nccl-tests name.
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
        }
    }

    /// Parses `sum`, `prod`, `min`, `max` or `avg` (any case).
    pub fn parse(name: &str) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|op| op.name().eq_ignore_ascii_case(name))
    }

    /// Decodes a wire code written by `self as u8`.
    pub fn from_code(code: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.get(code as usize).copied()
    }

    /// The operator applied pairwise while data is combined (`Avg` combines by `Sum`).
    pub const fn combine(self) -> ReduceOp {
        match self {
            ReduceOp::Avg => ReduceOp::Sum,
            op => op,
        }
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type that maps to a [`DataType`]; implemented for the ten supported element types.
///
/// # Safety
/// Implementors must be plain-old-data of exactly `DTYPE.size()` bytes with no padding and no
/// invalid bit patterns, because collectives write raw bytes received from peers into them.
pub unsafe trait Element: Copy + Send + Sync + 'static {
    /// The wire type of `Self`.
    const DTYPE: DataType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(unsafe impl Element for $t { const DTYPE: DataType = DataType::$d; })*
    };
}
element!(i8 => I8, u8 => U8, i32 => I32, u32 => U32, i64 => I64, u64 => U64,
    half::f16 => F16, half::bf16 => Bf16, f32 => F32, f64 => F64);

/// Calls a generic function with the element type a [`DataType`] names:
/// `dispatch_dtype!(dtype, f(args…))` is `f::<T>(args…)` for the `T` of `dtype`.
///
/// ```
/// use accl_core::{dispatch_dtype, DataType};
/// fn size<T>() -> usize {
///     std::mem::size_of::<T>()
/// }
/// assert_eq!(dispatch_dtype!(DataType::Bf16, size()), 2);
/// ```
#[macro_export]
macro_rules! dispatch_dtype {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            $crate::DataType::I8 => $f::<i8>($($arg),*),
            $crate::DataType::U8 => $f::<u8>($($arg),*),
            $crate::DataType::I32 => $f::<i32>($($arg),*),
            $crate::DataType::U32 => $f::<u32>($($arg),*),
            $crate::DataType::I64 => $f::<i64>($($arg),*),
            $crate::DataType::U64 => $f::<u64>($($arg),*),
            $crate::DataType::F16 => $f::<$crate::f16>($($arg),*),
            $crate::DataType::Bf16 => $f::<$crate::bf16>($($arg),*),
            $crate::DataType::F32 => $f::<f32>($($arg),*),
            $crate::DataType::F64 => $f::<f64>($($arg),*),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for dt in DataType::ALL {
            assert_eq!(DataType::parse(dt.name()), Some(dt));
            assert_eq!(DataType::from_code(dt as u8), Some(dt));
        }
        for op in ReduceOp::ALL {
            assert_eq!(ReduceOp::parse(op.name()), Some(op));
            assert_eq!(ReduceOp::from_code(op as u8), Some(op));
        }
        assert_eq!(DataType::parse("complex"), None);
    }
}
