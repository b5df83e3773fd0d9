//! The numerical core: relevance of weight elements to the outlier excess, and the
//! regularized least-squares update of one weight column (closed form with one Cholesky
//! factorization per layer and a Woodbury correction per column). Everything is `f64`.
//!
//! Notation (one layer, `y = x·W`, `W` is `[K, N]`, rows `x_i` of `X` are `[K]`):
//! - an outlier is `(i, j)` with `|y_ij| > τ`, its excess `e_ij = |y_ij| − τ`;
//! - its main contributor `k* = argmax_k x_ik·w_kj·sign(y_ij)`;
//! - relevance `R_kj = Σ_{outliers of column j with k* = k} e_ij / Σ_{outliers of j} e_ij`;
//! - the update `w'_j = w_j − (G + δI + λE_S E_Sᵀ)⁻¹ (λE_S w_S + Xᵀr_j)`, `r_j = X w_j − t_j`,
//!   `t_j = clip(X w_j, −τ, τ)`, minimizes `‖X w − t_j‖² + λ Σ_{k∈S} w_k² + δ‖w − w_j‖²`.

use anyhow::{bail, Result};
use ndarray::Array2;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// One outlier element of a layer's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Outlier {
    /// Global row index (over all calibration rows of the layer).
    pub row: u64,
    /// Output column.
    pub j: usize,
    /// The pre-bias output value `y_ij`.
    pub y: f32,
}

/// A weight element's share of a column's outlier excess.
#[derive(Debug, Clone, PartialEq)]
pub struct Relevance {
    pub k: usize,
    pub j: usize,
    /// `R_kj` in [0, 1].
    pub share: f64,
    /// The column's total excess `Σ e_ij` (for ranking across columns).
    pub column_excess: f64,
}

/// Relevance of weight elements per column: `R_kj` for every `(k, j)` that is the main
/// contributor of at least one outlier. `rows` maps an outlier's row index to its input row
/// `x_i` (`[K]`), `w` is `[K, N]`. Returns, per column with outliers (ascending), the pairs
/// sorted by share (descending, then `k`).
pub fn relevance(
    outliers: &[Outlier],
    rows: &BTreeMap<u64, Vec<f32>>,
    w: &Array2<f32>,
    tau: f64,
) -> Result<BTreeMap<usize, Vec<Relevance>>> {
    let (kdim, ndim) = w.dim();
    // column → (k → excess), column → total excess
    let mut per_col: BTreeMap<usize, (BTreeMap<usize, f64>, f64)> = BTreeMap::new();
    for o in outliers {
        let Some(x) = rows.get(&o.row) else { bail!("internal error: the input row of an outlier was not kept") };
        if x.len() != kdim || o.j >= ndim {
            bail!("internal error: outlier row of length {} for a [{kdim}, {ndim}] weight", x.len());
        }
        let sign = if o.y < 0.0 { -1.0 } else { 1.0 };
        let mut best = (0usize, f64::NEG_INFINITY);
        for (k, &xk) in x.iter().enumerate() {
            let c = f64::from(xk) * f64::from(w[[k, o.j]]) * sign;
            if c > best.1 {
                best = (k, c);
            }
        }
        let e = (f64::from(o.y).abs() - tau).max(0.0);
        let entry = per_col.entry(o.j).or_default();
        *entry.0.entry(best.0).or_default() += e;
        entry.1 += e;
    }
    Ok(per_col
        .into_iter()
        .map(|(j, (ks, total))| {
            let mut v: Vec<Relevance> = ks
                .into_iter()
                .map(|(k, e)| Relevance {
                    k,
                    j,
                    share: if total > 0.0 { e / total } else { 0.0 },
                    column_excess: total,
                })
                .collect();
            v.sort_by(|a, b| b.share.total_cmp(&a.share).then(a.k.cmp(&b.k)));
            (j, v)
        })
        .collect())
}

/// The selected set `S_j`: elements with share ≥ `min_share`, at most `max_count`, largest first.
pub fn select(rel: &[Relevance], min_share: f64, max_count: usize) -> Vec<usize> {
    rel.iter().filter(|r| r.share >= min_share).take(max_count).map(|r| r.k).collect()
}

/// `Σ a_i b_i` with eight independent partial sums (vectorizable; fixed order, so
/// deterministic).
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f64>() + tail
}

