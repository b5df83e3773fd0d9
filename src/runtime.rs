//! Running ONNX models with tract: every call into tract lives here.
//!
//! The rest of the crate speaks ONNX through our own prost types (`crate::onnx::pb`, proto2)
//! and tensors through [`ArrayData`]. tract has its own generated proto types, so the model
//! crosses the boundary as serialized `ModelProto` bytes only, and tensors cross as ndarray
//! arrays (tract re-exports the same ndarray 0.17 the crate uses). The bytes of
//! [`crate::onnx::io::encode_for_runtime`] carry no large weights: they are external data
//! references that [`TableResolver`], installed as tract's data resolver, serves from memory.
//!
//! Known tract 0.23.9 facts this module relies on:
//! - The loader must be `tract_onnx::onnx().with_ignore_value_info(true)`: real exports carry
//!   `value_info` shapes that fail tract's shape unification otherwise.
//! - Graph inputs with `-1`/symbolic dims need concrete facts before typing, so every input gets
//!   `InferenceFact::dt_shape(dt, shape)` from the caller's [`InputFact`]s (matched by name, then
//!   put in the caller's order).
//! - Requested tensors become model outputs *before* `into_optimized()`, otherwise the optimizer
//!   is free to fuse them away. The names are resolved with the `outlets_by_name` map tract's
//!   ONNX parser returns (exact ONNX tensor names, intermediate ones included). tract's own
//!   `select_outputs_by_name` is not used: it also accepts node names and `node:slot` forms, and
//!   silently maps a node name to that node's first output.
//! - A plan output is held until the end of the run and cannot be reused in place, so once
//!   optimized, only the requested tensors nothing consumes stay outputs (`unpinned_plan`); the
//!   others are handed over as their nodes run, through `SimpleState::run_plan_with_eval`
//!   (tract's own `plan::eval` per node, then a look at the node's outputs), and tract frees
//!   them after their last consumer. Requested tensors tract folded into constants are never
//!   evaluated in a run: their values are kept from the optimized model.
//! - An op type missing from tract's op register does not fail at load time: tract inserts an
//!   `UnimplementedOp` that only fails when typing, with a message that lacks the op type. On any
//!   failure we list the graph's unsupported nodes (name and op type) and the nodes tract's error
//!   chain mentions, on top of tract's own chain (print errors with `{:#}` to see all of it).
//! - tract's parser indexes maps with graph output names, so a graph output that nothing produces
//!   panics inside tract; such names are checked first, and every tract call is additionally run
//!   under `catch_unwind` so a tract panic becomes an error.
//! - ONNX int64 shape computations come back as `TDim` tensors; they are converted to `I64`.
//!   `f16` outputs are widened to `F32`; quantized datum types come back as their plain ints.
//! - tract's ONNX op register takes extra ops: [`FAKE_QUANTIZE_OP`], the fake-quant twin's fused
//!   QuantizeLinear → DequantizeLinear pair, is one there, an element-wise op (tract's
//!   `ElementWiseMiniOp`) evaluated in place.
//! - A runnable plan (`Arc<SimplePlan>`) is `Send + Sync`; `run` spawns a fresh state per call,
//!   so one [`Plan`] can serve many rayon threads at once. tract's default executor is single
//!   threaded, so parallelism is the caller's (per sample).

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use prost::Message;
use tract_onnx::model::{Onnx, ParseResult};
use tract_onnx::pb as tpb;
use tract_onnx::prelude::{
    DatumType, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, OutletId, TValue, TVec, Tensor, TypedModel,
    TypedSimplePlan,
};

use crate::array::{dtype, ArrayData};
use crate::quantize::params::{round_small, ROUND_LIMIT};
use ndarray::ArrayViewD;

/// A concrete fact (element type and shape) for one graph input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFact {
    pub name: String,
    /// ONNX `TensorProto.DataType` code (see [`crate::array::dtype`]).
    pub elem_type: i32,
    pub shape: Vec<usize>,
}

/// An optimized, runnable tract plan for a fixed set of input facts and requested outputs.
pub struct Plan {
    plan: std::sync::Arc<TypedSimplePlan>,
    inputs: Vec<InputFact>,
    input_dts: Vec<DatumType>,
    outputs: Vec<String>,
    /// For each requested output, its index among the plan's (deduplicated) outputs.
    output_slots: Vec<usize>,
    /// Per node id of the optimized model: the requested tensors it computes, reported as
    /// soon as the node has run.
    watch: Vec<Vec<Watch>>,
    /// Requested tensors that tract folded into constants: (deduplicated index, value).
    consts: Vec<(usize, TValue)>,
}

// A plan is shared across rayon threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Plan>();
};

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("inputs", &self.inputs).field("outputs", &self.outputs).finish_non_exhaustive()
    }
}

impl Plan {
    /// Loads, types and optimizes a model into a runnable plan.
    ///
    /// `model_bytes`: a serialized ONNX `ModelProto` (possibly memory-mapped). `model_dir`: where
    /// tract resolves external-data files (only needed when they were not inlined). `inputs`:
    /// concrete facts for every graph input (graph inputs backed by an initializer excluded);
    /// their order is the order of [`Plan::run`]'s inputs. `outputs`: the ONNX tensor names to
    /// return (graph outputs and/or intermediate tensors).
    pub fn load(
        model_bytes: &[u8],
        model_dir: Option<&Path>,
        inputs: &[InputFact],
        outputs: &[String],
    ) -> Result<Plan> {
        Plan::load_with(model_bytes, model_dir, inputs, outputs, &mut || {})
    }

    /// [`Plan::load`] of a runtime encoding that it owns: the weights table is dropped as soon
    /// as tract has copied the weights, before the plan is optimized (which packs them again),
    /// so a caller that dropped the model after encoding it never holds the weights three
    /// times (the fake-quant twin's float weights, e.g.).
    pub fn load_owned(model: crate::onnx::io::RuntimeBytes, inputs: &[InputFact], outputs: &[String]) -> Result<Plan> {
        let (bytes, weights) = model.into_owned_parts();
        let mut weights = Some(weights);
        Plan::load_with(&bytes, None, inputs, outputs, &mut || drop(weights.take()))
    }

    fn load_with(
        model_bytes: &[u8],
        model_dir: Option<&Path>,
        inputs: &[InputFact],
        outputs: &[String],
        parsed: &mut dyn FnMut(),
    ) -> Result<Plan> {
        if outputs.is_empty() {
            bail!("no output tensors requested");
        }
        let prepared = prepare(model_bytes, model_dir, inputs, Some(outputs), parsed)?;
        let Prepared { model, input_dts, output_slots, diag } = prepared;
        let (plan, watch, consts) = guarded("build a runnable plan from", || unpinned_plan(model))
            .map_err(|e| diag.explain(e, "tract could not build a runnable plan for the model"))?;
        Ok(Plan { plan, inputs: inputs.to_vec(), input_dts, outputs: outputs.to_vec(), output_slots, watch, consts })
    }

