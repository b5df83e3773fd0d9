//! Owned n-dimensional tensors of the element types onnxq moves between calibration data,
//! ONNX `TensorProto`s and the runtime. Float math happens on `ArrayD<f32>`; integer inputs
//! (token ids, masks) are carried through untouched.

use ndarray::ArrayD;

/// ONNX `TensorProto.DataType` codes used across the crate.
pub mod dtype {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;

    /// Human name of an ONNX element type code (`float`, `int64`, ...).
    pub fn name(code: i32) -> &'static str {
        match code {
            0 => "undefined",
            1 => "float",
            2 => "uint8",
            3 => "int8",
            4 => "uint16",
            5 => "int16",
            6 => "int32",
            7 => "int64",
            8 => "string",
            9 => "bool",
            10 => "float16",
            11 => "double",
            12 => "uint32",
            13 => "uint64",
            14 => "complex64",
            15 => "complex128",
            16 => "bfloat16",
            17 => "float8e4m3fn",
            18 => "float8e4m3fnuz",
            19 => "float8e5m2",
            20 => "float8e5m2fnuz",
            21 => "uint4",
            22 => "int4",
            23 => "float4e2m1",
            _ => "unknown",
        }
    }

    /// Size in bytes of one element, when fixed.
    pub fn size(code: i32) -> Option<usize> {
        match code {
            2 | 3 | 9 => Some(1),
            4 | 5 | 10 | 16 => Some(2),
            1 | 6 | 12 => Some(4),
            7 | 11 | 13 | 14 => Some(8),
            15 => Some(16),
            17..=20 => Some(1),
            _ => None,
        }
    }
}

/// A tensor value with its element type.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayData {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    I8(ArrayD<i8>),
    U8(ArrayD<u8>),
    Bool(ArrayD<bool>),
}

impl ArrayData {
    pub fn shape(&self) -> &[usize] {
        match self {
            ArrayData::F32(a) => a.shape(),
            ArrayData::F64(a) => a.shape(),
            ArrayData::I64(a) => a.shape(),
            ArrayData::I32(a) => a.shape(),
            ArrayData::I8(a) => a.shape(),
            ArrayData::U8(a) => a.shape(),
            ArrayData::Bool(a) => a.shape(),
        }
    }

    /// ONNX element type code of the data.
    pub fn elem_type(&self) -> i32 {
        match self {
            ArrayData::F32(_) => dtype::FLOAT,
            ArrayData::F64(_) => dtype::DOUBLE,
            ArrayData::I64(_) => dtype::INT64,
            ArrayData::I32(_) => dtype::INT32,
            ArrayData::I8(_) => dtype::INT8,
            ArrayData::U8(_) => dtype::UINT8,
            ArrayData::Bool(_) => dtype::BOOL,
        }
    }

    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            ArrayData::F32(a) => Some(a),
            _ => None,
        }
    }

    /// Counts of NaN and infinite elements (zero for integer types). A calibration sample is
    /// checked on every load: the common all-finite case is one branch-free pass over the
    /// exponent bits (all ones: NaN or ±Inf), which vectorizes; only a tensor with such
    /// values is walked again to tell them apart.
    pub fn non_finite(&self) -> (usize, usize) {
        match self {
            ArrayData::F32(a) => {
                let special = |v: &f32| usize::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000);
                let n: usize = match a.as_slice_memory_order() {
                    Some(s) => s.iter().map(special).sum(),
                    None => a.iter().map(special).sum(),
                };
                if n == 0 {
                    return (0, 0);
                }
                let nan = a.iter().filter(|v| v.is_nan()).count();
                (nan, n - nan)
            }
            ArrayData::F64(a) => {
                (a.iter().filter(|v| v.is_nan()).count(), a.iter().filter(|v| v.is_infinite()).count())
            }
            _ => (0, 0),
        }
    }
}

/// `(min, max)` of `lo`, `hi` and the values of `v`, NaN ignored (as `f32::min`/`max` do), in
/// eight independent lanes so that the loop vectorizes.
pub fn min_max(v: &[f32], lo: f32, hi: f32) -> (f32, f32) {
    let (mut l8, mut h8) = ([lo; 8], [hi; 8]);
    let chunks = v.chunks_exact(8);
    for &x in chunks.remainder() {
        (l8[0], h8[0]) = (l8[0].min(x), h8[0].max(x));
    }
    for c in chunks {
        for k in 0..8 {
            (l8[k], h8[k]) = (l8[k].min(c[k]), h8[k].max(c[k]));
        }
    }
    (l8.iter().fold(lo, |a, &b| a.min(b)), h8.iter().fold(hi, |a, &b| a.max(b)))
}

#[cfg(test)]
mod tests {

    #[test]
    fn min_max_ignores_nan_and_keeps_the_bounds() {
        let v: Vec<f32> = (0..37).map(|i| (i as f32 - 20.0) * 0.5).collect();
        assert_eq!(min_max(&v, 0.0, 0.0), (-10.0, 8.0));
        assert_eq!(min_max(&v, -11.0, 9.0), (-11.0, 9.0));
        let mut w = v.clone();
        w[3] = f32::NAN;
        w[36] = 30.0;
        assert_eq!(min_max(&w, 0.0, 0.0), (-10.0, 30.0));
        assert_eq!(min_max(&[], 1.0, 2.0), (1.0, 2.0));
    }
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    #[test]
    fn non_finite_counts_nan_and_infinities() {
        let v = [1.0f32, f32::NAN, f32::INFINITY, -f32::INFINITY, 3.0, -f32::NAN, f32::MAX, f32::MIN_POSITIVE / 2.0];
        let a = ArrayData::F32(ArrayD::from_shape_vec(IxDyn(&[2, 4]), v.to_vec()).expect("shape"));
        assert_eq!(a.non_finite(), (2, 2));
        // A transposed tensor is counted the same.
        let ArrayData::F32(t) = &a else { unreachable!() };
        assert_eq!(ArrayData::F32(t.clone().reversed_axes()).non_finite(), (2, 2));
        let finite = ArrayData::F32(ArrayD::from_elem(IxDyn(&[3]), 2.5f32));
        assert_eq!(finite.non_finite(), (0, 0));
        let d =
            ArrayData::F64(ArrayD::from_shape_vec(IxDyn(&[3]), vec![f64::NAN, f64::NEG_INFINITY, 0.0]).expect("shape"));
        assert_eq!(d.non_finite(), (1, 1));
        assert_eq!(ArrayData::I8(ArrayD::from_elem(IxDyn(&[2]), 1i8)).non_finite(), (0, 0));
    }
}
