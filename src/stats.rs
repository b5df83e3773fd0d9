//! Streaming calibration statistics for one tensor, in bounded memory, and the range
//! (clipping) methods computed from them.
//!
//! This module owns [`TensorStats`] (what is accumulated per calibrated tensor, how two
//! accumulations are merged) and [`RangeMethod`] (how a quantization range `(lo, hi)` is
//! chosen from them). It does not know about graphs, scales or zero points.
//!
//! # What is accumulated
//!
//! NaN and ±Inf elements are only counted (`nan_count`, `inf_count`) and excluded from
//! everything else. Over the `n` finite elements `x`:
//!
//! * `count = n`, `min`, `max`, `sum = Σx`, `sum_sq = Σx²` (all `f64`);
//!   `mean = sum / n`, `std = sqrt(max(0, sum_sq / n − mean²))` (population std),
//!   `abs_max = max(|min|, |max|)`.
//! * per-channel `max |x|` along `channel_axis` (if given; a sample whose rank is too small
//!   for the axis does not contribute to it; the vector grows to the largest channel count).
//! * a signed histogram with `B` bins (`B` a multiple of 4) of `x` over `[-R, R)`, bin width
//!   `w = 2R / B`, bin of `x` = `floor(x / w) + B/2`. `R = 2^e` is the smallest power of two
//!   strictly above `abs_max` (and at least `2^-24`), so every finite value lies strictly
//!   inside. When a sample needs a larger `R`, `R` doubles (as often as needed) and old bins
//!   `2i, 2i+1` are summed into new bin `B/4 + i` (`d` doublings in one pass: bin `i` goes to
//!   `⌊(i − B/2) / 2^d⌋ + B/2`). Because `x·B` is exact in `f64` and `R`
//!   is a power of two, `floor(x / 2w) = floor(floor(x / w) / 2)` holds exactly: doubling
//!   commutes with binning, so the histogram is a pure function of the multiset of values
//!   (chunked = whole, `a+b` = `b+a`). Counts are `u64`.
//!
//! # Range methods (`lo ≤ 0 ≤ hi` always; `(0, 0)` if no finite value was seen)
//!
//! * `MinMax`: `(min, max)`; symmetric `(-m, m)`, `m = abs_max`.
//! * `Percentile(p)`: `lo = Q(1 − p/100)`, `hi = Q(p/100)` with `Q` the histogram quantile
//!   (linear interpolation inside the bin where the cumulative count reaches `q·n`, clamped
//!   to `[min, max]`); symmetric `m = Q_abs(p/100)` on the folded `|x|` histogram.
//! * `Entropy`: TensorRT KL calibration on the `|x|` histogram (the signed histogram folded
//!   at 0 into `B/2` bins). For `i` in `levels/2 ..= used`: `P` = first `i` bins with the
//!   outlier mass `Σ_{k≥i}` added to bin `i−1`; `Q` = the first `i` bins summed into
//!   `levels/2` groups (last group takes the remainder), each group's mass spread evenly
//!   over its bins where `P ≠ 0` (zero bins stay zero); both smoothed (zero entries get
//!   `ε = 1e-4` counts, taken proportionally from the non-zero ones, as in MXNet/ORT);
//!   `KL(P‖Q) = Σ p̂ ln(p̂ / q̂)` on the normalized distributions. `T = i_best · w`
//!   (upper edge), capped at `abs_max`; result `(max(min, −T), min(max, T))`, symmetric
//!   `(−T, T)`.
//! * `Mse`: for `a = k/200`, `k = 1..=200`, candidate `(a·lo₀, a·hi₀)` with
//!   `(lo₀, hi₀) = (min(min,0), max(max,0))`, or `(−a·m, a·m)` if symmetric. With
//!   `s = (hi − lo)/(L − 1)` and `q(x) = lo + s·clamp(round((x − lo)/s), 0, L − 1)`, the
//!   error `Σ_bins n_b · E_b[(x − q(x))²]` is evaluated exactly under a uniform density
//!   inside each bin (bin clipped to `[min, max]`), not just at bin centres: the bin width
//!   is comparable to the 8-bit step, and centre sampling aliases against the grid. The
//!   minimal error wins, ties go to the larger `a`.

use ndarray::ArrayViewD;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// Histogram bins used when the caller has no preference.
pub const DEFAULT_BINS: usize = 2048;
/// Histogram cells `(lower, upper, weight)` (see `TensorStats::cells`).
type Cells = Vec<(f64, f64, f64)>;

/// Number of clipping factors `a = k / MSE_GRID_STEPS` tried by [`RangeMethod::Mse`].
pub const MSE_GRID_STEPS: u32 = 200;
/// Smallest histogram half-range exponent: `R >= 2^-24`.
const MIN_EXP: i32 = -24;
/// Largest bin count; keeps `x · bins` exact in `f64` (24 + 28 < 53 mantissa bits).
const MAX_BINS: usize = 1 << 28;
/// Smoothing mass for zero entries in the KL search (in counts).
const KL_EPS: f64 = 1e-4;

/// Asks the core to bring `data` into L1 (a hint: no effect on results; nothing off x86-64).
#[inline]
fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: a prefetch of an address inside `data` (SSE, part of x86-64); it reads
        // nothing the program sees and cannot fault.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// `2^e` built from the bit pattern, exact for `e` in the normal `f64` exponent range.
fn pow2(e: i32) -> f64 {
    let e = e.clamp(-1022, 1023);
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// Smallest `e >= MIN_EXP` with `2^e > v` (`v` finite, non-negative).
fn exp_above(v: f64) -> i32 {
    if v.is_nan() || v < pow2(MIN_EXP) {
        return MIN_EXP;
    }
    // v >= 2^-24 is a normal f64: its exponent field gives floor(log2 v) exactly.
    let floor_log2 = ((v.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    (floor_log2 + 1).max(MIN_EXP)
}

/// Count, NaN/Inf counts, min, max, `Σx` and `Σx²` of the finite elements of a slice,
/// accumulated in `LANES` independent lanes (element `i` goes to lane `i mod LANES`, a fixed
/// order, so the sums are deterministic and the same with or without SIMD).
struct Moments {
    n: u64,
    nan: u64,
    inf: u64,
    min: f64,
    max: f64,
    sum: f64,
    sum_sq: f64,
}

/// Per-lane min, max, `Σx`, `Σx²`.
#[derive(Clone, Copy)]
struct Lanes {
    min: [f32; Moments::LANES],
    max: [f32; Moments::LANES],
    sum: [f64; Moments::LANES],
    sum_sq: [f64; Moments::LANES],
}

impl Lanes {
    const EMPTY: Lanes = Lanes {
        min: [f32::INFINITY; Moments::LANES],
        max: [f32::NEG_INFINITY; Moments::LANES],
        sum: [0.0; Moments::LANES],
        sum_sq: [0.0; Moments::LANES],
    };

    /// Adds a body (length a multiple of `LANES`, starting at lane 0) with min/max by compare
    /// and select, and with `bins`, writes the bin of each element into `idx` (same length as
    /// `body`) in the same pass where the `f32` kernel applies (AVX-512F or AVX2, and a
    /// [`GridF32`]).
    /// Returns (all finite, `idx` written); if a NaN or ±Inf is present, the lanes are
    /// unchanged.
    ///
    /// `carry`'s bins are counted in any case (during the vector pass where the kernel
    /// applies), whatever is returned.
    fn add_finite_binned(
        &mut self,
        body: &[f32],
        bins: Option<(&GridF32, &mut [u32])>,
        carry: Option<Carry<'_>>,
    ) -> (bool, bool) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let avx512 = std::arch::is_x86_feature_detected!("avx512f");
            return match bins {
                Some((grid, idx)) if idx.len() == body.len() => {
                    // SAFETY: the CPU supports AVX2, and AVX-512F if `avx512`, checked just
                    // above; `idx` is as long as `body`.
                    let finite = unsafe { self.add_finite_simd::<true>(avx512, body, grid, idx, carry) };
                    (finite, finite)
                }
                // SAFETY: as above; `BIN` is false.
                _ => (unsafe { self.add_finite_simd::<false>(avx512, body, &GridF32::UNUSED, &mut [], carry) }, false),
            };
        }
        let _ = bins;
        if let Some(c) = carry {
            c.count_from(0);
        }
        (self.add_finite_portable(body), false)
    }

    /// [`Self::add_finite_avx512`] if `avx512`, else [`Self::add_finite_avx2`].
    ///
    /// # Safety
    /// The CPU supports AVX2, and AVX-512F if `avx512`; with `BIN`, `idx` is as long as `body`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn add_finite_simd<const BIN: bool>(
        &mut self,
        avx512: bool,
        body: &[f32],
        grid: &GridF32,
        idx: &mut [u32],
        carry: Option<Carry<'_>>,
    ) -> bool {
        // SAFETY: the caller's promises are the kernels' preconditions.
        unsafe {
            if avx512 {
                self.add_finite_avx512::<BIN>(body, grid, idx, carry)
            } else {
                self.add_finite_avx2::<BIN>(body, grid, idx, carry)
            }
        }
    }

    /// [`Self::add_finite_portable`] with AVX2 intrinsics: lanes 0–3 and 4–7 are the two
    /// `f64` halves of one 8-wide `f32` load. Each square is rounded before it is added (no
    /// FMA), so the results are bit-identical to the portable code. With `BIN`, the bins of
    /// `grid` go to `idx` (which must be as long as `body`), computed as in
    /// [`GridF32`]; `idx` is meaningful only if `true` is returned. `carry`'s bins are
    /// counted eight per step alongside (the rest after the loop), whatever is returned: the
    /// core runs the counting's loads and stores beside the vector work, where two loops
    /// in a row would overlap only as far as its reorder window reaches.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_finite_avx2<const BIN: bool>(
        &mut self,
        body: &[f32],
        grid: &GridF32,
        idx: &mut [u32],
        mut carry: Option<Carry<'_>>,
    ) -> bool {
        use std::arch::x86_64::*;
        // Steps that also count eight carried bins.
        let fused = carry.as_ref().map_or(0, |c| c.idx.len() / 8).min(body.len() / Moments::LANES);
        // SAFETY: each source array holds exactly one vector.
        let (mut mn, mut mx, mut s_lo, mut s_hi, mut ss_lo, mut ss_hi) = unsafe {
            (
                _mm256_loadu_ps(self.min.as_ptr()),
                _mm256_loadu_ps(self.max.as_ptr()),
                _mm256_loadu_pd(self.sum.as_ptr()),
                _mm256_loadu_pd(self.sum.as_ptr().add(4)),
                _mm256_loadu_pd(self.sum_sq.as_ptr()),
                _mm256_loadu_pd(self.sum_sq.as_ptr().add(4)),
            )
        };
        // `v - v` is +0 for finite `v` and NaN otherwise: OR-ed together, any set bit means a
        // non-finite element.
        let mut bad = _mm256_setzero_ps();
        let steps = body.len() / Moments::LANES;
        for i in 0..steps {
            let at = i * Moments::LANES;
            // SAFETY: `at + 8 <= body.len()`.
            let v = unsafe { _mm256_loadu_ps(body.as_ptr().add(at)) };
            bad = _mm256_or_ps(bad, _mm256_sub_ps(v, v));
            // min_ps(v, m) = if v < m { v } else { m }, as in the portable code.
            mn = _mm256_min_ps(v, mn);
            mx = _mm256_max_ps(v, mx);
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
            s_lo = _mm256_add_pd(s_lo, lo);
            s_hi = _mm256_add_pd(s_hi, hi);
            ss_lo = _mm256_add_pd(ss_lo, _mm256_mul_pd(lo, lo));
            ss_hi = _mm256_add_pd(ss_hi, _mm256_mul_pd(hi, hi));
            if BIN {
                // Outside the range the bins are meaningless: the block is binned again
                // (`add_slice`).
                let k = grid.bins8(v);
                // SAFETY: `idx` is as long as `body` (caller), so `at + 8 <= idx.len()`.
                unsafe { _mm256_storeu_si256(idx.as_mut_ptr().add(at).cast::<__m256i>(), k) };
            }
            if let (true, Some(c)) = (i < fused, carry.as_mut()) {
                // SAFETY: `i < fused`, so `at + 8 <= c.idx.len()`.
                unsafe { c.count_step::<8>(at) };
            }
        }
        if let Some(c) = carry {
            c.count_from(fused * 8);
        }
        if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(bad, _mm256_setzero_ps())) != 0 {
            return false;
        }
        // SAFETY: each destination array holds exactly one vector.
        unsafe {
            _mm256_storeu_ps(self.min.as_mut_ptr(), mn);
            _mm256_storeu_ps(self.max.as_mut_ptr(), mx);
            _mm256_storeu_pd(self.sum.as_mut_ptr(), s_lo);
            _mm256_storeu_pd(self.sum.as_mut_ptr().add(4), s_hi);
            _mm256_storeu_pd(self.sum_sq.as_mut_ptr(), ss_lo);
            _mm256_storeu_pd(self.sum_sq.as_mut_ptr().add(4), ss_hi);
        }
        true
    }

    /// [`Self::add_finite_avx2`] sixteen elements per step: the `f64` sums of lanes 0–7 in
    /// one 512-bit register each, fed the low then the high eight elements of a step (the
    /// same order per lane as two 8-wide steps, so bit-identical), min/max still in 8-wide
    /// halves (the order decides which of `-0.0`/`+0.0` a lane keeps), and the floor taken by
    /// the conversion's rounding mode. A last 8-element step (body lengths are multiples of
    /// 8, not 16) uses the 8-wide operations.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn add_finite_avx512<const BIN: bool>(
        &mut self,
        body: &[f32],
        grid: &GridF32,
        idx: &mut [u32],
        mut carry: Option<Carry<'_>>,
    ) -> bool {
        use std::arch::x86_64::*;
        const W: usize = 2 * Moments::LANES;
        let steps = body.len() / W;
        // Steps that also count sixteen carried bins.
        let fused = carry.as_ref().map_or(0, |c| c.idx.len() / W).min(steps);
        // SAFETY: each source array holds exactly one vector.
        let (mut mn, mut mx, mut s, mut ss) = unsafe {
            (
                _mm256_loadu_ps(self.min.as_ptr()),
                _mm256_loadu_ps(self.max.as_ptr()),
                _mm512_loadu_pd(self.sum.as_ptr()),
                _mm512_loadu_pd(self.sum_sq.as_ptr()),
            )
        };
        // `v - v` is +0 for finite `v` and NaN otherwise: OR-ed together, any set bit means a
        // non-finite element.
        let mut bad = _mm512_setzero_si512();
        for i in 0..steps {
            let at = i * W;
            // SAFETY: `at + 16 <= body.len()`.
            let v = unsafe { _mm512_loadu_ps(body.as_ptr().add(at)) };
            bad = _mm512_or_si512(bad, _mm512_castps_si512(_mm512_sub_ps(v, v)));
            let lo8 = _mm512_castps512_ps256(v);
            let hi8 = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            mn = _mm256_min_ps(hi8, _mm256_min_ps(lo8, mn));
            mx = _mm256_max_ps(hi8, _mm256_max_ps(lo8, mx));
            let (lo, hi) = (_mm512_cvtps_pd(lo8), _mm512_cvtps_pd(hi8));
            s = _mm512_add_pd(_mm512_add_pd(s, lo), hi);
            ss = _mm512_add_pd(_mm512_add_pd(ss, _mm512_mul_pd(lo, lo)), _mm512_mul_pd(hi, hi));
            if BIN {
                let k = grid.bins16(v);
                // SAFETY: `idx` is as long as `body` (caller), so `at + 16 <= idx.len()`.
                unsafe { _mm512_storeu_si512(idx.as_mut_ptr().add(at).cast(), k) };
            }
            if let (true, Some(c)) = (i < fused, carry.as_mut()) {
                // SAFETY: `i < fused`, so `at + 16 <= c.idx.len()`.
                unsafe { c.count_step::<W>(at) };
            }
        }
        if let Some(c) = carry {
            c.count_from(fused * W);
        }
        let mut bad8 = _mm256_setzero_ps();
        if !body.len().is_multiple_of(W) {
            let at = steps * W;
            // SAFETY: body lengths are multiples of 8, so `at + 8 == body.len()`.
            let v = unsafe { _mm256_loadu_ps(body.as_ptr().add(at)) };
            bad8 = _mm256_sub_ps(v, v);
            mn = _mm256_min_ps(v, mn);
            mx = _mm256_max_ps(v, mx);
            let lo = _mm512_cvtps_pd(v);
            s = _mm512_add_pd(s, lo);
            ss = _mm512_add_pd(ss, _mm512_mul_pd(lo, lo));
            if BIN {
                let k = grid.bins8(v);
                // SAFETY: `idx` is as long as `body` (caller), so `at + 8 <= idx.len()`.
                unsafe { _mm256_storeu_si256(idx.as_mut_ptr().add(at).cast::<__m256i>(), k) };
            }
        }
        if _mm512_test_epi32_mask(bad, bad) != 0
            || _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(bad8, _mm256_setzero_ps())) != 0
        {
            return false;
        }
        // SAFETY: each destination array holds exactly one vector.
        unsafe {
            _mm256_storeu_ps(self.min.as_mut_ptr(), mn);
            _mm256_storeu_ps(self.max.as_mut_ptr(), mx);
            _mm512_storeu_pd(self.sum.as_mut_ptr(), s);
            _mm512_storeu_pd(self.sum_sq.as_mut_ptr(), ss);
        }
        true
    }

    fn add_finite_portable(&mut self, body: &[f32]) -> bool {
        if !body.iter().all(|v| v.is_finite()) {
            return false;
        }
        for c in body.chunks_exact(Moments::LANES) {
            for (k, &v) in c.iter().enumerate() {
                self.min[k] = if v < self.min[k] { v } else { self.min[k] };
                self.max[k] = if v > self.max[k] { v } else { self.max[k] };
                let d = f64::from(v);
                self.sum[k] += d;
                self.sum_sq[k] += d * d;
            }
        }
        true
    }
}

