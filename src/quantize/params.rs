//! Quantization arithmetic: scales and zero points from ranges, int8 weights (per tensor or
//! per channel), int32 biases. Everything follows the ONNX `QuantizeLinear` definition:
//! `q = saturate(round_half_even(x / scale) + zero_point)`.

use ndarray::{ArrayD, Axis};

/// Activation element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActType {
    /// uint8, asymmetric (ONNX Runtime's CPU int8 kernels want this).
    U8,
    /// int8, symmetric (zero point 0).
    S8,
}

/// Scale and zero point of one per-tensor activation quantizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActParams {
    pub scale: f32,
    /// Stored as i32; the element type says how to write it.
    pub zero_point: i32,
    pub ty: ActType,
}

impl ActParams {
    /// Params covering `[lo, hi]` (the range is widened to include 0 so 0 is exact).
    pub fn from_range(lo: f32, hi: f32, ty: ActType) -> Self {
        let lo = lo.min(0.0);
        let hi = hi.max(0.0);
        match ty {
            ActType::U8 => {
                let scale = (hi - lo) / 255.0;
                if !(scale.is_finite() && scale > 0.0) {
                    return ActParams { scale: 1.0, zero_point: 0, ty };
                }
                let zp = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as i32;
                ActParams { scale, zero_point: zp, ty }
            }
            ActType::S8 => {
                let m = lo.abs().max(hi.abs());
                let scale = m / 127.0;
                if !(scale.is_finite() && scale > 0.0) {
                    return ActParams { scale: 1.0, zero_point: 0, ty };
                }
                ActParams { scale, zero_point: 0, ty }
            }
        }
    }

    pub fn qmin_qmax(&self) -> (i32, i32) {
        match self.ty {
            ActType::U8 => (0, 255),
            ActType::S8 => (-128, 127),
        }
    }

    /// The stored integer of one value, exactly as QuantizeLinear computes it (the zero
    /// point is within the 8-bit range, so [`round_small`]'s saturation changes nothing).
    pub fn quantize(&self, x: f32) -> i32 {
        let (lo, hi) = self.qmin_qmax();
        (round_small(x / self.scale) + self.zero_point as f32).clamp(lo as f32, hi as f32) as i32
    }

    /// Quantize then dequantize one value, exactly as QuantizeLinear → DequantizeLinear.
    pub fn fake(&self, x: f32) -> f32 {
        (self.quantize(x) - self.zero_point) as f32 * self.scale
    }

    /// [`Self::fake`] of a finite `x`, all in `f32` (the clipped integer and its difference with
    /// the zero point are exact there), so loops over slices vectorize; NaN gives NaN.
    #[inline]
    pub fn fake_finite(&self, x: f32) -> f32 {
        let (lo, hi) = self.qmin_qmax();
        let zp = self.zero_point as f32;
        ((round_small(x / self.scale) + zp).clamp(lo as f32, hi as f32) - zp) * self.scale
    }
}

/// `1.5·2²³`: for `|v| <= 2²²`, `(v + M) − M` is `v` rounded to an integer, ties to even, in
/// f32 arithmetic (a libm `rintf` call per element otherwise, where the build does not assume
/// SSE4.1).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Where [`round_small`] is exact: `2²²`.
pub const ROUND_LIMIT: f32 = 4_194_304.0;

/// `v` rounded half to even, for `|v| <= ROUND_LIMIT`; larger values saturate at
/// `±ROUND_LIMIT` (NaN stays NaN). Wherever the result is clipped to a range well inside
/// `±ROUND_LIMIT` afterwards (8-bit quantization), it equals `round_ties_even` then the clip.
#[inline]
pub fn round_small(v: f32) -> f32 {
    (v.clamp(-ROUND_LIMIT, ROUND_LIMIT) + ROUND_MAGIC) - ROUND_MAGIC
}

/// A symmetric int8 weight: values in [-127, 127], one scale per channel along `axis`
/// (or one scale when `axis` is None).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantWeight {
    pub values: ArrayD<i8>,
    pub scales: Vec<f32>,
    pub axis: Option<usize>,
}

fn symmetric_scale(abs_max: f32) -> f32 {
    let s = abs_max / 127.0;
    if s.is_finite() && s > 0.0 {
        s
    } else {
        1.0
    }
}

/// `clamp(round_half_even(x / scale), -127, 127)`. Clamping first to the integer bounds gives
/// the same result, and then `(y + 1.5·2^23) - 1.5·2^23` rounds half to even in the default
/// rounding mode (the sum lies in [2^23, 2^24), where the f32 step is 1): unlike
/// `round_ties_even`, which is a libm call without SSE4.1, it vectorizes. NaN stays NaN (→ 0).
fn q8(x: f32, scale: f32) -> i8 {
    round_small((x / scale).clamp(-127.0, 127.0)) as i8
}

