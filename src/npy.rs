//! NumPy `.npy` parsing and serialization and `.npz` archive reading and writing: the
//! calibration data format. Hand-written header parsing (format versions 1–3), the element
//! types onnxq handles, either byte order and Fortran-ordered arrays.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{ArrayD, IxDyn};

use crate::array::ArrayData;
use crate::onnx::tensor::f16_to_f32;

const MAGIC: &[u8] = b"\x93NUMPY";

/// A value of the Python literal subset used in `.npy` headers.
#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Str(String),
    Bool(bool),
    Int(u64),
    None,
    Seq(Vec<Lit>),
    Dict(Vec<(Lit, Lit)>),
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    /// Nesting depth, bounded so hostile headers cannot exhaust the stack.
    depth: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn err(&self, msg: &str) -> anyhow::Error {
        anyhow!("{msg} at byte {} of the header", self.pos)
    }

    /// Items up to `close`, separated by commas, trailing comma allowed.
    fn items(&mut self, close: u8, dict: bool) -> Result<Vec<(Lit, Lit)>> {
        self.depth += 1;
        if self.depth > 16 {
            return Err(self.err("nesting too deep"));
        }
        let out = self.items_inner(close, dict);
        self.depth -= 1;
        out
    }

    fn items_inner(&mut self, close: u8, dict: bool) -> Result<Vec<(Lit, Lit)>> {
        let mut out = Vec::new();
        loop {
            if self.eat(close) {
                return Ok(out);
            }
            let k = self.value()?;
            let v = if dict {
                if !self.eat(b':') {
                    return Err(self.err("expected ':'"));
                }
                self.value()?
            } else {
                Lit::None
            };
            out.push((k, v));
            if !self.eat(b',') {
                if self.eat(close) {
                    return Ok(out);
                }
                return Err(self.err(&format!("expected ',' or '{}'", close as char)));
            }
        }
    }

    fn value(&mut self) -> Result<Lit> {
        match self.peek() {
            Some(b'{') => {
                self.pos += 1;
                Ok(Lit::Dict(self.items(b'}', true)?))
            }
            Some(c @ (b'(' | b'[')) => {
                self.pos += 1;
                let close = if c == b'(' { b')' } else { b']' };
                let items = self.items(close, false)?;
                Ok(Lit::Seq(items.into_iter().map(|(k, _)| k).collect()))
            }
            Some(q @ (b'\'' | b'"')) => {
                self.pos += 1;
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos] != q {
                    if self.s[self.pos] == b'\\' {
                        return Err(self.err("escapes in strings are not supported"));
                    }
                    self.pos += 1;
                }
                if self.pos >= self.s.len() {
                    return Err(self.err("unterminated string"));
                }
                let text = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
                self.pos += 1;
                Ok(Lit::Str(text))
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                let v = text.parse::<u64>().map_err(|_| self.err(&format!("integer {text} is too large")))?;
                // Python 2 long suffix, as in `(3L, 4L)`.
                if self.s.get(self.pos) == Some(&b'L') {
                    self.pos += 1;
                }
                Ok(Lit::Int(v))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_alphanumeric() {
                    self.pos += 1;
                }
                match &self.s[start..self.pos] {
                    b"True" => Ok(Lit::Bool(true)),
                    b"False" => Ok(Lit::Bool(false)),
                    b"None" => Ok(Lit::None),
                    w => Err(self.err(&format!("unexpected word '{}'", String::from_utf8_lossy(w)))),
                }
            }
            Some(c) => Err(self.err(&format!("unexpected character '{}'", c as char))),
            None => Err(self.err("unexpected end")),
        }
    }
}

/// Element type of an `.npy` file.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    F2,
    F4,
    F8,
    I1,
    I2,
    I4,
    I8,
    U1,
    U2,
    U4,
    U8,
    B1,
}