/// [`Moments`] of one slice fed in consecutive segments (each but the last a multiple of
/// `LANES` long), so that each segment can be used while it is in cache.
struct MomentsAcc {
    lanes: Lanes,
    n: u64,
    nan: u64,
    inf: u64,
}

impl MomentsAcc {
    fn new() -> MomentsAcc {
        MomentsAcc { lanes: Lanes::EMPTY, n: 0, nan: 0, inf: 0 }
    }

    /// Adds the next segment and, with `bins`, bins it with the grid into `idx` (as long as
    /// `seg`) in the same pass where the fused kernel applies. Returns (all finite, `idx`
    /// written: the bins of every element inside the grid's range, `u32::MAX` for NaN and
    /// ±Inf; elements outside the range get meaningless bins).
    /// `carry`'s bins are counted as well.
    fn add_binned(
        &mut self,
        seg: &[f32],
        bins: Option<(&BinGrid, &mut [u32])>,
        carry: Option<Carry<'_>>,
    ) -> (bool, bool) {
        const L: usize = Moments::LANES;
        let cut = seg.len() - seg.len() % L;
        let (body, rest) = seg.split_at(cut);
        let (grid, idx) = match bins {
            Some((grid, idx)) if idx.len() == seg.len() => (Some(grid), idx),
            _ => (None, &mut [][..]),
        };
        let fast = grid.and_then(BinGrid::f32_grid);
        let (idx_body, idx_rest) = idx.split_at_mut(cut.min(idx.len()));
        let (mut finite, mut binned) = self.lanes.add_finite_binned(body, fast.as_ref().map(|g| (g, idx_body)), carry);
        if finite {
            self.n += body.len() as u64;
        } else {
            // Rare: element by element, skipping and counting NaN and ±Inf (min/max are
            // redone by `finish`).
            for (i, &v) in body.iter().enumerate() {
                self.add_one(i % L, v);
            }
        }
        for (k, &v) in rest.iter().enumerate() {
            finite &= v.is_finite();
            self.add_one(k, v);
        }
        if let (true, Some(grid)) = (binned, grid) {
            grid.bins_of_portable(rest, idx_rest, false);
        } else {
            binned = false;
        }
        (finite, binned)
    }

    fn add_one(&mut self, lane: usize, v: f32) {
        if v.is_nan() {
            self.nan += 1;
        } else if v.is_infinite() {
            self.inf += 1;
        } else {
            let l = &mut self.lanes;
            l.min[lane] = l.min[lane].min(v);
            l.max[lane] = l.max[lane].max(v);
            let d = f64::from(v);
            l.sum[lane] += d;
            l.sum_sq[lane] += d * d;
            self.n += 1;
        }
    }

    /// `max(|min|, |max|)` of the finite elements so far (`None` before any).
    fn abs_max(&self) -> Option<f64> {
        let min = self.lanes.min.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let max = self.lanes.max.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        (self.n > 0).then(|| f64::from(min.abs().max(max.abs())))
    }

    /// The moments of `data`, the whole slice that was fed. With NaN or ±Inf present, min and
    /// max are the sequential `f64` min/max of the finite elements.
    fn finish(self, data: &[f32]) -> Moments {
        let l = &self.lanes;
        let (mut min, mut max) = (
            f64::from(l.min.iter().fold(f32::INFINITY, |a, &b| a.min(b))),
            f64::from(l.max.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))),
        );
        if self.nan + self.inf > 0 {
            (min, max) = (f64::INFINITY, f64::NEG_INFINITY);
            for &v in data.iter().filter(|v| v.is_finite()) {
                min = min.min(f64::from(v));
                max = max.max(f64::from(v));
            }
        }
        Moments {
            n: self.n,
            nan: self.nan,
            inf: self.inf,
            min,
            max,
            sum: l.sum.iter().sum(),
            sum_sq: l.sum_sq.iter().sum(),
        }
    }
}

impl Moments {
    const LANES: usize = 8;

    fn empty() -> Moments {
        Moments { n: 0, nan: 0, inf: 0, min: f64::INFINITY, max: f64::NEG_INFINITY, sum: 0.0, sum_sq: 0.0 }
    }

    fn add(&mut self, o: &Moments) {
        self.n += o.n;
        self.nan += o.nan;
        self.inf += o.inf;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.sum += o.sum;
        self.sum_sq += o.sum_sq;
    }
}

/// Histogram bin arithmetic for one range: bin of a finite `v` = `floor(v·scale) + half`,
/// clamped to `[0, top]`.
struct BinGrid {
    scale: f64,
    half: i64,
    top: i64,
}

/// [`BinGrid`] in `f32`, for the fused kernel: bin of a finite `v` inside the range =
/// `floor(v·scale) + half`, and `−1 + half` at most for `v < 0`. `v·scale` is exact when it is
/// a normal `f32` (scale a power of two); when it is below `2^-126` in magnitude it may round,
/// possibly to `−0`, but then `|v·scale| < 1` and the floor is 0 for `v ≥ 0` and −1 for
/// `v < 0`, which the `v < 0` rule restores. So inside the range the bins equal
/// [`BinGrid`]'s exactly (no clamp is needed there).
struct GridF32 {
    scale: f32,
    half: i32,
}

impl GridF32 {
    /// Placeholder for kernels that do not bin.
    const UNUSED: GridF32 = GridF32 { scale: 1.0, half: 0 };

    /// The bins of eight values: for `v` inside the range, the floor of the exact product is
    /// an integer in [-half, half - 1] and the conversion is exact (outside it the bins are
    /// meaningless). A negative `v` whose product underflowed to -0 still belongs below 0:
    /// where `v < 0`, the compare's all-ones lane OR i32::MAX is -1 and the bin becomes
    /// min(k, -1); elsewhere min(k, i32::MAX) = k.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    fn bins8(&self, v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let k = _mm256_cvtps_epi32(_mm256_floor_ps(_mm256_mul_ps(v, _mm256_set1_ps(self.scale))));
        let neg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_setzero_ps()));
        let k = _mm256_min_epi32(k, _mm256_or_si256(neg, _mm256_set1_epi32(i32::MAX)));
        _mm256_add_epi32(k, _mm256_set1_epi32(self.half))
    }

    /// [`Self::bins8`] of sixteen values, the floor taken by the conversion's rounding mode
    /// and the `v < 0` rule by a masked min.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn bins16(&self, v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let product = _mm512_mul_ps(v, _mm512_set1_ps(self.scale));
        let k = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(product);
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_setzero_ps());
        _mm512_add_epi32(_mm512_mask_min_epi32(k, neg, k, _mm512_set1_epi32(-1)), _mm512_set1_epi32(self.half))
    }

    /// The bins of `block`'s values (finite, inside the range) into `idx`, which must be as
    /// long as `block`: [`Self::bins16`], the last partial step through masked loads and
    /// stores.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn bins_avx512(&self, block: &[f32], idx: &mut [u32]) {
        use std::arch::x86_64::*;
        let n = block.len().min(idx.len());
        for at in (0..n).step_by(16) {
            // Lanes of this step inside the slices (all 16 but in the last step).
            let mask: __mmask16 = if n - at >= 16 { !0 } else { (1 << (n - at)) - 1 };
            // SAFETY: the masked load and store touch only lanes `at + l < n`, inside both
            // slices.
            unsafe {
                let k = self.bins16(_mm512_maskz_loadu_ps(mask, block.as_ptr().add(at)));
                _mm512_mask_storeu_epi32(idx.as_mut_ptr().add(at).cast(), mask, k);
            }
        }
    }
}

impl BinGrid {
    /// The same grid in `f32`, when that is exact: the scale a normal power of two in `f32`,
    /// at most `2^23` bins per side (exact `f32` integers).
    fn f32_grid(&self) -> Option<GridF32> {
        let scale = self.scale as f32;
        let exact = f64::from(scale) == self.scale
            && scale.is_normal()
            && self.scale.to_bits() & ((1 << 52) - 1) == 0
            && self.half <= 1 << 23
            && self.top == 2 * self.half - 1;
        exact.then_some(GridF32 { scale, half: self.half as i32 })
    }

