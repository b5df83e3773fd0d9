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
use std::sync::{Arc, Mutex, Weak};

/// Files at least this large are memory-mapped instead of read.
const MMAP_MIN: u64 = 1 << 20;
/// Protobuf cannot encode a message of 2 GiB or more; keep a margin for framing.
pub const PROTOBUF_LIMIT: usize = (1usize << 31) - (1 << 20);

/// The encoding limit in force: [`PROTOBUF_LIMIT`], or a lower one from the environment
/// variable `ONNXQ_PROTOBUF_LIMIT` (bytes), a test knob that sends small models down the code
/// paths of models over 2 GiB.
pub fn protobuf_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let knob = std::env::var("ONNXQ_PROTOBUF_LIMIT").ok().and_then(|v| v.parse::<usize>().ok());
        knob.map_or(PROTOBUF_LIMIT, |k| k.min(PROTOBUF_LIMIT))
    })
}

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

impl Model {
    /// A model built in memory (no file, no external data).
    pub fn in_memory(proto: ModelProto) -> Model {
        Model { proto, path: None, file_size: 0, external_tensors: 0 }
    }
}

/// A whole file's bytes (memory-mapped when large), shared by every `Bytes` slice of it.
enum FileBuf {
    Map(memmap2::Mmap),
    Heap(Vec<u8>),
}

impl FileBuf {
    fn bytes(&self) -> &[u8] {
        match self {
            FileBuf::Map(m) => m,
            FileBuf::Heap(v) => v,
        }
    }
}

struct SharedFile(Arc<FileBuf>);

impl AsRef<[u8]> for SharedFile {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// The memory maps still in use, for [`release_pages`].
static MAPS: Mutex<Vec<Weak<FileBuf>>> = Mutex::new(Vec::new());

/// Maps or reads a whole file into a `Bytes` without copying large files.
pub fn read_file_bytes(path: &Path) -> Result<Bytes> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
    let buf = if len >= MMAP_MIN {
        // SAFETY: the mapping is read-only; onnxq never writes to its input files. Another
        // process truncating the file while we run is outside what any reader can defend.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        FileBuf::Map(map)
    } else {
        FileBuf::Heap(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
    };
    let buf = Arc::new(buf);
    if matches!(*buf, FileBuf::Map(_)) {
        let mut maps = MAPS.lock().unwrap_or_else(|e| e.into_inner());
        maps.retain(|m| m.strong_count() > 0);
        maps.push(Arc::downgrade(&buf));
    }
    Ok(Bytes::from_owner(SharedFile(buf)))
}

/// Drops the pages of `data` from the process's resident memory when `data` lies in a
/// memory-mapped input file (they are read back from the file if touched again); otherwise
/// does nothing. Called once a weight has been copied or converted, so that reading every
/// weight of a big model once does not leave all of them resident on top of the copies.
pub fn release_pages(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let maps: Vec<Arc<FileBuf>> =
        MAPS.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect();
    let start = data.as_ptr() as usize;
    for buf in maps {
        let FileBuf::Map(m) = &*buf else { continue };
        let base = m.as_ptr() as usize;
        if start >= base && start + data.len() <= base + m.len() {
            // SAFETY: a read-only file mapping: MADV_DONTNEED only drops its page table entries,
            // the same bytes are faulted back in from the file on the next access.
            let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start - base, data.len()) };
            return;
        }
    }
}

/// Tensor payloads at least this large reach the runtime by reference, outside the protobuf.
const RUNTIME_INLINE_MAX: usize = 1024;

/// Metadata key under which [`encode_for_runtime`] records which [`RuntimeWeights`] table its
/// external data references point into; [`crate::runtime`] serves them from that table.
pub const RUNTIME_WEIGHTS_KEY: &str = "onnxq.runtime_weights";

/// The location every external reference of [`encode_for_runtime`] names: the model folder
/// itself, so it resolves inside any folder; the reference's `offset` is an index into the
/// [`RuntimeWeights`] table and its `length` the payload's byte length.
pub const RUNTIME_LOCATION: &str = ".";