impl Kind {
    fn size(self) -> usize {
        match self {
            Kind::I1 | Kind::U1 | Kind::B1 => 1,
            Kind::F2 | Kind::I2 | Kind::U2 => 2,
            Kind::F4 | Kind::I4 | Kind::U4 => 4,
            Kind::F8 | Kind::I8 | Kind::U8 => 8,
        }
    }
}

/// Parses a dtype descriptor like `<f4` into its kind and whether it is big-endian.
fn parse_descr(d: &str) -> Result<(Kind, bool)> {
    let (order, code) = match d.as_bytes().first() {
        Some(b'<' | b'>' | b'|' | b'=') => d.split_at(1),
        _ => ("=", d),
    };
    let kind = match code {
        "f2" | "e" => Kind::F2,
        "f4" | "f" => Kind::F4,
        "f8" | "d" => Kind::F8,
        "i1" | "b" => Kind::I1,
        "i2" | "h" => Kind::I2,
        "i4" | "i" => Kind::I4,
        "i8" | "q" => Kind::I8,
        "u1" | "B" => Kind::U1,
        "u2" | "H" => Kind::U2,
        "u4" | "I" => Kind::U4,
        "u8" | "Q" => Kind::U8,
        "b1" | "?" => Kind::B1,
        _ => bail!("unsupported dtype '{d}' (supported: f2 f4 f8 i1 i2 i4 i8 u1 u2 u4 u8 b1)"),
    };
    let big = match order {
        ">" => true,
        "<" | "|" => false,
        _ => cfg!(target_endian = "big"),
    };
    Ok((kind, big))
}

struct Header {
    kind: Kind,
    big_endian: bool,
    fortran: bool,
    shape: Vec<usize>,
    data_offset: usize,
}

