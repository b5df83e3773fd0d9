//! Streaming per-layer statistics over the calibration samples, with bounded memory.
//!
//! For a layer `y = x·W` and its input rows (all leading dims flattened, `[.., K] → [rows, K]`;
//! for a Conv with `g` groups one `[rows, K]` matrix of im2col patches per group, and group
//! `gi` owns the output columns `gi·N/g .. (gi+1)·N/g`):
//! - the exact `q`-quantile of `|y|` over all `n` elements as an order statistic: with
//!   `M = n − ⌈q·n⌉ + 1`, `quantile_q(|Y|)` is the `M`-th largest `|y|`. Each sample keeps only
//!   its `M` largest values (and none below the `M`-th largest folded so far, which cannot be
//!   among the final `M`) and the fold keeps the global `M` largest, so memory is `M` floats;
//! - outlier candidates: an outlier has `|y| > τ = c·quantile_q ≥ c·m`, where `m` is the `M`-th
//!   largest value of any subset with at least `M` elements (a single sample) or of the values
//!   folded so far. Each sample keeps the elements above that bound with their input rows
//!   `x_i`, the fold prunes them as the bound rises; the exact `τ` filters them at the end;
//! - optionally, per group, the Gram matrix `G = XᵀX` ([`GramAcc`]: the product of every
//!   [`GRAM_ROWS`] rows in f32 on the blocks on and above the diagonal only, its upper
//!   triangle summed in f64, in sample order, and mirrored at the end) and the column sums
//!   `Σ_i x_i`;
//! - optionally a bounded, evenly spaced subset of the input rows of every sample (for the
//!   local acceptance test of an edit).
//!
//! `y` is either computed here (`x·W`) or handed in ([`Sampler::output_stats`], e.g. a
//! MatMul's output read from the runtime), with the outliers' input rows added afterwards.
//!
//! Row ids: position `i` (counted over all samples) of group `gi` is row `i·g + gi`, so an
//! outlier's row id names the patch that made it.

use super::solve::Outlier;
use anyhow::{bail, Result};
use ndarray::{s, Array2, ArrayView2, Axis};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

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
    /// Per group: the sample's input rows, for the Gram ([`GramAcc`]).
    gram: Option<Vec<Array2<f32>>>,
    colsum: Vec<Vec<f64>>,
    /// Per group: the kept rows (local row ids, input rows, outputs `y` on them).
    kept: Vec<(Vec<usize>, Array2<f32>, Array2<f32>)>,
}

impl SampleStats {
    /// Adds the input rows of the outlier candidates from the layer's input rows (one
    /// `[rows, K]` matrix per group).
    pub fn attach_rows(&mut self, xg: &[ArrayView2<f32>]) -> Result<()> {
        let g = xg.len().max(1);
        for &(r, _, _) in &self.cands {
            let x = xg.get(r % g).filter(|x| r / g < x.nrows());
            let Some(x) = x else { bail!("outlier row {r} is outside the layer's input rows") };
            self.xrows.entry(r).or_insert_with(|| x.row(r / g).to_vec());
        }
        Ok(())
    }

    /// The (local) row ids of the outlier candidates whose input rows are missing, sorted.
    pub fn missing_rows(&self) -> Vec<usize> {
        let ids: std::collections::BTreeSet<usize> =
            self.cands.iter().map(|c| c.0).filter(|r| !self.xrows.contains_key(r)).collect();
        ids.into_iter().collect()
    }

    /// Adds input rows by (local) row id, e.g. those of [`SampleStats::missing_rows`]
    /// gathered alone.
    pub fn add_rows(&mut self, rows: Vec<(usize, Vec<f32>)>) {
        for (r, x) in rows {
            self.xrows.entry(r).or_insert(x);
        }
    }
}

/// Gram block size: products of `GRAM_BLOCK`-wide column blocks.
const GRAM_BLOCK: usize = 256;