    /// The requested output tensor names, in the order [`Plan::run`] returns them.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// The input facts the plan was built for, in the order [`Plan::run`] takes them.
    pub fn inputs(&self) -> &[InputFact] {
        &self.inputs
    }

    /// Runs one sample. `inputs` are in the order of `load`'s `inputs` and must have exactly the
    /// shapes given there; data whose element type differs from the input's is cast (e.g. `F32`
    /// data for a float16 input). Returns one array per requested output, in order.
    pub fn run(&self, inputs: &[ArrayData]) -> Result<Vec<ArrayData>> {
        // Each tensor is copied as soon as it is computed and tract's buffer is left to tract,
        // so a sample's outputs are not held twice.
        let mut converted: Vec<Option<Result<ArrayData>>> = (0..self.unique_outputs()).map(|_| None).collect();
        self.run_streaming(inputs, |slot, value, shape| converted[slot] = Some(to_array(value, shape)))?;
        let mut converted = converted
            .into_iter()
            .enumerate()
            .map(|(slot, c)| {
                let name = self
                    .output_slots
                    .iter()
                    .position(|&s| s == slot)
                    .and_then(|p| self.outputs.get(p))
                    .map_or("?", String::as_str);
                c.ok_or_else(|| anyhow!("missing output {slot}"))?
                    .with_context(|| format!("converting output tensor '{name}'"))
            })
            .collect::<Result<Vec<_>>>()?;
        if self.output_slots.iter().copied().eq(0..converted.len()) {
            return Ok(converted);
        }
        let mut out = Vec::with_capacity(self.output_slots.len());
        for (p, &s) in self.output_slots.iter().enumerate() {
            // The last request of a slot takes the array, earlier ones a copy.
            let last = !self.output_slots[p + 1..].contains(&s);
            let a = converted.get_mut(s).ok_or_else(|| anyhow!("missing output {s}"))?;
            out.push(if last {
                std::mem::replace(a, ArrayData::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[0]))))
            } else {
                a.clone()
            });
        }
        Ok(out)
    }

    /// Runs one sample and hands each requested output that tract holds as plain `f32` to
    /// `visit` as a view into tract's own buffer (no copy; float16 is widened into a temporary,
    /// other element types give `None`), right after the node computing it has run: tract
    /// frees it once its last consumer is done, so a sample's requested tensors are never all
    /// alive at once. `visit` gets the output's index in [`Plan::outputs`] (once per index,
    /// in no particular order). Returns `visit`'s results in the order of [`Plan::outputs`].
    pub fn run_visit_f32<T>(
        &self,
        inputs: &[ArrayData],
        visit: impl FnMut(usize, Option<ArrayViewD<'_, f32>>) -> T,
    ) -> Result<Vec<T>> {
        Ok(self.run_each(inputs, &vec![false; self.output_slots.len()], visit)?.1)
    }

    /// [`Plan::run_visit_f32`] that also returns a copy of the outputs marked in `copy` (by
    /// index in [`Plan::outputs`], any element type, as [`Plan::run`] converts them; `None`
    /// for the others): a piece of a model hands over the few tensors it must keep and reads
    /// the rest in place.
    pub fn run_each<T>(
        &self,
        inputs: &[ArrayData],
        copy: &[bool],
        mut visit: impl FnMut(usize, Option<ArrayViewD<'_, f32>>) -> T,
    ) -> Result<(Vec<Option<ArrayData>>, Vec<T>)> {
        if copy.len() != self.output_slots.len() {
            bail!("internal error: {} copy flags for {} outputs", copy.len(), self.output_slots.len());
        }
        let mut copies: Vec<Option<Result<ArrayData>>> = self.output_slots.iter().map(|_| None).collect();
        let mut results: Vec<Option<T>> = self.output_slots.iter().map(|_| None).collect();
        self.run_streaming(inputs, |slot, value, shape| {
            for (p, _) in self.output_slots.iter().enumerate().filter(|&(_, &s)| s == slot) {
                if copy[p] {
                    copies[p] = Some(to_array(value, shape));
                }
                results[p] = Some(with_f32_view(value, shape, |v| visit(p, v)));
            }
        })?;
        let copies = copies
            .into_iter()
            .enumerate()
            .map(|(p, c)| {
                c.transpose().with_context(|| {
                    format!("converting output tensor '{}'", self.outputs.get(p).map_or("?", String::as_str))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let results = results
            .into_iter()
            .enumerate()
            .map(|(p, r)| r.ok_or_else(|| anyhow!("missing output {p}")))
            .collect::<Result<Vec<T>>>()?;
        Ok((copies, results))
    }

    fn unique_outputs(&self) -> usize {
        self.output_slots.iter().copied().max().map_or(0, |m| m + 1)
    }

    /// Checks and converts the inputs, runs the plan, and hands every deduplicated output to
    /// `seen` (its index, its value) as soon as it is computed. Fails if one is never seen.
    fn run_streaming(
        &self,
        inputs: &[ArrayData],
        mut seen: impl FnMut(usize, &TValue, Option<&[usize]>),
    ) -> Result<()> {
        let values = self.input_values(inputs)?;
        let mut count = 0;
        for (slot, value) in &self.consts {
            seen(*slot, value, None);
            count += 1;
        }
        guarded("run", || {
            let mut state = self.plan.spawn()?;
            state.run_plan_with_eval(values, |ctx, op_state, node, node_inputs| -> Result<TVec<TValue>> {
                let outs = tract_onnx::tract_core::plan::eval(ctx, op_state, node, node_inputs)?;
                for w in self.watch.get(node.id).map_or(&[][..], Vec::as_slice) {
                    let value =
                        outs.get(w.output).with_context(|| format!("node {} has no output {}", node.name, w.output))?;
                    seen(w.slot, value, w.shape.as_deref());
                    count += 1;
                }
                Ok(outs)
            })
        })
        .context("tract failed to run the model")?;
        if count != self.unique_outputs() {
            bail!("tract computed {count} of the {} requested tensors", self.unique_outputs());
        }
        Ok(())
    }

    /// The inputs as tract values, checked against the plan's facts (cast where the element
    /// types differ).
    fn input_values(&self, inputs: &[ArrayData]) -> Result<TVec<TValue>> {
        if inputs.len() != self.inputs.len() {
            bail!(
                "the plan takes {} inputs ({}), got {}",
                self.inputs.len(),
                self.inputs.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "),
                inputs.len()
            );
        }
        let mut values: TVec<TValue> = TVec::with_capacity(inputs.len());
        for ((data, fact), &dt) in inputs.iter().zip(&self.inputs).zip(&self.input_dts) {
            if data.shape() != fact.shape.as_slice() {
                bail!("input '{}' has shape {:?}, the plan was built for {:?}", fact.name, data.shape(), fact.shape);
            }
            let tensor = to_tensor(data);
            let tensor = if tensor.datum_type() == dt {
                tensor
            } else {
                tensor
                    .cast_to_dt(dt)
                    .with_context(|| {
                        format!(
                            "input '{}': cannot convert {} data to the model's {}",
                            fact.name,
                            dtype::name(data.elem_type()),
                            dtype::name(fact.elem_type)
                        )
                    })?
                    .into_owned()
            };
            values.push(tensor.into_tvalue());
        }
        Ok(values)
    }
}

/// A requested tensor as a node of the optimized model computes it.
#[derive(Debug, Clone)]
struct Watch {
    /// The node's output slot.
    output: usize,
    /// The requested tensor's deduplicated output index.
    slot: usize,
    /// The requested tensor's shape, when the node's output holds its elements in the same
    /// (C) order under another shape (see [`reshaped_source`]).
    shape: Option<Vec<usize>>,
}

/// The outlet whose tensor holds the elements of `o`'s in the same C order, and `o`'s shape:
/// through the IntoShape nodes tract puts around a convolution it runs as a matrix product
/// (they only set a new shape, with natural strides). Reporting that tensor instead lets the
/// plan skip a reshape kept only for the report, and a reshape copies its input whenever
/// that input has another consumer still to run (PP-OCR det: a pinned convolution output
/// read by its Gelu was copied every sample, 4% of the calibration's CPU time). `None`
/// when `o` is no such reshape or its shape is not concrete.
fn reshaped_source(model: &TypedModel, o: OutletId) -> Option<(OutletId, Vec<usize>)> {
    use tract_onnx::tract_core::ops::{change_axes::IntoShape, konst::Const};
    let shape = model.outlet_fact(o).ok()?.shape.as_concrete()?.to_vec();
    let mut src = o;
    while let Some(op) = model.node(src.node).op_as::<IntoShape>() {
        let node = model.node(src.node);
        let natural = op.strides[..] == Tensor::natural_strides(&op.dims)[..];
        // (A constant is never evaluated in a run, so it could not be reported.)
        let input_const = node.inputs.first().is_some_and(|i| model.node(i.node).op_is::<Const>());
        if node.inputs.len() != 1 || !natural || op.len != shape.iter().product::<usize>() || input_const {
            break;
        }
        src = node.inputs[0];
    }
    (src != o).then_some((src, shape))
}

/// The runnable plan of an optimized model whose outputs are the requested tensors, with
/// those tensors no longer held as outputs: they were outputs through optimization, so no
/// fusion removed them, but a plan output stays alive until the end of the run and cannot be
/// reused in place. The plan's outputs become the requested tensors nothing consumes (the
/// ends of the graph, which every other requested tensor feeds); the rest are reported by
/// [`Plan::run_streaming`] as their nodes run (a reshaped one from the tensor it reshapes,
/// [`reshaped_source`]). Returns the plan, the per-node watch list and the requested tensors
/// tract folded into constants (never evaluated in a run).
#[allow(clippy::type_complexity)]
fn unpinned_plan(
    mut model: TypedModel,
) -> Result<(std::sync::Arc<TypedSimplePlan>, Vec<Vec<Watch>>, Vec<(usize, TValue)>)> {
    use tract_onnx::tract_core::ops::konst::Const;
    let requested: Vec<OutletId> = model.output_outlets()?.to_vec();
    let mut watch = vec![Vec::new(); model.nodes().len()];
    let mut consts = vec![];
    // Each requested tensor and the tensor it is reported from.
    let mut reported = vec![];
    for (slot, &o) in requested.iter().enumerate() {
        if let Some(k) = model.node(o.node).op_as::<Const>() {
            consts.push((slot, k.val().clone().into_tvalue()));
            continue;
        }
        let (src, shape) = reshaped_source(&model, o).map_or((o, None), |(src, shape)| (src, Some(shape)));
        watch[src.node].push(Watch { output: src.slot, slot, shape });
        reported.push((o, src));
    }
    // The reshapes that only lead to a requested tensor nothing consumes (there to make it an
    // output) need not run: the tensor is reported from the reshaped one.
    let mut dead = vec![false; model.nodes().len()];
    for &(o, src) in &reported {
        let mut cur = o;
        while cur != src && model.outlet_successors(cur).iter().all(|s| dead[s.node]) {
            dead[cur.node] = true;
            cur = model.node(cur.node).inputs[0];
        }
    }
    let live = |o: OutletId| model.outlet_successors(o).iter().any(|s| !dead[s.node]);
    let mut ends = vec![];
    for &(o, src) in &reported {
        let end = if dead[o.node] { src } else { o };
        if !live(end) && !ends.contains(&end) {
            ends.push(end);
        }
    }
    // Every watched node must be computed for the ends; otherwise keep all requested outputs.
    let mut needed = vec![false; model.nodes().len()];
    let mut stack: Vec<usize> = ends.iter().map(|o| o.node).collect();
    while let Some(n) = stack.pop() {
        if !std::mem::replace(&mut needed[n], true) {
            stack.extend(model.node(n).inputs.iter().map(|i| i.node));
        }
    }
    if ends.is_empty() || watch.iter().enumerate().any(|(n, w)| !w.is_empty() && !needed[n]) {
        ends = requested.iter().copied().filter(|o| model.node(o.node).op_as::<Const>().is_none()).collect();
    }
    if !ends.is_empty() {
        model.select_output_outlets(&ends)?;
    }
    Ok((model.into_runnable()?, watch, consts))
}

/// Loads, types and optimizes the model for `inputs` with its own graph outputs, to report
/// unsupported ops or shape errors early. Nothing is run.
pub fn check_runnable(model_bytes: &[u8], inputs: &[InputFact]) -> Result<()> {
    prepare(model_bytes, None, inputs, None, &mut || {}).map(|_| ())
}

/// An optimized model with the bookkeeping `Plan` needs.
struct Prepared {
    model: TypedModel,
    input_dts: Vec<DatumType>,
    output_slots: Vec<usize>,
    diag: Diagnostics,
}

fn prepare(
    model_bytes: &[u8],
    model_dir: Option<&Path>,
    inputs: &[InputFact],
    outputs: Option<&[String]>,
    parsed: &mut dyn FnMut(),
) -> Result<Prepared> {
    let proto = tpb::ModelProto::decode(model_bytes).context("tract could not decode the ONNX model (ModelProto)")?;
    let mut onnx = tract_onnx::onnx().with_ignore_value_info(true);
    onnx.op_register.insert(FAKE_QUANTIZE_OP, fake_quantize_op);
    let diag = Diagnostics::new(&proto, &onnx);
    let graph = proto.graph.as_ref().context("the ONNX model has no graph")?;
    check_graph_outputs_produced(graph)?;

    // The weights of `encode_for_runtime` are served from its table (see `TableResolver`).
    let table = proto.metadata_props.iter().find(|p| p.key == crate::onnx::io::RUNTIME_WEIGHTS_KEY);
    let dir = match table {
        Some(p) => {
            let weights = crate::onnx::io::runtime_weights(&p.value)
                .context("the model's runtime weights are no longer in memory (internal error)")?;
            onnx.provider = std::sync::Arc::new(TableResolver(weights));
            Some("/")
        }
        None => model_dir
            .map(|d| d.to_str().with_context(|| format!("model directory {} is not valid UTF-8", d.display())))
            .transpose()?,
    };
    let ParseResult { mut model, unresolved_inputs, outlets_by_name } =
        guarded("load", || onnx.parse(&proto, dir)).map_err(|e| diag.explain(e, "tract could not load the model"))?;
    if !unresolved_inputs.is_empty() {
        bail!(
            "tract could not load the model: tensors {unresolved_inputs:?} are consumed by nodes \
             but are neither graph inputs, initializers nor node outputs"
        );
    }
    // The decoded proto holds a copy of every weight; tract's model now holds its own.
    drop(proto);
    // So does the weights table, which `onnx` keeps alive; the caller may release its own.
    drop(onnx);
    parsed();

    // Inputs: match tract's sources by name, reorder them as the caller's facts, set the facts.
    let sources: Vec<OutletId> = model.input_outlets()?.to_vec();
    let mut by_name: HashMap<String, OutletId> =
        sources.iter().map(|&o| (model.node(o.node).name.clone(), o)).collect();
    let mut ordered = Vec::with_capacity(inputs.len());
    let mut input_dts = Vec::with_capacity(inputs.len());
    for fact in inputs {
        let outlet = match by_name.remove(&fact.name) {
            Some(o) => o,
            None if ordered.iter().any(|&o: &OutletId| model.node(o.node).name == fact.name) => {
                bail!("input '{}' is given twice", fact.name)
            }
            None if outlets_by_name.contains_key(&fact.name) => {
                bail!("'{}' is not a runtime input of the model (it is an initializer or a node output)", fact.name)
            }
            None => bail!("'{}' is not a graph input of the model", fact.name),
        };
        ordered.push(outlet);
        input_dts.push(datum_type_of(fact.elem_type).with_context(|| {
            format!(
                "input '{}' has element type {} ({}), which tract cannot take as input",
                fact.name,
                fact.elem_type,
                dtype::name(fact.elem_type)
            )
        })?);
    }
    if !by_name.is_empty() {
        let mut missing: Vec<_> = by_name.into_keys().collect();
        missing.sort();
        bail!("no input fact given for graph input(s) {}", missing.join(", "));
    }
    model.set_input_outlets(&ordered)?;
    for (ix, (fact, &dt)) in inputs.iter().zip(&input_dts).enumerate() {
        model
            .set_input_fact(ix, InferenceFact::dt_shape(dt, fact.shape.iter().copied()))
            .with_context(|| format!("setting the fact of input '{}'", fact.name))?;
    }

    // Outputs: exact ONNX tensor names, deduplicated, selected before optimization.
    let mut output_slots = vec![];
    if let Some(outputs) = outputs {
        let mut unique: Vec<OutletId> = vec![];
        for name in outputs {
            let outlet =
                *outlets_by_name.get(name).with_context(|| format!("tensor '{name}' not found in the model"))?;
            let slot = match unique.iter().position(|&o| o == outlet) {
                Some(s) => s,
                None => {
                    unique.push(outlet);
                    unique.len() - 1
                }
            };
            output_slots.push(slot);
        }
        model.select_output_outlets(&unique)?;
    }

    let typed = guarded("type", || model.into_typed())
        .map_err(|e| diag.explain(e, "tract could not type the model (type and shape inference)"))?;
    let optimized = guarded("optimize", || typed.into_optimized())
        .map_err(|e| diag.explain(e, "tract could not optimize the model"))?;
    if outputs.is_some() && optimized.output_outlets()?.len() != output_slots.iter().max().map_or(0, |m| m + 1) {
        bail!("tract's optimized model lost some requested outputs");
    }
    Ok(Prepared { model: optimized, input_dts, output_slots, diag })
}

/// Op type of the fused QuantizeLinear → DequantizeLinear pair of the fake-quant twin
/// ([`crate::fakequant`]), in domain [`FAKE_QUANTIZE_DOMAIN`]; attributes `q_scale`,
/// `q_zero_point`, `qmin`, `qmax`, `dq_scale`, `dq_zero_point` (floats, per tensor).
pub const FAKE_QUANTIZE_OP: &str = "OnnxqFakeQuantize";
pub const FAKE_QUANTIZE_DOMAIN: &str = "ai.onnxq.twin";

/// `y = (clip(round_half_even(x / q_scale) + q_zero_point, qmin, qmax) − dq_zero_point) · dq_scale`
/// in float32, element by element: QuantizeLinear then DequantizeLinear as ONNX defines them
/// (an f32 division is correctly rounded, and the quantized values are small integers, exact
/// in f32), in one pass instead of the six to eight float ops that spell it in ONNX. A twin
/// built from those loads several times slower in tract (its optimizer passes grow with the
/// node count).
#[derive(Debug, Clone, PartialEq)]
struct FakeQuantize {
    q_scale: f32,
    q_zero_point: f32,
    qmin: f32,
    qmax: f32,
    dq_scale: f32,
    dq_zero_point: f32,
}

// The parameters are finite (checked when the op is built), so equality is an equivalence.
impl Eq for FakeQuantize {}

impl FakeQuantize {
    /// Whether [`round_small`]'s saturation at `±2²²` changes nothing: the clip to
    /// `[qmin, qmax]` after adding the zero point then saturates the same way.
    fn magic_rounding(&self) -> bool {
        let reach = self.qmin.abs().max(self.qmax.abs()) + self.q_zero_point.abs();
        reach < ROUND_LIMIT / 2.0
    }

    fn apply_slice(&self, xs: &mut [f32]) {
        let (s, zp, lo, hi, dzp, ds) =
            (self.q_scale, self.q_zero_point, self.qmin, self.qmax, self.dq_zero_point, self.dq_scale);
        if self.magic_rounding() {
            for x in xs {
                let q = (round_small(*x / s) + zp).clamp(lo, hi);
                *x = (q - dzp) * ds;
            }
        } else {
            for x in xs {
                let q = ((*x / s).round_ties_even() + zp).clamp(lo, hi);
                *x = (q - dzp) * ds;
            }
        }
    }
}

impl tract_onnx::tract_core::ops::element_wise::ElementWiseMiniOp for FakeQuantize {
    fn name(&self) -> String {
        FAKE_QUANTIZE_OP.into()
    }

    fn eval_in_place(&self, t: &mut Tensor, _out_dt: Option<DatumType>) -> tract_onnx::prelude::TractResult<()> {
        if t.datum_type() != DatumType::F32 {
            bail!("{FAKE_QUANTIZE_OP} takes float32, got {:?}", t.datum_type());
        }
        let mut plain = t.try_as_plain_ram_mut()?;
        self.apply_slice(plain.as_slice_mut::<f32>()?);
        Ok(())
    }
}

/// tract's builder of [`FakeQuantize`] from its ONNX node.
fn fake_quantize_op(
    _: &tract_onnx::model::ParsingContext,
    node: &tpb::NodeProto,
) -> tract_onnx::prelude::TractResult<(Box<dyn tract_onnx::tract_hir::infer::InferenceOp>, Vec<String>)> {
    use tract_onnx::tract_hir::ops::element_wise::ElementWiseIntoHir;
    let attr = |name: &str| -> Result<f32> {
        let v: f32 = node.get_attr(name)?;
        if !v.is_finite() {
            bail!("{}: attribute {name} is {v}", node.name);
        }
        Ok(v)
    };
    let op = FakeQuantize {
        q_scale: attr("q_scale")?,
        q_zero_point: attr("q_zero_point")?,
        qmin: attr("qmin")?,
        qmax: attr("qmax")?,
        dq_scale: attr("dq_scale")?,
        dq_zero_point: attr("dq_zero_point")?,
    };
    let op = tract_onnx::tract_core::ops::element_wise::ElementWiseOp(Box::new(op), None);
    Ok((op.into_hir(), vec![]))
}

/// Serves the external data references of [`crate::onnx::io::encode_for_runtime`]: location
/// [`crate::onnx::io::RUNTIME_LOCATION`] (the model folder itself, which tract's path check
/// accepts for any existing folder, `/` here), `offset` = index in the table, `length` = the
/// payload's length. Nothing is read from disk.
struct TableResolver(std::sync::Arc<crate::onnx::io::RuntimeWeights>);

impl tract_onnx::data_resolver::ModelDataResolver for TableResolver {
    fn read_bytes_from_path(&self, buf: &mut Vec<u8>, _: &Path, offset: usize, length: Option<usize>) -> Result<()> {
        self.0.handed_over(offset, |t| {
            if length.is_some_and(|l| l != t.len()) {
                bail!("runtime weight #{offset} has {} bytes, not {length:?}", t.len());
            }
            buf.extend_from_slice(t);
            crate::onnx::io::release_pages(t);
            Ok(())
        })
    }
}

thread_local! {
    /// Set while this thread is inside [`guarded`].
    static IN_GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Wraps the process's panic hook (once) so that panics inside [`guarded`] calls print
/// nothing: they become errors carrying the panic message, and the command still ends with
/// its one-line `error:`. Panics anywhere else are reported as before.
fn silence_guarded_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_GUARDED.with(|g| g.get()) {
                previous(info)
            }
        }));
    });
}

