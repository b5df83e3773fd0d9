//! Conversion between ONNX `TensorProto`s and [`ArrayData`]: decoding `raw_data` (little-endian)
//! or the typed `*_data` fields with shape and length validation, float16/bfloat16 widening,
//! and constructors that build `TensorProto`s with little-endian `raw_data`.

use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};

use crate::array::{dtype, ArrayData};
use crate::onnx::pb;

const UINT16: i32 = 4;
const INT16: i32 = 5;
const UINT32: i32 = 12;
const UINT64: i32 = 13;
const BFLOAT16: i32 = 16;

/// Converts an IEEE 754 half-precision bit pattern to `f32` (exact, including subnormals,
/// infinities and NaN payloads).
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let mant = (bits & 0x3ff) as u32;
    let out = match (exp, mant) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = mant * 2^-24; normalise the mantissa for f32.
            let shift = mant.leading_zeros() - 21; // bring the top set bit to bit 10
            let m = (mant << shift) & 0x3ff;
            let e = 127 - 15 + 1 - shift;
            sign | (e << 23) | (m << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(out)
}

/// Converts a bfloat16 bit pattern to `f32`.
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Validated shape of a tensor and its element count.
fn shape_of(t: &pb::TensorProto) -> Result<(Vec<usize>, usize)> {
    let name = t.name();
    let mut shape = Vec::with_capacity(t.dims.len());
    let mut count: usize = 1;
    for &d in &t.dims {
        let Ok(d) = usize::try_from(d) else {
            bail!("tensor '{name}': negative dim in shape {:?}", t.dims);
        };
        count = match count.checked_mul(d) {
            Some(c) if c <= isize::MAX as usize => c,
            _ => bail!("tensor '{name}': shape {:?} overflows", t.dims),
        };
        shape.push(d);
    }
    Ok((shape, count))
}

/// Decodes fixed-size little-endian elements.
fn decode_le<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            f(b)
        })
        .collect()
}

fn make<T>(name: &str, shape: &[usize], v: Vec<T>) -> Result<ArrayD<T>> {
    ArrayD::from_shape_vec(IxDyn(shape), v)
        .with_context(|| format!("tensor '{name}': cannot build an array of shape {shape:?}"))
}

fn from_raw(name: &str, dt: i32, shape: &[usize], count: usize, raw: &[u8]) -> Result<ArrayData> {
    let Some(size) = dtype::size(dt) else {
        bail!("tensor '{name}': unsupported element type {}", dtype::name(dt));
    };
    let expected =
        count.checked_mul(size).with_context(|| format!("tensor '{name}': byte size of shape {shape:?} overflows"))?;
    if raw.len() != expected {
        bail!(
            "tensor '{name}': raw_data holds {} bytes, expected {expected} for {} shape {shape:?}",
            raw.len(),
            dtype::name(dt)
        );
    }
    Ok(match dt {
        dtype::FLOAT => ArrayData::F32(make(name, shape, decode_le(raw, f32::from_le_bytes))?),
        dtype::DOUBLE => ArrayData::F64(make(name, shape, decode_le(raw, f64::from_le_bytes))?),
        dtype::FLOAT16 => ArrayData::F32(make(name, shape, decode_le(raw, |b| f16_to_f32(u16::from_le_bytes(b))))?),
        BFLOAT16 => ArrayData::F32(make(name, shape, decode_le(raw, |b| bf16_to_f32(u16::from_le_bytes(b))))?),
        dtype::INT64 => ArrayData::I64(make(name, shape, decode_le(raw, i64::from_le_bytes))?),
        dtype::INT32 => ArrayData::I32(make(name, shape, decode_le(raw, i32::from_le_bytes))?),
        INT16 => ArrayData::I32(make(name, shape, decode_le(raw, |b| i16::from_le_bytes(b) as i32))?),
        UINT16 => ArrayData::I32(make(name, shape, decode_le(raw, |b| u16::from_le_bytes(b) as i32))?),
        UINT32 => ArrayData::I64(make(name, shape, decode_le(raw, |b| u32::from_le_bytes(b) as i64))?),
        UINT64 => {
            let v = decode_le(raw, u64::from_le_bytes);
            ArrayData::I64(make(name, shape, u64_to_i64(name, v)?)?)
        }
        dtype::INT8 => ArrayData::I8(make(name, shape, raw.iter().map(|&b| b as i8).collect())?),
        dtype::UINT8 => ArrayData::U8(make(name, shape, raw.to_vec())?),
        dtype::BOOL => ArrayData::Bool(make(name, shape, raw.iter().map(|&b| b != 0).collect())?),
        _ => bail!("tensor '{name}': unsupported element type {}", dtype::name(dt)),
    })
}