/// Lower Cholesky factor `L` (row-major, `L Lᵀ = A`) of a symmetric positive definite matrix.
#[derive(Debug, Clone)]
pub struct Cholesky {
    n: usize,
    l: Vec<f64>,
}

/// Column block width of the blocked factorization.
const CHOL_BLOCK: usize = 96;

/// Rows per product (and per parallel task) of a panel.
const PANEL_ROWS: usize = 128;

/// The inverse of the finished lower-triangular diagonal block `jb..je` of a row-major `n × n`
/// factor, by forward substitution on the identity (`(je − jb)³/6` multiply-adds).
fn lower_inverse(l: &[f64], n: usize, jb: usize, je: usize) -> Array2<f64> {
    let bw = je - jb;
    let at = |r: usize, c: usize| l[(jb + r) * n + jb + c];
    let mut inv = Array2::<f64>::zeros((bw, bw));
    for c in 0..bw {
        for r in c..bw {
            let mut s = if r == c { 1.0 } else { 0.0 };
            for p in c..r {
                s -= at(r, p) * inv[[p, c]];
            }
            inv[[r, c]] = s / at(r, r);
        }
    }
    inv
}

impl Cholesky {
    /// Factors `a` (only its lower triangle is read): right-looking and blocked. For each
    /// block of columns `J = jb..je`, the diagonal block is finished with short contiguous
    /// dot products over `jb..j`, the panel below it by a product with the block's inverse,
    /// and the trailing lower triangle is updated by `A[je.., je..] −= L[je.., J]·L[je.., J]ᵀ`
    /// with one matrix product per block row (most of the `n³/3` flops). Each entry's
    /// summation order depends only on `n`, so the result is deterministic.
    pub fn new(a: &Array2<f64>) -> Result<Cholesky> {
        Cholesky::damped(a, 0.0)
    }

    /// The factor of `a + δI` ([`damped`] without a copy of `a`).
    pub fn damped(a: &Array2<f64>, delta: f64) -> Result<Cholesky> {
        let n = a.nrows();
        if a.ncols() != n {
            bail!("Cholesky needs a square matrix, got {:?}", a.dim());
        }
        let mut l = vec![0f64; n * n];
        for (i, (dst, src)) in l.chunks_mut(n.max(1)).zip(a.outer_iter()).enumerate() {
            for (d, &v) in dst[..=i].iter_mut().zip(src.iter()) {
                *d = v;
            }
            dst[i] += delta;
        }
        let mut jb = 0;
        while jb < n {
            let je = (jb + CHOL_BLOCK).min(n);
            // The diagonal block: s = a_ij − Σ_{jb≤p<j} l_ip l_jp (earlier blocks already
            // subtracted by the trailing updates).
            for j in jb..je {
                let dot_jj = dot(&l[j * n + jb..j * n + j], &l[j * n + jb..j * n + j]);
                let s = l[j * n + j] - dot_jj;
                if s.is_nan() || s <= 0.0 {
                    bail!("the regularized Gram matrix is not positive definite (pivot {j}: {s:e})");
                }
                let d = s.sqrt();
                l[j * n + j] = d;
                for i in j + 1..je {
                    let (ri, rj) = (i * n, j * n);
                    let t = dot(&l[ri + jb..ri + j], &l[rj + jb..rj + j]);
                    l[ri + j] = (l[ri + j] - t) / d;
                }
            }
            // The panel below it: `L[je.., J] = A[je.., J]·L_JJ⁻ᵀ`, one matrix product per chunk
            // of rows (in parallel) with the inverse of the diagonal block.
            if je < n {
                let inv = lower_inverse(&l, n, jb, je);
                let (_, below) = l.split_at_mut(je * n);
                below.par_chunks_mut(n * PANEL_ROWS).try_for_each(|rows| -> Result<()> {
                    let mut rows = ndarray::ArrayViewMut2::from_shape((rows.len() / n, n), rows)?;
                    let a = rows.slice(ndarray::s![.., jb..je]).to_owned();
                    crate::linalg::mul_into(&mut rows.slice_mut(ndarray::s![.., jb..je]), None, 1.0, a.view(), inv.t())
                })?;
            }
            // Trailing update of the lower triangle, one block row at a time.
            if je < n {
                let full = ndarray::ArrayViewMut2::from_shape((n, n), &mut l)?;
                let (left, right) = full.split_at(ndarray::Axis(1), je);
                let panel = left.slice(ndarray::s![je.., jb..]);
                let mut trailing = right.slice_move(ndarray::s![je.., ..]);
                let rows: Vec<_> = trailing.axis_chunks_iter_mut(ndarray::Axis(0), CHOL_BLOCK).collect();
                rows.into_par_iter().enumerate().try_for_each(|(r, mut c)| {
                    let (rb, re) = (r * CHOL_BLOCK, (r * CHOL_BLOCK + c.nrows()));
                    let mut c = c.slice_mut(ndarray::s![.., ..re]);
                    let rows = panel.slice(ndarray::s![rb..re, ..]);
                    let cols = panel.slice(ndarray::s![..re, ..]);
                    crate::linalg::mul_into(&mut c, Some(1.0), -1.0, rows, cols.t())
                })?;
            }
            jb = je;
        }
        // The strict upper triangle holds update by-products: clear it.
        for i in 0..n {
            l[i * n + i + 1..(i + 1) * n].fill(0.0);
        }
        Ok(Cholesky { n, l })
    }