/// Runs a tract call, turning a panic inside tract (e.g. tract-data's "failed to allocate"
/// on a hostile shape) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    silence_guarded_panics();
    let outer = IN_GUARDED.with(|g| g.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_GUARDED.with(|g| g.set(outer));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(anyhow!("tract failed internally (a panic) while trying to {what} the model: {msg}"))
        }
    }
}

/// tract's parser panics on graph outputs no node, input or initializer produces.
fn check_graph_outputs_produced(graph: &tpb::GraphProto) -> Result<()> {
    let mut known: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    known.extend(graph.initializer.iter().map(|t| t.name.as_str()));
    known.extend(graph.node.iter().flat_map(|n| n.output.iter().map(String::as_str)));
    for out in &graph.output {
        if !known.contains(out.name.as_str()) {
            bail!("graph output '{}' is not produced by any node, input or initializer", out.name);
        }
    }
    Ok(())
}

/// ONNX node names and op types, to make tract's errors name the culprits.
struct Diagnostics {
    /// Nodes (subgraphs included) whose op type tract has no builder for.
    unsupported: Vec<String>,
    /// Top-level nodes: (name as tract knows it, description).
    nodes: Vec<(String, String)>,
}

impl Diagnostics {
    fn new(proto: &tpb::ModelProto, onnx: &Onnx) -> Diagnostics {
        let mut unsupported = vec![];
        let mut nodes = vec![];
        if let Some(graph) = &proto.graph {
            collect_unsupported(graph, onnx, &mut unsupported);
            for (ix, node) in graph.node.iter().enumerate() {
                let tract_name = if !node.name.is_empty() {
                    node.name.clone()
                } else if let Some(o) = node.output.first().filter(|o| !o.is_empty()) {
                    o.clone()
                } else {
                    // tract names it after the node count, which includes constants: unknowable
                    // here, so it is never matched.
                    format!("\u{0}{ix}")
                };
                nodes.push((tract_name, describe(node)));
            }
        }
        Diagnostics { unsupported, nodes }
    }

