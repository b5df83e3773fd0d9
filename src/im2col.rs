//! im2col for 2-D convolution: the input patches a Conv multiplies with its weight, as rows of
//! a matrix, so that a convolution of one group is a matrix product.
//!
//! For `Conv(X [N, C, H, W], W [M, C/g, kh, kw])` with `g` groups, strides `s`, dilations `d`
//! and pads (top, left, bottom, right), the output position `p = (n, oy, ox)` of group `gi`
//! reads the patch row
//!
//! `x_p[c·kh·kw + ky·kw + kx] = X[n, gi·C/g + c, oy·s_y − pad_top + ky·d_y, ox·s_x − pad_left + kx·d_x]`
//!
//! (0 outside the input), `K = C/g·kh·kw` elements in the order of the flattened weight
//! `W[m, c, ky, kx]`. With `W_g [K, M/g]` the weights of the group's output channels
//! (`W_g[k, m] = W[gi·M/g + m, k]`), `Y[n, gi·M/g + m, oy, ox] = x_p · W_g[:, m]` (+ bias).
//!
//! Positions are numbered `p = (n·OH + oy)·OW + ox`. [`subsample`] picks a deterministic,
//! spatially spread subset of them; [`ConvGeometry::rows`] gathers the patch rows of a set of
//! positions and [`ConvGeometry::patch`] writes one. No allocation depends on anything but
//! the positions asked for.

use crate::onnx::attr::{describe, NodeAttrs};
use crate::onnx::pb::NodeProto;
use anyhow::{bail, Context, Result};
use ndarray::{Array2, ArrayView4};

/// ONNX `auto_pad`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoPad {
    /// Explicit `pads`.
    NotSet,
    Valid,
    SameUpper,
    SameLower,
}