    pub fn dim(&self) -> usize {
        self.n
    }

    /// The factor `L`, row-major (`n × n`, zero above the diagonal).
    pub fn lower(self) -> Vec<f64> {
        self.l
    }

    /// Solves `A z = b`.
    pub fn solve(&self, b: &[f64]) -> Vec<f64> {
        let n = self.n;
        let mut z = b.to_vec();
        for i in 0..n {
            let row = &self.l[i * n..i * n + i];
            let s = dot(row, &z[..i]);
            z[i] = (z[i] - s) / self.l[i * n + i];
        }
        // Lᵀ z = y, column by column: once z_i is known, row i of L (contiguous) removes its
        // term from every earlier entry.
        for i in (0..n).rev() {
            z[i] /= self.l[i * n + i];
            let zi = z[i];
            for (zp, &lip) in z[..i].iter_mut().zip(&self.l[i * n..i * n + i]) {
                *zp -= lip * zi;
            }
        }
        z
    }
}

/// Solves `(A + λ E_S E_Sᵀ) d = b` given the factor of `A`, with the Woodbury identity:
/// `d = z − Z (I/λ + Z_S)⁻¹ z_S`, `z = A⁻¹b`, `Z = A⁻¹E_S` (columns cached in `inv_cols`).
pub fn woodbury_solve(
    chol: &Cholesky,
    inv_cols: &mut BTreeMap<usize, Vec<f64>>,
    s: &[usize],
    lambda: f64,
    b: &[f64],
) -> Result<Vec<f64>> {
    let n = chol.dim();
    let mut z = chol.solve(b);
    if s.is_empty() || lambda <= 0.0 {
        return Ok(z);
    }
    for &k in s {
        if k >= n {
            bail!("internal error: selected index {k} out of range {n}");
        }
        inv_cols.entry(k).or_insert_with(|| {
            let mut e = vec![0f64; n];
            e[k] = 1.0;
            chol.solve(&e)
        });
    }
    let m = s.len();
    let mut mat = vec![0f64; m * m];
    for (a, &ka) in s.iter().enumerate() {
        for (c, &kc) in s.iter().enumerate() {
            mat[a * m + c] = inv_cols[&kc][ka] + if a == c { 1.0 / lambda } else { 0.0 };
        }
    }
    let rhs: Vec<f64> = s.iter().map(|&k| z[k]).collect();
    let u = dense_solve(&mut mat, rhs, m)?;
    for (c, &kc) in s.iter().enumerate() {
        let col = &inv_cols[&kc];
        for (zi, ci) in z.iter_mut().zip(col) {
            *zi -= ci * u[c];
        }
    }
    Ok(z)
}

