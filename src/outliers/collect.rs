//! Streaming per-layer statistics over the calibration samples, with bounded memory.
//!
//! For a layer `y = x·W` and its input rows (all leading dims flattened, `[.., K] → [rows, K]`):
//! - the exact `q`-quantile of `|y|` over all `n` elements as an order statistic: with
//!   `M = n − ⌈q·n⌉ + 1`, `quantile_q(|Y|)` is the `M`-th largest `|y|`. Each sample keeps only
//!   its `M` largest values and the fold keeps the global `M` largest, so memory is `M` floats;
//! - outlier candidates: an outlier has `|y| > τ = c·quantile_q ≥ c·m`, where `m` is the `M`-th
//!   largest value of any subset with at least `M` elements (a single sample) or of the values
//!   folded so far. Each sample keeps the elements above that bound with their input rows
//!   `x_i`, the fold prunes them as the bound rises; the exact `τ` filters them at the end;
//! - optionally the Gram matrix `G = XᵀX` (f64) and the column sums `Σ_i x_i`.

use super::solve::Outlier;
use anyhow::{bail, Result};
use ndarray::{Array2, ArrayD, Axis};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

/// One sample's contribution to a layer's statistics.
#[derive(Debug)]
pub struct SampleStats {
    rows: usize,
    elements: u64,
    nonfinite: u64,
    abs_max: f32,
    top: Vec<f32>,
    /// (local row, column, y)
    cands: Vec<(usize, usize, f32)>,
    xrows: BTreeMap<usize, Vec<f32>>,
    gram: Option<Array2<f64>>,
    colsum: Vec<f64>,
}

/// The accumulator of one layer.
#[derive(Debug)]
pub struct LayerAcc {
    samples: usize,
    quantile: f64,
    factor: f64,
    want_gram: bool,
    /// `c · (M-th largest so far)` as f32 bits: a lower bound of the final τ.
    bound: AtomicU32,
    rows: u64,
    elements: u64,
    nonfinite: u64,
    abs_max: f32,
    m: usize,
    top: Vec<f32>,
    cands: Vec<Outlier>,
    xrows: BTreeMap<u64, Vec<f32>>,
    gram: Option<Array2<f64>>,
    colsum: Vec<f64>,
}

/// A layer's finished statistics.
#[derive(Debug, Clone)]
pub struct LayerStats {
    pub rows: u64,
    pub elements: u64,
    pub nonfinite: u64,
    pub abs_max: f64,
    /// `quantile_q(|Y|)`.
    pub q: f64,
    /// `τ = c · q`.
    pub tau: f64,
    /// Outliers sorted by (row, column).
    pub outliers: Vec<Outlier>,
    /// Input rows of the outliers.
    pub xrows: BTreeMap<u64, Vec<f32>>,
    pub gram: Option<Array2<f64>>,
    pub colsum: Vec<f64>,
}

/// `M = n − ⌈q·n⌉ + 1` (at least 1, at most n).
pub fn top_count(n: u64, q: f64) -> usize {
    if n == 0 {
        return 1;
    }
    let ceil = ((q * n as f64).ceil() as u64).clamp(1, n);
    (n - ceil + 1) as usize
}

/// Keeps the `m` largest values of `v` (unordered).
fn keep_largest(v: &mut Vec<f32>, m: usize) {
    if v.len() > m {
        let cut = v.len() - m;
        v.select_nth_unstable_by(cut, |a, b| a.total_cmp(b));
        v.drain(..cut);
    }
}

/// The smallest of a non-empty slice.
fn min_of(v: &[f32]) -> f32 {
    v.iter().copied().fold(f32::INFINITY, f32::min)
}

impl LayerAcc {
    /// `samples`: how many samples will be folded (all share the same shapes).
    pub fn new(samples: usize, quantile: f64, factor: f64, want_gram: bool) -> LayerAcc {
        LayerAcc {
            samples,
            quantile,
            factor,
            want_gram,
            bound: AtomicU32::new(0),
            rows: 0,
            elements: 0,
            nonfinite: 0,
            abs_max: 0.0,
            m: 0,
            top: Vec::new(),
            cands: Vec::new(),
            xrows: BTreeMap::new(),
            gram: None,
            colsum: Vec::new(),
        }
    }