    /// Bins of `block` (every element finite and inside the range) into `idx` (same length):
    /// sixteen at a time in `f32` with AVX-512F and the exact `f32` grid `fast` (this grid's,
    /// [`Self::f32_grid`]), else [`Self::bins_of`].
    fn bins_of_finite(&self, fast: Option<&GridF32>, block: &[f32], idx: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(g), true) = (fast, std::arch::is_x86_feature_detected!("avx512f")) {
            if idx.len() == block.len() {
                // SAFETY: the CPU supports AVX-512F, checked just above; `idx` is as long as
                // `block`.
                return unsafe { g.bins_avx512(block, idx) };
            }
        }
        let _ = fast;
        self.bins_of(block, idx, true)
    }

    /// Bins of `block` into `idx` (same length); non-finite elements get `u32::MAX` unless
    /// `finite_only` promises there are none.
    fn bins_of(&self, block: &[f32], idx: &mut [u32], finite_only: bool) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { self.bins_of_avx2(block, idx, finite_only) };
        }
        self.bins_of_portable(block, idx, finite_only)
    }

    /// [`Self::bins_of_portable`] with AVX2 intrinsics when every element is finite: the same
    /// exact product, clamp and floor (`floor` of an exact product, so no rounding step
    /// differs), four elements per step.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn bins_of_avx2(&self, block: &[f32], idx: &mut [u32], finite_only: bool) {
        use std::arch::x86_64::*;
        if !finite_only || idx.len() != block.len() {
            return self.bins_of_portable(block, idx, finite_only);
        }
        let scale = _mm256_set1_pd(self.scale);
        let lo = _mm256_set1_pd(-(self.half as f64));
        let hi = _mm256_set1_pd((self.top - self.half) as f64);
        // `half <= 2^27`: an i32.
        let half = _mm_set1_epi32(self.half as i32);
        let body = block.len() - block.len() % 4;
        for (src, dst) in block[..body].chunks_exact(4).zip(idx[..body].chunks_exact_mut(4)) {
            // SAFETY: `src` and `dst` hold exactly 4 elements each.
            unsafe {
                let t = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(src.as_ptr())), scale);
                let f = _mm256_floor_pd(_mm256_min_pd(_mm256_max_pd(t, lo), hi));
                // `f` is an integer in [-half, top - half]: the conversion is exact.
                let k = _mm_add_epi32(_mm256_cvtpd_epi32(f), half);
                _mm_storeu_si128(dst.as_mut_ptr().cast::<__m128i>(), k);
            }
        }
        self.bins_of_portable(&block[body..], &mut idx[body..], true);
    }

    /// `v·scale` is exact (scale is a power of two and |v·scale| < B/2 <= 2^27). Adding and
    /// subtracting 1.5·2^52 rounds it to the nearest integer `r` exactly; `r − [r > t]` is
    /// the floor, and adding 1.5·2^52 once more puts that integer in the low mantissa bits
    /// (two's complement). No libm call and no saturating float→int conversion, so the loop
    /// vectorizes.
    #[inline(always)]
    fn bins_of_portable(&self, block: &[f32], idx: &mut [u32], finite_only: bool) {
        const MAGIC: f64 = 6_755_399_441_055_744.0;
        let (scale, half) = (self.scale, self.half);
        let (lo_t, hi_t) = (-(half as f64), (self.top - half) as f64);
        let bin = |v: f32| -> u32 {
            let t = (f64::from(v) * scale).clamp(lo_t, hi_t);
            let r = (t + MAGIC) - MAGIC;
            let floor = r - if r > t { 1.0 } else { 0.0 };
            ((floor + MAGIC).to_bits() as u32).wrapping_add(half as u32)
        };
        if finite_only {
            for (j, &v) in idx.iter_mut().zip(block) {
                *j = bin(v);
            }
        } else {
            for (j, &v) in idx.iter_mut().zip(block) {
                *j = if v.is_finite() { bin(v) } else { u32::MAX };
            }
        }
    }
}

/// `SUB` interleaved `u32` histograms (one per element position mod `SUB`) for a large sample,
/// so that runs of equal bins do not serialize on one counter; empty for small samples,
/// which count straight into the `u64` histogram.
struct SubHistograms {
    sub: Vec<u32>,
    /// Elements counted since the last flush.
    pending: usize,
}

impl SubHistograms {
    const SUB: usize = 4;
    /// Counted elements after which the `u32` counters are flushed (none can overflow before).
    const FLUSH_AT: usize = 1 << 31;

    fn new(elements: usize, bins: usize) -> SubHistograms {
        let interleave = elements >= Self::SUB * bins && elements >= 4096;
        SubHistograms { sub: if interleave { vec![0u32; Self::SUB * bins] } else { Vec::new() }, pending: 0 }
    }
}

/// The bins of a finite block not yet counted, for the next block's vector pass to count
/// ([`Lanes::add_finite_avx512`], [`Lanes::add_finite_avx2`]) into `SubHistograms::SUB`
/// interleaved histograms of `bins`
/// bins each (`sub`). Every bin in `idx` is below `bins` (a finite block's bins, after any
/// re-binning, lie in `[0, bins)`), which the unchecked counting relies on.
struct Carry<'a> {
    idx: &'a [u32],
    sub: &'a mut [u32],
    bins: usize,
}

impl Carry<'_> {
    /// Counts the `N` bins `idx[at..at + N]` (a step of a kernel's vector pass), position `p`
    /// into sub-histogram `p % SUB`.
    ///
    /// # Safety
    /// `at + N <= idx.len()`.
    #[inline(always)]
    unsafe fn count_step<const N: usize>(&mut self, at: usize) {
        const SUB: usize = SubHistograms::SUB;
        for p in 0..N {
            // SAFETY: `at + p < idx.len()` (caller); `j < bins` and `sub.len() == SUB * bins`
            // ([`Carry`]), so `(p % SUB) * bins + j < sub.len()`.
            unsafe {
                let j = *self.idx.get_unchecked(at + p) as usize;
                *self.sub.get_unchecked_mut((p % SUB) * self.bins + j) += 1;
            }
        }
    }

    /// Counts `idx[from..]`: sub-histogram `k` counts position `k` of each group of `SUB`,
    /// the last partial group goes to the first (which one is only a matter of speed: they
    /// are summed).
    fn count_from(self, from: usize) {
        const SUB: usize = SubHistograms::SUB;
        let (sub, bins) = (self.sub, self.bins);
        debug_assert_eq!(sub.len(), SUB * bins);
        let mut groups = self.idx[from.min(self.idx.len())..].chunks_exact(SUB);
        for g in &mut groups {
            for (k, &j) in g.iter().enumerate() {
                // SAFETY: `j < bins` and `sub.len() == SUB * bins` ([`Carry`]), so
                // `k * bins + j < sub.len()`.
                unsafe { *sub.get_unchecked_mut(k * bins + j as usize) += 1 };
            }
        }
        for &j in groups.remainder() {
            // SAFETY: as above, with `k = 0`.
            unsafe { *sub.get_unchecked_mut(j as usize) += 1 };
        }
    }
}

/// Streaming statistics of one tensor's activations over a calibration set.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorStats {
    bins: usize,
    channel_axis: Option<usize>,
    count: u64,
    nan_count: u64,
    inf_count: u64,
    /// `+inf` / `-inf` while `count == 0`.
    min: f64,
    max: f64,
    sum: f64,
    sum_sq: f64,
    channel_absmax: Vec<f32>,
    /// Bins of the per-channel statistics (0: none are kept).
    channel_bins: usize,
    /// Per channel along `channel_axis`: the same statistics of that channel's values alone
    /// (kept only when asked for with [`TensorStats::with_channel_stats`]).
    channel_stats: Vec<TensorStats>,
    /// `R = 2^hist_exp`.
    hist_exp: i32,
    hist: Vec<u64>,
}

impl Default for TensorStats {
    fn default() -> Self {
        Self::new(DEFAULT_BINS, None)
    }
}

impl TensorStats {
    /// Empty statistics. `bins` is rounded up to a multiple of 4 (at least 4, at most
    /// 2^28) so that range doubling stays exact; `channel_axis` selects the per-channel
    /// abs-max axis.
    pub fn new(bins: usize, channel_axis: Option<usize>) -> Self {
        let bins = bins.clamp(4, MAX_BINS).div_ceil(4) * 4;
        TensorStats {
            bins,
            channel_axis,
            count: 0,
            nan_count: 0,
            inf_count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            sum_sq: 0.0,
            channel_absmax: Vec::new(),
            channel_bins: 0,
            channel_stats: Vec::new(),
            hist_exp: MIN_EXP,
            hist: vec![0; bins],
        }
    }

    /// The same empty statistics that also keep, per channel along the channel axis, the
    /// statistics of that channel's values alone, with `bins` bins (what
    /// [`scaled_range`] reads to range a tensor whose channels are rescaled).
    pub fn with_channel_stats(mut self, bins: usize) -> Self {
        self.channel_bins = bins.clamp(4, MAX_BINS).div_ceil(4) * 4;
        self
    }

    /// Fold one sample's activation (any shape) into the stats.
    ///
    /// One pass over the C-order slice, in blocks of 256 elements (within each channel block
    /// when there are per-channel blocks): the moments in fixed-width lanes and, in the same
    /// loop, the histogram bins with the range so far (AVX-512F or AVX2 where available,
    /// bit-identical to the portable code, `floor` of an exact product, no libm call); a block whose values
    /// need a larger range grows it and is binned again while it is in cache. Counts go
    /// through four interleaved `u32` sub-histograms when the sample is large, so consecutive
    /// equal bins do not serialize on one counter, and then a block's bins are counted by
    /// the next block's vector pass ([`Carry`]).
    pub fn update(&mut self, x: ArrayViewD<'_, f32>) {
        // One C-order slice (borrowed unless the view is not C-contiguous) serves every pass.
        let standard = x.as_standard_layout();
        let Some(data) = standard.as_slice() else { return };
        let shape = x.shape();
        // (channels, elements after the channel axis)
        let layout = self.channel_axis.filter(|&a| a < x.ndim()).map(|a| (shape[a], shape[a + 1..].iter().product()));
        // With enough elements per channel block, the moments are taken per block: a block's
        // abs-max is max(|min|, |max|), so no separate per-channel pass is needed.
        let blocks = layout.filter(|&(channels, inner): &(usize, usize)| channels > 0 && inner >= 16);
        // Per-channel statistics: with channel blocks, taken block by block beside the tensor's
        // while each block is in cache; otherwise in a pass of their own below.
        let per_channel = match layout {
            Some((channels, inner)) if self.channel_bins > 0 && channels > 0 && inner > 0 => Some((channels, inner)),
            _ => None,
        };
        if let Some((channels, _)) = per_channel {
            if self.channel_stats.len() < channels {
                self.channel_stats.resize(channels, TensorStats::new(self.channel_bins, None));
            }
        }
        let mut counts = SubHistograms::new(data.len(), self.bins);
        // The channels' counting scratch, shared (every channel block is `inner` long).
        let mut channel_counts = per_channel.map(|(_, inner)| SubHistograms::new(inner, self.channel_bins));
        let moments = match blocks {
            Some((channels, inner)) => {
                if self.channel_absmax.len() < channels {
                    self.channel_absmax.resize(channels, 0.0);
                }
                let mut total = Moments::empty();
                for (k, block) in data.chunks_exact(inner).enumerate() {
                    let m = self.add_slice(block, &mut counts);
                    if m.n > 0 {
                        let slot = &mut self.channel_absmax[k % channels];
                        *slot = slot.max(m.min.abs().max(m.max.abs()) as f32);
                    }
                    if let Some(scratch) = channel_counts.as_mut() {
                        self.channel_stats[k % channels].update_flat_known(block, &m, scratch);
                    }
                    total.add(&m);
                }
                total
            }
            None => self.add_slice(data, &mut counts),
        };
        self.flush_sub_histograms(&mut counts.sub);
        self.add_moments(&moments);
        let finite_only = moments.nan == 0 && moments.inf == 0;
        if let (Some((channels, inner)), None) = (layout, blocks) {
            self.update_channel_absmax(data, channels, inner, finite_only);
        }
        if let (Some((channels, inner)), None, Some(scratch)) = (per_channel, blocks, channel_counts.as_mut()) {
            for (k, block) in data.chunks_exact(inner).enumerate() {
                self.channel_stats[k % channels].update_flat(block, scratch);
            }
        }
    }

    /// [`Self::update`] of statistics without channels, from a flat slice, counting through
    /// `scratch` ([`SubHistograms::new`] for `data.len()` elements and this histogram's bins),
    /// which is left empty again: one tensor's per-channel statistics share one instead of
    /// allocating and zeroing their own per channel block.
    fn update_flat(&mut self, data: &[f32], scratch: &mut SubHistograms) {
        let moments = self.add_slice(data, scratch);
        self.flush_sub_histograms(&mut scratch.sub);
        scratch.pending = 0;
        self.add_moments(&moments);
    }

    /// [`Self::update_flat`] of a slice whose moments `add_slice` has just computed (the
    /// channel block of the tensor's pass: the same function of the same slice, so the same
    /// bits). When every element is finite, the range grows to its final size first and one
    /// pass bins and counts, without the moments or any re-binning: doubling commutes with
    /// binning (module docs), so the histogram is the one `update_flat` would count.
    fn update_flat_known(&mut self, data: &[f32], moments: &Moments, scratch: &mut SubHistograms) {
        if moments.n == 0 || moments.nan + moments.inf > 0 {
            return self.update_flat(data, scratch);
        }
        self.grow_to(exp_above(moments.min.abs().max(moments.max.abs())));
        let grid = self.grid();
        let fast = grid.f32_grid();
        let mut idx = [0u32; 256];
        for chunk in data.chunks(idx.len()) {
            let idx = &mut idx[..chunk.len()];
            grid.bins_of_finite(fast.as_ref(), chunk, idx);
            self.count_bins(idx, true, scratch);
        }
        self.flush_sub_histograms(&mut scratch.sub);
        scratch.pending = 0;
        self.add_moments(moments);
    }