/// The payloads a runtime encoding references, shared with the model they came from (slices of
/// memory-mapped files or of in-memory tensors, never copies).
#[derive(Debug, Default)]
pub struct RuntimeWeights {
    /// `None` once handed over for good ([`RuntimeWeights::handed_over`]).
    tensors: Vec<Mutex<Option<Bytes>>>,
    /// Each payload is dropped as soon as the runtime has its copy ([`RuntimeBytes::into_owned_parts`]).
    once: std::sync::atomic::AtomicBool,
}

impl RuntimeWeights {
    /// Bytes of the payloads still held.
    pub fn held_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, Bytes::len)).sum()
    }

    /// Payload `i` given to `f` (the runtime's copy is made there); when the table's owner gave
    /// it up ([`RuntimeBytes::into_owned_parts`]), the table's share of the payload is dropped
    /// afterwards, so a payload nothing else holds (a fake-quant twin's folded weights) is freed
    /// while the runtime copies the next one, instead of all of them outliving the copy. A
    /// second request for a dropped payload is an error.
    pub fn handed_over<R>(&self, i: usize, f: impl FnOnce(&[u8]) -> Result<R>) -> Result<R> {
        let slot = self.tensors.get(i).with_context(|| format!("no runtime weight #{i}"))?;
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(slot.as_deref().with_context(|| format!("runtime weight #{i} was already handed over"))?)?;
        if self.once.load(std::sync::atomic::Ordering::Relaxed) {
            *slot = None;
        }
        Ok(out)
    }
}

/// A model serialized for the runtime (see [`encode_for_runtime`]): derefs to the protobuf
/// bytes and keeps the weights they reference alive.
#[derive(Debug)]
pub struct RuntimeBytes {
    bytes: Vec<u8>,
    weights: Arc<RuntimeWeights>,
}

impl std::ops::Deref for RuntimeBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl RuntimeBytes {
    /// The protobuf bytes and the weights table they reference, apart: the table can then be
    /// dropped as soon as the runtime has copied the weights (see `runtime::Plan::load_owned`).
    pub fn into_parts(self) -> (Vec<u8>, Arc<RuntimeWeights>) {
        (self.bytes, self.weights)
    }

    /// [`RuntimeBytes::into_parts`] for a single load: each payload of the table is dropped as
    /// soon as it has been handed over ([`RuntimeWeights::handed_over`]).
    pub fn into_owned_parts(self) -> (Vec<u8>, Arc<RuntimeWeights>) {
        self.weights.once.store(true, std::sync::atomic::Ordering::Relaxed);
        (self.bytes, self.weights)
    }

    /// The weights the encoding references.
    pub fn weights(&self) -> &RuntimeWeights {
        &self.weights
    }
}

/// Live weight tables by id; an entry dies with its [`RuntimeBytes`].
static RUNTIME_TABLES: Mutex<Vec<(u64, Weak<RuntimeWeights>)>> = Mutex::new(Vec::new());

/// The weights table recorded in a runtime encoding's metadata (`RUNTIME_WEIGHTS_KEY` value).
pub fn runtime_weights(id: &str) -> Option<Arc<RuntimeWeights>> {
    let id: u64 = id.parse().ok()?;
    let tables = RUNTIME_TABLES.lock().unwrap_or_else(|e| e.into_inner());
    tables.iter().find(|(i, _)| *i == id).and_then(|(_, w)| w.upgrade())
}