    /// Computes one sample's statistics from the layer input `x` (`[.., K]`) and `w` (`[K, N]`).
    /// Thread safe: only reads the accumulator.
    pub fn sample(&self, x: &ArrayD<f32>, w: &Array2<f32>) -> Result<SampleStats> {
        let (k, n) = w.dim();
        if x.ndim() == 0 || x.shape()[x.ndim() - 1] != k {
            bail!("input of shape {:?} does not end with the weight's K = {k}", x.shape());
        }
        let rows = x.len() / k;
        let x2 = x.as_standard_layout().into_owned().into_shape_with_order((rows, k))?;
        let y = x2.dot(w);
        let elements = (rows * n) as u64;
        let m = top_count(elements * self.samples as u64, self.quantile);
        let mut nonfinite = 0u64;
        let mut abs: Vec<f32> = Vec::with_capacity(y.len());
        for &v in y.iter() {
            if v.is_finite() {
                abs.push(v.abs());
            } else {
                nonfinite += 1;
            }
        }
        let abs_max = abs.iter().copied().fold(0f32, f32::max);
        // The sample's own M-th largest is a lower bound of the global one.
        let own_bound = if abs.len() >= m {
            keep_largest(&mut abs, m);
            min_of(&abs) as f64 * self.factor
        } else {
            0.0
        };
        let shared = f32::from_bits(self.bound.load(Ordering::Relaxed)) as f64;
        let bound = own_bound.max(shared);
        let mut cands = Vec::new();
        let mut xrows = BTreeMap::new();
        for ((i, j), &v) in y.indexed_iter() {
            if v.is_finite() && f64::from(v.abs()) > bound {
                cands.push((i, j, v));
                xrows.entry(i).or_insert_with(|| x2.row(i).to_vec());
            }
        }
        let (gram, colsum) = if self.want_gram {
            let x64 = x2.mapv(f64::from);
            (Some(x64.t().dot(&x64)), x64.sum_axis(Axis(0)).to_vec())
        } else {
            (None, Vec::new())
        };
        Ok(SampleStats { rows, elements, nonfinite, abs_max, top: abs, cands, xrows, gram, colsum })
    }

    /// Folds one sample (call in sample order for reproducible results).
    pub fn merge(&mut self, s: SampleStats) -> Result<()> {
        let base = self.rows;
        self.rows += s.rows as u64;
        self.elements += s.elements;
        self.nonfinite += s.nonfinite;
        self.abs_max = self.abs_max.max(s.abs_max);
        self.m = top_count(s.elements * self.samples as u64, self.quantile);
        self.top.extend(s.top);
        if self.top.len() > 2 * self.m {
            keep_largest(&mut self.top, self.m);
        }
        for (i, j, y) in s.cands {
            self.cands.push(Outlier { row: base + i as u64, j, y });
        }
        for (i, x) in s.xrows {
            self.xrows.insert(base + i as u64, x);
        }
        if let Some(g) = s.gram {
            match &mut self.gram {
                Some(acc) if acc.dim() == g.dim() => *acc += &g,
                Some(acc) => bail!("Gram matrices of different shapes {:?} and {:?}", acc.dim(), g.dim()),
                None => self.gram = Some(g),
            }
            if self.colsum.is_empty() {
                self.colsum = s.colsum;
            } else {
                for (a, b) in self.colsum.iter_mut().zip(s.colsum) {
                    *a += b;
                }
            }
        }
        // Raise the shared bound and prune.
        if self.top.len() >= self.m {
            keep_largest(&mut self.top, self.m);
            let b = (f64::from(min_of(&self.top)) * self.factor) as f32;
            self.bound.fetch_max(b.max(0.0).to_bits(), Ordering::Relaxed);
            let bound = f64::from(f32::from_bits(self.bound.load(Ordering::Relaxed)));
            self.cands.retain(|o| f64::from(o.y.abs()) > bound);
            self.prune_rows();
        }
        Ok(())
    }