fn u64_to_i64(name: &str, v: Vec<u64>) -> Result<Vec<i64>> {
    v.into_iter()
        .map(|x| i64::try_from(x).map_err(|_| anyhow::anyhow!("tensor '{name}': uint64 value {x} does not fit int64")))
        .collect()
}

/// Narrows `int32_data` values to the element type, rejecting out-of-range values.
fn narrow<T: TryFrom<i32>>(name: &str, dt: i32, v: &[i32]) -> Result<Vec<T>> {
    v.iter()
        .map(|&x| {
            T::try_from(x).map_err(|_| {
                anyhow::anyhow!("tensor '{name}': int32_data value {x} is out of range for {}", dtype::name(dt))
            })
        })
        .collect()
}

/// Number of values in the typed field that holds elements of type `dt`.
fn typed_len(t: &pb::TensorProto, dt: i32) -> usize {
    match dt {
        dtype::FLOAT => t.float_data.len(),
        dtype::DOUBLE => t.double_data.len(),
        dtype::INT64 => t.int64_data.len(),
        UINT32 | UINT64 => t.uint64_data.len(),
        _ => t.int32_data.len(),
    }
}

fn typed_field_name(dt: i32) -> &'static str {
    match dt {
        dtype::FLOAT => "float_data",
        dtype::DOUBLE => "double_data",
        dtype::INT64 => "int64_data",
        UINT32 | UINT64 => "uint64_data",
        _ => "int32_data",
    }
}