/// Gaussian elimination with partial pivoting on a row-major `n × n` matrix.
pub fn dense_solve(a: &mut [f64], mut b: Vec<f64>, n: usize) -> Result<Vec<f64>> {
    for col in 0..n {
        let piv = (col..n).max_by(|&x, &y| a[x * n + col].abs().total_cmp(&a[y * n + col].abs())).unwrap_or(col);
        if a[piv * n + col].abs() < 1e-300 {
            bail!("singular system");
        }
        if piv != col {
            for c in 0..n {
                a.swap(piv * n + c, col * n + c);
            }
            b.swap(piv, col);
        }
        for r in col + 1..n {
            let f = a[r * n + col] / a[col * n + col];
            if f != 0.0 {
                for c in col..n {
                    a[r * n + c] -= f * a[col * n + c];
                }
                b[r] -= f * b[col];
            }
        }
    }
    let mut x = vec![0f64; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|c| a[r * n + c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r * n + r];
    }
    Ok(x)
}

/// The per-column change `d_j = w_j − w'_j` of the regularized solve.
///
/// `xtr` is `Xᵀr_j` (only outlier rows contribute), `w` the column `w_j`, `s` the selected set.
pub fn column_update(
    chol: &Cholesky,
    inv_cols: &mut BTreeMap<usize, Vec<f64>>,
    s: &[usize],
    lambda: f64,
    w: &[f64],
    xtr: &[f64],
) -> Result<Vec<f64>> {
    let mut b = xtr.to_vec();
    for &k in s {
        if let (Some(bk), Some(wk)) = (b.get_mut(k), w.get(k)) {
            *bk += lambda * wk;
        }
    }
    woodbury_solve(chol, inv_cols, s, lambda, &b)
}