    fn prune_rows(&mut self) {
        let used: std::collections::BTreeSet<u64> = self.cands.iter().map(|o| o.row).collect();
        self.xrows.retain(|r, _| used.contains(r));
    }

    pub fn finish(mut self) -> LayerStats {
        keep_largest(&mut self.top, self.m.max(1));
        let q = if self.top.is_empty() { 0.0 } else { f64::from(min_of(&self.top)) };
        let tau = self.factor * q;
        if q > 0.0 {
            self.cands.retain(|o| f64::from(o.y.abs()) > tau);
        } else {
            // Degenerate distribution (mostly zeros): no meaningful threshold.
            self.cands.clear();
        }
        self.cands.sort_by(|a, b| a.row.cmp(&b.row).then(a.j.cmp(&b.j)));
        self.prune_rows();
        LayerStats {
            rows: self.rows,
            elements: self.elements,
            nonfinite: self.nonfinite,
            abs_max: f64::from(self.abs_max),
            q,
            tau,
            outliers: self.cands,
            xrows: self.xrows,
            gram: self.gram,
            colsum: self.colsum,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use ndarray::IxDyn;

    #[test]
    fn top_count_is_the_order_statistic_of_the_quantile() {
        assert_eq!(top_count(1000, 0.999), 2); // 999th of 1000 sorted ascending = 2nd largest
        assert_eq!(top_count(10_000, 0.999), 11);
        assert_eq!(top_count(1, 0.999), 1);
        assert_eq!(top_count(5, 0.5), 3);
    }

    /// Streaming over samples gives the exact quantile and outliers of the whole set.
    #[test]
    fn streaming_matches_the_batch_computation() -> Result<()> {
        let mut r = Rng::new(3);
        let (k, n, rows, samples) = (6usize, 5usize, 20usize, 7usize);
        let w = Array2::from_shape_vec((k, n), (0..k * n).map(|_| r.normal() as f32).collect())?;
        let xs: Vec<ArrayD<f32>> = (0..samples)
            .map(|s| {
                let mut v: Vec<f32> = (0..rows * k).map(|_| r.normal() as f32).collect();
                if s == 4 {
                    v[3 * k + 2] = 40.0; // one large input → an outlier row
                }
                ArrayD::from_shape_vec(IxDyn(&[1, rows, k]), v).expect("shape")
            })
            .collect();
        let mut acc = LayerAcc::new(samples, 0.9, 2.0, true);
        for x in &xs {
            let s = acc.sample(x, &w)?;
            acc.merge(s)?;
        }
        let st = acc.finish();
        // Batch reference.
        let mut all: Vec<f32> = Vec::new();
        let mut outs = Vec::new();
        let mut g = Array2::<f64>::zeros((k, k));
        for (s, x) in xs.iter().enumerate() {
            let x2 = x.clone().into_shape_with_order((rows, k))?;
            let y = x2.dot(&w);
            for ((i, j), &v) in y.indexed_iter() {
                all.push(v.abs());
                outs.push(((s * rows + i) as u64, j, v));
            }
            let x64 = x2.mapv(f64::from);
            g += &x64.t().dot(&x64);
        }
        all.sort_by(|a, b| a.total_cmp(b));
        let nn = all.len();
        let q = all[((0.9 * nn as f64).ceil() as usize) - 1];
        assert_eq!(st.q, f64::from(q));
        let want: Vec<(u64, usize)> =
            outs.iter().filter(|o| f64::from(o.2.abs()) > 2.0 * f64::from(q)).map(|o| (o.0, o.1)).collect();
        let got: Vec<(u64, usize)> = st.outliers.iter().map(|o| (o.row, o.j)).collect();
        assert!(!got.is_empty());
        assert_eq!(got, want);
        assert!(st.outliers.iter().all(|o| st.xrows.contains_key(&o.row)));
        assert_eq!(st.rows, (samples * rows) as u64);
        let diff = (st.gram.expect("gram") - g).mapv(f64::abs).sum();
        assert!(diff < 1e-9, "{diff}");
        Ok(())
    }
}