/// The geometry of a 2-D Conv, independent of the input size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels `C`.
    pub in_channels: usize,
    /// Output channels `M`.
    pub out_channels: usize,
    pub groups: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[s_y, s_x]`.
    pub strides: [usize; 2],
    /// `[d_y, d_x]`.
    pub dilations: [usize; 2],
    /// `[top, left, bottom, right]` (used with [`AutoPad::NotSet`]).
    pub pads: [usize; 4],
    pub auto_pad: AutoPad,
}

/// The geometry resolved for one input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub batch: usize,
    pub in_hw: [usize; 2],
    pub out_hw: [usize; 2],
    /// `[top, left]`.
    pub pad_begin: [usize; 2],
}

impl Resolved {
    /// `N·OH·OW`.
    pub fn positions(&self) -> usize {
        self.batch * self.out_hw[0] * self.out_hw[1]
    }
}

fn pair(v: Option<&[i64]>, default: usize, what: &str, label: &str) -> Result<[usize; 2]> {
    match v {
        None => Ok([default, default]),
        Some([a, b]) if *a >= 1 && *b >= 1 => Ok([*a as usize, *b as usize]),
        Some(v) => bail!("{label}: {what} {v:?} is not two positive integers"),
    }
}

impl ConvGeometry {
    /// Reads a 2-D Conv's attributes; `weight_dims` is `W`'s shape `[M, C/g, kh, kw]`.
    pub fn from_node(node: &NodeProto, weight_dims: &[i64]) -> Result<ConvGeometry> {
        let label = describe(node);
        let &[m, cg, kh, kw] = weight_dims else {
            bail!("{label}: weight of rank {} is not a 2-D convolution kernel", weight_dims.len())
        };
        if m < 1 || cg < 1 || kh < 1 || kw < 1 {
            bail!("{label}: weight shape {weight_dims:?} has empty dimensions");
        }
        let groups = node.attr_int_or("group", 1)?;
        if groups < 1 || m % groups != 0 {
            bail!("{label}: group = {groups} does not divide the {m} output channels");
        }
        let kernel = [kh as usize, kw as usize];
        if let Some(ks) = node.attr_ints("kernel_shape")? {
            if ks != [kh, kw] {
                bail!("{label}: kernel_shape {ks:?} does not match the weight {weight_dims:?}");
            }
        }
        let strides = pair(node.attr_ints("strides")?, 1, "strides", &label)?;
        let dilations = pair(node.attr_ints("dilations")?, 1, "dilations", &label)?;
        let pads = match node.attr_ints("pads")? {
            None => [0; 4],
            Some(&[t, l, b, r]) if t >= 0 && l >= 0 && b >= 0 && r >= 0 => {
                [t as usize, l as usize, b as usize, r as usize]
            }
            Some(p) => bail!("{label}: pads {p:?} are not four non-negative integers"),
        };
        let auto_pad = match node.attr_string("auto_pad")?.as_deref() {
            None | Some("NOTSET") | Some("") => AutoPad::NotSet,
            Some("VALID") => AutoPad::Valid,
            Some("SAME_UPPER") => AutoPad::SameUpper,
            Some("SAME_LOWER") => AutoPad::SameLower,
            Some(o) => bail!("{label}: unknown auto_pad '{o}'"),
        };
        Ok(ConvGeometry {
            in_channels: (cg * groups) as usize,
            out_channels: m as usize,
            groups: groups as usize,
            kernel,
            strides,
            dilations,
            pads,
            auto_pad,
        })
    }

    /// `K = C/g·kh·kw`, the length of a patch row.
    pub fn k(&self) -> usize {
        self.in_channels / self.groups * self.kernel[0] * self.kernel[1]
    }

    /// Output channels per group.
    pub fn group_out(&self) -> usize {
        self.out_channels / self.groups
    }

    /// Output size and padding for an input of shape `[N, C, H, W]`.
    pub fn resolve(&self, shape: &[usize]) -> Result<Resolved> {
        let &[n, c, h, w] = shape else { bail!("conv input of shape {shape:?} is not [N, C, H, W]") };
        if c != self.in_channels {
            bail!("conv input has {c} channels, the weight expects {}", self.in_channels);
        }
        let mut out_hw = [0; 2];
        let mut pad_begin = [0; 2];
        for (a, size) in [h, w].into_iter().enumerate() {
            let eff = (self.kernel[a] - 1) * self.dilations[a] + 1;
            let (begin, total) = match self.auto_pad {
                AutoPad::NotSet => (self.pads[a], self.pads[a] + self.pads[a + 2]),
                AutoPad::Valid => (0, 0),
                AutoPad::SameUpper | AutoPad::SameLower => {
                    let out = size.div_ceil(self.strides[a]);
                    let total = ((out.max(1) - 1) * self.strides[a] + eff).saturating_sub(size);
                    let small = total / 2;
                    (if self.auto_pad == AutoPad::SameUpper { small } else { total - small }, total)
                }
            };
            let padded = size + total;
            if padded < eff {
                bail!("conv input {h}x{w} is smaller than the dilated kernel");
            }
            out_hw[a] = (padded - eff) / self.strides[a] + 1;
            pad_begin[a] = begin;
        }
        Ok(Resolved { batch: n, in_hw: [h, w], out_hw, pad_begin })
    }

    /// Writes the patch row of position `p` for group `group` into `out` (`K` values).
    pub fn patch(&self, x: &ArrayView4<f32>, r: &Resolved, group: usize, p: usize, out: &mut [f32]) {
        let [oh, ow] = r.out_hw;
        let (n, oy, ox) = (p / (oh * ow), (p / ow) % oh, p % ow);
        let [kh, kw] = self.kernel;
        let cg = self.in_channels / self.groups;
        let y0 = (oy * self.strides[0]) as isize - r.pad_begin[0] as isize;
        let x0 = (ox * self.strides[1]) as isize - r.pad_begin[1] as isize;
        let mut idx = 0;
        for c in 0..cg {
            let ch = group * cg + c;
            for ky in 0..kh {
                let iy = y0 + (ky * self.dilations[0]) as isize;
                for kx in 0..kw {
                    let ix = x0 + (kx * self.dilations[1]) as isize;
                    let inside = iy >= 0 && ix >= 0 && (iy as usize) < r.in_hw[0] && (ix as usize) < r.in_hw[1];
                    if let Some(o) = out.get_mut(idx) {
                        *o = if inside { x[[n, ch, iy as usize, ix as usize]] } else { 0.0 };
                    }
                    idx += 1;
                }
            }
        }
    }

    /// The patch rows `[positions.len(), K]` of group `group` for input `x` `[N, C, H, W]`.
    pub fn rows(&self, x: &ArrayView4<f32>, group: usize, positions: &[usize]) -> Result<Array2<f32>> {
        let r = self.resolve(x.shape())?;
        if group >= self.groups {
            bail!("group {group} of a conv with {} groups", self.groups);
        }
        let total = r.positions();
        let k = self.k();
        let mut out = Array2::<f32>::zeros((positions.len(), k));
        for (row, &p) in out.outer_iter_mut().zip(positions) {
            if p >= total {
                bail!("position {p} of a conv output with {total} positions");
            }
            let slice = row.into_slice().context("internal error: im2col row is not contiguous")?;
            self.patch(x, &r, group, p, slice);
        }
        Ok(out)
    }
}

/// At most `max` of the positions `0..total`, deterministic and spread over the whole range
/// (a golden-ratio stride coprime with `total`), sorted. All of them when `total <= max`.
pub fn subsample(total: usize, max: usize) -> Vec<usize> {
    if total <= max {
        return (0..total).collect();
    }
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut step = ((total as f64) * 0.618_033_988_749_895) as usize % total;
    step = step.max(1);
    while gcd(step, total) != 1 {
        step += 1;
    }
    let mut v: Vec<usize> = (0..max).map(|i| (i as u128 * step as u128 % total as u128) as usize).collect();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_int, attr_ints, node};
    use crate::rng::Rng;
    use ndarray::{Array4, Axis};

    /// Direct convolution by the ONNX definition (no bias).
    fn direct(x: &Array4<f32>, w: &Array4<f32>, g: &ConvGeometry) -> Array4<f32> {
        let r = g.resolve(x.shape()).expect("resolve");
        let (m, cg) = (g.out_channels, g.in_channels / g.groups);
        let mg = m / g.groups;
        let mut y = Array4::<f32>::zeros((r.batch, m, r.out_hw[0], r.out_hw[1]));
        for n in 0..r.batch {
            for oc in 0..m {
                let gi = oc / mg;
                for oy in 0..r.out_hw[0] {
                    for ox in 0..r.out_hw[1] {
                        let mut s = 0f32;
                        for c in 0..cg {
                            for ky in 0..g.kernel[0] {
                                for kx in 0..g.kernel[1] {
                                    let iy =
                                        (oy * g.strides[0] + ky * g.dilations[0]) as isize - r.pad_begin[0] as isize;
                                    let ix =
                                        (ox * g.strides[1] + kx * g.dilations[1]) as isize - r.pad_begin[1] as isize;
                                    if iy < 0 || ix < 0 || iy as usize >= r.in_hw[0] || ix as usize >= r.in_hw[1] {
                                        continue;
                                    }
                                    s += x[[n, gi * cg + c, iy as usize, ix as usize]] * w[[oc, c, ky, kx]];
                                }
                            }
                        }
                        y[[n, oc, oy, ox]] = s;
                    }
                }
            }
        }
        y
    }

    fn randn(r: &mut Rng, shape: (usize, usize, usize, usize)) -> Array4<f32> {
        Array4::from_shape_fn(shape, |_| r.normal() as f32)
    }

    /// Patch rows times the group's weight matrix reproduce the direct convolution at every
    /// position, for plain, strided/padded/dilated, grouped, depthwise and SAME-padded convs.
    #[test]
    fn rows_times_weights_is_the_convolution() -> Result<()> {
        let mut rng = Rng::new(7);
        // (C, M, group, kernel, attrs, H, W)
        type Case = (usize, usize, i64, [usize; 2], Vec<crate::onnx::pb::AttributeProto>, usize, usize);
        let cases: Vec<Case> = vec![
            (3, 4, 1, [3, 3], vec![], 6, 5),
            (4, 6, 2, [3, 2], vec![attr_ints("strides", &[2, 1]), attr_ints("pads", &[1, 0, 2, 1])], 7, 6),
            (4, 4, 4, [3, 3], vec![attr_ints("dilations", &[2, 2]), attr_ints("pads", &[2, 2, 2, 2])], 6, 7),
            (6, 3, 3, [2, 3], vec![attr_ints("strides", &[2, 2])], 9, 8),
            (
                2,
                2,
                1,
                [3, 3],
                vec![crate::onnx::builder::attr_string("auto_pad", "SAME_UPPER"), attr_ints("strides", &[2, 2])],
                6,
                5,
            ),
            (2, 2, 1, [2, 2], vec![crate::onnx::builder::attr_string("auto_pad", "SAME_LOWER")], 5, 5),
            (5, 10, 1, [1, 1], vec![], 3, 4),
        ];
        for (c, m, group, kernel, mut attrs, h, w) in cases {
            attrs.push(attr_int("group", group));
            let n = node("Conv", "conv", &["x", "w"], &["y"], attrs);
            let cg = c / group as usize;
            let dims = [m as i64, cg as i64, kernel[0] as i64, kernel[1] as i64];
            let geo = ConvGeometry::from_node(&n, &dims)?;
            assert_eq!(geo.k(), cg * kernel[0] * kernel[1]);
            let x = randn(&mut rng, (2, c, h, w));
            let wt = randn(&mut rng, (m, cg, kernel[0], kernel[1]));
            let want = direct(&x, &wt, &geo);
            let r = geo.resolve(x.shape())?;
            assert_eq!(&want.shape()[2..], &r.out_hw[..]);
            let all: Vec<usize> = (0..r.positions()).collect();
            let mg = geo.group_out();
            for gi in 0..geo.groups {
                let rows = geo.rows(&x.view(), gi, &all)?;
                // W_g [K, M/g]
                let wg = Array2::from_shape_fn((geo.k(), mg), |(k, j)| {
                    wt.index_axis(Axis(0), gi * mg + j).iter().nth(k).copied().expect("k")
                });
                let y = rows.dot(&wg);
                for (p, yrow) in y.outer_iter().enumerate() {
                    let (nn, oy, ox) =
                        (p / (r.out_hw[0] * r.out_hw[1]), (p / r.out_hw[1]) % r.out_hw[0], p % r.out_hw[1]);
                    for (j, &v) in yrow.iter().enumerate() {
                        let e = want[[nn, gi * mg + j, oy, ox]];
                        assert!((v - e).abs() < 1e-4 * (1.0 + e.abs()), "group {gi} pos {p} ch {j}: {v} vs {e}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bad_geometry_is_an_error() {
        let n = node("Conv", "c", &["x", "w"], &["y"], vec![attr_int("group", 3)]);
        assert!(ConvGeometry::from_node(&n, &[4, 1, 3, 3]).is_err()); // 3 does not divide 4
        assert!(ConvGeometry::from_node(&n, &[3, 1, 3]).is_err()); // 1-D kernel
        let n = node("Conv", "c", &["x", "w"], &["y"], vec![attr_ints("strides", &[0, 1])]);
        assert!(ConvGeometry::from_node(&n, &[2, 1, 1, 1]).is_err());
        let n = node("Conv", "c", &["x", "w"], &["y"], vec![]);
        let g = ConvGeometry::from_node(&n, &[2, 3, 5, 5]).expect("geometry");
        assert!(g.resolve(&[1, 3, 4, 4]).is_err()); // input smaller than the kernel
        assert!(g.resolve(&[1, 2, 9, 9]).is_err()); // channel mismatch
        assert!(g.rows(&Array4::<f32>::zeros((1, 3, 5, 5)).view(), 0, &[1]).is_err());
        // position out of range
    }

    #[test]
    fn subsample_is_spread_distinct_and_deterministic() {
        assert_eq!(subsample(5, 10), vec![0, 1, 2, 3, 4]);
        let s = subsample(160 * 160, 1000);
        assert_eq!(s.len(), 1000);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s, subsample(160 * 160, 1000));
        // Every column and most rows of a 160x160 map are hit (no stride aliasing).
        let cols: std::collections::BTreeSet<usize> = s.iter().map(|p| p % 160).collect();
        let rows: std::collections::BTreeSet<usize> = s.iter().map(|p| p / 160).collect();
        assert!(cols.len() > 150 && rows.len() > 150, "{} cols, {} rows", cols.len(), rows.len());
    }
}