/// `XᵀX` of one sample's rows in f32, only its blocks on and above the diagonal: block row
/// `r` (columns `b0 = r·GRAM_BLOCK .. b1` of `X`) is `X[:, b0..b1]ᵀ · X[:, b0..]`, `[b1 − b0, K − b0]`
/// (about half of `K × K`, nothing allocated or zeroed for the lower blocks), block rows in
/// parallel.
pub fn upper_gram(x: ArrayView2<f32>) -> Result<Vec<Array2<f32>>> {
    let k = x.ncols();
    let starts: Vec<usize> = (0..k).step_by(GRAM_BLOCK).collect();
    // The block rows are independent products: computed in parallel (each one alone).
    starts
        .into_par_iter()
        .map(|b0| {
            let b1 = (b0 + GRAM_BLOCK).min(k);
            let mut c = Array2::zeros((b1 - b0, k - b0));
            crate::linalg::mul_into(&mut c.view_mut(), None, 1.0, x.slice(s![.., b0..b1]).t(), x.slice(s![.., b0..]))?;
            Ok(c)
        })
        .collect()
}

/// Adds the upper triangle of a sample's [`upper_gram`] blocks to `acc` (`K × K`, f64). Block
/// rows are added in parallel; each element still receives the samples in fold order, so the
/// sum does not depend on the thread count.
pub fn add_upper(acc: &mut Array2<f64>, blocks: &[Array2<f32>]) -> Result<()> {
    let k = acc.ncols();
    let expected = k.div_ceil(GRAM_BLOCK);
    if acc.nrows() != k || blocks.len() != expected {
        bail!("Gram blocks of a {}-column input for a {:?} accumulator", blocks.len() * GRAM_BLOCK, acc.dim());
    }
    let Some(flat) = acc.as_slice_mut() else { bail!("internal error: Gram accumulator not contiguous") };
    let add = |(r, (rows, blk)): (usize, (&mut [f64], &Array2<f32>))| -> Result<()> {
        let b0 = r * GRAM_BLOCK;
        if blk.dim() != (rows.len() / k, k - b0) {
            bail!("Gram block {r} has shape {:?}", blk.dim());
        }
        for (il, (row, brow)) in rows.chunks_mut(k).zip(blk.outer_iter()).enumerate() {
            let Some(brow) = brow.as_slice() else { bail!("internal error: Gram block not contiguous") };
            for (a, &b) in row[b0 + il..].iter_mut().zip(&brow[il..]) {
                *a += f64::from(b);
            }
        }
        Ok(())
    };
    // One block row (K ≤ GRAM_BLOCK, e.g. every group of a depthwise Conv) has nothing to
    // split: added in place, without a parallel job per call.
    if blocks.len() == 1 {
        flat.chunks_mut(GRAM_BLOCK * k).zip(blocks).enumerate().try_for_each(add)
    } else {
        flat.par_chunks_mut(GRAM_BLOCK * k).zip(blocks.par_iter()).enumerate().try_for_each(add)
    }
}

/// A `K × K` zero accumulator for [`add_upper`], its pages written before use. A large zeroed
/// allocation comes as untouched pages; [`add_upper`]'s first read-modify-write of each one
/// would map the shared zero page on the read and copy it on the write, and that copy flushes
/// the TLB of every core the process runs on (MiniLM-L6: 1.7% of `quantize`'s CPU time in
/// those flushes). One write per page (through `black_box`, so it is not dropped as storing a
/// zero over zeros) faults each page in once, writable.
pub fn written_zeros(k: usize) -> Array2<f64> {
    let mut g = Array2::zeros((k, k));
    if let Some(flat) = g.as_slice_mut() {
        // 512 f64 = 4 KiB, the smallest page size.
        for x in flat.iter_mut().step_by(512) {
            *x = std::hint::black_box(0.0);
        }
    }
    g
}

/// Copies the upper triangle of a square matrix onto its lower one (an [`add_upper`]
/// accumulator made whole), in 64 × 64 tiles: element by element, reading a column of a
/// `K = 1536` matrix touches a new cache line per element (MiniLM-L6: 6 ms of single-core
/// time per layer, between two pieces of the sequential pass).
pub fn mirror_upper(g: &mut Array2<f64>) {
    const TILE: usize = 64;
    let n = g.nrows();
    for ib in (0..n).step_by(TILE) {
        for jb in (0..=ib).step_by(TILE) {
            for i in ib..(ib + TILE).min(n) {
                for j in jb..(jb + TILE).min(i) {
                    g[[i, j]] = g[[j, i]];
                }
            }
        }
    }
}