    fn add_moments(&mut self, moments: &Moments) {
        self.nan_count += moments.nan;
        self.inf_count += moments.inf;
        if moments.n > 0 {
            self.count += moments.n;
            self.sum += moments.sum;
            self.sum_sq += moments.sum_sq;
            self.min = self.min.min(moments.min);
            self.max = self.max.max(moments.max);
        }
    }

    /// The moments of `data` (lanes counted from its first element) and its histogram counts,
    /// block by block: each block's moments and bins in one pass with the range so far; when
    /// the block's values need a larger range, the range grows and the block is binned again.
    /// Since doubling commutes with binning (module docs), the histogram is the same as with
    /// the final range from the start. With interleaved sub-histograms, a finite block's bins
    /// are counted during the next block's pass (the last block's after the loop); the
    /// counts before a growth, carried ones included, are flushed with the old range.
    fn add_slice(&mut self, data: &[f32], counts: &mut SubHistograms) -> Moments {
        /// A multiple of `Moments::LANES`; the block and its bins stay in L1. On one sample of
        /// PP-OCR det's calibrated activations (85 M elements) replayed from memory, 256 took
        /// 0.76–0.77 ns per element against 0.83–0.84 with 512 and 0.95–1.03 with 1024 (the
        /// counting carried into the next block's pass; before it, 256 took 1.03–1.07 against
        /// 1.11–1.20 with 1024).
        const BLOCK: usize = 256;
        let mut acc = MomentsAcc::new();
        // Two bin buffers: a finite block's bins (with interleaved sub-histograms) wait in one
        // while the next block's vector pass fills the other and counts them as it goes.
        let mut bufs = [[0u32; BLOCK]; 2];
        // Bins waiting in `bufs[(b + 1) % 2]` (those of block `b - 1`).
        let mut waiting = 0;
        for (b, block) in data.chunks(BLOCK).enumerate() {
            // The next block is read from memory while this one is counted: the counting
            // makes no demand loads of `data` that would draw the hardware prefetcher ahead
            // (one sample of PP-OCR det's activations replayed from memory: 1.01 -> 0.88 ns
            // per element; about 1% of a `quantize` run, where tract has just written them).
            if let Some(next) = data.get((b + 1) * BLOCK..(b + 2) * BLOCK) {
                prefetch(next);
            }
            let [even, odd] = &mut bufs;
            let (idx, prev) = if b % 2 == 0 { (even, &*odd) } else { (odd, &*even) };
            let idx = &mut idx[..block.len()];
            let carry = (waiting > 0).then(|| Carry { idx: &prev[..waiting], sub: &mut counts.sub, bins: self.bins });
            let (finite, binned) = acc.add_binned(block, Some((&self.grid(), &mut *idx)), carry);
            counts.pending += std::mem::take(&mut waiting);
            // Nothing to count before the first finite value.
            let Some(abs_max) = acc.abs_max() else { continue };
            let exp = exp_above(abs_max);
            let grows = exp > self.hist_exp;
            if grows {
                // The counts so far (the carried block's included) are bins of the old range.
                self.flush_sub_histograms(&mut counts.sub);
                self.grow_to(exp);
            }
            if grows || !binned {
                self.grid().bins_of(block, idx, finite);
            }
            if finite && !counts.sub.is_empty() && counts.pending < SubHistograms::FLUSH_AT {
                waiting = block.len();
            } else {
                self.count_bins(idx, finite, counts);
            }
        }
        if waiting > 0 {
            let last = &bufs[(data.len().div_ceil(BLOCK) + 1) % 2][..waiting];
            self.count_bins(last, true, counts);
        }
        acc.finish(data)
    }

    /// The bin arithmetic of the current range.
    fn grid(&self) -> BinGrid {
        let half = (self.bins / 2) as i64;
        BinGrid { scale: self.bins as f64 / pow2(self.hist_exp + 1), half, top: self.bins as i64 - 1 }
    }

    /// Counts bins (`u32::MAX` = not counted, only when not `finite_only`).
    fn count_bins(&mut self, idx: &[u32], finite_only: bool, counts: &mut SubHistograms) {
        if counts.sub.is_empty() {
            for &j in idx {
                if j != u32::MAX {
                    self.hist[j as usize] += 1;
                }
            }
            return;
        }
        if finite_only {
            // Every bin is in [0, bins) (finite elements are binned into it), and `sub` holds
            // `SUB` histograms of `bins`: a [`Carry`]'s invariant.
            Carry { idx, sub: &mut counts.sub, bins: self.bins }.count_from(0);
        } else {
            const SUB: usize = SubHistograms::SUB;
            let (bins, sub) = (self.bins, &mut counts.sub);
            let mut groups = idx.chunks_exact(SUB);
            for g in &mut groups {
                for (k, &j) in g.iter().enumerate() {
                    if j != u32::MAX {
                        sub[k * bins + j as usize] += 1;
                    }
                }
            }
            for &j in groups.remainder() {
                if j != u32::MAX {
                    sub[j as usize] += 1;
                }
            }
        }
        counts.pending += idx.len();
        // Flush before any u32 counter could overflow.
        if counts.pending >= SubHistograms::FLUSH_AT {
            self.flush_sub_histograms(&mut counts.sub);
            counts.pending = 0;
        }
    }

    fn flush_sub_histograms(&mut self, sub: &mut [u32]) {
        for part in sub.chunks_exact_mut(self.bins) {
            for (h, c) in self.hist.iter_mut().zip(part.iter_mut()) {
                *h += u64::from(*c);
                *c = 0;
            }
        }
    }

    /// Per-channel `max |x|` of a C-order tensor whose channel axis has `channels` entries
    /// and `inner` elements after it.
    fn update_channel_absmax(&mut self, data: &[f32], channels: usize, inner: usize, finite_only: bool) {
        if channels == 0 || inner == 0 {
            return;
        }
        if self.channel_absmax.len() < channels {
            self.channel_absmax.resize(channels, 0.0);
        }
        let absmax = &mut self.channel_absmax[..channels];
        let abs = |v: f32| if finite_only || v.is_finite() { v.abs() } else { 0.0 };
        // Neither operand is NaN (the maxima start at 0 and non-finite values count as 0),
        // so a compare and select is `f32::max`, and it vectorizes.
        let max = |m: f32, a: f32| if a > m { a } else { m };
        if inner == 1 {
            for row in data.chunks_exact(channels) {
                for (m, &v) in absmax.iter_mut().zip(row) {
                    *m = max(*m, abs(v));
                }
            }
        } else {
            for outer in data.chunks_exact(channels * inner) {
                for (m, lane) in absmax.iter_mut().zip(outer.chunks_exact(inner)) {
                    *m = lane.iter().fold(*m, |m, &v| max(m, abs(v)));
                }
            }
        }
    }

    /// Merge another accumulation into this one. Counts, min/max, per-channel abs-max and
    /// the histogram merge exactly and order-independently (when both use the same number
    /// of bins; otherwise the other histogram is re-binned by bin centre, which is
    /// approximate). The float sums are added, so fold in a fixed order for bit-identical
    /// mean/std.
    pub fn merge(&mut self, other: &TensorStats) {
        self.nan_count += other.nan_count;
        self.inf_count += other.inf_count;
        if other.channel_absmax.len() > self.channel_absmax.len() {
            self.channel_absmax.resize(other.channel_absmax.len(), 0.0);
        }
        for (a, b) in self.channel_absmax.iter_mut().zip(&other.channel_absmax) {
            *a = a.max(*b);
        }
        if other.channel_stats.len() > self.channel_stats.len() {
            let bins = other.channel_stats.first().map_or(DEFAULT_BINS, |c| c.bins);
            self.channel_stats.resize(other.channel_stats.len(), TensorStats::new(bins, None));
        }
        for (a, b) in self.channel_stats.iter_mut().zip(&other.channel_stats) {
            a.merge(b);
        }
        if other.count == 0 {
            return;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.grow_to(other.hist_exp);
        if self.bins == other.bins {
            add_doubled(&mut self.hist, &other.hist, self.hist_exp - other.hist_exp);
        } else {
            let w_other = other.bin_width();
            let r_other = other.hist_range();
            let scale = self.bins as f64 / pow2(self.hist_exp + 1);
            let half = (self.bins / 2) as i64;
            let top = self.bins as i64 - 1;
            for (j, &c) in other.hist.iter().enumerate() {
                if c > 0 {
                    let centre = -r_other + (j as f64 + 0.5) * w_other;
                    let k = ((centre * scale).floor() as i64 + half).clamp(0, top) as usize;
                    self.hist[k] = self.hist[k].saturating_add(c);
                }
            }
        }
    }

    /// Double `R` until `R >= 2^exp`, merging bins pairwise.
    fn grow_to(&mut self, exp: i32) {
        if exp <= self.hist_exp {
            return;
        }
        // One pass for all the doublings: a fresh sample's statistics start at `R = 2^-24`
        // and grow about 25 times on their first block of ordinary activations.
        double_in_place(&mut self.hist, exp - self.hist_exp);
        self.hist_exp = exp;
    }

    /// The same statistics without the per-channel abs-max (and its axis).
    pub fn without_channels(&self) -> TensorStats {
        TensorStats {
            channel_axis: None,
            channel_absmax: Vec::new(),
            channel_bins: 0,
            channel_stats: Vec::new(),
            ..self.clone()
        }
    }

    /// Per channel, the statistics of that channel's values alone (empty unless asked for
    /// with [`TensorStats::with_channel_stats`]).
    pub fn channel_stats(&self) -> &[TensorStats] {
        &self.channel_stats
    }

    /// Number of histogram bins (a multiple of 4).
    pub fn bins(&self) -> usize {
        self.bins
    }
    /// Axis of the per-channel abs-max, if any.
    pub fn channel_axis(&self) -> Option<usize> {
        self.channel_axis
    }
    /// Number of finite elements seen.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Number of NaN elements seen.
    pub fn nan_count(&self) -> u64 {
        self.nan_count
    }
    /// Number of ±Inf elements seen.
    pub fn inf_count(&self) -> u64 {
        self.inf_count
    }
    /// Smallest finite value (0 if none).
    pub fn min(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.min
        }
    }
    /// Largest finite value (0 if none).
    pub fn max(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.max
        }
    }
    /// `Σx` over finite elements.
    pub fn sum(&self) -> f64 {
        self.sum
    }
    /// `Σx²` over finite elements.
    pub fn sum_sq(&self) -> f64 {
        self.sum_sq
    }
    /// Mean of finite elements (0 if none).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
    /// Population standard deviation of finite elements (0 if none).
    pub fn std(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let mean = self.mean();
        (self.sum_sq / self.count as f64 - mean * mean).max(0.0).sqrt()
    }
    /// `max(|min|, |max|)` (0 if none).
    pub fn abs_max(&self) -> f64 {
        self.min().abs().max(self.max().abs())
    }
    /// Per-channel `max |x|` along the channel axis (empty if no axis or never applicable).
    pub fn channel_absmax(&self) -> &[f32] {
        &self.channel_absmax
    }
    /// Signed histogram counts over `[-R, R)`.
    pub fn histogram(&self) -> &[u64] {
        &self.hist
    }
    /// Histogram half-range `R` (a power of two).
    pub fn hist_range(&self) -> f64 {
        pow2(self.hist_exp)
    }
    /// Histogram bin width `2R / bins`.
    pub fn bin_width(&self) -> f64 {
        pow2(self.hist_exp + 1) / self.bins as f64
    }

    /// `|x|` histogram: the signed one folded at 0 into `bins/2` bins of width `w`.
    pub fn abs_histogram(&self) -> Vec<u64> {
        let half = self.bins / 2;
        let (neg, pos) = self.hist.split_at(half);
        pos.iter().zip(neg.iter().rev()).map(|(p, n)| p.saturating_add(*n)).collect()
    }

    /// The `q` quantile (`q` in `[0, 1]`) of `x` from the histogram, linearly interpolated
    /// inside the bin, clamped to `[min, max]`. 0 if no finite value was seen.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let r = self.hist_range();
        match hist_quantile(&self.hist, q, self.bin_width()) {
            Some(v) => (v - r).clamp(self.min, self.max),
            None => self.max,
        }
    }

    /// The `q` quantile (`q` in `[0, 1]`) of `|x|` from the folded histogram, linearly
    /// interpolated inside the bin, clamped to `[0, abs_max]`. 0 if no finite value was seen.
    pub fn quantile_abs(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        match hist_quantile(&self.abs_histogram(), q, self.bin_width()) {
            Some(v) => v.clamp(0.0, self.abs_max()),
            None => self.abs_max(),
        }
    }

    /// Quantization range `(lo, hi)` with `lo <= 0 <= hi` for `qmax_levels` levels (256
    /// for 8-bit). `(0, 0)` if no finite value was seen.
    pub fn range(&self, method: &RangeMethod, qmax_levels: u32, symmetric: bool) -> (f32, f32) {
        if self.count == 0 {
            return (0.0, 0.0);
        }
        let m = self.abs_max();
        let (lo, hi) = match method {
            RangeMethod::MinMax => {
                if symmetric {
                    (-m, m)
                } else {
                    (self.min, self.max)
                }
            }
            RangeMethod::Percentile(p) => {
                // Out-of-domain percentiles mean "no clipping".
                let p = if p.is_finite() && *p > 0.0 { p.min(100.0) } else { 100.0 };
                if symmetric {
                    let t = self.quantile_abs(p / 100.0);
                    (-t, t)
                } else {
                    (self.quantile(1.0 - p / 100.0), self.quantile(p / 100.0))
                }
            }
            RangeMethod::Entropy => {
                let t = self.entropy_threshold(qmax_levels);
                if symmetric {
                    (-t, t)
                } else {
                    (self.min.max(-t), self.max.min(t))
                }
            }
            RangeMethod::Mse => self.mse_range(qmax_levels, symmetric),
        };
        let lo = if lo.is_nan() { 0.0 } else { lo.min(0.0) };
        let hi = if hi.is_nan() { 0.0 } else { hi.max(0.0) };
        (lo as f32, hi as f32)
    }

    /// TensorRT-style KL threshold `T` on the `|x|` histogram (see module docs).
    fn entropy_threshold(&self, qmax_levels: u32) -> f64 {
        let abs = self.abs_histogram();
        let w = self.bin_width();
        let used = abs.iter().rposition(|&c| c > 0).map_or(0, |p| p + 1);
        let nq = (qmax_levels / 2).max(1) as usize;
        if used <= nq {
            return self.abs_max();
        }
        let abs = &abs[..used];
        // suffix[i] = Σ abs[i..]
        let mut suffix = vec![0u64; used + 1];
        for i in (0..used).rev() {
            suffix[i] = suffix[i + 1].saturating_add(abs[i]);
        }
        let mut p = vec![0.0f64; used];
        let mut q = vec![0.0f64; used];
        let mut best = (f64::INFINITY, used);
        for i in nq..=used {
            let p = &mut p[..i];
            let q = &mut q[..i];
            for (d, &c) in p.iter_mut().zip(abs) {
                *d = c as f64;
            }
            p[i - 1] += suffix[i] as f64;
            let merged = i / nq;
            for j in 0..nq {
                let start = j * merged;
                let stop = if j + 1 == nq { i } else { start + merged };
                let mass: f64 = abs[start..stop].iter().map(|&c| c as f64).sum();
                let nonzero = p[start..stop].iter().filter(|&&v| v != 0.0).count();
                let each = if nonzero > 0 { mass / nonzero as f64 } else { 0.0 };
                for (qv, &pv) in q[start..stop].iter_mut().zip(&p[start..stop]) {
                    *qv = if pv != 0.0 { each } else { 0.0 };
                }
            }
            if !smooth(p) || !smooth(q) {
                continue;
            }
            let kl = kl_divergence(p, q);
            if kl < best.0 {
                best = (kl, i);
            }
        }
        (best.1 as f64 * w).min(self.abs_max())
    }

    /// Clipping range minimizing the expected squared quantization error (see module docs).
    fn mse_range(&self, qmax_levels: u32, symmetric: bool) -> (f64, f64) {
        let (lo0, hi0) =
            if symmetric { (-self.abs_max(), self.abs_max()) } else { (self.min.min(0.0), self.max.max(0.0)) };
        if hi0 <= lo0 || hi0.is_nan() || lo0.is_nan() {
            return (0.0, 0.0);
        }
        let steps = f64::from(qmax_levels.max(2) - 1);
        let cells = self.cells();
        let mut best = (f64::INFINITY, lo0, hi0);
        // Descending `a` with a strict `<`: ties go to the larger `a`. The clipping error alone
        // (cells below `lo` or above `hi`, a lower bound of the total) only grows as `a`
        // shrinks, so once it exceeds the best total no smaller `a` can win; the relative
        // margin keeps rounding noise in the two sums from cutting a near-tie.
        for k in (1..=MSE_GRID_STEPS).rev() {
            let a = f64::from(k) / f64::from(MSE_GRID_STEPS);
            let (lo, hi) = (a * lo0, a * hi0);
            let s = (hi - lo) / steps;
            if s.is_nan() || s <= 0.0 {
                continue;
            }
            let grid = Grid::new(lo, hi, s, steps);
            if best.0.is_finite() {
                let below = cells.partition_point(|c| c.0 < lo);
                let above = cells.partition_point(|c| c.1 <= hi).max(below);
                let clip: f64 = cells[..below]
                    .iter()
                    .chain(&cells[above..])
                    .filter(|c| c.1 > c.0)
                    .map(|&(u, v, weight)| weight * grid.clip_sq_err(u, v))
                    .sum();
                if clip > best.0 * (1.0 + 1e-9) {
                    break;
                }
            }
            let err = grid.cells_sq_err(&cells);
            if err < best.0 {
                best = (err, lo, hi);
            }
        }
        (best.1, best.2)
    }

    /// Non-empty bins as (lower, upper, weight), clipped to the observed [min, max]; the
    /// weight is the count per unit length (a uniform density), or the count of a bin
    /// clipped to a point.
    fn cells(&self) -> Cells {
        let r = self.hist_range();
        let w = self.bin_width();
        self.hist
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(j, &c)| {
                let u = (-r + j as f64 * w).max(self.min);
                let v = (-r + (j + 1) as f64 * w).min(self.max).max(u);
                (u, v, if v > u { c as f64 / (v - u) } else { c as f64 })
            })
            .collect()
    }

    /// Summary of the statistics (serializes with a fixed field order).
    pub fn summary(&self) -> StatsSummary {
        StatsSummary {
            count: self.count,
            min: self.min(),
            max: self.max(),
            mean: self.mean(),
            std: self.std(),
            nan: self.nan_count,
            inf: self.inf_count,
            abs_max: self.abs_max(),
            p99_9: self.quantile_abs(0.999),
            channel_absmax: if self.channel_absmax.is_empty() { None } else { Some(self.channel_absmax.clone()) },
        }
    }

    /// [`Self::summary`] as JSON: `count, min, max, mean, std, nan, inf, abs_max, p99_9`
    /// and `channel_absmax` when present (serde_json map key order, i.e. sorted).
    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::to_value(self.summary()).unwrap_or(serde_json::Value::Null)
    }
}