/// `A = G + δI`.
pub fn damped(g: &Array2<f64>, delta: f64) -> Array2<f64> {
    let mut a = g.clone();
    for i in 0..a.nrows() {
        a[[i, i]] += delta;
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn randn(r: &mut Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| r.normal()).collect()
    }

    /// The closed form equals the dense solution of the normal equations of
    /// `‖Xw − t‖² + λ Σ_{k∈S} w_k² + δ‖w − w0‖²`.
    #[test]
    fn closed_form_matches_dense_normal_equations() -> Result<()> {
        let mut r = Rng::new(7);
        let (rows, k) = (40usize, 12usize);
        let x = Array2::from_shape_vec((rows, k), randn(&mut r, rows * k))?;
        let mut w0 = randn(&mut r, k);
        w0[3] = 6.0; // a dominant weight
        let mut xr = x.row(5).to_vec();
        xr[3] = 5.0;
        let mut x = x;
        x.row_mut(5).assign(&ndarray::Array1::from(xr));
        let y: Vec<f64> = (0..rows).map(|i| (0..k).map(|c| x[[i, c]] * w0[c]).sum()).collect();
        let tau = 4.0;
        let t: Vec<f64> = y.iter().map(|v| v.clamp(-tau, tau)).collect();
        let g = x.t().dot(&x);
        let trace: f64 = (0..k).map(|i| g[[i, i]]).sum::<f64>() / k as f64;
        let (lambda, delta) = (trace, trace);
        let s = vec![3usize, 7];

        // Closed form.
        let chol = Cholesky::new(&damped(&g, delta))?;
        let mut cache = BTreeMap::new();
        let resid: Vec<f64> = y.iter().zip(&t).map(|(a, b)| a - b).collect();
        let xtr: Vec<f64> = (0..k).map(|c| (0..rows).map(|i| x[[i, c]] * resid[i]).sum()).collect();
        let d = column_update(&chol, &mut cache, &s, lambda, &w0, &xtr)?;
        let w_closed: Vec<f64> = w0.iter().zip(&d).map(|(a, b)| a - b).collect();

        // Brute force: (G + δI + λ E_S E_Sᵀ) w = Xᵀt + δ w0.
        let mut a = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                a[i * k + j] = g[[i, j]] + if i == j { delta } else { 0.0 };
            }
        }
        for &q in &s {
            a[q * k + q] += lambda;
        }
        let rhs: Vec<f64> = (0..k).map(|c| (0..rows).map(|i| x[[i, c]] * t[i]).sum::<f64>() + delta * w0[c]).collect();
        let w_dense = dense_solve(&mut a, rhs, k)?;
        for (a, b) in w_closed.iter().zip(&w_dense) {
            assert!((a - b).abs() < 1e-9 * (1.0 + b.abs()), "{w_closed:?} vs {w_dense:?}");
        }
        // The outlier shrinks and the selected weight moves toward zero.
        let y_new: f64 = (0..k).map(|c| x[[5, c]] * w_closed[c]).sum();
        assert!(y_new.abs() < y[5].abs(), "{} -> {y_new}", y[5]);
        assert!(w_closed[3].abs() < w0[3].abs());

        // Without a selection the update is the plain damped least-squares one.
        let d0 = column_update(&chol, &mut cache, &[], lambda, &w0, &xtr)?;
        let mut a = damped(&g, delta).into_raw_vec_and_offset().0;
        let w_plain = dense_solve(&mut a, xtr.clone(), k)?;
        for (a, b) in d0.iter().zip(&w_plain) {
            assert!((a - b).abs() < 1e-9 * (1.0 + b.abs()));
        }
        Ok(())
    }

    /// The blocked factorization (several blocks, a ragged last one) reproduces `A` and
    /// solves against dense elimination.
    #[test]
    fn blocked_cholesky_matches_brute_force() -> Result<()> {
        let mut r = Rng::new(11);
        let (rows, k) = (300usize, 2 * CHOL_BLOCK + 37);
        let x = Array2::from_shape_vec((rows, k), randn(&mut r, rows * k))?;
        let g = x.t().dot(&x);
        let a = damped(&g, 0.5);
        let chol = Cholesky::new(&a)?;
        // Shifting the diagonal while copying gives the same factor.
        assert_eq!(Cholesky::damped(&g, 0.5)?.l, chol.l);
        let l = Array2::from_shape_vec((k, k), chol.l.clone())?;
        for i in 0..k {
            assert!(l.row(i).iter().skip(i + 1).all(|&v| v == 0.0), "row {i} is not lower triangular");
        }
        let back = l.dot(&l.t());
        let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (p, q) in back.iter().zip(a.iter()) {
            assert!((p - q).abs() < 1e-10 * scale, "{p} vs {q}");
        }
        let b = randn(&mut r, k);
        let z = chol.solve(&b);
        let mut dense = a.clone().into_raw_vec_and_offset().0;
        let want = dense_solve(&mut dense, b, k)?;
        for (p, q) in z.iter().zip(&want) {
            assert!((p - q).abs() < 1e-8 * (1.0 + q.abs()), "{p} vs {q}");
        }
        Ok(())
    }

    #[test]
    fn cholesky_rejects_indefinite_matrices() {
        let a = Array2::from_shape_vec((2, 2), vec![1.0, 2.0, 2.0, 1.0]).expect("shape");
        assert!(Cholesky::new(&a).is_err());
    }

    #[test]
    fn relevance_credits_the_dominant_term() -> Result<()> {
        // K = 4, N = 2. Column 1 has two outliers: one dominated by k = 2, one by k = 0.
        let w = Array2::from_shape_vec((4, 2), vec![0.1, 1.0, 0.2, 0.1, 0.3, 5.0, 0.0, -0.2])?;
        let mut rows = BTreeMap::new();
        rows.insert(10u64, vec![0.5f32, 1.0, 3.0, 1.0]); // y_1 = 0.5 + 0.1 + 15 − 0.2 = 15.4
        rows.insert(11u64, vec![-9.0f32, 0.0, 0.1, 0.0]); // y_1 = −9 + 0.5 = −8.5 → sign −: k = 0
        let outliers = vec![Outlier { row: 10, j: 1, y: 15.4 }, Outlier { row: 11, j: 1, y: -8.5 }];
        let tau = 4.0;
        let rel = relevance(&outliers, &rows, &w, tau)?;
        let col = &rel[&1];
        let (e1, e2) = (15.4f64 - 4.0, 8.5f64 - 4.0);
        assert_eq!(col.len(), 2);
        assert_eq!(col[0].k, 2);
        assert!((col[0].share - e1 / (e1 + e2)).abs() < 1e-6);
        assert_eq!(col[1].k, 0);
        assert!((col[1].share - e2 / (e1 + e2)).abs() < 1e-6);
        assert!((col[0].share + col[1].share - 1.0).abs() < 1e-12);
        assert_eq!(select(col, 0.1, 8), vec![2, 0]);
        assert_eq!(select(col, 0.5, 8), vec![2]);
        assert_eq!(select(col, 0.1, 1), vec![2]);
        // A missing row is an error, not a panic.
        assert!(relevance(&[Outlier { row: 99, j: 0, y: 9.0 }], &rows, &w, tau).is_err());
        Ok(())
    }
}
