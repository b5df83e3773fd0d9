//! A dependency-free, deterministic mutation fuzzer: byte-level mutations plus
//! protobuf-aware ones (duplicate, drop, swap or transplant a field; swap one string for
//! another seen in the model; set a varint to a boundary value; retag a field), and the
//! harness that drives the library path on each input. Shared by the in-suite test
//! (`tests/hostile.rs`) and the cargo-fuzz target (`fuzz/fuzz_targets/load_dump_quantize.rs`).

use bytes::Bytes;
use onnxq::calibrate::TensorEntry;
use onnxq::dump::{self, DumpOptions};
use onnxq::onnx::GraphView;
use onnxq::quantize::{self, QuantOptions};
use prost::Message;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

pub enum Outcome {
    /// Everything succeeded and every quantized output is a valid model.
    Accepted,
    /// Some step returned an error (the expected fate of most mutants).
    Rejected(String),
    /// A quantizer succeeded but wrote a model that does not load or validate.
    Invalid(String),
}

fn check_output(m: &onnxq::onnx::pb::ModelProto) -> Result<(), String> {
    let bytes = onnxq::onnx::io::encode(m).map_err(|e| format!("{e:#}"))?;
    let back = onnxq::onnx::io::load_bytes(Bytes::from(bytes), None).map_err(|e| format!("{e:#}"))?;
    let g = back.proto.graph.as_ref().ok_or("no graph")?;
    GraphView::new(g).validate().map_err(|e| format!("{e:#}"))
}

fn entry(abs: f64) -> TensorEntry {
    TensorEntry {
        count: 16,
        min: -abs,
        max: abs,
        mean: 0.0,
        std: abs / 2.0,
        abs_max: abs,
        p99_9: abs,
        nan: 0,
        inf: 0,
        range: [-abs as f32, abs as f32],
        range_symmetric: [-abs as f32, abs as f32],
        channel_abs_max: vec![],
        channels: None,
    }
}

/// The library path of `dump` and `quantize` on one input.
pub fn exercise(bytes: &[u8], dir: &Path) -> Outcome {
    let model = match onnxq::onnx::io::load_bytes(Bytes::copy_from_slice(bytes), Some(dir)) {
        Ok(m) => m,
        Err(e) => return Outcome::Rejected(format!("{e:#}")),
    };
    let steps = || -> anyhow::Result<Vec<onnxq::onnx::pb::ModelProto>> {
        let g = model.proto.graph.as_ref().ok_or_else(|| anyhow::anyhow!("no graph"))?;
        let view = GraphView::new(g);
        view.validate()?;
        let nodes = g.node.first().map(|n| vec![n.name().to_string()]).unwrap_or_default();
        let d = dump::build(&model, &DumpOptions { weights: true, nodes })?;
        let _ = dump::render_text(&d);
        let _ = serde_json::to_string(&d)?;
        // What `onnxq quantize` does: graph preparation, opset upgrade, then quantization.
        let (mut m, _) = quantize::prepare::prepare(&model.proto)?;
        if quantize::default_opset(&m) < 13 {
            if let Ok((up, _)) = quantize::opset::upgrade_to_13(&m) {
                m = up;
            }
        }
        let wo = QuantOptions { weights_only: true, ..Default::default() };
        let (q1, _) = quantize::quantize(&m, &BTreeMap::new(), &wo)?;
        // Static placement with made-up ranges (one in seven a sentinel-sized range).
        let ranges: BTreeMap<String, TensorEntry> = g
            .input
            .iter()
            .map(|v| v.name().to_string())
            .chain(g.node.iter().flat_map(|n| n.output.iter().cloned()))
            .enumerate()
            .map(|(i, n)| (n, entry(if i % 7 == 6 { 1e5 } else { 1.0 + i as f64 })))
            .collect();
        let (q2, _) = quantize::quantize(&m, &ranges, &QuantOptions::default())?;
        Ok(vec![q1, q2])
    };
    match steps() {
        Ok(outputs) => {
            for q in &outputs {
                if let Err(e) = check_output(q) {
                    return Outcome::Invalid(e);
                }
            }
            Outcome::Accepted
        }
        Err(e) => {
            let msg = format!("{e:#}");
            if msg.contains("internal error") {
                Outcome::Invalid(msg)
            } else {
                Outcome::Rejected(msg)
            }
        }
    }
}