/// Serializable summary of a [`TensorStats`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatsSummary {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
    pub nan: u64,
    pub inf: u64,
    pub abs_max: f64,
    pub p99_9: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_absmax: Option<Vec<f32>>,
}

/// Adds to `dst` the histogram `src` (same length `B`) after `doublings` range doublings
/// ([`double_hist`] applied that often), in one pass: bin `i`, at signed offset `s = i − B/2`,
/// goes to bin `⌊s / 2^d⌋ + B/2` (the floor of repeated halvings is the floor of one
/// division). Counts saturate, so the order of the additions does not matter.
fn add_doubled(dst: &mut [u64], src: &[u64], doublings: i32) {
    if doublings <= 0 {
        for (a, &b) in dst.iter_mut().zip(src) {
            *a = a.saturating_add(b);
        }
        return;
    }
    let half = src.len() / 2;
    for (i, &c) in src.iter().enumerate() {
        if c != 0 {
            let j = doubled_bin(i, half, doublings);
            if let Some(a) = dst.get_mut(j) {
                *a = a.saturating_add(c);
            }
        }
    }
}

/// Where bin `i` (signed offset `i − half`) of a histogram of `2·half` bins lands after
/// `doublings ≥ 1` range doublings: offset `(i − half) >> doublings`, a floor division.
fn doubled_bin(i: usize, half: usize, doublings: i32) -> usize {
    // Offsets lie in [-2^27, 2^27) (`B ≤ 2^28`): from 27 doublings on, every negative offset
    // maps to -1 and every other one to 0, so capping the shift at 63 changes nothing.
    let shift = doublings.clamp(0, 63) as u32;
    (((i as i64 - half as i64) >> shift) + half as i64) as usize
}

/// [`add_doubled`] of a histogram onto itself emptied, without a second buffer (a fresh
/// sample's statistics grow on their first block, and a per-channel target's every channel
/// does: PP-OCR det allocated and zeroed ~90 k histograms for it). Bin `i` moves to
/// `((i − half) >> d) + half`, which is never farther from the middle than `i`: walking each
/// half away from the middle, every bin is read (and emptied) before anything lands on it.
fn double_in_place(h: &mut [u64], doublings: i32) {
    if doublings <= 0 {
        return;
    }
    let half = h.len() / 2;
    // (An empty histogram, the usual case, is only read.)
    if h.iter().fold(0, |a, &c| a | c) == 0 {
        return;
    }
    for i in (half..h.len()).chain((0..half).rev()) {
        let c = h[i];
        if c != 0 {
            h[i] = 0;
            let j = doubled_bin(i, half, doublings);
            h[j] = h[j].saturating_add(c);
        }
    }
}

/// Range doubling: bins `2i, 2i+1` go to bin `len/4 + i` of a histogram of the same length
/// (the definition [`add_doubled`] is tested against).
#[cfg(test)]
fn double_hist(h: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; h.len()];
    let offset = h.len() / 4;
    for (o, pair) in out[offset..].iter_mut().zip(h.chunks_exact(2)) {
        *o = pair[0].saturating_add(pair[1]);
    }
    out
}

/// Quantile of a histogram with bins `[k·w, (k+1)·w)`, as an offset from its lower edge.
/// `None` if the histogram is empty.
fn hist_quantile(h: &[u64], q: f64, w: f64) -> Option<f64> {
    let total: u64 = h.iter().fold(0u64, |a, &c| a.saturating_add(c));
    if total == 0 {
        return None;
    }
    let q = if q.is_nan() { 1.0 } else { q.clamp(0.0, 1.0) };
    let target = q * total as f64;
    let mut cum = 0u64;
    for (k, &c) in h.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let next = cum.saturating_add(c);
        if next as f64 >= target {
            let frac = ((target - cum as f64) / c as f64).clamp(0.0, 1.0);
            return Some((k as f64 + frac) * w);
        }
        cum = next;
    }
    h.iter().rposition(|&c| c > 0).map(|k| (k + 1) as f64 * w)
}

/// MXNet/ORT smoothing: zero entries get `KL_EPS`, taken evenly from the non-zero ones
/// (never driving one below half its value). `false` if all entries are zero.
fn smooth(d: &mut [f64]) -> bool {
    let zeros = d.iter().filter(|&&v| v == 0.0).count();
    let nonzeros = d.len() - zeros;
    if nonzeros == 0 {
        return false;
    }
    let take = KL_EPS * zeros as f64 / nonzeros as f64;
    for v in d.iter_mut() {
        *v = if *v == 0.0 { KL_EPS } else { (*v - take).max(*v * 0.5) };
    }
    true
}

/// `KL(P‖Q)` of two positive count vectors after normalizing each.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let sp: f64 = p.iter().sum();
    let sq: f64 = q.iter().sum();
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let a = a / sp;
            let b = b / sq;
            if a > 0.0 && b > 0.0 {
                a * (a / b).ln()
            } else {
                0.0
            }
        })
        .sum()
}

/// `∫_0^y (t − round(t))² dt` for `y >= 0` (grid points at the integers, starting at 0).
fn rounding_sq_integral(y: f64) -> f64 {
    // round(y) for y >= 0 without a libm call; a y within an ulp of a .5 tie may go either
    // way, where the integral is continuous.
    let k = (y + 0.5) as i64 as f64;
    let r = y - k;
    if k <= 0.0 {
        r * r * r / 3.0
    } else {
        1.0 / 24.0 + (k - 1.0) / 12.0 + (r * r * r + 0.125) / 3.0
    }
}

/// The uniform quantizer with grid `lo + s·k`, `k = 0..=steps`, clipping outside `[lo, hi]`.
struct Grid {
    lo: f64,
    hi: f64,
    s: f64,
    inv_s: f64,
    s3: f64,
    steps: f64,
}

impl Grid {
    /// The grid from `lo` with step `s` and `steps` steps (`hi` its top).
    fn new(lo: f64, hi: f64, s: f64, steps: f64) -> Grid {
        Grid { lo, hi, s, inv_s: 1.0 / s, s3: s * s * s, steps }
    }

    /// `Σ (x − q(x))²` over histogram cells ([`TensorStats::cells`]) under a uniform density
    /// inside each cell.
    fn cells_sq_err(&self, cells: &[(f64, f64, f64)]) -> f64 {
        cells
            .iter()
            .map(|&(u, v, weight)| weight * if v > u { self.segment_sq_err(u, v) } else { self.point_sq_err(u) })
            .sum()
    }

    /// The part of `∫_u^v (x − q(x))² dx` outside `[lo, hi]`, where `q` saturates.
    fn clip_sq_err(&self, u: f64, v: f64) -> f64 {
        let (lo, hi) = (self.lo, self.hi);
        let mut acc = 0.0;
        if u < lo {
            let b = v.min(lo);
            acc += ((lo - u).powi(3) - (lo - b).powi(3)) / 3.0;
        }
        if v > hi {
            let a = u.max(hi);
            acc += ((v - hi).powi(3) - (a - hi).powi(3)) / 3.0;
        }
        acc
    }

