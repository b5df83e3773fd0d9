//! Loading and saving ONNX models.
//!
//! Loading memory-maps the file and decodes it with prost; `TensorProto.raw_data` is a
//! `bytes::Bytes` slice of that mapping, so weights are never copied. Tensors stored as ONNX
//! *external data* (`data_location = EXTERNAL`, keys `location`, `offset`, `length`) are
//! resolved into `raw_data` slices of their memory-mapped data files; a location must be a
//! relative path inside the model's folder.
//!
//! Saving encodes to one file when the result fits under protobuf's 2 GiB limit, otherwise (or
//! when asked) it moves every tensor of at least `threshold` bytes into one external data file
//! beside the model. Every write goes to a temporary file in the target folder and is renamed
//! into place, so a failed run never leaves a partial output and never touches its input.

use super::pb::{tensor_proto::DataLocation, GraphProto, ModelProto, StringStringEntryProto, TensorProto};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use prost::Message;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Files at least this large are memory-mapped instead of read.
const MMAP_MIN: u64 = 1 << 20;
/// Protobuf cannot encode a message of 2 GiB or more; keep a margin for framing.
pub const PROTOBUF_LIMIT: usize = (1usize << 31) - (1 << 20);

/// A decoded model and where it came from.
#[derive(Debug, Clone)]
pub struct Model {
    pub proto: ModelProto,
    /// The file it was loaded from (external data paths are relative to its folder).
    pub path: Option<PathBuf>,
    /// Size of the model file itself, in bytes.
    pub file_size: u64,
    /// Number of tensors whose data came from external files.
    pub external_tensors: usize,
}

/// Maps or reads a whole file into a `Bytes` without copying large files.
pub fn read_file_bytes(path: &Path) -> Result<Bytes> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
    if len >= MMAP_MIN {
        // SAFETY: the mapping is read-only; onnxq never writes to its input files. Another
        // process truncating the file while we run is outside what any reader can defend.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        Ok(Bytes::from_owner(map))
    } else {
        let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Bytes::from(data))
    }
}

/// Decodes model bytes without resolving external data or checking structure.
pub fn decode(bytes: Bytes) -> Result<ModelProto> {
    ModelProto::decode(bytes).context("not a valid ONNX model (protobuf decoding failed)")
}

/// Decodes, checks and resolves external data relative to `dir`.
pub fn load_bytes(bytes: Bytes, dir: Option<&Path>) -> Result<Model> {
    let file_size = bytes.len() as u64;
    if bytes.is_empty() {
        bail!("file is empty, not an ONNX model");
    }
    let mut proto = decode(bytes)?;
    check_structure(&proto)?;
    let mut files = ExternalFiles { dir, maps: BTreeMap::new() };
    let mut external_tensors = 0;
    if let Some(graph) = proto.graph.as_mut() {
        visit_graph_tensors(graph, &mut |t| {
            if t.data_location() == DataLocation::External {
                files.resolve(t)?;
                external_tensors += 1;
            }
            Ok(())
        })?;
    }
    Ok(Model { proto, path: None, file_size, external_tensors })
}

/// Loads a model file: decode, check it has a graph and opset imports, resolve external data.
pub fn load(path: &Path) -> Result<Model> {
    let bytes = read_file_bytes(path)?;
    let dir = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    let mut model = load_bytes(bytes, dir).with_context(|| format!("cannot load model {}", path.display()))?;
    model.path = Some(path.to_path_buf());
    Ok(model)
}

fn check_structure(proto: &ModelProto) -> Result<()> {
    let graph = proto.graph.as_ref().context("the model has no graph")?;
    if proto.opset_import.is_empty() {
        bail!("the model has no opset_import");
    }
    if graph.node.is_empty() && graph.output.is_empty() {
        bail!("the graph is empty (no nodes, no outputs)");
    }
    Ok(())
}

/// Calls `f` on every tensor of the graph: initializers and tensors in node attributes
/// (Constant values), recursing into subgraphs.
pub fn visit_graph_tensors(graph: &mut GraphProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    for t in &mut graph.initializer {
        f(t)?;
    }
    for t in &mut graph.sparse_initializer {
        if let Some(v) = t.values.as_mut() {
            f(v)?;
        }
    }
    for node in &mut graph.node {
        for a in &mut node.attribute {
            if let Some(t) = a.t.as_mut() {
                f(t)?;
            }
            for t in &mut a.tensors {
                f(t)?;
            }
            if let Some(g) = a.g.as_mut() {
                visit_graph_tensors(g, f)?;
            }
            for g in &mut a.graphs {
                visit_graph_tensors(g, f)?;
            }
        }
    }
    Ok(())
}

struct ExternalFiles<'a> {
    dir: Option<&'a Path>,
    maps: BTreeMap<String, Bytes>,
}