/// Serializes a model for the runtime (tract) without putting its weights in the protobuf:
/// every initializer (subgraphs included) and `Constant` value of at least 1 KiB becomes an
/// external data reference into a [`RuntimeWeights`] table that shares the payloads with
/// `proto`. So no model is too large for the runtime (protobuf stops at 2 GiB), nothing copies
/// weights on our side, and tract does not decode a second copy of them; it copies each one
/// once, into its own tensor. The protobuf is small and only valid while the returned value
/// lives.
pub fn encode_for_runtime(proto: &ModelProto) -> Result<RuntimeBytes> {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut proto = proto.clone(); // cheap: payloads are shared `Bytes`
    proto.metadata_props.retain(|p| p.key() != RUNTIME_WEIGHTS_KEY);
    let mut tensors = Vec::new();
    let mut externalize = |t: &mut TensorProto| {
        let Some(raw) = t.raw_data.take_if(|r| r.len() >= RUNTIME_INLINE_MAX) else { return };
        let kv = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        t.external_data = vec![
            kv("location", RUNTIME_LOCATION.into()),
            kv("offset", tensors.len().to_string()),
            kv("length", raw.len().to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        tensors.push(raw);
    };
    if let Some(g) = proto.graph.as_mut() {
        externalize_graph(g, &mut externalize);
    }
    if !tensors.is_empty() {
        proto
            .metadata_props
            .push(StringStringEntryProto { key: Some(RUNTIME_WEIGHTS_KEY.into()), value: Some(id.to_string()) });
    }
    let bytes = encode(&proto)?;
    let weights = Arc::new(RuntimeWeights {
        tensors: tensors.into_iter().map(|t| Mutex::new(Some(t))).collect(),
        once: false.into(),
    });
    let mut tables = RUNTIME_TABLES.lock().unwrap_or_else(|e| e.into_inner());
    tables.retain(|(_, w)| w.strong_count() > 0);
    tables.push((id, Arc::downgrade(&weights)));
    Ok(RuntimeBytes { bytes, weights })
}

/// The tensors tract loads through its data resolver: initializers and `Constant` values, in
/// subgraphs too.
fn externalize_graph(g: &mut GraphProto, f: &mut dyn FnMut(&mut TensorProto)) {
    g.initializer.iter_mut().for_each(&mut *f);
    for n in &mut g.node {
        let constant = n.op_type() == "Constant" && matches!(n.domain(), "" | "ai.onnx");
        for a in &mut n.attribute {
            if constant && a.name() == "value" {
                if let Some(t) = a.t.as_mut() {
                    f(t);
                }
            }
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                externalize_graph(sub, f);
            }
        }
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
            check_payload(t)
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

/// [`load`], then the graph checks of [`crate::onnx::GraphView::validate`] (dangling inputs,
/// duplicate names, cycles): what every command runs before touching a model file.
pub fn load_valid(path: &Path) -> Result<Model> {
    let model = load(path)?;
    let graph = model.proto.graph.as_ref().context("the model has no graph")?;
    crate::onnx::GraphView::new(graph).validate().with_context(|| format!("invalid model {}", path.display()))?;
    Ok(model)
}

/// Fails when `output` names the same file as `input` (the input model is never modified).
pub fn refuse_overwrite(input: &Path, output: &Path) -> Result<()> {
    if let (Ok(x), Ok(y)) = (std::fs::canonicalize(input), std::fs::canonicalize(output)) {
        if x == y {
            bail!("refusing to overwrite the input model {}: choose another -o", input.display());
        }
    }
    Ok(())
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

/// Checks a tensor's declared shape and that its payload has exactly the size the shape and
/// element type call for, so a corrupt or hostile file (2^40 elements over 48 bytes of data,
/// dims whose product overflows, negative dims) is rejected at load time, naming the tensor,
/// before anything sizes an allocation from its dims. Element types without a fixed size
/// (string, 4-bit) only get their dims checked.
fn check_payload(t: &TensorProto) -> Result<()> {
    let name = t.name();
    let mut count: u64 = 1;
    for &d in &t.dims {
        if d < 0 {
            bail!("tensor '{name}': negative dim in shape {:?}", t.dims);
        }
        count = count.checked_mul(d as u64).with_context(|| {
            format!("tensor '{name}': shape {:?} overflows (its element count does not fit in 64 bits)", t.dims)
        })?;
    }
    let dt = t.data_type();
    let raw = t.raw_data.as_deref().unwrap_or_default();
    let typed = [
        t.float_data.len(),
        t.int32_data.len(),
        t.string_data.len(),
        t.int64_data.len(),
        t.double_data.len(),
        t.uint64_data.len(),
    ]
    .iter()
    .sum::<usize>() as u64;
    let describe = || format!("{} shape {:?}", crate::array::dtype::name(dt), t.dims);
    if dt == 0 {
        if raw.is_empty() && typed == 0 && count == 0 {
            return Ok(());
        }
        bail!("tensor '{name}': its element type is undefined (data_type 0)");
    }
    // (bits per element in raw_data, elements per value of the typed fields)
    let (raw_bits, typed_per_value): (u64, u64) = match dt {
        2 | 3 | 9 | 17..=20 | 24 => (8, 1),
        4 | 5 | 10 | 16 => (16, 1),
        1 | 6 | 12 => (32, 1),
        7 | 11 | 13 => (64, 1),
        14 => (64, 1),
        15 => (128, 1),
        21..=23 => (4, 2),
        25 | 26 => (2, 4),
        27 | 28 => (6, 1),
        8 => (0, 1),
        _ => return Ok(()), // an element type this build does not know: dims checked only
    };
    if !raw.is_empty() {
        if dt == 8 {
            bail!("tensor '{name}': a string tensor cannot store its data in raw_data");
        }
        let expected = count.checked_mul(raw_bits).map(|bits| bits.div_ceil(8));
        match expected {
            Some(e) if raw.len() as u64 == e => return Ok(()),
            Some(e) => bail!("tensor '{name}': raw_data holds {} bytes, but {} needs {e} bytes", raw.len(), describe()),
            None => bail!("tensor '{name}': the byte size of {} overflows", describe()),
        }
    }
    // Typed fields: complex numbers take two values per element, 4- and 2-bit types are packed.
    let expected = match dt {
        14 | 15 => count.checked_mul(2),
        _ => Some(count.div_ceil(typed_per_value)),
    };
    match expected {
        Some(e) if typed == e => Ok(()),
        _ if typed == 0 => bail!("tensor '{name}': no data for the {count} elements of {}", describe()),
        _ => bail!("tensor '{name}': holds {typed} values, but {} has {count} elements", describe()),
    }
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
            let real = std::fs::canonicalize(&path)
                .with_context(|| format!("{}: missing or unreadable data file {}", ctx(), path.display()))?;
            // A symbolic link must not lead out of the folder either (tract refuses it too).
            if let Ok(root) = std::fs::canonicalize(dir) {
                if !real.starts_with(&root) {
                    bail!(
                        "{}: location '{location}' leads outside the model folder (to {}) through a symbolic link",
                        ctx(),
                        real.display()
                    );
                }
            }
            let bytes =
                read_file_bytes(&real).with_context(|| format!("{}: missing or unreadable data file", ctx()))?;
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
    checked_len(proto)?;
    Ok(proto.encode_to_vec())
}

/// Saves a model atomically, with external data when asked or when it would not fit in 2 GiB.
///
/// The protobuf is encoded straight into the file (never into one big buffer first), and with
/// external data both files are written to temporary files and only renamed into place once
/// both are complete, so a failure leaves neither behind.
pub fn save(proto: &ModelProto, path: &Path, opts: &SaveOptions) -> Result<Saved> {
    let ctx = || format!("cannot write {}", path.display());
    let external = opts.external || proto.encoded_len() > protobuf_limit();
    if !external {
        let len = checked_len(proto).with_context(ctx)?;
        write_atomic(path, |w| encode_into(proto, w)).with_context(ctx)?;
        return Ok(Saved { bytes: len as u64, external_file: None, external_bytes: 0 });
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
    let len = checked_len(&proto).with_context(ctx)?;
    let data_tmp = write_temp(&data_path, |w| {
        for c in &chunks {
            write_releasing(w, c)?;
        }
        Ok(())
    })
    .with_context(|| format!("cannot write {}", data_path.display()))?;
    drop(chunks);
    let model_tmp = write_temp(path, |w| encode_into(&proto, w)).with_context(ctx)?;
    data_tmp
        .persist(&data_path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", data_path.display()))?;
    if let Err(e) = model_tmp.persist(path) {
        // Without its model file the data file is a partial output.
        let _ = std::fs::remove_file(&data_path);
        return Err(e.error).with_context(ctx);
    }
    Ok(Saved { bytes: len as u64, external_file: Some(data_path), external_bytes: offset })
}

/// The encoded length of a model, or an error when it is over protobuf's limit.
fn checked_len(proto: &ModelProto) -> Result<usize> {
    let len = proto.encoded_len();
    if len > protobuf_limit() {
        bail!("the model encodes to {len} bytes, over protobuf's 2 GiB limit: save it with external data");
    }
    Ok(len)
}

/// Encodes a model into a writer through a small buffer (no copy of the whole encoding).
pub fn encode_into(proto: &ModelProto, w: &mut dyn Write) -> Result<()> {
    checked_len(proto)?;
    let mut sink = WriteSink { w, buf: Vec::with_capacity(WriteSink::CAP), err: None };
    proto.encode(&mut sink).context("protobuf encoding failed")?;
    sink.flush_buf();
    match sink.err {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Writes `data` a piece at a time, releasing each piece's pages once written when it lies in
/// a memory-mapped input ([`release_pages`]), so that writing a model's weights does not leave
/// them all resident.
fn write_releasing(w: &mut dyn Write, data: &[u8]) -> std::io::Result<()> {
    for piece in data.chunks(1 << 22) {
        w.write_all(piece)?;
        release_pages(piece);
    }
    Ok(())
}

/// A `BufMut` that streams into a `Write`: small puts (tags, varints) are gathered in a
/// buffer, large slices (tensor payloads) go straight through. The first I/O error is kept
/// and every later write is skipped.
struct WriteSink<'a> {
    w: &'a mut dyn Write,
    buf: Vec<u8>,
    err: Option<std::io::Error>,
}

impl WriteSink<'_> {
    const CAP: usize = 1 << 16;

    fn flush_buf(&mut self) {
        if self.err.is_none() && !self.buf.is_empty() {
            if let Err(e) = self.w.write_all(&self.buf) {
                self.err = Some(e);
            }
        }
        self.buf.clear();
    }
}

// SAFETY: `chunk_mut` hands out the vector's spare capacity (never empty: the buffer is
// flushed when full) and `advance_mut` only extends the length over bytes the caller wrote
// into that spare capacity.
unsafe impl bytes::BufMut for WriteSink<'_> {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize - self.buf.len()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let new_len = self.buf.len() + cnt;
        assert!(new_len <= self.buf.capacity(), "advance_mut past the chunk");
        // SAFETY: per the trait contract the caller initialized `cnt` bytes of `chunk_mut`.
        unsafe { self.buf.set_len(new_len) };
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
        bytes::buf::UninitSlice::uninit(self.buf.spare_capacity_mut())
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() <= self.buf.capacity() - self.buf.len() {
            self.buf.extend_from_slice(src);
            return;
        }
        self.flush_buf();
        if src.len() < Self::CAP {
            self.buf.extend_from_slice(src);
        } else if self.err.is_none() {
            // Large payloads go straight through.
            if let Err(e) = write_releasing(self.w, src) {
                self.err = Some(e);
            }
        }
    }

    fn put_u8(&mut self, n: u8) {
        self.put_slice(&[n]);
    }

    fn put<T: bytes::Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let chunk = src.chunk();
            let n = chunk.len();
            self.put_slice(chunk);
            src.advance(n);
        }
    }
}

/// Writes a file through a temporary file in the same folder, renamed into place on success.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let tmp = write_temp(path, write)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Writes a complete temporary file (`.onnxq-tmp-*`) in `path`'s folder, to be persisted as
/// `path`; dropping it deletes it.
fn write_temp(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<tempfile::NamedTempFile> {
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
    Ok(tmp)
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

    /// A table given up for a single load drops each payload once it is handed over (a second
    /// request is an error); a shared one keeps them.
    #[test]
    fn owned_runtime_weights_are_handed_over_once() -> Result<()> {
        use crate::onnx::builder::{graph, model, node, tensor_info};
        use crate::onnx::tensor::vec_f32;
        let big: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let g = graph(
            "g",
            vec![node("Add", "add", &["x", "big"], &["y"], vec![])],
            vec![tensor_info("x", 1, &[1000])],
            vec![tensor_info("y", 1, &[1000])],
            vec![vec_f32("big", &big)],
        );
        let m = model(g, 13);
        let copy = |w: &RuntimeWeights| w.handed_over(0, |t| Ok(t.to_vec()));
        let shared = encode_for_runtime(&m)?;
        assert_eq!(shared.weights().held_bytes(), 4000);
        assert_eq!(copy(shared.weights())?.len(), 4000);
        assert_eq!(copy(shared.weights())?.len(), 4000, "a shared table keeps its payloads");
        let (_, owned) = encode_for_runtime(&m)?.into_owned_parts();
        assert_eq!(copy(&owned)?.len(), 4000);
        assert_eq!(owned.held_bytes(), 0, "the payload is dropped once handed over");
        let again = copy(&owned).expect_err("a second request");
        assert!(format!("{again:#}").contains("already handed over"), "{again:#}");
        assert!(owned.handed_over(1, |t| Ok(t.len())).is_err(), "no payload #1");
        Ok(())
    }

    #[test]
    fn streamed_encoding_matches_encode_to_vec() {
        use crate::onnx::builder::{graph, model, node, tensor_info};
        use crate::onnx::tensor::{vec_f32, vec_i64};
        let big: Vec<f32> = (0..100_000).map(|i| i as f32 * 0.5).collect();
        let g = graph(
            "g",
            vec![node("Add", "add", &["x", "big"], &["y"], vec![])],
            vec![tensor_info("x", 1, &[100_000])],
            vec![tensor_info("y", 1, &[100_000])],
            vec![vec_f32("big", &big), vec_i64("small", &[1, 2, 3])],
        );
        let m = model(g, 13);
        let mut out = Vec::new();
        encode_into(&m, &mut out).unwrap();
        assert_eq!(out, m.encode_to_vec());
        struct Failing;
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        assert!(encode_into(&m, &mut Failing).unwrap_err().to_string().contains("disk full"));
    }

    #[test]
    fn payload_sizes_are_checked_at_load() {
        use crate::onnx::builder::{graph, model, node, tensor_info};
        use crate::onnx::tensor::vec_f32;
        let load = |t: TensorProto| {
            let g = graph(
                "g",
                vec![node("Add", "add", &["x", "w"], &["y"], vec![])],
                vec![tensor_info("x", 1, &[2])],
                vec![tensor_info("y", 1, &[2])],
                vec![t],
            );
            load_bytes(Bytes::from(model(g, 13).encode_to_vec()), None).map(|_| ()).map_err(|e| format!("{e:#}"))
        };
        assert!(load(vec_f32("w", &[1.0, 2.0])).is_ok());
        let mut t = vec_f32("w", &[1.0, 2.0]);
        t.dims = vec![1 << 20, 1 << 20];
        let e = load(t).unwrap_err();
        assert!(e.contains("tensor 'w': raw_data holds 8 bytes, but float shape [1048576, 1048576]"), "{e}");
        let mut t = vec_f32("w", &[1.0, 2.0]);
        t.dims = vec![1 << 62, 1 << 62];
        assert!(load(t).unwrap_err().contains("overflows"));
        let mut t = vec_f32("w", &[1.0, 2.0]);
        t.dims = vec![-2];
        assert!(load(t).unwrap_err().contains("negative dim"));
        let mut t = vec_f32("w", &[1.0, 2.0]);
        t.data_type = Some(11);
        assert!(load(t).unwrap_err().contains("raw_data holds 8 bytes, but double shape [2] needs 16 bytes"));
        let mut t = vec_f32("w", &[1.0, 2.0]);
        t.raw_data = None;
        t.float_data = vec![1.0];
        assert!(load(t.clone()).unwrap_err().contains("holds 1 values, but float shape [2] has 2 elements"));
        t.float_data.clear();
        assert!(load(t).unwrap_err().contains("no data for the 2 elements"));
        // Zero elements with a huge dim are fine here (nothing to allocate).
        let mut t = vec_f32("w", &[]);
        t.dims = vec![0, 1 << 40];
        assert!(load(t).is_ok());
    }

    #[test]
    fn empty_and_garbage_bytes_fail_cleanly() {
        assert!(load_bytes(Bytes::new(), None).is_err());
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        assert!(load_bytes(Bytes::from(png), None).is_err());
    }
}