    /// Wraps tract's error with a message naming unsupported nodes and the nodes its chain
    /// mentions, keeping the chain.
    fn explain(&self, err: anyhow::Error, what: &str) -> anyhow::Error {
        let chain = format!("{err:#}");
        let mut msg = what.to_string();
        if !self.unsupported.is_empty() {
            msg.push_str(&format!("; ops not supported by tract: {}", summarize(&self.unsupported)));
        }
        let mentioned: Vec<String> = self
            .nodes
            .iter()
            .filter(|(name, _)| chain.contains(&format!("\"{name}\"")) || chain.contains(&format!("\"{name}.")))
            .map(|(_, d)| d.clone())
            .collect();
        if !mentioned.is_empty() {
            msg.push_str(&format!("; tract's error concerns {}", summarize(&mentioned)));
        }
        err.context(msg)
    }
}

fn describe(node: &tpb::NodeProto) -> String {
    let domain =
        if node.domain.is_empty() || node.domain == "ai.onnx" { String::new() } else { format!("{}.", node.domain) };
    if node.name.is_empty() {
        let out = node.output.first().map_or("", String::as_str);
        format!("unnamed node producing '{out}' (op_type {domain}{})", node.op_type)
    } else {
        format!("node '{}' (op_type {domain}{})", node.name, node.op_type)
    }
}