/// Quantizes a float weight to int8, per channel along `axis` or per tensor.
pub fn quantize_weight(w: &ArrayD<f32>, axis: Option<usize>) -> QuantWeight {
    match axis {
        Some(ax) if ax < w.ndim() => {
            let channels = w.shape()[ax];
            let inner: usize = w.shape()[ax + 1..].iter().product();
            let standard = w.as_standard_layout();
            let data = standard.as_slice().unwrap_or_default();
            // One pass in memory order: element k belongs to channel (k / inner) % channels.
            // With the channels last (MatMul weights), rows of `channels` elements vectorize.
            let mut abs_max = vec![0f32; channels];
            let mut values = Vec::with_capacity(data.len());
            if inner == 1 {
                for row in data.chunks(channels) {
                    abs_max.iter_mut().zip(row).for_each(|(m, v)| *m = m.max(v.abs()));
                }
            } else {
                for_each_channel_run(data, channels, inner, |c, run| {
                    abs_max[c] = run.iter().fold(abs_max[c], |m, v| m.max(v.abs()));
                });
            }
            let scales: Vec<f32> = abs_max.into_iter().map(symmetric_scale).collect();
            if inner == 1 {
                for row in data.chunks(channels) {
                    values.extend(row.iter().zip(&scales).map(|(&x, &s)| q8(x, s)));
                }
            } else {
                for_each_channel_run(data, channels, inner, |c, run| {
                    let s = scales[c];
                    values.extend(run.iter().map(|&x| q8(x, s)));
                });
            }
            let values = ArrayD::from_shape_vec(w.raw_dim(), values).unwrap_or_else(|_| ArrayD::zeros(w.raw_dim()));
            QuantWeight { values, scales, axis: Some(ax) }
        }
        _ => {
            let s = symmetric_scale(w.iter().fold(0f32, |m, v| m.max(v.abs())));
            QuantWeight { values: w.mapv(|x| q8(x, s)), scales: vec![s], axis: None }
        }
    }
}

/// Calls `f(channel, run)` on consecutive runs of `data` (a standard-layout tensor whose
/// channel axis has `channels` entries and `inner` elements per entry after it), in memory
/// order, so a per-channel pass reads memory sequentially whatever the axis.
pub(crate) fn for_each_channel_run<T>(data: &[T], channels: usize, inner: usize, mut f: impl FnMut(usize, &[T])) {
    if channels == 0 || inner == 0 {
        return;
    }
    for block in data.chunks(channels * inner) {
        for (c, run) in block.chunks(inner).enumerate() {
            f(c, run);
        }
    }
}

impl QuantWeight {
    /// The float weight this int8 weight stands for.
    pub fn dequantize(&self) -> ArrayD<f32> {
        let mut out = self.values.mapv(|v| v as f32);
        match self.axis {
            Some(ax) => {
                for (c, mut ch) in out.axis_iter_mut(Axis(ax)).enumerate() {
                    let s = self.scales[c];
                    ch.mapv_inplace(|v| v * s);
                }
            }
            None => {
                let s = self.scales[0];
                out.mapv_inplace(|v| v * s);
            }
        }
        out
    }
}

/// An int32 bias with scale `input_scale × weight_scale[c]` and zero point 0. Returns None
/// when a value would not fit in int32 (the caller keeps that bias in float).
pub fn quantize_bias(b: &[f32], input_scale: f32, weight_scales: &[f32]) -> Option<(Vec<i32>, Vec<f32>)> {
    let per_channel = weight_scales.len() > 1;
    if per_channel && weight_scales.len() != b.len() {
        return None;
    }
    let scales: Vec<f32> = (0..if per_channel { b.len() } else { 1 })
        .map(|c| input_scale * weight_scales[if per_channel { c } else { 0 }])
        .collect();
    let mut q = Vec::with_capacity(b.len());
    for (c, &x) in b.iter().enumerate() {
        let s = scales[if per_channel { c } else { 0 }];
        if !(s > 0.0 && s.is_finite()) {
            return None;
        }
        let v = (x as f64 / s as f64).round_ties_even();
        if v.is_nan() || v.abs() >= i32::MAX as f64 {
            return None;
        }
        q.push(v as i32);
    }
    Some((q, scales))
}

#[cfg(test)]
mod tests {