    /// `∫_u^v (x − q(x))² dx`.
    fn segment_sq_err(&self, u: f64, v: f64) -> f64 {
        let (lo, hi) = (self.lo, self.hi);
        let mut acc = self.clip_sq_err(u, v);
        let (a, b) = (u.max(lo), v.min(hi));
        if b > a {
            let ya = (a - lo) * self.inv_s;
            let yb = (b - lo) * self.inv_s;
            acc += self.s3 * (rounding_sq_integral(yb) - rounding_sq_integral(ya)).max(0.0);
        }
        acc
    }

    /// `(x − q(x))²` for one point.
    fn point_sq_err(&self, x: f64) -> f64 {
        let q = self.lo + self.s * ((x - self.lo) / self.s).round().clamp(0.0, self.steps);
        (x - q) * (x - q)
    }
}

/// The range that `method` gives a tensor whose channel `c` holds the values of
/// `channels[c]` multiplied by `scale[c] > 0` (a tensor rescaled per channel after its
/// statistics were taken, see [`crate::quantize::equalize`]), as [`TensorStats::range`] would
/// on that tensor's own statistics. `MinMax` is exact. `Mse` searches the same candidates
/// `a·(lo₀, hi₀)`, with the error of each channel evaluated on its own histogram against the
/// grid mapped back by `1/scale[c]` and weighted by `scale[c]²`; the 200 factors are searched
/// coarse to fine (every 8th, then the 15 around the best; ties to the larger factor). Other
/// methods need the rescaled tensor's own histogram: `None`.
pub fn scaled_range(
    channels: &[TensorStats],
    scale: &[f64],
    method: &RangeMethod,
    qmax_levels: u32,
    symmetric: bool,
) -> Option<(f32, f32)> {
    if channels.len() != scale.len() || scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return None;
    }
    let seen: Vec<(&TensorStats, f64)> =
        channels.iter().zip(scale).filter(|(c, _)| c.count > 0).map(|(c, &s)| (c, s)).collect();
    if seen.is_empty() {
        return Some((0.0, 0.0));
    }
    let min = seen.iter().map(|(c, s)| c.min * s).fold(f64::INFINITY, f64::min);
    let max = seen.iter().map(|(c, s)| c.max * s).fold(f64::NEG_INFINITY, f64::max);
    let m = min.abs().max(max.abs());
    let (lo0, hi0) = if symmetric { (-m, m) } else { (min.min(0.0), max.max(0.0)) };
    let (lo, hi) = match method {
        RangeMethod::MinMax => (lo0, hi0),
        RangeMethod::Mse => {
            if hi0 <= lo0 || hi0.is_nan() || lo0.is_nan() {
                return Some((0.0, 0.0));
            }
            let steps = f64::from(qmax_levels.max(2) - 1);
            let cells: Vec<(Cells, f64)> = seen.iter().map(|(c, s)| (c.cells(), *s)).collect();
            let error = |k: u32| -> f64 {
                let a = f64::from(k) / f64::from(MSE_GRID_STEPS);
                let (lo, hi) = (a * lo0, a * hi0);
                let s_all = (hi - lo) / steps;
                if s_all.is_nan() || s_all <= 0.0 {
                    return f64::INFINITY;
                }
                cells
                    .iter()
                    .map(|(cells, sc)| Grid::new(lo / sc, hi / sc, s_all / sc, steps).cells_sq_err(cells) * sc * sc)
                    .sum()
            };
            // Each stage's candidates are independent: their errors are computed in parallel
            // (equalization ranges these tensors one after the other) and compared in order.
            let errors = |ks: Vec<u32>| -> Vec<(u32, f64)> {
                use rayon::prelude::*;
                ks.into_par_iter().map(|k| (k, error(k))).collect()
            };
            const COARSE: u32 = 8;
            let mut best = (f64::INFINITY, MSE_GRID_STEPS);
            for (k, e) in errors((1..=MSE_GRID_STEPS / COARSE).rev().map(|i| i * COARSE).collect()) {
                if e < best.0 {
                    best = (e, k);
                }
            }
            let k0 = best.1;
            let around = (k0.saturating_sub(COARSE - 1).max(1)..=(k0 + COARSE - 1).min(MSE_GRID_STEPS)).rev();
            for (k, e) in errors(around.filter(|&k| k != k0).collect()) {
                // Ties go to the larger factor: a smaller one must be strictly better.
                if e < best.0 || (e == best.0 && k > best.1) {
                    best = (e, k);
                }
            }
            let a = f64::from(best.1) / f64::from(MSE_GRID_STEPS);
            (a * lo0, a * hi0)
        }
        RangeMethod::Percentile(_) | RangeMethod::Entropy => return None,
    };
    let lo = if lo.is_nan() { 0.0 } else { lo.min(0.0) };
    let hi = if hi.is_nan() { 0.0 } else { hi.max(0.0) };
    Some((lo as f32, hi as f32))
}

/// How a quantization range is chosen from [`TensorStats`].
#[derive(Clone, Debug, PartialEq)]
pub enum RangeMethod {
    /// Observed min/max.
    MinMax,
    /// Percentile `p` in `(0, 100]` of `x` (or of `|x|` when symmetric).
    Percentile(f64),
    /// TensorRT KL-divergence threshold.
    Entropy,
    /// Minimal expected squared quantization error.
    Mse,
}

/// Error of [`RangeMethod::from_str`]; the message names the input and the valid forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseRangeMethodError {
    message: String,
}

impl fmt::Display for ParseRangeMethodError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParseRangeMethodError {}

const VALID_FORMS: &str = "expected one of: minmax, percentile:<p> with 0 < p <= 100 (e.g. percentile:99.999), \
                           entropy, mse";

impl FromStr for RangeMethod {
    type Err = ParseRangeMethodError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        let bad =
            |why: &str| ParseRangeMethodError { message: format!("invalid range method {s:?}{why}; {VALID_FORMS}") };
        match t.as_str() {
            "minmax" => Ok(RangeMethod::MinMax),
            "entropy" => Ok(RangeMethod::Entropy),
            "mse" => Ok(RangeMethod::Mse),
            _ => match t.strip_prefix("percentile:") {
                Some(num) => match num.trim().parse::<f64>() {
                    Ok(p) if p.is_finite() && p > 0.0 && p <= 100.0 => Ok(RangeMethod::Percentile(p)),
                    Ok(_) => Err(bad(" (percentile out of (0, 100])")),
                    Err(_) => Err(bad(" (percentile is not a number)")),
                },
                None => Err(bad("")),
            },
        }
    }
}