fn collect_unsupported(graph: &tpb::GraphProto, onnx: &Onnx, out: &mut Vec<String>) {
    for node in &graph.node {
        if !onnx.op_register.0.contains_key(&node.op_type) {
            out.push(describe(node));
        }
        for attr in &node.attribute {
            for g in attr.g.iter().chain(attr.graphs.iter()) {
                collect_unsupported(g, onnx, out);
            }
        }
    }
}

fn summarize(items: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = items.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    s
}

/// tract datum type for an ONNX element type code a model input can have.
fn datum_type_of(code: i32) -> Option<DatumType> {
    Some(match code {
        dtype::FLOAT => DatumType::F32,
        dtype::UINT8 => DatumType::U8,
        dtype::INT8 => DatumType::I8,
        4 => DatumType::U16,
        5 => DatumType::I16,
        dtype::INT32 => DatumType::I32,
        dtype::INT64 => DatumType::I64,
        dtype::BOOL => DatumType::Bool,
        dtype::FLOAT16 => DatumType::F16,
        dtype::DOUBLE => DatumType::F64,
        12 => DatumType::U32,
        13 => DatumType::U64,
        _ => return None,
    })
}

fn to_tensor(data: &ArrayData) -> Tensor {
    match data {
        ArrayData::F32(a) => Tensor::from(a.clone()),
        ArrayData::F64(a) => Tensor::from(a.clone()),
        ArrayData::I64(a) => Tensor::from(a.clone()),
        ArrayData::I32(a) => Tensor::from(a.clone()),
        ArrayData::I8(a) => Tensor::from(a.clone()),
        ArrayData::U8(a) => Tensor::from(a.clone()),
        ArrayData::Bool(a) => Tensor::from(a.clone()),
    }
}