    #[test]
    fn fake_finite_matches_fake() {
        let mut r = crate::rng::Rng::new(5);
        for ty in [ActType::U8, ActType::S8] {
            let p = ActParams::from_range(-3.7, 11.2, ty);
            for _ in 0..10_000 {
                let x = (r.normal() * 8.0) as f32;
                assert_eq!(p.fake_finite(x).to_bits(), p.fake(x).to_bits(), "{x} {ty:?}");
            }
            for x in [0.0f32, -0.0, 1e30, -1e30, p.scale * 0.5, -p.scale * 0.5, f32::MIN_POSITIVE] {
                assert_eq!(p.fake_finite(x), p.fake(x), "{x} {ty:?}");
            }
        }
    }
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn u8_params_cover_range_and_keep_zero_exact() {
        let p = ActParams::from_range(-1.0, 3.0, ActType::U8);
        assert!((p.scale - 4.0 / 255.0).abs() < 1e-9);
        assert_eq!(p.zero_point, 64);
        assert_eq!(p.fake(0.0), 0.0);
        assert!((p.fake(3.0) - 3.0).abs() <= p.scale);
        assert!((p.fake(100.0) - p.fake(3.0)).abs() < 1e-6, "clipped at the top");
        let relu = ActParams::from_range(0.0, 6.0, ActType::U8);
        assert_eq!(relu.zero_point, 0);
        assert_eq!(relu.fake(-5.0), 0.0, "u8 with zp 0 clamps negatives like Relu");
    }

    #[test]
    fn s8_params_are_symmetric() {
        let p = ActParams::from_range(-2.0, 1.0, ActType::S8);
        assert_eq!(p.zero_point, 0);
        assert!((p.scale - 2.0 / 127.0).abs() < 1e-9);
        let degenerate = ActParams::from_range(0.0, 0.0, ActType::S8);
        assert_eq!(degenerate.scale, 1.0);
    }

    #[test]
    fn act_quantize_matches_round_ties_even_and_clamp() {
        for ty in [ActType::U8, ActType::S8] {
            let p = ActParams::from_range(-3.1, 7.9, ty);
            let (lo, hi) = p.qmin_qmax();
            // Ties (k + ½)·scale, values around them, out of range and huge ones.
            let mut xs: Vec<f32> = (-300..300).map(|k| (k as f32 + 0.5) * p.scale).collect();
            xs.extend((-3000..3000).map(|k| k as f32 * 0.0037));
            xs.extend([1e9, -1e9, f32::MAX, f32::MIN, 0.0, -0.0]);
            for x in xs {
                let want = ((x / p.scale).round_ties_even() + p.zero_point as f32).clamp(lo as f32, hi as f32) as i32;
                assert_eq!(p.quantize(x), want, "x = {x}, {ty:?}");
            }
        }
        assert_eq!(round_small(2.5), 2.0);
        assert_eq!(round_small(-3.5), -4.0);
        assert_eq!(round_small(1e30), ROUND_LIMIT);
    }

    #[test]
    fn q8_matches_round_ties_even_and_clamp() {
        let scale = 0.37f32;
        let mut xs: Vec<f32> = (-40_000..40_000).map(|i| i as f32 * 0.00137 * scale).collect();
        // Exact midpoints, the clamp bounds and beyond, non-finite values.
        xs.extend((-260..260).map(|k| (k as f32 + 0.5) * scale));
        xs.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, -0.0, 126.5 * scale, -126.5 * scale]);
        for x in xs {
            let want = (x / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
            assert_eq!(q8(x, scale), want, "x = {x}");
        }
    }

    #[test]
    fn rounding_is_half_to_even() {
        let p = ActParams { scale: 1.0, zero_point: 0, ty: ActType::S8 };
        assert_eq!(p.fake(2.5), 2.0);
        assert_eq!(p.fake(3.5), 4.0);
        assert_eq!(p.fake(-2.5), -2.0);
    }

    #[test]
    fn per_channel_weights_use_each_channels_abs_max() {
        let w = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.1, -0.2, 0.4, 10.0, 5.0, -2.5]).unwrap();
        let q = quantize_weight(&w, Some(1));
        assert_eq!(q.scales.len(), 3);
        assert!((q.scales[0] - 10.0 / 127.0).abs() < 1e-7);
        assert_eq!(q.values[[1, 0]], 127);
        assert_eq!(q.values[[0, 2]], (0.4f32 / (2.5 / 127.0)).round_ties_even() as i8);
        let back = q.dequantize();
        for (a, b) in back.iter().zip(w.iter()) {
            assert!((a - b).abs() <= 10.0 / 127.0 / 2.0 + 1e-6);
        }
        let t = quantize_weight(&w, None);
        assert_eq!(t.scales.len(), 1);
        assert_eq!(t.values[[0, 0]], 1, "0.1 / (10/127) = 1.27 -> 1");
    }

    #[test]
    fn bias_scale_is_input_times_weight_scale() {
        let (q, s) = quantize_bias(&[0.5, -1.0], 0.1, &[0.01, 0.02]).unwrap();
        assert_eq!(s, vec![0.1 * 0.01, 0.1 * 0.02]);
        assert_eq!(q, vec![500, -500]);
        assert!(quantize_bias(&[1e30], 1e-6, &[1e-6]).is_none(), "overflow keeps float");
    }
}
