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

    /// Counts of NaN and infinite elements (zero for integer types).
    pub fn non_finite(&self) -> (usize, usize) {
        let count = |it: &mut dyn Iterator<Item = f64>| {
            let (mut nan, mut inf) = (0, 0);
            for v in it {
                if v.is_nan() {
                    nan += 1
                } else if v.is_infinite() {
                    inf += 1
                }
            }
            (nan, inf)
        };
        match self {
            ArrayData::F32(a) => count(&mut a.iter().map(|&v| v as f64)),
            ArrayData::F64(a) => count(&mut a.iter().copied()),
            _ => (0, 0),
        }
    }
}