/// The project's generator with the two draws the mutators use.
pub struct Rng(onnxq::rng::Rng);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(onnxq::rng::Rng::new(seed))
    }

    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }
}

// ---------------------------------------------------------------- protobuf tree

#[derive(Clone)]
enum Val {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(Vec<u8>),
    Msg(Vec<Field>),
}

#[derive(Clone)]
struct Field {
    num: u64,
    val: Val,
}

fn read_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn write_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Parses a message; length-delimited fields that parse as messages become submessages.
fn parse(b: &[u8], depth: usize) -> Option<Vec<Field>> {
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let (tag, n) = read_varint(&b[i..])?;
        i += n;
        let num = tag >> 3;
        if num == 0 || num > 1 << 29 {
            return None;
        }
        let val = match tag & 7 {
            0 => {
                let (v, n) = read_varint(&b[i..])?;
                i += n;
                Val::Varint(v)
            }
            1 => {
                let v: [u8; 8] = b.get(i..i + 8)?.try_into().ok()?;
                i += 8;
                Val::Fixed64(v)
            }
            5 => {
                let v: [u8; 4] = b.get(i..i + 4)?.try_into().ok()?;
                i += 4;
                Val::Fixed32(v)
            }
            2 => {
                let (len, n) = read_varint(&b[i..])?;
                i += n;
                let end = i.checked_add(usize::try_from(len).ok()?)?;
                let body = b.get(i..end)?;
                i = end;
                match (depth < 16).then(|| parse(body, depth + 1)).flatten() {
                    Some(sub) if !sub.is_empty() => Val::Msg(sub),
                    _ => Val::Bytes(body.to_vec()),
                }
            }
            _ => return None,
        };
        out.push(Field { num, val });
    }
    Some(out)
}

fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        let wt = match f.val {
            Val::Varint(_) => 0,
            Val::Fixed64(_) => 1,
            Val::Bytes(_) | Val::Msg(_) => 2,
            Val::Fixed32(_) => 5,
        };
        write_varint(f.num << 3 | wt, out);
        match &f.val {
            Val::Varint(v) => write_varint(*v, out),
            Val::Fixed64(v) => out.extend_from_slice(v),
            Val::Fixed32(v) => out.extend_from_slice(v),
            Val::Bytes(b) => {
                write_varint(b.len() as u64, out);
                out.extend_from_slice(b);
            }
            Val::Msg(m) => {
                let mut body = Vec::new();
                encode(m, &mut body);
                write_varint(body.len() as u64, out);
                out.extend(body);
            }
        }
    }
}

/// Paths (indices of Msg fields from the root) of every field list in the tree.
fn lists(fields: &[Field], path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    out.push(path.clone());
    for (i, f) in fields.iter().enumerate() {
        if let Val::Msg(m) = &f.val {
            path.push(i);
            lists(m, path, out);
            path.pop();
        }
    }
}

fn list_mut<'a>(root: &'a mut Vec<Field>, path: &[usize]) -> &'a mut Vec<Field> {
    let mut cur = root;
    for &i in path {
        cur = match &mut cur[i].val {
            Val::Msg(m) => m,
            _ => unreachable!("paths only go through messages"),
        };
    }
    cur
}

fn strings(fields: &[Field], out: &mut Vec<Vec<u8>>) {
    for f in fields {
        match &f.val {
            Val::Bytes(b) if b.len() <= 64 => out.push(b.clone()),
            Val::Msg(m) => strings(m, out),
            _ => {}
        }
    }
}