/// Rows buffered by [`GramAcc`] before their product is taken: one f32 product over this
/// many rows instead of one per sample (MiniLM-L6: 64 rows a sample) makes the matrix
/// product efficient and the f64 additions of `K²/2` elements eight times rarer.
pub const GRAM_ROWS: usize = 512;

/// A streaming `G = XᵀX` (`K × K`, f64): rows are buffered, and every [`GRAM_ROWS`] rows
/// their [`upper_gram`] (f32) is added to the f64 sum ([`add_upper`]). The flush points
/// depend only on the row counts, so the sum is the same for any thread count.
#[derive(Debug)]
pub struct GramAcc {
    k: usize,
    pending: Vec<f32>,
    acc: Option<Array2<f64>>,
}

impl GramAcc {
    pub fn new(k: usize) -> GramAcc {
        GramAcc { k, pending: Vec::new(), acc: None }
    }

    /// Adds the rows of `x` (`[rows, K]`).
    pub fn add(&mut self, x: ArrayView2<f32>) -> Result<()> {
        if x.ncols() != self.k {
            bail!("rows of {} columns for a {}-column Gram matrix", x.ncols(), self.k);
        }
        for row in x.outer_iter() {
            match row.as_slice() {
                Some(r) => self.pending.extend_from_slice(r),
                None => self.pending.extend(row.iter()),
            }
            if self.pending.len() >= GRAM_ROWS * self.k {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = self.pending.len() / self.k.max(1);
        let x = ArrayView2::from_shape((rows, self.k), &self.pending)?;
        let blocks = upper_gram(x)?;
        let k = self.k;
        add_upper(self.acc.get_or_insert_with(|| written_zeros(k)), &blocks)?;
        self.pending.clear();
        Ok(())
    }

    /// The whole matrix (zero without rows).
    pub fn finish(mut self) -> Result<Array2<f64>> {
        self.flush()?;
        let k = self.k;
        let mut g = self.acc.take().unwrap_or_else(|| Array2::zeros((k, k)));
        mirror_upper(&mut g);
        Ok(g)
    }
}

/// What the samples of a layer need of its accumulator: the settings and the shared bounds
/// the fold raises ([`LayerAcc::sampler`]). Cheap to clone and used without a lock, so
/// samples are looked at in parallel while [`LayerAcc::merge`] folds earlier ones.
#[derive(Debug, Clone)]
pub struct Sampler {
    samples: usize,
    quantile: f64,
    factor: f64,
    want_gram: bool,
    /// Rows kept per sample and group (0: none).
    keep_rows: usize,
    groups: usize,
    bounds: Arc<Bounds>,
}

/// Raised by the fold, read by the samples (relaxed: any value seen is a valid bound).
#[derive(Debug, Default)]
struct Bounds {
    /// `c · (M-th largest so far)` as f32 bits: a lower bound of the final τ.
    bound: AtomicU32,
    /// The `M`-th largest `|y|` so far as f32 bits: values below it can be skipped.
    floor: AtomicU32,
}

/// The accumulator of one layer.
#[derive(Debug)]
pub struct LayerAcc {
    sampler: Sampler,
    rows: u64,
    elements: u64,
    nonfinite: u64,
    abs_max: f32,
    m: usize,
    top: Vec<f32>,
    cands: Vec<Outlier>,
    xrows: BTreeMap<u64, Vec<f32>>,
    gram: Option<Vec<GramAcc>>,
    colsum: Vec<Vec<f64>>,
    kept: Vec<(Vec<u64>, Vec<f32>, Vec<f32>)>,
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
    /// Input rows of the outliers (by row id).
    pub xrows: BTreeMap<u64, Vec<f32>>,
    /// Per group (when asked for).
    pub gram: Option<Vec<Array2<f64>>>,
    /// Per group (with the Gram).
    pub colsum: Vec<Vec<f64>>,
    /// Per group: the kept rows, their row ids, input rows `[rows, K]` and pre-bias outputs
    /// `y` on them `[rows, N/g]` (when asked for).
    pub kept: Vec<(Vec<u64>, Array2<f32>, Array2<f32>)>,
    pub groups: usize,
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
    /// `samples`: how many samples will be folded (all share the same shapes); `groups`: how
    /// many row matrices each sample gives; `keep_rows`: rows per sample and group to keep.
    pub fn new(
        samples: usize,
        quantile: f64,
        factor: f64,
        want_gram: bool,
        groups: usize,
        keep_rows: usize,
    ) -> LayerAcc {
        LayerAcc {
            sampler: Sampler {
                samples,
                quantile,
                factor,
                want_gram,
                keep_rows,
                groups: groups.max(1),
                bounds: Arc::new(Bounds::default()),
            },
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
            kept: Vec::new(),
        }
    }

    /// The sampling side of the accumulator (shares its bounds).
    pub fn sampler(&self) -> Sampler {
        self.sampler.clone()
    }

    /// [`Sampler::sample`].
    pub fn sample(&self, xg: Vec<Array2<f32>>, w: &Array2<f32>) -> Result<SampleStats> {
        self.sampler.sample(xg, w)
    }
}

impl Sampler {
    /// Computes one sample's statistics from the layer's input rows (one `[rows, K]` matrix
    /// per group, the same rows for every group) and `w` (`[K, N]`). Thread safe: only reads
    /// the accumulator.
    pub fn sample(&self, xg: Vec<Array2<f32>>, w: &Array2<f32>) -> Result<SampleStats> {
        let (k, n) = w.dim();
        let g = self.groups;
        if xg.len() != g || n % g != 0 {
            bail!("{} input matrices for {g} groups and {n} output columns", xg.len());
        }
        let ng = n / g;
        if xg.iter().any(|x| x.ncols() != k) {
            bail!("input rows do not have the weight's K = {k} columns");
        }
        let ys = xg.iter().enumerate().map(|(gi, x)| x.dot(&w.slice(s![.., gi * ng..(gi + 1) * ng]))).collect();
        self.sample_with(xg, ys)
    }

    /// [`Sampler::sample`] with the outputs `y` given (one `[rows, N/g]` matrix per group,
    /// e.g. read from the runtime): the rows of `xg` and `ys` must correspond.
    pub fn sample_with(&self, xg: Vec<Array2<f32>>, ys: Vec<Array2<f32>>) -> Result<SampleStats> {
        let g = self.groups;
        let rows = xg.first().map_or(0, |x| x.nrows());
        if xg.len() != g || xg.iter().any(|x| x.nrows() != rows) {
            bail!("{} input matrices of unequal rows for {g} groups", xg.len());
        }
        if ys.iter().any(|y| y.nrows() != rows) {
            bail!("{} input rows but outputs of {:?} rows", rows, ys.iter().map(|y| y.nrows()).collect::<Vec<_>>());
        }
        let views: Vec<ArrayView2<f32>> = ys.iter().map(|y| y.view()).collect();
        let mut st = self.output_stats(&views)?;
        let xv: Vec<ArrayView2<f32>> = xg.iter().map(|x| x.view()).collect();
        st.attach_rows(&xv)?;
        if self.keep_rows > 0 {
            let pick = crate::im2col::subsample(rows, self.keep_rows);
            st.kept = xg
                .iter()
                .zip(&ys)
                .map(|(x, y)| (pick.clone(), x.select(Axis(0), &pick), y.select(Axis(0), &pick)))
                .collect();
        }
        if self.want_gram {
            // The rows go to the layer's Gram accumulator when the sample is folded.
            st.colsum = xg.iter().map(|x| x.mapv(f64::from).sum_axis(Axis(0)).to_vec()).collect();
            st.gram = Some(xg);
        }
        Ok(st)
    }

    /// The part of a sample's statistics that only needs the layer's outputs `y` (one
    /// `[rows, N/g]` matrix per group, e.g. read from the runtime instead of recomputed): the
    /// quantile candidates and the outlier candidates, whose input rows
    /// [`SampleStats::attach_rows`] then adds. Thread safe: only reads the accumulator.
    pub fn output_stats(&self, ys: &[ArrayView2<f32>]) -> Result<SampleStats> {
        let g = self.groups;
        if ys.len() != g {
            bail!("{} output matrices for {g} groups", ys.len());
        }
        let rows = ys.first().map_or(0, |y| y.nrows());
        let ng = ys.first().map_or(0, |y| y.ncols());
        if ys.iter().any(|y| y.dim() != (rows, ng)) {
            bail!("the groups' outputs differ in shape");
        }
        let n = ng * g;
        let elements = (rows * n) as u64;
        let m = top_count(elements * self.samples as u64, self.quantile);
        // Values below the M-th largest seen so far can be neither in the final top M nor
        // outliers, so they are not kept (the shared bound is `c ·` that value).
        let shared = f64::from(f32::from_bits(self.bounds.bound.load(Ordering::Relaxed)));
        let floor = f32::from_bits(self.bounds.floor.load(Ordering::Relaxed));
        let mut nonfinite = 0u64;
        let mut abs_max = 0f32;
        let mut abs: Vec<f32> = Vec::new();
        let mut add = |v: f32| {
            if v.is_finite() {
                let a = v.abs();
                abs_max = abs_max.max(a);
                if a >= floor {
                    abs.push(a);
                }
            } else {
                nonfinite += 1;
            }
        };
        let mut block_max = 0f32;
        for y in ys {
            // The order of the values does not matter here: walk them in memory order, in
            // blocks whose max and floor test vectorize; a block with a non-finite value, or
            // one holding values at or above the floor, is walked value by value.
            match y.as_slice_memory_order() {
                Some(flat) => {
                    for block in flat.chunks(64) {
                        let (mut bmax, mut bad) = (0f32, false);
                        for &v in block {
                            let a = v.abs();
                            bad |= !a.is_finite();
                            bmax = if a > bmax { a } else { bmax };
                        }
                        if bad || bmax >= floor {
                            block.iter().for_each(|&v| add(v));
                        } else {
                            block_max = block_max.max(bmax);
                        }
                    }
                }
                None => y.iter().for_each(|&v| add(v)),
            }
        }
        abs_max = abs_max.max(block_max);
        // The sample's own M-th largest is a lower bound of the global one.
        let own_bound = if abs.len() >= m {
            keep_largest(&mut abs, m);
            // The sample's statistics are held until they are folded: do not hold the
            // capacity of every value pushed before the cut (a Conv layer's early samples
            // push them all).
            abs.shrink_to_fit();
            min_of(&abs) as f64 * self.factor
        } else {
            0.0
        };
        let bound = own_bound.max(shared);
        let mut cands = Vec::new();
        // Usually no value of the sample exceeds the bound: then there is nothing to look for.
        let none_above = f64::from(abs_max) <= bound;
        for (gi, y) in ys.iter().enumerate().filter(|_| !none_above) {
            // In memory order (`finish` sorts the outliers).
            ndarray::Zip::indexed(y).for_each(|(i, j), &v| {
                if v.is_finite() && f64::from(v.abs()) > bound {
                    cands.push((i * g + gi, gi * ng + j, v));
                }
            });
        }
        Ok(SampleStats {
            rows,
            elements,
            nonfinite,
            abs_max,
            top: abs,
            cands,
            xrows: BTreeMap::new(),
            gram: None,
            colsum: Vec::new(),
            kept: Vec::new(),
        })
    }
}

impl LayerAcc {
    /// Folds one sample (call in sample order for reproducible results).
    pub fn merge(&mut self, mut s: SampleStats) -> Result<()> {
        self.add_gram(&mut s)?;
        let g = self.sampler.groups as u64;
        let base = self.rows * g;
        self.rows += s.rows as u64;
        self.elements += s.elements;
        self.nonfinite += s.nonfinite;
        self.abs_max = self.abs_max.max(s.abs_max);
        let sp = &self.sampler;
        self.m = top_count(s.elements * sp.samples as u64, sp.quantile);
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
        if self.colsum.is_empty() {
            self.colsum = s.colsum;
        } else {
            for (a, b) in self.colsum.iter_mut().zip(s.colsum) {
                for (a, b) in a.iter_mut().zip(b) {
                    *a += b;
                }
            }
        }
        if self.kept.is_empty() {
            self.kept = vec![(Vec::new(), Vec::new(), Vec::new()); s.kept.len()];
        }
        for (gi, ((ids, xs, ys), (pick, x, y))) in self.kept.iter_mut().zip(s.kept).enumerate() {
            ids.extend(pick.iter().map(|&i| base + i as u64 * g + gi as u64));
            xs.extend(x.iter());
            ys.extend(y.iter());
        }
        // Raise the shared bound and prune.
        if self.top.len() >= self.m {
            keep_largest(&mut self.top, self.m);
            let m = min_of(&self.top);
            let b = &self.sampler.bounds;
            b.floor.fetch_max(m.max(0.0).to_bits(), Ordering::Relaxed);
            let raised = (f64::from(m) * self.sampler.factor) as f32;
            b.bound.fetch_max(raised.max(0.0).to_bits(), Ordering::Relaxed);
            let bound = f64::from(f32::from_bits(b.bound.load(Ordering::Relaxed)));
            self.cands.retain(|o| f64::from(o.y.abs()) > bound);
            self.prune_rows();
        }
        Ok(())
    }

    /// Adds a sample's input rows to the Gram accumulator (and takes them out of `s`).
    fn add_gram(&mut self, s: &mut SampleStats) -> Result<()> {
        let Some(xs) = s.gram.take() else { return Ok(()) };
        let acc = self.gram.get_or_insert_with(|| xs.iter().map(|x| GramAcc::new(x.ncols())).collect());
        if acc.len() != xs.len() {
            bail!("Gram matrices of {} and {} groups", acc.len(), xs.len());
        }
        for (a, x) in acc.iter_mut().zip(&xs) {
            a.add(x.view())?;
        }
        Ok(())
    }

    fn prune_rows(&mut self) {
        let used: std::collections::BTreeSet<u64> = self.cands.iter().map(|o| o.row).collect();
        self.xrows.retain(|r, _| used.contains(r));
    }

    pub fn finish(mut self) -> Result<LayerStats> {
        keep_largest(&mut self.top, self.m.max(1));
        let q = if self.top.is_empty() { 0.0 } else { f64::from(min_of(&self.top)) };
        let tau = self.sampler.factor * q;
        if q > 0.0 {
            self.cands.retain(|o| f64::from(o.y.abs()) > tau);
        } else {
            // Degenerate distribution (mostly zeros): no meaningful threshold.
            self.cands.clear();
        }
        self.cands.sort_by(|a, b| a.row.cmp(&b.row).then(a.j.cmp(&b.j)));
        self.prune_rows();
        let gram = match self.gram {
            Some(accs) => Some(accs.into_iter().map(GramAcc::finish).collect::<Result<Vec<_>>>()?),
            None => None,
        };
        let mut kept = Vec::with_capacity(self.kept.len());
        for (ids, xs, ys) in self.kept {
            let width = |v: &Vec<f32>| if ids.is_empty() { 0 } else { v.len() / ids.len() };
            let (k, n) = (width(&xs), width(&ys));
            let (x, y) = (Array2::from_shape_vec((ids.len(), k), xs)?, Array2::from_shape_vec((ids.len(), n), ys)?);
            kept.push((ids, x, y));
        }
        Ok(LayerStats {
            rows: self.rows,
            elements: self.elements,
            nonfinite: self.nonfinite,
            abs_max: f64::from(self.abs_max),
            q,
            tau,
            outliers: self.cands,
            xrows: self.xrows,
            gram,
            colsum: self.colsum,
            kept,
            groups: self.sampler.groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use ndarray::{ArrayD, IxDyn};

    /// Two groups: group `gi`'s rows meet only its own columns, row ids are `i·g + gi`, and
    /// the per-group Grams are those of each group's rows.
    #[test]
    fn groups_are_block_diagonal() -> Result<()> {
        let mut r = Rng::new(5);
        let (k, n, rows) = (3usize, 4usize, 6usize);
        let w = Array2::from_shape_fn((k, n), |_| r.normal() as f32);
        let mut xs: Vec<Array2<f32>> =
            (0..2).map(|_| Array2::from_shape_fn((rows, k), |_| r.normal() as f32)).collect();
        xs[1][[4, 2]] = 50.0; // an outlier in group 1, row 4
        let mut acc = LayerAcc::new(1, 0.9, 3.0, true, 2, 2);
        let s = acc.sample(xs.clone(), &w)?;
        acc.merge(s)?;
        let st = acc.finish()?;
        assert!(!st.outliers.is_empty());
        for o in &st.outliers {
            assert_eq!(o.row, 4 * 2 + 1);
            assert!(o.j >= 2, "group 1 owns columns 2 and 3");
            let y: f32 = (0..k).map(|kk| xs[1][[4, kk]] * w[[kk, o.j]]).sum();
            assert!((o.y - y).abs() < 1e-4 * (1.0 + y.abs()), "{} vs {y}", o.y);
        }
        assert_eq!(st.xrows[&9], xs[1].row(4).to_vec());
        let grams = st.gram.expect("gram");
        for (gi, x) in xs.iter().enumerate() {
            let want = x.mapv(f64::from).t().dot(&x.mapv(f64::from));
            for (a, b) in grams[gi].iter().zip(want.iter()) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "group {gi}: {a} vs {b}");
            }
        }
        assert_eq!(st.kept.len(), 2);
        assert_eq!(st.kept[1].0.len(), 2);
        assert!(st.kept[1].0.iter().all(|id| id % 2 == 1));
        Ok(())
    }

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
        let mut acc = LayerAcc::new(samples, 0.9, 2.0, true, 1, 0);
        for x in &xs {
            let s = acc.sample(vec![x.clone().into_shape_with_order((rows, k))?], &w)?;
            acc.merge(s)?;
        }
        let st = acc.finish()?;
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
        // Each sample's Gram is summed in f32.
        let diff = (&st.gram.expect("gram")[0] - &g).mapv(f64::abs).sum();
        assert!(diff < 1e-6 * g.mapv(f64::abs).sum(), "{diff}");
        Ok(())
    }
    #[test]
    fn gram_accumulator_flushes_in_batches_and_matches_the_batch_product() -> Result<()> {
        let mut rng = crate::rng::Rng::new(5);
        let k = 300;
        // 3 × 300 rows: one flush after 512 rows (inside the second chunk), the rest at the end.
        let chunks: Vec<Array2<f32>> =
            (0..3).map(|_| Array2::from_shape_fn((300, k), |_| rng.normal() as f32)).collect();
        let mut acc = GramAcc::new(k);
        for c in &chunks {
            acc.add(c.view())?;
        }
        let g = acc.finish()?;
        let mut want = Array2::<f64>::zeros((k, k));
        for c in &chunks {
            let c = c.mapv(f64::from);
            want += &c.t().dot(&c);
        }
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let err = (&g - &want).mapv(f64::abs).iter().copied().fold(0.0, f64::max);
        assert!(err < 1e-5 * scale, "max error {err} of {scale}");
        assert!((0..k).all(|i| (0..k).all(|j| g[[i, j]] == g[[j, i]])), "symmetric");
        assert!(GramAcc::new(3).add(Array2::<f32>::zeros((2, 4)).view()).is_err());
        Ok(())
    }

    #[test]
    fn mirrored_tiles_equal_the_transpose() {
        let mut rng = crate::rng::Rng::new(3);
        for n in [1usize, 2, 63, 64, 65, 200] {
            let mut g = Array2::from_shape_fn((n, n), |_| rng.normal());
            let upper = g.clone();
            mirror_upper(&mut g);
            for i in 0..n {
                for j in 0..n {
                    let want = if j >= i { upper[[i, j]] } else { upper[[j, i]] };
                    assert_eq!(g[[i, j]].to_bits(), want.to_bits(), "n = {n}, ({i}, {j})");
                }
            }
        }
        // Not standard layout.
        let mut t = Array2::from_shape_fn((3, 3), |(i, j)| (i * 3 + j) as f64).reversed_axes();
        mirror_upper(&mut t);
        assert_eq!(t, ndarray::arr2(&[[0.0, 3.0, 6.0], [3.0, 4.0, 7.0], [6.0, 7.0, 8.0]]));
    }
}