fn parse_header(bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        bail!("not a .npy file (bad magic)");
    }
    let major = bytes[6];
    let (len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                bail!("truncated header");
            }
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (usize::try_from(len).context("header length overflows")?, 12)
        }
        v => bail!("unsupported .npy format version {v}.{}", bytes[7]),
    };
    let end = start
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .with_context(|| format!("truncated header: declares {len} bytes, file has {}", bytes.len() - start))?;
    let text = &bytes[start..end];
    let mut p = Parser { s: text, pos: 0, depth: 0 };
    let dict = match p.value().context("bad header")? {
        Lit::Dict(d) => d,
        other => bail!("bad header: expected a dict, found {other:?}"),
    };
    if p.peek().is_some() {
        return Err(p.err("trailing characters after the dict")).context("bad header");
    }
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (k, v) in dict {
        let Lit::Str(k) = k else {
            bail!("bad header: non-string key {k:?}");
        };
        match (k.as_str(), v) {
            ("descr", Lit::Str(d)) => descr = Some(d),
            ("descr", other) => {
                bail!("unsupported dtype {other:?}: structured arrays are not supported")
            }
            ("fortran_order", Lit::Bool(b)) => fortran = Some(b),
            ("shape", Lit::Seq(dims)) => {
                let dims = dims
                    .into_iter()
                    .map(|d| match d {
                        Lit::Int(v) => usize::try_from(v).map_err(|_| anyhow!("dim {v} is too large")),
                        other => Err(anyhow!("bad header: shape entry {other:?} is not an integer")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                shape = Some(dims);
            }
            (k @ ("fortran_order" | "shape"), v) => bail!("bad header: bad '{k}' value {v:?}"),
            _ => {}
        }
    }
    let descr = descr.context("bad header: no 'descr'")?;
    let (kind, big_endian) = parse_descr(&descr)?;
    Ok(Header {
        kind,
        big_endian,
        fortran: fortran.context("bad header: no 'fortran_order'")?,
        shape: shape.context("bad header: no 'shape'")?,
        data_offset: end,
    })
}

fn decode<const N: usize, T>(data: &[u8], big: bool, f: impl Fn([u8; N]) -> T) -> Vec<T> {
    let word = |c: &[u8]| {
        let mut b = [0u8; N];
        b.copy_from_slice(c);
        b
    };
    // Two loops, so that the common little-endian one is a plain conversion that vectorizes.
    if big {
        data.chunks_exact(N)
            .map(|c| {
                let mut b = word(c);
                b.reverse();
                f(b)
            })
            .collect()
    } else {
        data.chunks_exact(N).map(|c| f(word(c))).collect()
    }
}

fn build<T: Clone>(shape: &[usize], fortran: bool, v: Vec<T>) -> Result<ArrayD<T>> {
    if fortran {
        let rev: Vec<usize> = shape.iter().rev().copied().collect();
        let a = ArrayD::from_shape_vec(IxDyn(&rev), v)
            .with_context(|| format!("cannot build an array of shape {shape:?}"))?
            .reversed_axes();
        Ok(a.as_standard_layout().into_owned())
    } else {
        ArrayD::from_shape_vec(IxDyn(shape), v).with_context(|| format!("cannot build an array of shape {shape:?}"))
    }
}

fn read_npy_inner(bytes: &[u8]) -> Result<ArrayData> {
    let h = parse_header(bytes)?;
    let mut count: usize = 1;
    for &d in &h.shape {
        count = count
            .checked_mul(d)
            .filter(|&c| c <= isize::MAX as usize)
            .with_context(|| format!("shape {:?} overflows", h.shape))?;
    }
    let nbytes =
        count.checked_mul(h.kind.size()).with_context(|| format!("byte size of shape {:?} overflows", h.shape))?;
    let data = &bytes[h.data_offset..];
    if data.len() < nbytes {
        bail!("truncated data: shape {:?} needs {nbytes} bytes, found {}", h.shape, data.len());
    }
    if data.len() > nbytes {
        bail!("{} bytes of trailing data after the {nbytes} bytes of shape {:?}", data.len() - nbytes, h.shape);
    }
    let (s, f, be) = (&h.shape[..], h.fortran, h.big_endian);
    Ok(match h.kind {
        Kind::F4 => ArrayData::F32(build(s, f, decode(data, be, f32::from_le_bytes))?),
        Kind::F8 => ArrayData::F64(build(s, f, decode(data, be, f64::from_le_bytes))?),
        Kind::F2 => ArrayData::F32(build(s, f, decode(data, be, |b| f16_to_f32(u16::from_le_bytes(b))))?),
        Kind::I8 => ArrayData::I64(build(s, f, decode(data, be, i64::from_le_bytes))?),
        Kind::I4 => ArrayData::I32(build(s, f, decode(data, be, i32::from_le_bytes))?),
        Kind::I2 => ArrayData::I32(build(s, f, decode(data, be, |b| i16::from_le_bytes(b) as i32))?),
        Kind::U2 => ArrayData::I32(build(s, f, decode(data, be, |b| u16::from_le_bytes(b) as i32))?),
        Kind::U4 => ArrayData::I64(build(s, f, decode(data, be, |b| u32::from_le_bytes(b) as i64))?),
        Kind::U8 => {
            let v = decode(data, be, u64::from_le_bytes)
                .into_iter()
                .map(|x| i64::try_from(x).map_err(|_| anyhow!("uint64 value {x} does not fit int64")))
                .collect::<Result<Vec<_>>>()?;
            ArrayData::I64(build(s, f, v)?)
        }
        Kind::I1 => ArrayData::I8(build(s, f, data.iter().map(|&b| b as i8).collect())?),
        Kind::U1 => ArrayData::U8(build(s, f, data.to_vec())?),
        Kind::B1 => ArrayData::Bool(build(s, f, data.iter().map(|&b| b != 0).collect())?),
    })
}

/// Parses one `.npy` file. `what` names it in errors (a path, or `archive.npz:key`).
/// int16/uint16 become `I32`, uint32 `I64`, uint64 `I64` when every value fits,
/// float16 `F32`.
pub fn read_npy(bytes: &[u8], what: &str) -> Result<ArrayData> {
    read_npy_inner(bytes).with_context(|| format!("reading {what}"))
}

fn shape_repr(shape: &[usize]) -> String {
    match shape {
        [] => "()".into(),
        [d] => format!("({d},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    }
}

/// Serializes an array as a `.npy` file (version 1 unless the header needs version 2,
/// header padded so the data starts at a multiple of 64 bytes, C order, little-endian).
pub fn write_npy(a: &ArrayData) -> Vec<u8> {
    let descr = match a {
        ArrayData::F32(_) => "<f4",
        ArrayData::F64(_) => "<f8",
        ArrayData::I64(_) => "<i8",
        ArrayData::I32(_) => "<i4",
        ArrayData::I8(_) => "|i1",
        ArrayData::U8(_) => "|u1",
        ArrayData::Bool(_) => "|b1",
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {}, }}", shape_repr(a.shape()));
    // Header text is the dict, space padding and a final newline.
    let padded = |prefix: usize| (prefix + dict.len() + 1).div_ceil(64) * 64;
    let v1 = padded(10) - 10 <= u16::MAX as usize;
    let prefix = if v1 { 10 } else { 12 };
    let total = padded(prefix);
    let hlen = total - prefix;
    let mut out = Vec::with_capacity(total + a.len() * 8);
    out.extend_from_slice(MAGIC);
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(hlen as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(hlen as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    match a {
        ArrayData::F32(a) => a.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        ArrayData::F64(a) => a.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        ArrayData::I64(a) => a.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        ArrayData::I32(a) => a.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        ArrayData::I8(a) => out.extend(a.iter().map(|&v| v as u8)),
        ArrayData::U8(a) => out.extend(a.iter().copied()),
        ArrayData::Bool(a) => out.extend(a.iter().map(|&v| v as u8)),
    }
    out
}

/// Reads every array of an `.npz` archive, in archive order. Keys are the entry names
/// without their `.npy` suffix.
pub fn read_npz(path: &Path) -> Result<Vec<(String, ArrayData)>> {
    let shown = path.display();
    let file = File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{shown} is not a valid .npz (zip) archive"))?;
    let mut out: Vec<(String, ArrayData)> = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).with_context(|| format!("{shown}: cannot read archive entry #{i}"))?;
        if entry.is_dir() {
            continue;
        }
        let entry_name = entry.name().to_string();
        let key = entry_name.strip_suffix(".npy").unwrap_or(&entry_name).to_string();
        let what = format!("{shown}:{key}");
        // The declared size is untrusted: cap the up-front reservation.
        let mut bytes = Vec::with_capacity(entry.size().min(1 << 26) as usize);
        entry.read_to_end(&mut bytes).with_context(|| format!("{what}: corrupt archive entry"))?;
        if out.iter().any(|(k, _)| *k == key) {
            bail!("{shown}: duplicate entry '{key}'");
        }
        let array = read_npy(&bytes, &what)?;
        out.push((key, array));
    }
    Ok(out)
}

/// Writes arrays as an uncompressed `.npz` archive (`name.npy` entries in the given order).
pub fn write_npz(path: &Path, arrays: &[(&str, &ArrayData)]) -> Result<()> {
    let shown = path.display();
    let file = File::create(path).with_context(|| format!("cannot create {shown}"))?;
    let mut zip = zip::ZipWriter::new(BufWriter::new(file));
    for (name, a) in arrays {
        let bytes = write_npy(a);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(bytes.len() as u64 >= u32::MAX as u64);
        zip.start_file(format!("{name}.npy"), opts).with_context(|| format!("{shown}: cannot add entry '{name}'"))?;
        zip.write_all(&bytes).with_context(|| format!("{shown}: cannot write entry '{name}'"))?;
    }
    let mut w = zip.finish().with_context(|| format!("{shown}: cannot finish the archive"))?;
    w.flush().with_context(|| format!("cannot write {shown}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2, ArrayD, IxDyn};

    fn all_types() -> Vec<(&'static str, ArrayData)> {
        vec![
            ("f32", ArrayData::F32(arr2(&[[1.0f32, -2.5, 3.0], [4.0, 5.0, f32::MIN]]).into_dyn())),
            ("f64", ArrayData::F64(arr1(&[1.0f64, -2.5, 1e300]).into_dyn())),
            ("i64", ArrayData::I64(arr1(&[i64::MIN, 0, i64::MAX]).into_dyn())),
            ("i32", ArrayData::I32(arr2(&[[i32::MIN], [i32::MAX]]).into_dyn())),
            ("i8", ArrayData::I8(arr1(&[-128i8, 0, 127]).into_dyn())),
            ("u8", ArrayData::U8(arr1(&[0u8, 128, 255]).into_dyn())),
            ("bool", ArrayData::Bool(arr1(&[true, false]).into_dyn())),
            ("scalar", ArrayData::F32(ArrayD::from_elem(IxDyn(&[]), 7.0))),
            ("empty", ArrayData::I64(ArrayD::from_shape_vec(IxDyn(&[2, 0]), vec![]).unwrap())),
        ]
    }

    #[test]
    fn npy_round_trip_and_alignment() {
        for (name, a) in all_types() {
            let bytes = write_npy(&a);
            let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!((10 + hlen) % 64, 0, "{name}");
            assert_eq!(bytes[9 + hlen], b'\n');
            assert_eq!(read_npy(&bytes, name).unwrap(), a, "{name}");
        }
    }

    #[test]
    fn npz_round_trip_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npz");
        let arrays = all_types();
        let refs: Vec<(&str, &ArrayData)> = arrays.iter().map(|(n, a)| (*n, a)).collect();
        write_npz(&path, &refs).unwrap();
        let back = read_npz(&path).unwrap();
        let expect: Vec<(String, ArrayData)> = arrays.into_iter().map(|(n, a)| (n.to_string(), a)).collect();
        assert_eq!(back, expect);
    }

    #[test]
    fn npz_deflated_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.npz");
        let a = ArrayData::F32(ArrayD::from_elem(IxDyn(&[100, 10]), 0.5));
        {
            let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
            let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
            zip.start_file("x.npy", opts).unwrap();
            zip.write_all(&write_npy(&a)).unwrap();
            zip.start_file("no_suffix", opts).unwrap();
            zip.write_all(&write_npy(&a)).unwrap();
            zip.finish().unwrap();
        }
        let back = read_npz(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0], ("x".to_string(), a.clone()));
        assert_eq!(back[1].0, "no_suffix");
    }

    fn handmade(version: u8, header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[version, 0]);
        if version == 1 {
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn header_variants() {
        let data = f32s(&[1.0, 2.0, 3.0]);
        let a =
            read_npy(&handmade(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }\n", &data), "v2").unwrap();
        assert_eq!(a, ArrayData::F32(arr1(&[1.0f32, 2.0, 3.0]).into_dyn()));
        let a = read_npy(&handmade(3, "{\"shape\": (3,), \"fortran_order\": False, \"descr\": \"<f4\"}", &data), "v3")
            .unwrap();
        assert_eq!(a.shape(), &[3]);

        let a =
            read_npy(&handmade(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", &f32s(&[9.0])), "scalar")
                .unwrap();
        assert_eq!(a, ArrayData::F32(ArrayD::from_elem(IxDyn(&[]), 9.0)));

        // Column-major 2x3 [[1,2,3],[4,5,6]] is stored 1,4,2,5,3,6.
        let a = read_npy(
            &handmade(
                1,
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
                &f32s(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]),
            ),
            "fortran",
        )
        .unwrap();
        let expect = arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]).into_dyn();
        assert_eq!(a, ArrayData::F32(expect.clone()));
        assert!(a.as_f32().unwrap().is_standard_layout());

        // Big-endian, python 2 longs.
        let be: Vec<u8> = [1i32, -2].iter().flat_map(|v| v.to_be_bytes()).collect();
        let a =
            read_npy(&handmade(1, "{'descr': '>i4', 'fortran_order': False, 'shape': (1L, 2L), }", &be), "be").unwrap();
        assert_eq!(a, ArrayData::I32(arr2(&[[1, -2]]).into_dyn()));

        // float16 and uint64.
        let h: Vec<u8> = [0x3c00u16, 0x0001].iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = read_npy(&handmade(1, "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }", &h), "f2").unwrap();
        assert_eq!(a, ArrayData::F32(arr1(&[1.0, 2f32.powi(-24)]).into_dyn()));
        let u: Vec<u8> = [5u64, 6].iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = read_npy(&handmade(1, "{'descr': '<u8', 'fortran_order': False, 'shape': (2,), }", &u), "u8").unwrap();
        assert_eq!(a, ArrayData::I64(arr1(&[5, 6]).into_dyn()));
    }

    fn err(bytes: &[u8]) -> String {
        format!("{:#}", read_npy(bytes, "f.npy").unwrap_err())
    }

    #[test]
    fn bad_files_are_errors() {
        let ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
        let e = err(&handmade(1, ok, &f32s(&[1.0, 2.0])));
        assert!(e.contains("f.npy") && e.contains("truncated data"), "{e}");
        let e = err(&handmade(1, ok, &f32s(&[1.0, 2.0, 3.0, 4.0])));
        assert!(e.contains("trailing"), "{e}");
        assert!(err(b"PK\x03\x04 not npy").contains("bad magic"));
        assert!(err(b"\x93NUM").contains("bad magic"));
        assert!(err(&handmade(4, ok, &[])).contains("version 4"));
        let mut short = handmade(1, ok, &[]);
        short.truncate(20);
        assert!(err(&short).contains("truncated header"));
        for bad in [
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,)",
            "{'descr': '<f4', 'fortran_order': False}",
            "{'descr': '<f4', 'fortran_order': 1, 'shape': (3,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 'a')}",
            "[1, 2]",
            "{'descr': '<f4' 'x'}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
        ] {
            let e = err(&handmade(1, bad, &[]));
            assert!(e.contains("f.npy"), "{bad}: {e}");
        }
        let e = err(&handmade(2, &"(".repeat(100_000), &[]));
        assert!(e.contains("nesting too deep"), "{e}");
        let e = err(&handmade(1, "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }", &[0; 8]));
        assert!(e.contains("unsupported dtype '<c8'"), "{e}");
        let e = err(&handmade(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", &[0; 4]));
        assert!(e.contains("structured"), "{e}");
        let e = err(&handmade(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }",
            &[],
        ));
        assert!(e.contains("overflows"), "{e}");
        let u: Vec<u8> = u64::MAX.to_le_bytes().to_vec();
        let e = err(&handmade(1, "{'descr': '<u8', 'fortran_order': False, 'shape': (1,), }", &u));
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn corrupt_npz_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.npz");
        std::fs::write(&path, b"this is not a zip").unwrap();
        let e = format!("{:#}", read_npz(&path).unwrap_err());
        assert!(e.contains("broken.npz"), "{e}");
        let e = format!("{:#}", read_npz(&dir.path().join("missing.npz")).unwrap_err());
        assert!(e.contains("missing.npz"), "{e}");

        // A valid archive whose entry is not an .npy.
        let path = dir.path().join("inner.npz");
        {
            let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
            zip.start_file("x.npy", zip::write::SimpleFileOptions::default()).unwrap();
            zip.write_all(b"garbage").unwrap();
            zip.finish().unwrap();
        }
        let e = format!("{:#}", read_npz(&path).unwrap_err());
        assert!(e.contains("inner.npz:x") && e.contains("bad magic"), "{e}");

        // Truncated archive.
        let good = dir.path().join("good.npz");
        let a = ArrayData::F32(ArrayD::from_elem(IxDyn(&[64]), 1.0));
        write_npz(&good, &[("a", &a)]).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let cut = dir.path().join("cut.npz");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", read_npz(&cut).unwrap_err());
        assert!(e.contains("cut.npz"), "{e}");
    }
}