fn all_fields(fields: &[Field], out: &mut Vec<Field>) {
    for f in fields {
        out.push(f.clone());
        if let Val::Msg(m) = &f.val {
            all_fields(m, out);
        }
    }
}

const BOUNDARY: [u64; 14] = [
    0,
    1,
    2,
    3,
    u64::MAX, // -1 as int64/int32
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    i64::MIN as u64,
    0xffff_ffff_ffff_fffe, // -2
];

fn mutate_tree(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let mut root = parse(input, 0)?;
    let mut paths = Vec::new();
    lists(&root, &mut Vec::new(), &mut paths);
    let path = paths[rng.below(paths.len())].clone();
    let op = rng.below(8);
    let mut pool = Vec::new();
    if op == 4 {
        strings(&root, &mut pool);
    }
    let mut every = Vec::new();
    if op == 6 {
        all_fields(&root, &mut every);
    }
    let list = list_mut(&mut root, &path);
    if list.is_empty() {
        return None;
    }
    let k = rng.below(list.len());
    match op {
        0 => {
            let f = list[k].clone();
            let at = rng.below(list.len() + 1);
            list.insert(at, f);
        }
        1 => {
            list.remove(k);
        }
        2 => {
            let j = rng.below(list.len());
            list.swap(k, j);
        }
        3 => {
            let Val::Varint(v) = &mut list[k].val else { return None };
            *v = if rng.below(4) == 0 { rng.next() >> rng.below(64) } else { BOUNDARY[rng.below(BOUNDARY.len())] };
        }
        4 => {
            let Val::Bytes(b) = &mut list[k].val else { return None };
            if pool.is_empty() {
                return None;
            }
            *b = pool[rng.below(pool.len())].clone();
        }
        5 => list[k].num = if rng.below(2) == 0 { list[k].num ^ 1 } else { 1 + rng.below(24) as u64 },
        6 => {
            let f = every[rng.below(every.len())].clone();
            let at = rng.below(list.len() + 1);
            list.insert(at, f);
        }
        _ => {
            // grow or shrink a string/bytes field by one byte
            let Val::Bytes(b) = &mut list[k].val else { return None };
            if b.is_empty() || rng.below(2) == 0 {
                b.push(b"_0xy"[rng.below(4)]);
            } else {
                b.pop();
            }
        }
    }
    let mut out = Vec::with_capacity(input.len() + 64);
    encode(&root, &mut out);
    Some(out)
}

fn mutate_bytes(rng: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    if b.is_empty() {
        return vec![rng.next() as u8];
    }
    let at = rng.below(b.len());
    match rng.below(6) {
        0 => b[at] ^= 1 << rng.below(8),
        1 => b[at] = [0x00, 0xff, 0x7f, 0x80, 0x01, rng.next() as u8][rng.below(6)],
        2 => b.truncate(at),
        3 => {
            let n = 1 + rng.below(8);
            let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            b.splice(at..at, ins);
        }
        4 => {
            let end = (at + 1 + rng.below(16)).min(b.len());
            b.drain(at..end);
        }
        _ => {
            let end = (at + 1 + rng.below(32)).min(b.len());
            let chunk = b[at..end].to_vec();
            let to = rng.below(b.len() + 1);
            b.splice(to..to, chunk);
        }
    }
    b
}

pub fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut cur = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        cur = if rng.below(3) != 0 {
            mutate_tree(rng, &cur).unwrap_or_else(|| mutate_bytes(rng, cur.clone()))
        } else {
            mutate_bytes(rng, cur)
        };
    }
    cur
}

fn is_finding(bytes: &[u8], dir: &Path) -> bool {
    !matches!(catch_unwind(AssertUnwindSafe(|| exercise(bytes, dir))), Ok(Outcome::Accepted) | Ok(Outcome::Rejected(_)))
}