impl fmt::Display for RangeMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RangeMethod::MinMax => f.write_str("minmax"),
            RangeMethod::Percentile(p) => write!(f, "percentile:{p}"),
            RangeMethod::Entropy => f.write_str("entropy"),
            RangeMethod::Mse => f.write_str("mse"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    /// xorshift64* with uniform and Gaussian (Box–Muller) draws.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn gauss(&mut self) -> f64 {
            let u1 = 1.0 - self.uniform();
            let u2 = self.uniform();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
    }

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng(seed);
        (0..n).map(|_| rng.gauss() as f32).collect()
    }

    /// Skewed, heavy-tailed, mostly positive (GELU-like negative part, Laplace positive tail).
    fn skewed(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng(seed);
        (0..n)
            .map(|_| {
                let g = rng.gauss();
                if g < 0.0 {
                    (0.05 * g) as f32
                } else {
                    (-(1.0 - rng.uniform()).ln() * 0.7) as f32
                }
            })
            .collect()
    }

    fn view(data: &[f32]) -> ArrayViewD<'_, f32> {
        ArrayViewD::from_shape(IxDyn(&[data.len()]), data).expect("1-D view")
    }

    fn chunked(data: &[f32], chunk: usize) -> TensorStats {
        let mut s = TensorStats::new(DEFAULT_BINS, None);
        for c in data.chunks(chunk) {
            s.update(view(c));
        }
        s
    }

    fn merged(data: &[f32], chunk: usize) -> TensorStats {
        let mut s = TensorStats::new(DEFAULT_BINS, None);
        for c in data.chunks(chunk) {
            let mut part = TensorStats::new(DEFAULT_BINS, None);
            part.update(view(c));
            s.merge(&part);
        }
        s
    }

    fn whole(data: &[f32]) -> TensorStats {
        let mut s = TensorStats::new(DEFAULT_BINS, None);
        s.update(view(data));
        s
    }

    /// The AVX2 and AVX-512 kernels give bit-identical lanes and bins to the portable code, including on
    /// -0.0, tiny denormals (whose scaled value underflows), bin edges and the range ends.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_kernels_match_portable() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        // First, values spread over 2^-30..2^30: their f64 sums round, so each lane's order of
        // addition shows in the bits.
        let mut data: Vec<f32> =
            gaussian(64, 7).iter().enumerate().map(|(i, v)| v * 2f32.powi((i * 37 % 61) as i32 - 30)).collect();
        data.extend(skewed(10_003, 5));
        data.extend(gaussian(997, 6).iter().map(|v| v * 1e-3));
        data.extend([0.0, -0.0, f32::from_bits(1), -f32::from_bits(1), -1e-40, 1e-40, 0.5, -0.5, 0.25, -0.25]);
        data.extend([f32::MIN_POSITIVE, -f32::MIN_POSITIVE, 3.999_999_8, -3.999_999_8, 1.0 / 512.0, -1.0 / 512.0]);
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        for n in [0, 3, 8, 9, 16, 24, 1000, 1024, data.len()] {
            let body = &data[..n - n % Moments::LANES];
            let (mut a, mut b, mut p) = (Lanes::EMPTY, Lanes::EMPTY, Lanes::EMPTY);
            let (mut c, mut d) = (Lanes::EMPTY, Lanes::EMPTY);
            let mut idx = vec![0u32; body.len()];
            let mut idx512 = vec![0u32; body.len()];
            let grid = GridF32 { scale: 256.0, half: 1024 };
            // Twice: the second call continues from the lanes of the first.
            for _ in 0..2 {
                // SAFETY: AVX2 is present (checked above); `idx` is as long as `body`.
                assert!(unsafe { a.add_finite_avx2::<false>(body, &GridF32::UNUSED, &mut [], None) });
                assert!(unsafe { b.add_finite_avx2::<true>(body, &grid, &mut idx, None) });
                assert!(p.add_finite_portable(body));
                if avx512 {
                    // SAFETY: AVX-512F is present (checked above); `idx512` is as long as `body`.
                    assert!(unsafe { c.add_finite_avx512::<false>(body, &GridF32::UNUSED, &mut [], None) });
                    assert!(unsafe { d.add_finite_avx512::<true>(body, &grid, &mut idx512, None) });
                }
            }
            if avx512 {
                assert_eq!(idx512, idx, "16-wide bins, n {n}");
            }
            let lanes = if avx512 { vec![&a, &b, &c, &d] } else { vec![&a, &b] };
            for l in lanes {
                assert_eq!(l.min.map(f32::to_bits), p.min.map(f32::to_bits));
                assert_eq!(l.max.map(f32::to_bits), p.max.map(f32::to_bits));
                assert_eq!(l.sum.map(f64::to_bits), p.sum.map(f64::to_bits));
                assert_eq!(l.sum_sq.map(f64::to_bits), p.sum_sq.map(f64::to_bits));
            }
        }
        let mut bad = data.clone();
        for v in [f32::INFINITY, f32::NAN] {
            bad[40] = v;
            let mut l = Lanes::EMPTY;
            // SAFETY: AVX2 is present (checked above).
            assert!(!unsafe { l.add_finite_avx2::<false>(&bad[..64], &GridF32::UNUSED, &mut [], None) });
            assert_eq!(l.sum, Lanes::EMPTY.sum, "a refused body leaves the lanes alone");
            if avx512 {
                // A bad element in a 16-wide step (40 of 64) and in the last 8-wide one (66 of 72).
                for (at, len) in [(40, 64), (66, 72)] {
                    let mut b = data[..len].to_vec();
                    b[at] = v;
                    // SAFETY: AVX-512F is present (checked above).
                    assert!(!unsafe { l.add_finite_avx512::<false>(&b, &GridF32::UNUSED, &mut [], None) });
                    assert_eq!(l.sum, Lanes::EMPTY.sum, "a refused body leaves the lanes alone");
                }
            }
        }
        // Range exponents down to the smallest and up to beyond f32::MAX (where tiny values
        // underflow when scaled: negative ones must still land below 0), and bin counts with
        // and without an exact f32 grid.
        data.extend([-1e-38, -1.5e-39, 1e-38, -1e-30, -3e-20, 1e-10, -1e-10, 1e30, -1e35, 3e38, -3.4e38]);
        for (bins, exp) in [
            (2048usize, 2),
            (2048, -20),
            (2048, 100),
            (2048, 128),
            (4, 30),
            (4, 128),
            (1 << 20, 2),
            (1 << 24, 2),
            (1 << 25, 2),
            (2052, 2),
        ] {
            let grid = BinGrid { scale: bins as f64 / pow2(exp + 1), half: (bins / 2) as i64, top: bins as i64 - 1 };
            let mut in_range: Vec<f32> = data.iter().copied().filter(|v| (f64::from(*v)).abs() < pow2(exp)).collect();
            in_range.truncate(in_range.len() - in_range.len() % Moments::LANES);
            let (mut a, mut p) = (vec![0u32; in_range.len()], vec![0u32; in_range.len()]);
            // SAFETY: AVX2 is present (checked above).
            unsafe { grid.bins_of_avx2(&in_range, &mut a, true) };
            grid.bins_of_portable(&in_range, &mut p, true);
            assert_eq!(a, p, "bins {bins}, exp {exp}");
            let fast = grid.f32_grid();
            let normal_scale = grid.scale >= f64::from(f32::MIN_POSITIVE);
            assert_eq!(fast.is_some(), bins.is_power_of_two() && bins <= 1 << 24 && normal_scale, "bins {bins}");
            if let Some(g) = fast {
                let mut f = vec![0u32; in_range.len()];
                let mut l = Lanes::EMPTY;
                // SAFETY: AVX2 is present (checked above); `f` is as long as `in_range`.
                assert!(unsafe { l.add_finite_avx2::<true>(&in_range, &g, &mut f, None) });
                assert_eq!(f, p, "fused bins {bins}, exp {exp}");
                if avx512 {
                    let mut f = vec![0u32; in_range.len()];
                    let mut l = Lanes::EMPTY;
                    // SAFETY: AVX-512F is present (checked above); `f` is as long as `in_range`.
                    assert!(unsafe { l.add_finite_avx512::<true>(&in_range, &g, &mut f, None) });
                    assert_eq!(f, p, "16-wide fused bins {bins}, exp {exp}");
                    // The bins alone, also on lengths that end in a partial step.
                    for len in [in_range.len(), in_range.len().saturating_sub(3), 5.min(in_range.len())] {
                        let mut f = vec![u32::MAX; len];
                        // SAFETY: AVX-512F is present (checked above); `f` is as long as the block.
                        unsafe { g.bins_avx512(&in_range[..len], &mut f) };
                        assert_eq!(f, p[..len], "16-wide bins {bins}, exp {exp}, {len} elements");
                    }
                }
            }
        }
    }

    /// The three ways of building stats agree on everything exact.
    fn builds(data: &[f32]) -> [TensorStats; 3] {
        let [a, b, c] = [whole(data), chunked(data, 7_777), merged(data, 3_001)];
        for s in [&b, &c] {
            assert_eq!(s.histogram(), a.histogram());
            assert_eq!(s.hist_range(), a.hist_range());
            assert_eq!((s.count(), s.min(), s.max()), (a.count(), a.min(), a.max()));
        }
        [a, b, c]
    }

    fn sorted(data: &[f32]) -> Vec<f64> {
        let mut v: Vec<f64> = data.iter().map(|&x| f64::from(x)).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    /// Element at which the cumulative count first reaches `q·n`.
    fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
        let k = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[k - 1]
    }

    fn raw_mse(data: &[f32], lo: f64, hi: f64, levels: u32) -> f64 {
        let steps = f64::from(levels - 1);
        let s = (hi - lo) / steps;
        data.iter()
            .map(|&x| {
                let x = f64::from(x);
                let q = lo + s * ((x - lo) / s).round().clamp(0.0, steps);
                (x - q) * (x - q)
            })
            .sum()
    }

    #[test]
    fn minmax_exact() {
        let mut data = gaussian(50_000, 1);
        data[123] = -7.25;
        data[40_000] = 5.5;
        for s in builds(&data) {
            assert_eq!(s.min(), -7.25);
            assert_eq!(s.max(), 5.5);
            assert_eq!(s.range(&RangeMethod::MinMax, 256, false), (-7.25, 5.5));
            assert_eq!(s.range(&RangeMethod::MinMax, 256, true), (-7.25, 7.25));
            assert_eq!(s.count(), 50_000);
        }
        // Range always includes 0.
        let pos = whole(&[1.0, 2.0, 3.0]);
        assert_eq!(pos.range(&RangeMethod::MinMax, 256, false), (0.0, 3.0));
        let mean: f64 = data.iter().map(|&x| f64::from(x)).sum::<f64>() / data.len() as f64;
        assert!((whole(&data).mean() - mean).abs() < 1e-12);
        assert!((whole(&data).std() - 1.0).abs() < 0.02);
    }

    #[test]
    fn percentile_within_one_bin() {
        for data in [gaussian(100_000, 2), skewed(100_000, 3)] {
            let sd = sorted(&data);
            let abs_sorted = {
                let mut v: Vec<f64> = sd.iter().map(|x| x.abs()).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                v
            };
            for s in builds(&data) {
                let w = s.bin_width();
                for p in [99.0, 99.9, 99.99] {
                    let (lo, hi) = s.range(&RangeMethod::Percentile(p), 256, false);
                    let elo = exact_quantile(&sd, 1.0 - p / 100.0).min(0.0);
                    let ehi = exact_quantile(&sd, p / 100.0).max(0.0);
                    assert!((f64::from(lo) - elo).abs() <= w, "p{p} lo {lo} vs {elo} (w {w})");
                    assert!((f64::from(hi) - ehi).abs() <= w, "p{p} hi {hi} vs {ehi} (w {w})");
                    let (slo, shi) = s.range(&RangeMethod::Percentile(p), 256, true);
                    let em = exact_quantile(&abs_sorted, p / 100.0);
                    assert_eq!(slo, -shi);
                    assert!((f64::from(shi) - em).abs() <= w, "p{p} sym {shi} vs {em} (w {w})");
                    assert!((s.quantile_abs(p / 100.0) - em).abs() <= w);
                }
                assert_eq!(
                    s.range(&RangeMethod::Percentile(100.0), 256, false),
                    s.range(&RangeMethod::MinMax, 256, false)
                );
            }
        }
    }

    #[test]
    fn mse_matches_brute_force_on_raw_data() {
        let levels = 256;
        for (data, symmetric) in [
            (gaussian(60_000, 4), true),
            (gaussian(60_000, 5), false),
            (skewed(60_000, 6), false),
            (skewed(60_000, 7), true),
        ] {
            let s = &builds(&data)[2];
            let (lo0, hi0) = if symmetric { (-s.abs_max(), s.abs_max()) } else { (s.min().min(0.0), s.max().max(0.0)) };
            let mut best = (f64::INFINITY, 0.0, 0.0);
            for k in 1..=MSE_GRID_STEPS {
                let a = f64::from(k) / f64::from(MSE_GRID_STEPS);
                let e = raw_mse(&data, a * lo0, a * hi0, levels);
                if e <= best.0 {
                    best = (e, a * lo0, a * hi0);
                }
            }
            let (lo, hi) = s.range(&RangeMethod::Mse, levels, symmetric);
            let got = raw_mse(&data, f64::from(lo), f64::from(hi), levels);
            let w = s.bin_width();
            let grid = (hi0 - lo0).max(hi0) / f64::from(MSE_GRID_STEPS);
            eprintln!(
                "mse sym={symmetric}: hist ({lo:.4}, {hi:.4}) err {got:.5e}; raw best ({:.4}, {:.4}) err {:.5e}; w {w:.4}",
                best.1, best.2, best.0
            );
            assert!(got <= best.0 * 1.01, "hist choice err {got} vs best {}", best.0);
            assert!((f64::from(hi) - best.2).abs() <= (3.0 * w).max(2.0 * grid));
            assert!(hi < s.max() as f32 || symmetric, "MSE should clip the heavy tail");
        }
    }

    #[test]
    fn entropy_gaussian_with_outliers_and_uniform() {
        let mut data = gaussian(200_000, 8);
        for (i, v) in [40.0, -35.0, 45.0, 38.0, -42.0].into_iter().enumerate() {
            data[1000 * i + 17] = v;
        }
        let abs_sorted = {
            let mut v: Vec<f64> = data.iter().map(|x| f64::from(x.abs())).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v
        };
        let p99 = exact_quantile(&abs_sorted, 0.99);
        for s in builds(&data) {
            let (lo, hi) = s.range(&RangeMethod::Entropy, 256, true);
            eprintln!("entropy gaussian+outliers: T {hi} (p99 {p99:.3}, max {})", s.abs_max());
            assert_eq!(lo, -hi);
            assert!(f64::from(hi) > p99 && f64::from(hi) < 0.5 * s.abs_max());
            let (alo, ahi) = s.range(&RangeMethod::Entropy, 256, false);
            assert_eq!((alo, ahi), (-hi, hi));
        }

        let mut rng = Rng(9);
        let uniform: Vec<f32> = (0..200_000).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
        for s in builds(&uniform) {
            let (lo, hi) = s.range(&RangeMethod::Entropy, 256, false);
            eprintln!("entropy uniform: ({lo}, {hi}) min {} max {}", s.min(), s.max());
            assert!(f64::from(hi) >= 0.97 * s.max() && f64::from(lo) <= 0.97 * s.min());
        }
    }

    #[test]
    fn merge_is_exact_and_order_independent() {
        let a_data = gaussian(30_000, 10);
        let b_data: Vec<f32> = gaussian(20_000, 11).iter().map(|x| x * 300.0).collect();
        let (a, b) = (whole(&a_data), whole(&b_data));
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab.histogram(), ba.histogram());
        assert_eq!(
            (ab.count(), ab.min(), ab.max(), ab.hist_range()),
            (ba.count(), ba.min(), ba.max(), ba.hist_range())
        );
        let all: Vec<f32> = a_data.iter().chain(&b_data).copied().collect();
        let w = whole(&all);
        assert_eq!(w.histogram(), ab.histogram());
        assert_eq!((w.count(), w.min(), w.max(), w.hist_range()), (ab.count(), ab.min(), ab.max(), ab.hist_range()));
        assert_eq!(ab.histogram().iter().sum::<u64>(), 50_000);
        // Empty stats are a neutral element on both sides.
        let mut e = TensorStats::default();
        e.merge(&ab);
        assert_eq!(e, ab);
        let mut ab2 = ab.clone();
        ab2.merge(&TensorStats::default());
        assert_eq!(ab2, ab);
    }

    #[test]
    fn range_doubles_for_1000x_larger_sample() {
        let small = gaussian(10_000, 12);
        let big: Vec<f32> = small.iter().map(|x| x * 1000.0).collect();
        let mut s = whole(&small);
        let r0 = s.hist_range();
        assert!(r0 > s.abs_max() && r0 / 2.0 <= s.abs_max());
        s.update(view(&big));
        assert!(s.hist_range() >= 512.0 * r0 && s.hist_range() > s.abs_max() && s.hist_range() / 2.0 <= s.abs_max());
        let all: Vec<f32> = small.iter().chain(&big).copied().collect();
        assert_eq!(s.histogram(), whole(&all).histogram());
        assert_eq!(s.histogram().iter().sum::<u64>(), 20_000);
        // Exact power of two lands strictly inside.
        let p = whole(&[4.0, -4.0]);
        assert_eq!(p.hist_range(), 8.0);
        let z = whole(&[0.0, 0.0]);
        assert_eq!(z.hist_range(), pow2(-24));
        assert_eq!(z.range(&RangeMethod::Mse, 256, false), (0.0, 0.0));
        assert_eq!(z.range(&RangeMethod::Entropy, 256, true), (0.0, 0.0));
    }

    /// A large sample whose range grows from segment to segment, with NaN/Inf in some
    /// segments (and in the tail): the histogram equals the one binned directly with the final
    /// range, the sums follow the lane order, min/max are exact.
    #[test]
    fn growing_segments_match_direct_binning() {
        let mut data: Vec<f32> =
            gaussian(70_001, 11).iter().enumerate().map(|(i, v)| v * (1.0 + i as f32 / 500.0)).collect();
        data[20_000] = f32::NAN;
        data[40_003] = f32::NEG_INFINITY;
        data[70_000] = f32::INFINITY;
        data[3] = -0.0;
        let s = whole(&data);
        let finite: Vec<f32> = data.iter().copied().filter(|v| v.is_finite()).collect();
        assert_eq!((s.count(), s.nan_count(), s.inf_count()), (finite.len() as u64, 1, 2));
        let min = finite.iter().fold(f64::INFINITY, |a, &v| a.min(f64::from(v)));
        let max = finite.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(f64::from(v)));
        assert_eq!((s.min(), s.max()), (min, max));
        let (mut lanes, mut lanes_sq) = ([0.0f64; 8], [0.0f64; 8]);
        for (i, &v) in data.iter().enumerate().filter(|(_, v)| v.is_finite()) {
            lanes[i % 8] += f64::from(v);
            lanes_sq[i % 8] += f64::from(v) * f64::from(v);
        }
        assert_eq!(s.sum().to_bits(), lanes.iter().sum::<f64>().to_bits());
        assert_eq!(s.sum_sq().to_bits(), lanes_sq.iter().sum::<f64>().to_bits());
        let mut direct = vec![0u64; DEFAULT_BINS];
        for &v in &finite {
            direct[((f64::from(v) / s.bin_width()).floor() as i64 + DEFAULT_BINS as i64 / 2) as usize] += 1;
        }
        assert_eq!(s.histogram(), direct.as_slice());
        assert_eq!(s.hist_range(), pow2(exp_above(min.abs().max(max.abs()))));
    }

    #[test]
    fn nan_and_inf_are_counted_and_excluded() {
        let data = [1.0, f32::NAN, -2.0, f32::INFINITY, f32::NEG_INFINITY, 0.5, f32::NAN];
        let s = whole(&data);
        assert_eq!((s.count(), s.nan_count(), s.inf_count()), (3, 2, 2));
        assert_eq!((s.min(), s.max(), s.abs_max()), (-2.0, 1.0, 2.0));
        assert_eq!(s.histogram().iter().sum::<u64>(), 3);
        assert!((s.mean() - (-0.5 / 3.0)).abs() < 1e-12);
        assert_eq!(s.hist_range(), 4.0);
        let only_bad = whole(&[f32::NAN, f32::INFINITY]);
        assert_eq!(only_bad.count(), 0);
        for m in [RangeMethod::MinMax, RangeMethod::Percentile(99.9), RangeMethod::Entropy, RangeMethod::Mse] {
            assert_eq!(only_bad.range(&m, 256, false), (0.0, 0.0));
            assert_eq!(TensorStats::default().range(&m, 256, true), (0.0, 0.0));
        }
        assert_eq!(only_bad.quantile_abs(0.5), 0.0);
    }

    #[test]
    fn per_channel_absmax_axis1() {
        let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |i| {
            let v = (i[0] * 12 + i[1] * 4 + i[2]) as f32;
            if i[2] % 2 == 0 {
                -v
            } else {
                v
            }
        });
        let mut s = TensorStats::new(DEFAULT_BINS, Some(1));
        s.update(x.view());
        // channel c: max over n, k of |12n + 4c + k| = 12 + 4c + 3
        assert_eq!(s.channel_absmax(), &[15.0, 19.0, 23.0]);
        // NaN/Inf ignored, rank too small ignored, more channels grow the vector.
        let mut y = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 2]));
        y[[0, 0, 0]] = f32::INFINITY;
        y[[0, 3, 1]] = -30.0;
        y[[0, 1, 1]] = f32::NAN;
        s.update(y.view());
        s.update(view(&[1000.0]));
        assert_eq!(s.channel_absmax(), &[15.0, 19.0, 23.0, 30.0]);
        let mut t = TensorStats::new(DEFAULT_BINS, Some(1));
        t.merge(&s);
        assert_eq!(t.channel_absmax(), s.channel_absmax());
        let j = s.stats_json();
        assert_eq!(j["channel_absmax"].as_array().map(Vec::len), Some(4));
    }

    #[test]
    fn stats_json_keys() {
        let s = whole(&gaussian(1000, 13));
        let j = s.stats_json();
        let keys: Vec<&str> = j.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
        let mut expected = vec!["count", "min", "max", "mean", "std", "nan", "inf", "abs_max", "p99_9"];
        expected.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, expected);
        assert_eq!(j["count"], 1000);
        assert_eq!(
            serde_json::to_string(&s.summary()).ok().map(|t| t.starts_with("{\"count\":1000,\"min\":")),
            Some(true)
        );
    }

    #[test]
    fn range_method_parse_and_display() {
        for m in [
            RangeMethod::MinMax,
            RangeMethod::Percentile(99.999),
            RangeMethod::Percentile(100.0),
            RangeMethod::Entropy,
            RangeMethod::Mse,
        ] {
            assert_eq!(m.to_string().parse::<RangeMethod>(), Ok(m.clone()));
        }
        assert_eq!("percentile:99.999".parse::<RangeMethod>(), Ok(RangeMethod::Percentile(99.999)));
        assert_eq!(RangeMethod::Percentile(99.9).to_string(), "percentile:99.9");
        assert_eq!(" MinMax ".parse::<RangeMethod>(), Ok(RangeMethod::MinMax));
        for bad in ["kl", "percentile", "percentile:0", "percentile:101", "percentile:abc", "percentile:nan", ""] {
            let err = bad.parse::<RangeMethod>().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                err.contains(&format!("{bad:?}")) && err.contains("percentile:<p>") && err.contains("mse"),
                "{err}"
            );
        }
    }

    /// The scalar definition of `update` (the module docs), element by element in logical order.
    fn reference_update(s: &mut TensorStats, x: ArrayViewD<'_, f32>) {
        let (mut mn, mut mx) = (f64::INFINITY, f64::NEG_INFINITY);
        for &v in x.iter() {
            if v.is_nan() {
                s.nan_count += 1;
            } else if v.is_infinite() {
                s.inf_count += 1;
            } else {
                s.count += 1;
                s.sum += f64::from(v);
                s.sum_sq += f64::from(v) * f64::from(v);
                mn = mn.min(f64::from(v));
                mx = mx.max(f64::from(v));
            }
        }
        if mn <= mx {
            s.min = s.min.min(mn);
            s.max = s.max.max(mx);
            s.grow_to(exp_above(mn.abs().max(mx.abs())));
            let w = pow2(s.hist_exp + 1) / s.bins as f64;
            for &v in x.iter().filter(|v| v.is_finite()) {
                let j = ((f64::from(v) / w).floor() as i64 + (s.bins / 2) as i64).clamp(0, s.bins as i64 - 1);
                s.hist[j as usize] += 1;
            }
        }
        if let Some(axis) = s.channel_axis.filter(|&a| a < x.ndim()) {
            let c = x.len_of(ndarray::Axis(axis));
            if s.channel_absmax.len() < c {
                s.channel_absmax.resize(c, 0.0);
            }
            for (slot, lane) in s.channel_absmax.iter_mut().zip(x.axis_iter(ndarray::Axis(axis))) {
                *slot = lane.iter().filter(|v| v.is_finite()).fold(*slot, |m, v| m.max(v.abs()));
            }
        }
    }

    /// Any number of doublings in one pass equals that many pairwise doublings.
    #[test]
    fn one_pass_doublings_equal_repeated_doublings() {
        let mut r = Rng(17);
        for bins in [4usize, 16, 2048] {
            let h: Vec<u64> = (0..bins).map(|i| if i % 3 == 0 { 0 } else { r.next_u64() % 1000 }).collect();
            let mut saturated = h.clone();
            saturated[bins / 2] = u64::MAX - 3;
            for src in [&h, &saturated] {
                let mut want = src.clone();
                for d in 0..40 {
                    let mut got = vec![1u64; bins];
                    add_doubled(&mut got, src, d);
                    let plus_one: Vec<u64> = want.iter().map(|c| c.saturating_add(1)).collect();
                    assert_eq!(got, plus_one, "{bins} bins, {d} doublings");
                    let mut in_place = src.clone();
                    double_in_place(&mut in_place, d);
                    assert_eq!(in_place, want, "{bins} bins, {d} doublings in place");
                    want = double_hist(&want);
                }
            }
        }
    }

    /// Per-channel statistics, taken block by block beside the tensor's (channel blocks of 16
    /// elements and more) or in a pass of their own (shorter ones), equal each channel's
    /// values calibrated alone, block after block in order.
    #[test]
    fn channel_statistics_equal_each_channel_alone() {
        // Channel blocks short and long (sub-histograms from 4096 elements), and too short
        // for blocks of their own (6).
        for (shape, scale) in [([2usize, 3, 5, 7], 1.0f32), ([3, 4, 2, 3], 40.0), ([1, 3, 64, 80], 3.0)] {
            let n: usize = shape.iter().product();
            let inner = shape[2] * shape[3];
            let a = ArrayD::from_shape_vec(IxDyn(&shape), gaussian(n, 17)).expect("shape");
            let mut s = TensorStats::new(256, Some(1)).with_channel_stats(64);
            let mut want = vec![TensorStats::new(64, None); shape[1]];
            // Three updates, the second with a wider range, the third with a NaN and an Inf
            // in the second channel's block.
            let mut bad = a.mapv(|v| v * 0.5);
            if let Some(flat) = bad.as_slice_mut() {
                (flat[inner + 1], flat[2 * inner - 1]) = (f32::NAN, f32::NEG_INFINITY);
            }
            for x in [a.clone(), a.mapv(|v| v * scale), bad] {
                s.update(x.view());
                let flat = x.as_slice().expect("standard layout");
                for (k, block) in flat.chunks_exact(inner).enumerate() {
                    want[k % shape[1]].update(ndarray::ArrayView1::from(block).into_dyn());
                }
            }
            assert_eq!(s.channel_stats(), want.as_slice(), "shape {shape:?}");
        }
    }

    #[test]
    fn vectorized_update_matches_scalar_definition() {
        let mut rng = Rng(99);
        for (case, &(n, bins, axis)) in
            [(37usize, 2048usize, None), (9_000, 2048, Some(1)), (40_000, 64, Some(2)), (100_000, 2048, Some(0))]
                .iter()
                .enumerate()
        {
            // Gaussians at several scales, tiny negatives (which must land below 0, not in 0's
            // bin), subnormals, exact bin edges, and sprinkled NaN / ±Inf in some cases.
            let data: Vec<f32> = (0..n)
                .map(|i| match rng.next_u64() % 16 {
                    0 => -1e-30,
                    1 => f32::from_bits(1) * if i % 2 == 0 { 1.0 } else { -1.0 },
                    2 => 0.25 * (i % 9) as f32 - 1.0,
                    3 if case % 2 == 1 => [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3],
                    4 => (rng.gauss() * 1e4) as f32,
                    _ => rng.gauss() as f32,
                })
                .collect();
            let shape = if n < 74 { [1, n, 1] } else { [2, 37, n / 74] };
            let len = shape.iter().product::<usize>();
            let a = ArrayD::from_shape_vec(IxDyn(&shape), data[..len].to_vec()).expect("shape");
            for view in [a.view(), a.view().reversed_axes()] {
                let (mut fast, mut slow) = (TensorStats::new(bins, axis), TensorStats::new(bins, axis));
                // Two updates: the second one may grow the range of the first.
                fast.update(view.view());
                reference_update(&mut slow, view.view());
                let scaled = view.mapv(|v| v * 300.0);
                fast.update(scaled.view());
                reference_update(&mut slow, scaled.view());
                assert_eq!(fast.histogram(), slow.histogram(), "case {case}");
                assert_eq!(
                    (fast.count, fast.nan_count, fast.inf_count, fast.min, fast.max, fast.hist_exp),
                    (slow.count, slow.nan_count, slow.inf_count, slow.min, slow.max, slow.hist_exp),
                    "case {case}"
                );
                assert_eq!(fast.channel_absmax, slow.channel_absmax, "case {case}");
                let tol = 1e-9 * slow.sum_sq.max(1.0);
                assert!((fast.sum - slow.sum).abs() <= tol && (fast.sum_sq - slow.sum_sq).abs() <= tol, "case {case}");
            }
        }
    }

    /// A block's bins are counted by the next block's vector pass ([`Carry`]): across range
    /// growths in the middle of a sample (the carried bins are of the old range), blocks with
    /// a NaN (counted on their own, and what follows is carried again), a short last block and
    /// a slice of one block, the histogram is the direct one.
    #[test]
    fn carried_counts_match_reference() {
        let mut rng = Rng(5);
        for (n, nan_at) in [(70_001usize, Some(30_000usize)), (70_000, None), (9_000, Some(8_999)), (200, None)] {
            // Magnitudes grow along the slice, so the range doubles many times mid-sample.
            let mut data: Vec<f32> = (0..n).map(|i| (rng.gauss() * (1.0 + i as f64 / 500.0)) as f32).collect();
            if let Some(at) = nan_at {
                data[at] = f32::NAN;
            }
            let (mut fast, mut slow) = (TensorStats::new(2048, None), TensorStats::new(2048, None));
            fast.update(view(&data));
            reference_update(&mut slow, view(&data));
            assert_eq!(fast.histogram(), slow.histogram(), "n {n}");
            assert_eq!(
                (fast.count, fast.nan_count, fast.hist_exp),
                (slow.count, slow.nan_count, slow.hist_exp),
                "n {n}"
            );
            assert_eq!(fast.histogram().iter().sum::<u64>(), fast.count, "n {n}");
        }
    }

    #[test]
    fn extreme_values() {
        let data = [f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 1e-45, -1e-45, 0.0];
        let s = whole(&data);
        assert_eq!(s.hist_range(), pow2(128));
        assert_eq!(s.histogram().iter().sum::<u64>(), 6);
        assert_eq!(s.range(&RangeMethod::MinMax, 256, false), (-f32::MAX, f32::MAX));
        for m in [RangeMethod::Percentile(99.0), RangeMethod::Entropy, RangeMethod::Mse] {
            let (lo, hi) = s.range(&m, 256, false);
            assert!(lo <= 0.0 && hi >= 0.0 && lo.is_finite() && hi.is_finite(), "{m}: {lo} {hi}");
        }
        let tiny = whole(&[1e-45, -3e-40]);
        assert_eq!(tiny.hist_range(), pow2(MIN_EXP));
        let (lo, hi) = tiny.range(&RangeMethod::Mse, 256, false);
        assert!(lo <= 0.0 && hi >= 0.0);
    }

    #[test]
    fn odd_bin_counts_and_mismatched_merge_do_not_panic() {
        let data = gaussian(5000, 14);
        let mut a = TensorStats::new(0, None);
        assert_eq!(a.bins(), 4);
        a.update(view(&data));
        let mut b = TensorStats::new(1001, None);
        assert_eq!(b.bins(), 1004);
        b.update(view(&data));
        b.merge(&a);
        assert_eq!(b.histogram().iter().sum::<u64>(), 10_000);
        for m in [
            RangeMethod::MinMax,
            RangeMethod::Percentile(0.0),
            RangeMethod::Percentile(f64::NAN),
            RangeMethod::Entropy,
            RangeMethod::Mse,
        ] {
            for s in [&a, &b] {
                for levels in [0, 1, 2, 256, u32::MAX] {
                    let (lo, hi) = s.range(&m, levels, false);
                    assert!(lo <= 0.0 && hi >= 0.0);
                }
            }
        }
    }
}