/// `a` with `shape` (the same elements in C order), or as it is without one.
fn shaped<'a, T>(a: ArrayViewD<'a, T>, shape: Option<&[usize]>) -> Result<ArrayViewD<'a, T>> {
    match shape {
        Some(s) => Ok(a.into_shape_with_order(ndarray::IxDyn(s))?),
        None => Ok(a),
    }
}

/// Hands `value` to `f` as a view into tract's buffer when it is plain `f32`, with `shape`
/// when given; float16 is widened into a temporary, as [`Plan::run`] does; other element
/// types give `None`.
fn with_f32_view<R>(value: &Tensor, shape: Option<&[usize]>, f: impl FnOnce(Option<ArrayViewD<'_, f32>>) -> R) -> R {
    match value.datum_type().unquantized() {
        DatumType::F32 => f(value.to_plain_array_view::<f32>().ok().and_then(|v| shaped(v, shape).ok())),
        DatumType::F16 => {
            let wide = value.cast_to::<f32>().ok();
            f(wide.as_ref().and_then(|t| t.to_plain_array_view::<f32>().ok()).and_then(|v| shaped(v, shape).ok()))
        }
        _ => f(None),
    }
}

/// Converts a tract output to our array type, with `shape` when given (the same elements in C
/// order): f16 widens to F32, TDim/u32/u64 to I64, i16/u16 to I32 (u64 values above i64::MAX
/// wrap).
fn to_array(t: &Tensor, shape: Option<&[usize]>) -> Result<ArrayData> {
    fn plain<T: tract_onnx::prelude::Datum>(t: &Tensor, shape: Option<&[usize]>) -> Result<ndarray::ArrayD<T>> {
        Ok(shaped(t.to_plain_array_view::<T>()?, shape)?.to_owned())
    }
    fn cast<T: tract_onnx::prelude::Datum>(t: &Tensor, shape: Option<&[usize]>) -> Result<ndarray::ArrayD<T>> {
        plain::<T>(t.cast_to::<T>()?.as_ref(), shape)
    }
    let s = shape;
    let dt = t.datum_type().unquantized();
    Ok(match dt {
        DatumType::F32 => ArrayData::F32(plain(t, s)?),
        DatumType::F64 => ArrayData::F64(plain(t, s)?),
        DatumType::F16 => ArrayData::F32(cast(t, s)?),
        DatumType::I64 => ArrayData::I64(plain(t, s)?),
        DatumType::I32 => ArrayData::I32(plain(t, s)?),
        DatumType::I8 => ArrayData::I8(plain(t, s)?),
        DatumType::U8 => ArrayData::U8(plain(t, s)?),
        DatumType::Bool => ArrayData::Bool(plain(t, s)?),
        DatumType::I16 | DatumType::U16 => ArrayData::I32(cast(t, s)?),
        DatumType::U32 | DatumType::TDim => ArrayData::I64(cast(t, s)?),
        DatumType::U64 => ArrayData::I64(plain::<u64>(t, s)?.mapv(|v| v as i64)),
        other => bail!("tract returned a {other:?} tensor, which onnxq cannot represent"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::pb;
    use ndarray::{ArrayD, IxDyn};
    use rayon::prelude::*;

    enum Dim {
        Fixed(i64),
        Sym(&'static str),
    }

    fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> pb::ValueInfoProto {
        use pb::tensor_shape_proto::{dimension::Value as DimValue, Dimension};
        let dim = dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d {
                    Dim::Fixed(v) => DimValue::DimValue(*v),
                    Dim::Sym(s) => DimValue::DimParam(s.to_string()),
                }),
                ..Default::default()
            })
            .collect();
        pb::ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: Some(elem_type),
                    shape: Some(pb::TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn f32_initializer(name: &str, dims: &[i64], data: &[f32]) -> pb::TensorProto {
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        pb::TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(dtype::FLOAT),
            raw_data: Some(raw.into()),
            ..Default::default()
        }
    }

    fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
        pb::NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn model_bytes(graph: pb::GraphProto) -> Vec<u8> {
        let model = pb::ModelProto {
            ir_version: Some(8),
            opset_import: vec![pb::OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
            producer_name: Some("onnxq-test".into()),
            graph: Some(graph),
            ..Default::default()
        };
        prost::Message::encode_to_vec(&model)
    }

    const W: [f32; 12] = [
        0.5, -1.0, 2.0, //
        1.0, 0.25, -0.5, //
        -2.0, 1.5, 0.0, //
        0.75, -0.25, 1.0,
    ];

    /// x[batch_dim,4] -> MatMul(W[4,3]) -> "mm" -> Relu -> y
    fn matmul_relu(batch_dim: Dim) -> Vec<u8> {
        model_bytes(pb::GraphProto {
            name: Some("g".into()),
            node: vec![node("MatMul", "matmul_node", &["x", "W"], &["mm"]), node("Relu", "relu_node", &["mm"], &["y"])],
            initializer: vec![f32_initializer("W", &[4, 3], &W)],
            input: vec![value_info("x", dtype::FLOAT, &[batch_dim, Dim::Fixed(4)])],
            output: vec![value_info("y", dtype::FLOAT, &[Dim::Sym("b"), Dim::Fixed(3)])],
            ..Default::default()
        })
    }

    fn x_fact(batch: usize) -> InputFact {
        InputFact { name: "x".into(), elem_type: dtype::FLOAT, shape: vec![batch, 4] }
    }

    fn hand_matmul(x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * 3];
        for r in 0..rows {
            for c in 0..3 {
                out[r * 3 + c] = (0..4).map(|k| x[r * 4 + k] * W[k * 3 + c]).sum();
            }
        }
        out
    }

    fn assert_close(got: &ArrayData, shape: &[usize], want: &[f32]) {
        let a = got.as_f32().expect("float output");
        assert_eq!(a.shape(), shape);
        for (g, w) in a.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "got {a:?}, want {want:?}");
        }
    }

    /// x[1,2,3,3] -> 1x1 Conv -> "c" -> Erf -> "e" -> 1x1 Conv -> "y": tract runs the
    /// convolutions as matrix products and reshapes their outputs back to NCHW; the requested
    /// "c" and "e" are reported from the products (viewed in their own shape), so those
    /// reshapes, which would copy "c" while Erf still needs it, do not run.
    #[test]
    fn reshaped_outputs_are_reported_from_the_reshaped_tensor() -> Result<()> {
        let w1: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * 0.25).collect();
        let w2: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut conv1 = node("Conv", "conv1", &["x", "w1"], &["c"]);
        let mut conv2 = node("Conv", "conv2", &["e", "w2"], &["y"]);
        for n in [&mut conv1, &mut conv2] {
            n.attribute.push(crate::onnx::builder::attr_ints("kernel_shape", &[1, 1]));
        }
        let bytes = model_bytes(pb::GraphProto {
            name: Some("g".into()),
            node: vec![conv1, node("Erf", "erf", &["c"], &["e"]), conv2],
            initializer: vec![f32_initializer("w1", &[4, 2, 1, 1], &w1), f32_initializer("w2", &[2, 4, 1, 1], &w2)],
            input: vec![value_info("x", dtype::FLOAT, &[Dim::Fixed(1), Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(3)])],
            output: vec![value_info("y", dtype::FLOAT, &[Dim::Fixed(1), Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(3)])],
            ..Default::default()
        });
        let fact = InputFact { name: "x".into(), elem_type: dtype::FLOAT, shape: vec![1, 2, 3, 3] };
        let x: Vec<f32> = (0..18).map(|i| (i as f32 * 0.37).cos() * 2.0).collect();
        let input = || ArrayData::F32(ArrayD::from_shape_vec(IxDyn(&[1, 2, 3, 3]), x.clone()).expect("shape"));
        let names: Vec<String> = ["c", "e", "y"].map(String::from).to_vec();
        let plan = Plan::load(&bytes, None, std::slice::from_ref(&fact), &names)?;
        let reshaped = plan.watch.iter().flatten().filter(|w| w.shape.is_some()).count();
        assert!(reshaped >= 1, "tract no longer reshapes here: the test needs another model");
        // Each tensor requested alone is a plan output, reported as computed.
        let alone: Vec<ArrayData> = names
            .iter()
            .map(|n| {
                Ok(Plan::load(&bytes, None, std::slice::from_ref(&fact), std::slice::from_ref(n))?
                    .run(&[input()])?
                    .remove(0))
            })
            .collect::<Result<_>>()?;
        assert_eq!(plan.run(&[input()])?, alone);
        let (copies, seen) = plan.run_each(&[input()], &[true, false, true], |_, v| v.map(|v| v.to_owned()))?;
        for (k, a) in alone.iter().enumerate() {
            let a = a.as_f32().expect("float");
            assert_eq!(a.shape(), [1, if k == 2 { 2 } else { 4 }, 3, 3]);
            assert_eq!(seen[k].as_ref().map(|v| v.view()), Some(a.view()), "{}", names[k]);
            if k != 1 {
                assert_eq!(copies[k].as_ref().and_then(ArrayData::as_f32).map(|c| c.view()), Some(a.view()));
            }
        }
        Ok(())
    }

    #[test]
    fn runs_matmul_relu_with_intermediate_output() -> Result<()> {
        let bytes = matmul_relu(Dim::Fixed(1));
        let outputs = vec!["y".to_string(), "mm".to_string()];
        let plan = Plan::load(&bytes, None, &[x_fact(1)], &outputs)?;
        assert_eq!(plan.outputs(), outputs.as_slice());
        let x = [1.0f32, -2.0, 0.5, 3.0];
        let input = ArrayData::F32(ArrayD::from_shape_vec(IxDyn(&[1, 4]), x.to_vec())?);
        let out = plan.run(&[input])?;
        assert_eq!(out.len(), 2);
        let mm = hand_matmul(&x, 1);
        let relu: Vec<f32> = mm.iter().map(|v| v.max(0.0)).collect();
        assert!(mm.iter().any(|&v| v < 0.0), "test data must exercise Relu");
        assert_close(&out[0], &[1, 3], &relu);
        assert_close(&out[1], &[1, 3], &mm);

        // Duplicated names and the intermediate alone also work.
        let dup = vec!["mm".to_string(), "y".to_string(), "mm".to_string()];
        let plan = Plan::load(&bytes, None, &[x_fact(1)], &dup)?;
        let input = ArrayData::F32(ArrayD::from_shape_vec(IxDyn(&[1, 4]), x.to_vec())?);
        let out = plan.run(&[input])?;
        assert_eq!(out.len(), 3);
        assert_close(&out[0], &[1, 3], &mm);
        assert_close(&out[1], &[1, 3], &relu);
        assert_close(&out[2], &[1, 3], &mm);

        check_runnable(&bytes, &[x_fact(1)])?;
        Ok(())
    }

    #[test]
    fn symbolic_batch_dim_gets_concrete_fact() -> Result<()> {
        let bytes = matmul_relu(Dim::Sym("batch"));
        let plan = Plan::load(&bytes, None, &[x_fact(2)], &["y".to_string()])?;
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 2.0).collect();
        let input = ArrayData::F32(ArrayD::from_shape_vec(IxDyn(&[2, 4]), x.clone())?);
        let out = plan.run(&[input])?;
        let want: Vec<f32> = hand_matmul(&x, 2).iter().map(|v| v.max(0.0)).collect();
        assert_close(&out[0], &[2, 3], &want);

        // A wrong shape at run time is an error naming the input, not a panic.
        let bad = ArrayData::F32(ArrayD::zeros(IxDyn(&[3, 4])));
        let err = plan.run(&[bad]).expect_err("wrong shape must fail");
        assert!(format!("{err:#}").contains("'x'"), "{err:#}");
        Ok(())
    }

    #[test]
    fn unsupported_op_names_node_and_op_type() {
        let bytes = model_bytes(pb::GraphProto {
            name: Some("g".into()),
            node: vec![node("Relu", "relu_node", &["x"], &["r"]), node("NoSuchOp", "mystery_node", &["r"], &["y"])],
            input: vec![value_info("x", dtype::FLOAT, &[Dim::Fixed(1), Dim::Fixed(4)])],
            output: vec![value_info("y", dtype::FLOAT, &[Dim::Fixed(1), Dim::Fixed(4)])],
            ..Default::default()
        });
        let err = Plan::load(&bytes, None, &[x_fact(1)], &["y".to_string()]).expect_err("unsupported op must fail");
        let plain = format!("{err}");
        let full = format!("{err:#}");
        eprintln!("unsupported op error: {full}");
        for text in [&plain, &full] {
            assert!(text.contains("mystery_node"), "{text}");
            assert!(text.contains("NoSuchOp"), "{text}");
        }
        let err = check_runnable(&bytes, &[x_fact(1)]).expect_err("check must fail too");
        assert!(format!("{err}").contains("mystery_node"), "{err:#}");
    }

    #[test]
    fn unknown_tensor_is_named() {
        let bytes = matmul_relu(Dim::Fixed(1));
        let err = Plan::load(&bytes, None, &[x_fact(1)], &["y".into(), "no_such_tensor".into()])
            .expect_err("unknown tensor must fail");
        assert!(format!("{err:#}").contains("tensor 'no_such_tensor' not found in the model"));
        // A node name is not a tensor name.
        let err =
            Plan::load(&bytes, None, &[x_fact(1)], &["matmul_node".into()]).expect_err("node names are not tensors");
        assert!(format!("{err:#}").contains("'matmul_node'"));
    }

    #[test]
    fn bad_inputs_and_models_are_errors() {
        let bytes = matmul_relu(Dim::Fixed(1));
        let y = ["y".to_string()];
        let wrong = InputFact { name: "nope".into(), ..x_fact(1) };
        assert!(Plan::load(&bytes, None, &[wrong], &y).is_err());
        assert!(Plan::load(&bytes, None, &[], &y).is_err());
        assert!(Plan::load(b"not a model \xff\xff", None, &[x_fact(1)], &y).is_err());
        // A graph output nothing produces panics inside tract's parser: must be an error.
        let dangling = model_bytes(pb::GraphProto {
            node: vec![node("Relu", "relu_node", &["x"], &["r"])],
            input: vec![value_info("x", dtype::FLOAT, &[Dim::Fixed(1), Dim::Fixed(4)])],
            output: vec![value_info("ghost", dtype::FLOAT, &[])],
            ..Default::default()
        });
        let err = Plan::load(&dangling, None, &[x_fact(1)], &["r".into()]).expect_err("dangling");
        assert!(format!("{err:#}").contains("ghost"), "{err:#}");
    }

    #[test]
    fn shape_cast_and_passthrough_outputs_convert() -> Result<()> {
        let mut cast = node("Cast", "cast_node", &["x"], &["h"]);
        cast.attribute.push(pb::AttributeProto {
            name: Some("to".into()),
            r#type: Some(pb::attribute_proto::AttributeType::Int as i32),
            i: Some(i64::from(dtype::FLOAT16)),
            ..Default::default()
        });
        let bytes = model_bytes(pb::GraphProto {
            name: Some("g".into()),
            node: vec![node("Shape", "shape_node", &["x"], &["s"]), cast],
            initializer: vec![f32_initializer("W", &[4, 3], &W)],
            input: vec![value_info("x", dtype::FLOAT, &[Dim::Sym("batch"), Dim::Fixed(4)])],
            output: vec![
                value_info("s", dtype::INT64, &[Dim::Fixed(2)]),
                value_info("h", dtype::FLOAT16, &[Dim::Sym("batch"), Dim::Fixed(4)]),
            ],
            ..Default::default()
        });
        let outputs: Vec<String> = ["s", "h", "x", "W"].iter().map(|s| s.to_string()).collect();
        let plan = Plan::load(&bytes, None, &[x_fact(2)], &outputs)?;
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.25).collect();
        let out = plan.run(&[ArrayData::F32(ArrayD::from_shape_vec(IxDyn(&[2, 4]), x.clone())?)])?;
        assert_eq!(out[0], ArrayData::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![2, 4])?));
        assert_close(&out[1], &[2, 4], &x);
        assert_close(&out[2], &[2, 4], &x);
        assert_close(&out[3], &[4, 3], &W);
        // f64 data for a float input is cast.
        let x64 = ArrayData::F64(ArrayD::from_shape_vec(IxDyn(&[2, 4]), x.iter().map(|&v| v as f64).collect())?);
        let out = plan.run(&[x64])?;
        assert_close(&out[2], &[2, 4], &x);
        Ok(())
    }

    #[test]
    fn plan_is_shared_across_rayon_threads() -> Result<()> {
        let bytes = matmul_relu(Dim::Sym("batch"));
        let plan = Plan::load(&bytes, None, &[x_fact(3)], &["y".into(), "mm".into()])?;
        let x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
        let input = ArrayData::F32(ArrayD::from_shape_vec(IxDyn(&[3, 4]), x)?);
        let reference = plan.run(std::slice::from_ref(&input))?;
        let results: Vec<Vec<ArrayData>> =
            (0..64).into_par_iter().map(|_| plan.run(std::slice::from_ref(&input))).collect::<Result<_>>()?;
        for r in &results {
            assert_eq!(r, &reference);
        }
        Ok(())
    }

    /// The magic-number rounding of the fused fake-quant op equals `round_ties_even` then
    /// the clip, bit for bit: ties, values beyond the clamp, tiny and non-finite inputs.
    #[test]
    fn fake_quantize_rounds_half_to_even_and_saturates() {
        let mut xs: Vec<f32> = vec![0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY];
        for k in -700..700 {
            let t = k as f32 * 0.25;
            xs.extend([t, t * 0.37 + 1e-3, t * 3.0e4, t * 1e-4]);
        }
        for (s, zp, lo, hi) in
            [(0.5f32, 10.0f32, 0.0f32, 255.0f32), (0.013, -3.0, -128.0, 127.0), (1e-6, 0.0, 0.0, 65535.0)]
        {
            let op = FakeQuantize { q_scale: s, q_zero_point: zp, qmin: lo, qmax: hi, dq_scale: s, dq_zero_point: zp };
            assert!(op.magic_rounding());
            let mut got = xs.clone();
            op.apply_slice(&mut got);
            for (&x, &g) in xs.iter().zip(&got) {
                let want = (((x / s).round_ties_even() + zp).clamp(lo, hi) - zp) * s;
                assert_eq!(g.to_bits(), want.to_bits(), "x = {x}, scale {s}, zero point {zp}");
            }
        }
        let mut nan = [f32::NAN];
        FakeQuantize { q_scale: 1.0, q_zero_point: 0.0, qmin: 0.0, qmax: 255.0, dq_scale: 1.0, dq_zero_point: 0.0 }
            .apply_slice(&mut nan);
        assert!(nan[0].is_nan());
    }
}