/// Shrinks a failing input while it keeps failing: first whole protobuf fields (nodes,
/// tensors, attributes, ...), innermost lists last, then chunks of bytes.
pub fn minimize(bytes: &[u8], dir: &Path) -> Vec<u8> {
    let mut cur = bytes.to_vec();
    if let Some(mut root) = parse(&cur, 0) {
        let mut changed = true;
        let mut tries = 0;
        while changed && tries < 5_000 {
            changed = false;
            let mut paths = Vec::new();
            lists(&root, &mut Vec::new(), &mut paths);
            for path in paths {
                let mut k = 0;
                while tries < 5_000 {
                    let mut cand = root.clone();
                    let list = list_mut(&mut cand, &path);
                    if k >= list.len() {
                        break;
                    }
                    list.remove(k);
                    tries += 1;
                    let mut b = Vec::new();
                    encode(&cand, &mut b);
                    if is_finding(&b, dir) {
                        root = cand;
                        changed = true;
                    } else {
                        k += 1;
                    }
                }
                if changed {
                    break; // paths are stale once the tree changed
                }
            }
        }
        cur.clear();
        encode(&root, &mut cur);
    }
    let mut chunk = cur.len() / 2;
    let mut tries = 0;
    while chunk > 0 && tries < 20_000 {
        let mut i = 0;
        let mut shrunk = false;
        while i + chunk <= cur.len() && tries < 20_000 {
            tries += 1;
            let mut cand = cur.clone();
            cand.drain(i..i + chunk);
            if is_finding(&cand, dir) {
                cur = cand;
                shrunk = true;
            } else {
                i += chunk;
            }
        }
        if !shrunk {
            chunk /= 2;
        }
    }
    cur
}

pub struct Stats {
    pub execs: usize,
    pub accepted: usize,
    pub rejected: usize,
    /// Mutants that still decoded as protobuf.
    pub decoded: usize,
    pub seconds: f64,
}

/// Runs `iters` mutants of `seeds` (external data resolves in `dir`); on a panic or an invalid
/// output, writes the minimized input to `crash_dir` and panics naming it.
pub fn run(iters: usize, seed: u64, seeds: &[Vec<u8>], dir: &Path, crash_dir: &Path) -> Stats {
    let mut rng = Rng::new(seed);
    let t0 = std::time::Instant::now();
    let mut stats = Stats { execs: 0, accepted: 0, rejected: 0, decoded: 0, seconds: 0.0 };
    // Accepted mutants join the pool (bounded), so mutations stack up over time.
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    for i in 0..iters {
        let parent = if rng.below(4) == 0 { &seeds[rng.below(seeds.len())] } else { &pool[rng.below(pool.len())] };
        let input = mutate(&mut rng, parent);
        stats.execs += 1;
        if onnxq::onnx::pb::ModelProto::decode(input.as_slice()).is_ok() {
            stats.decoded += 1;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| exercise(&input, dir)));
        let problem = match outcome {
            Ok(Outcome::Accepted) => {
                stats.accepted += 1;
                if pool.len() < 256 {
                    pool.push(input);
                } else {
                    let slot = rng.below(pool.len());
                    pool[slot] = input;
                }
                continue;
            }
            Ok(Outcome::Rejected(_)) => {
                stats.rejected += 1;
                continue;
            }
            Ok(Outcome::Invalid(e)) => format!("quantize wrote an invalid model: {e}"),
            Err(_) => "panic (message above)".to_string(),
        };
        let small = minimize(&input, dir);
        let out = crash_dir.join(format!("fuzz-crash-seed{seed}-iter{i}.onnx"));
        std::fs::write(&out, &small).expect("write crash input");
        panic!(
            "mutation fuzz: execution {i} (seed {seed}): {problem}; minimized input ({} bytes) written to {}",
            small.len(),
            out.display()
        );
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    stats
}