impl ExternalFiles<'_> {
    fn resolve(&mut self, t: &mut TensorProto) -> Result<()> {
        let name = t.name().to_string();
        let ctx = || format!("tensor '{name}': external data");
        let (mut location, mut offset, mut length) = (None, 0u64, None);
        for kv in &t.external_data {
            match kv.key() {
                "location" => location = Some(kv.value().to_string()),
                "offset" => {
                    offset = kv.value().parse().with_context(|| format!("{}: bad offset '{}'", ctx(), kv.value()))?
                }
                "length" => {
                    length = Some(
                        kv.value().parse::<u64>().with_context(|| format!("{}: bad length '{}'", ctx(), kv.value()))?,
                    )
                }
                _ => {}
            }
        }
        let location = location.with_context(|| format!("{}: no 'location' key", ctx()))?;
        let rel = safe_relative(&location).with_context(ctx)?;
        let dir = self
            .dir
            .with_context(|| format!("{}: the model was not loaded from a file, cannot resolve '{location}'", ctx()))?;
        if !self.maps.contains_key(&location) {
            let path = dir.join(&rel);
            let bytes =
                read_file_bytes(&path).with_context(|| format!("{}: missing or unreadable data file", ctx()))?;
            self.maps.insert(location.clone(), bytes);
        }
        let data = &self.maps[&location];
        let end = match length {
            Some(l) => offset.checked_add(l),
            None => Some(data.len() as u64),
        };
        let end = end.with_context(|| format!("{}: offset + length overflows", ctx()))?;
        if offset > end || end > data.len() as u64 {
            bail!("{}: range {offset}..{end} is past the end of '{location}' ({} bytes)", ctx(), data.len());
        }
        t.raw_data = Some(data.slice(offset as usize..end as usize));
        t.external_data.clear();
        t.data_location = None;
        Ok(())
    }
}

/// Checks an external-data location is a plain relative path that stays inside the model folder.
pub fn safe_relative(location: &str) -> Result<PathBuf> {
    let p = Path::new(location);
    if location.is_empty() {
        bail!("empty location");
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => bail!("location '{location}' escapes the model folder ('..')"),
            Component::RootDir | Component::Prefix(_) => bail!("location '{location}' is an absolute path"),
        }
    }
    if out.as_os_str().is_empty() {
        bail!("location '{location}' names no file");
    }
    Ok(out)
}

/// How to save a model.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Always write large tensors to an external data file.
    pub external: bool,
    /// Tensors of at least this many bytes go external (default 1024).
    pub threshold: Option<usize>,
}

/// What `save` wrote.
#[derive(Debug, Clone)]
pub struct Saved {
    pub bytes: u64,
    pub external_file: Option<PathBuf>,
    pub external_bytes: u64,
}

/// Encodes a model to bytes (only for models that fit in one protobuf).
pub fn encode(proto: &ModelProto) -> Result<Vec<u8>> {
    let len = proto.encoded_len();
    if len > PROTOBUF_LIMIT {
        bail!("the model encodes to {len} bytes, over protobuf's 2 GiB limit: save it with external data");
    }
    Ok(proto.encode_to_vec())
}

/// Saves a model atomically, with external data when asked or when it would not fit in 2 GiB.
pub fn save(proto: &ModelProto, path: &Path, opts: &SaveOptions) -> Result<Saved> {
    let ctx = || format!("cannot write {}", path.display());
    let external = opts.external || proto.encoded_len() > PROTOBUF_LIMIT;
    if !external {
        let bytes = encode(proto).with_context(ctx)?;
        write_atomic(path, |w| w.write_all(&bytes).map_err(Into::into)).with_context(ctx)?;
        return Ok(Saved { bytes: bytes.len() as u64, external_file: None, external_bytes: 0 });
    }
    let threshold = opts.threshold.unwrap_or(1024);
    let file_name =
        path.file_name().with_context(|| format!("{} has no file name", path.display()))?.to_string_lossy().to_string();
    let data_name = format!("{file_name}.data");
    let data_path = path.with_file_name(&data_name);
    let mut proto = proto.clone(); // cheap: tensor payloads are shared `Bytes`
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut offset = 0u64;
    if let Some(g) = proto.graph.as_mut() {
        visit_graph_tensors(g, &mut |t| {
            let Some(raw) = t.raw_data.as_ref() else { return Ok(()) };
            if raw.len() < threshold {
                return Ok(());
            }
            // 64-byte alignment lets readers map tensors directly.
            let pad = (64 - offset % 64) % 64;
            if pad > 0 {
                chunks.push(Bytes::from(vec![0u8; pad as usize]));
                offset += pad;
            }
            let kv = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
            t.external_data = vec![
                kv("location", data_name.clone()),
                kv("offset", offset.to_string()),
                kv("length", raw.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            offset += raw.len() as u64;
            chunks.push(raw.clone());
            t.raw_data = None;
            Ok(())
        })?;
    }
    write_atomic(&data_path, |w| {
        for c in &chunks {
            w.write_all(c)?;
        }
        Ok(())
    })
    .with_context(|| format!("cannot write {}", data_path.display()))?;
    let bytes = encode(&proto).with_context(ctx)?;
    write_atomic(path, |w| w.write_all(&bytes).map_err(Into::into)).with_context(ctx)?;
    Ok(Saved { bytes: bytes.len() as u64, external_file: Some(data_path), external_bytes: offset })
}

/// Writes a file through a temporary file in the same folder, renamed into place on success.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".onnxq-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        write(&mut w)?;
        w.flush()?;
    }
    tmp.as_file().sync_all().ok();
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_locations() {
        assert!(safe_relative("w.bin").is_ok());
        assert!(safe_relative("./sub/w.bin").is_ok());
        assert!(safe_relative("../w.bin").is_err());
        assert!(safe_relative("sub/../../w.bin").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("").is_err());
    }

    #[test]
    fn empty_and_garbage_bytes_fail_cleanly() {
        assert!(load_bytes(Bytes::new(), None).is_err());
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        assert!(load_bytes(Bytes::from(png), None).is_err());
    }
}