fn from_typed(t: &pb::TensorProto, dt: i32, shape: &[usize], count: usize) -> Result<ArrayData> {
    let name = t.name();
    if dtype::size(dt).is_none() || (14..=15).contains(&dt) || (17..).contains(&dt) {
        bail!("tensor '{name}': unsupported element type {}", dtype::name(dt));
    }
    let n = typed_len(t, dt);
    if n != count {
        bail!("tensor '{name}': {} holds {n} values, expected {count} for shape {shape:?}", typed_field_name(dt));
    }
    let i32s = &t.int32_data;
    Ok(match dt {
        dtype::FLOAT => ArrayData::F32(make(name, shape, t.float_data.clone())?),
        dtype::DOUBLE => ArrayData::F64(make(name, shape, t.double_data.clone())?),
        dtype::INT64 => ArrayData::I64(make(name, shape, t.int64_data.clone())?),
        dtype::INT32 => ArrayData::I32(make(name, shape, i32s.clone())?),
        INT16 => {
            ArrayData::I32(make(name, shape, narrow::<i16>(name, dt, i32s)?.into_iter().map(i32::from).collect())?)
        }
        UINT16 => {
            ArrayData::I32(make(name, shape, narrow::<u16>(name, dt, i32s)?.into_iter().map(i32::from).collect())?)
        }
        dtype::INT8 => ArrayData::I8(make(name, shape, narrow(name, dt, i32s)?)?),
        dtype::UINT8 => ArrayData::U8(make(name, shape, narrow(name, dt, i32s)?)?),
        dtype::BOOL => ArrayData::Bool(make(name, shape, i32s.iter().map(|&x| x != 0).collect())?),
        dtype::FLOAT16 => {
            ArrayData::F32(make(name, shape, narrow::<u16>(name, dt, i32s)?.into_iter().map(f16_to_f32).collect())?)
        }
        BFLOAT16 => {
            ArrayData::F32(make(name, shape, narrow::<u16>(name, dt, i32s)?.into_iter().map(bf16_to_f32).collect())?)
        }
        UINT32 => {
            let v = t
                .uint64_data
                .iter()
                .map(|&x| {
                    u32::try_from(x).map(i64::from).map_err(|_| {
                        anyhow::anyhow!("tensor '{name}': uint64_data value {x} is out of range for uint32")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            ArrayData::I64(make(name, shape, v)?)
        }
        UINT64 => ArrayData::I64(make(name, shape, u64_to_i64(name, t.uint64_data.clone())?)?),
        _ => bail!("tensor '{name}': unsupported element type {}", dtype::name(dt)),
    })
}

/// Decodes a tensor's values. float16/bfloat16 become `F32`, int16/uint16 `I32`,
/// uint32/uint64 `I64` (uint64 values above `i64::MAX` are an error).
pub fn to_array(t: &pb::TensorProto) -> Result<ArrayData> {
    let name = t.name();
    let (shape, count) = shape_of(t)?;
    let dt = t.data_type();
    let raw = t.raw_data.as_deref().filter(|r| !r.is_empty() || typed_len(t, dt) == 0);
    match raw {
        Some(raw) => from_raw(name, dt, &shape, count, raw),
        None => {
            if t.data_location() == pb::tensor_proto::DataLocation::External {
                bail!("tensor '{name}': external data not loaded");
            }
            from_typed(t, dt, &shape, count)
        }
    }
}

/// Converts any numeric [`ArrayData`] to `f32` (bool becomes 0/1).
pub fn array_to_f32(a: &ArrayData) -> ArrayD<f32> {
    match a {
        ArrayData::F32(a) => a.clone(),
        ArrayData::F64(a) => a.mapv(|v| v as f32),
        ArrayData::I64(a) => a.mapv(|v| v as f32),
        ArrayData::I32(a) => a.mapv(|v| v as f32),
        ArrayData::I8(a) => a.mapv(f32::from),
        ArrayData::U8(a) => a.mapv(f32::from),
        ArrayData::Bool(a) => a.mapv(|v| if v { 1.0 } else { 0.0 }),
    }
}

/// Decodes a tensor of any numeric element type as `f32`.
pub fn to_f32(t: &pb::TensorProto) -> Result<ArrayD<f32>> {
    Ok(match to_array(t)? {
        ArrayData::F32(a) => a,
        other => array_to_f32(&other),
    })
}

fn build(name: &str, shape: &[usize], data_type: i32, raw: Vec<u8>) -> pb::TensorProto {
    pb::TensorProto {
        name: Some(name.to_string()),
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(data_type),
        raw_data: Some(raw.into()),
        ..Default::default()
    }
}

fn encode_le<T: Copy, const N: usize>(
    a: &ArrayD<T>,
    data_type: i32,
    name: &str,
    f: impl Fn(T) -> [u8; N],
) -> pb::TensorProto {
    let mut raw = vec![0u8; a.len() * N];
    let words = raw.chunks_exact_mut(N);
    match a.as_slice() {
        // Contiguous (the usual case): a slice walk, much faster than ndarray's IxDyn iterator,
        // into fixed-size words (no capacity check per element).
        Some(s) => words.zip(s).for_each(|(w, &v)| w.copy_from_slice(&f(v))),
        None => words.zip(a.iter()).for_each(|(w, &v)| w.copy_from_slice(&f(v))),
    }
    build(name, a.shape(), data_type, raw)
}

/// A FLOAT tensor.
pub fn from_f32(name: &str, a: &ArrayD<f32>) -> pb::TensorProto {
    encode_le(a, dtype::FLOAT, name, f32::to_le_bytes)
}

/// A DOUBLE tensor.
pub fn from_f64(name: &str, a: &ArrayD<f64>) -> pb::TensorProto {
    encode_le(a, dtype::DOUBLE, name, f64::to_le_bytes)
}

/// An INT8 tensor.
pub fn from_i8(name: &str, a: &ArrayD<i8>) -> pb::TensorProto {
    encode_le(a, dtype::INT8, name, i8::to_le_bytes)
}

/// A UINT8 tensor.
pub fn from_u8(name: &str, a: &ArrayD<u8>) -> pb::TensorProto {
    encode_le(a, dtype::UINT8, name, u8::to_le_bytes)
}

/// An INT32 tensor.
pub fn from_i32(name: &str, a: &ArrayD<i32>) -> pb::TensorProto {
    encode_le(a, dtype::INT32, name, i32::to_le_bytes)
}

/// An INT64 tensor.
pub fn from_i64(name: &str, a: &ArrayD<i64>) -> pb::TensorProto {
    encode_le(a, dtype::INT64, name, i64::to_le_bytes)
}

/// A BOOL tensor.
pub fn from_bool(name: &str, a: &ArrayD<bool>) -> pb::TensorProto {
    encode_le(a, dtype::BOOL, name, |v| [v as u8])
}

/// A tensor of the array's own element type.
pub fn from_array(name: &str, a: &ArrayData) -> pb::TensorProto {
    match a {
        ArrayData::F32(a) => from_f32(name, a),
        ArrayData::F64(a) => from_f64(name, a),
        ArrayData::I64(a) => from_i64(name, a),
        ArrayData::I32(a) => from_i32(name, a),
        ArrayData::I8(a) => from_i8(name, a),
        ArrayData::U8(a) => from_u8(name, a),
        ArrayData::Bool(a) => from_bool(name, a),
    }
}

fn vec_tensor<T: Copy, const N: usize>(
    name: &str,
    v: &[T],
    data_type: i32,
    f: impl Fn(T) -> [u8; N],
) -> pb::TensorProto {
    let raw: Vec<u8> = v.iter().flat_map(|&x| f(x)).collect();
    build(name, &[v.len()], data_type, raw)
}

/// A 0-d FLOAT tensor.
pub fn scalar_f32(name: &str, v: f32) -> pb::TensorProto {
    build(name, &[], dtype::FLOAT, v.to_le_bytes().to_vec())
}

/// A 0-d INT8 tensor.
pub fn scalar_i8(name: &str, v: i8) -> pb::TensorProto {
    build(name, &[], dtype::INT8, v.to_le_bytes().to_vec())
}

/// A 0-d UINT8 tensor.
pub fn scalar_u8(name: &str, v: u8) -> pb::TensorProto {
    build(name, &[], dtype::UINT8, vec![v])
}

/// A 1-d FLOAT tensor.
pub fn vec_f32(name: &str, v: &[f32]) -> pb::TensorProto {
    vec_tensor(name, v, dtype::FLOAT, f32::to_le_bytes)
}

/// A 1-d INT64 tensor.
pub fn vec_i64(name: &str, v: &[i64]) -> pb::TensorProto {
    vec_tensor(name, v, dtype::INT64, i64::to_le_bytes)
}

/// A 1-d INT32 tensor.
pub fn vec_i32(name: &str, v: &[i32]) -> pb::TensorProto {
    vec_tensor(name, v, dtype::INT32, i32::to_le_bytes)
}

/// A 1-d INT8 tensor.
pub fn vec_i8(name: &str, v: &[i8]) -> pb::TensorProto {
    vec_tensor(name, v, dtype::INT8, i8::to_le_bytes)
}

/// A 1-d UINT8 tensor.
pub fn vec_u8(name: &str, v: &[u8]) -> pb::TensorProto {
    vec_tensor(name, v, dtype::UINT8, u8::to_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, ArrayD, IxDyn};

    fn samples() -> Vec<ArrayData> {
        let sh = IxDyn(&[2, 3]);
        vec![
            ArrayData::F32(ArrayD::from_shape_vec(sh.clone(), vec![0.0, -1.5, 2.25, f32::MAX, 1e-30, 7.0]).unwrap()),
            ArrayData::F64(ArrayD::from_shape_vec(sh.clone(), vec![0.0, -1.5, 2.25, f64::MAX, 1e-300, 7.0]).unwrap()),
            ArrayData::I64(ArrayD::from_shape_vec(sh.clone(), vec![i64::MIN, -1, 0, 1, 2, i64::MAX]).unwrap()),
            ArrayData::I32(ArrayD::from_shape_vec(sh.clone(), vec![i32::MIN, -1, 0, 1, 2, i32::MAX]).unwrap()),
            ArrayData::I8(ArrayD::from_shape_vec(sh.clone(), vec![-128, -1, 0, 1, 2, 127]).unwrap()),
            ArrayData::U8(ArrayD::from_shape_vec(sh.clone(), vec![0, 1, 2, 128, 254, 255]).unwrap()),
            ArrayData::Bool(ArrayD::from_shape_vec(sh, vec![true, false, true, true, false, false]).unwrap()),
            ArrayData::F32(ArrayD::from_elem(IxDyn(&[]), 3.5)),
            ArrayData::I64(ArrayD::from_shape_vec(IxDyn(&[0, 4]), vec![]).unwrap()),
        ]
    }

    /// Same tensor with the data moved from raw_data into the typed fields.
    fn to_typed(a: &ArrayData, name: &str) -> pb::TensorProto {
        let mut t = from_array(name, a);
        t.raw_data = None;
        match a {
            ArrayData::F32(a) => t.float_data = a.iter().copied().collect(),
            ArrayData::F64(a) => t.double_data = a.iter().copied().collect(),
            ArrayData::I64(a) => t.int64_data = a.iter().copied().collect(),
            ArrayData::I32(a) => t.int32_data = a.iter().copied().collect(),
            ArrayData::I8(a) => t.int32_data = a.iter().map(|&v| v as i32).collect(),
            ArrayData::U8(a) => t.int32_data = a.iter().map(|&v| v as i32).collect(),
            ArrayData::Bool(a) => t.int32_data = a.iter().map(|&v| v as i32).collect(),
        }
        t
    }

    #[test]
    fn round_trip_raw_and_typed() {
        for a in samples() {
            let t = from_array("x", &a);
            assert_eq!(t.name(), "x");
            assert_eq!(t.data_type(), a.elem_type());
            assert_eq!(to_array(&t).unwrap(), a, "raw {:?}", a.elem_type());
            let t = to_typed(&a, "x");
            assert_eq!(to_array(&t).unwrap(), a, "typed {:?}", a.elem_type());
        }
    }

    #[test]
    fn round_trip_through_protobuf_encoding() {
        use prost::Message;
        for a in samples() {
            let bytes = from_array("y", &a).encode_to_vec();
            let t = pb::TensorProto::decode(bytes.as_slice()).unwrap();
            assert_eq!(to_array(&t).unwrap(), a);
        }
    }

    #[test]
    fn non_standard_layout_is_written_in_logical_order() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0f32, 2., 3., 4., 5., 6.]).unwrap();
        let t = a.t().to_owned();
        let back = to_f32(&from_f32("t", &a.t().into_owned())).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn helpers() {
        assert_eq!(to_f32(&scalar_f32("s", 2.5)).unwrap(), ArrayD::from_elem(IxDyn(&[]), 2.5));
        assert_eq!(to_array(&scalar_i8("s", -3)).unwrap(), ArrayData::I8(ArrayD::from_elem(IxDyn(&[]), -3)));
        assert_eq!(to_array(&scalar_u8("s", 200)).unwrap(), ArrayData::U8(ArrayD::from_elem(IxDyn(&[]), 200)));
        assert_eq!(to_f32(&vec_f32("v", &[1.0, 2.0])).unwrap(), arr1(&[1.0f32, 2.0]).into_dyn());
        assert_eq!(to_array(&vec_i64("v", &[5, -6])).unwrap(), ArrayData::I64(arr1(&[5i64, -6]).into_dyn()));
        assert_eq!(to_array(&vec_i32("v", &[5, -6])).unwrap(), ArrayData::I32(arr1(&[5i32, -6]).into_dyn()));
        assert_eq!(to_array(&vec_i8("v", &[5, -6])).unwrap(), ArrayData::I8(arr1(&[5i8, -6]).into_dyn()));
        assert_eq!(to_array(&vec_u8("v", &[5, 6])).unwrap(), ArrayData::U8(arr1(&[5u8, 6]).into_dyn()));
        assert_eq!(to_f32(&vec_i64("v", &[5, -6])).unwrap(), arr1(&[5.0f32, -6.0]).into_dyn());
    }

    #[test]
    fn float16_conversion() {
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert!(f16_to_f32(0x8000) == 0.0 && f16_to_f32(0x8000).is_sign_negative());
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14)); // smallest normal
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24)); // smallest subnormal
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24)); // largest subnormal
        assert_eq!(f16_to_f32(0x8200), -512.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert!(f16_to_f32(0xfc01).is_nan());
        // Every subnormal is exact.
        for m in 1u16..0x400 {
            assert_eq!(f16_to_f32(m), m as f32 * 2f32.powi(-24));
        }
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
    }

    #[test]
    fn float16_tensors() {
        let bits: [u16; 4] = [0x3c00, 0xc000, 0x0001, 0x7c00];
        let expect = arr1(&[1.0f32, -2.0, 2f32.powi(-24), f32::INFINITY]).into_dyn();
        let raw: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let t = pb::TensorProto {
            name: Some("h".into()),
            dims: vec![4],
            data_type: Some(dtype::FLOAT16),
            raw_data: Some(raw.into()),
            ..Default::default()
        };
        assert_eq!(to_f32(&t).unwrap(), expect);
        let t = pb::TensorProto { raw_data: None, int32_data: bits.iter().map(|&b| b as i32).collect(), ..t };
        assert_eq!(to_f32(&t).unwrap(), expect);
    }

    #[test]
    fn int16_and_uint16_widen_to_i32() {
        let raw: Vec<u8> = [-2i16, 300].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t =
            pb::TensorProto { dims: vec![2], data_type: Some(INT16), raw_data: Some(raw.into()), ..Default::default() };
        assert_eq!(to_array(&t).unwrap(), ArrayData::I32(arr1(&[-2, 300]).into_dyn()));
        let t = pb::TensorProto {
            dims: vec![2],
            data_type: Some(UINT16),
            int32_data: vec![65535, 1],
            ..Default::default()
        };
        assert_eq!(to_array(&t).unwrap(), ArrayData::I32(arr1(&[65535, 1]).into_dyn()));
    }

    fn err(t: &pb::TensorProto) -> String {
        format!("{:#}", to_array(t).unwrap_err())
    }

    #[test]
    fn errors_name_the_tensor() {
        let mut t = vec_f32("w", &[1.0, 2.0]);
        t.raw_data = Some(vec![0u8; 7].into());
        let e = err(&t);
        assert!(e.contains("tensor 'w'") && e.contains("7 bytes"), "{e}");

        let mut t = vec_f32("big", &[]);
        t.dims = vec![i64::MAX, i64::MAX, 4];
        let e = err(&t);
        assert!(e.contains("tensor 'big'") && e.contains("overflows"), "{e}");
        t.dims = vec![1 << 40, 1 << 30];
        assert!(err(&t).contains("overflows"));

        let mut t = vec_f32("neg", &[]);
        t.dims = vec![-1];
        assert!(err(&t).contains("tensor 'neg': negative dim"));

        let mut t = vec_i64("ext", &[1]);
        t.raw_data = None;
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        assert_eq!(err(&t), "tensor 'ext': external data not loaded");

        let mut t = vec_i8("typed", &[1, 2]);
        t.raw_data = None;
        t.int32_data = vec![1];
        let e = err(&t);
        assert!(e.contains("tensor 'typed'") && e.contains("int32_data holds 1"), "{e}");
        t.int32_data = vec![1, 300];
        assert!(err(&t).contains("out of range for int8"));

        let t = pb::TensorProto { name: Some("s".into()), dims: vec![1], data_type: Some(8), ..Default::default() };
        assert!(err(&t).contains("tensor 's': unsupported element type string"));

        let t = pb::TensorProto {
            name: Some("u".into()),
            dims: vec![1],
            data_type: Some(UINT64),
            uint64_data: vec![u64::MAX],
            ..Default::default()
        };
        assert!(err(&t).contains("does not fit int64"));

        // Zero-sized axis next to huge ones must not panic.
        let mut t = vec_f32("z", &[]);
        t.dims = vec![0, i64::MAX, i64::MAX];
        t.raw_data = Some(Vec::new().into());
        let _ = to_array(&t);
    }
}
