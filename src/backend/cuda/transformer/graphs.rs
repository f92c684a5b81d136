//! CUDA graphs of the transformer's steps: a step of the device-resident API (block step, or a
//! no-cache full step) or the layers of a Session-path forward is captured once per (shape,
//! kind, span, k) and replayed afterwards. A graph bakes in buffer addresses, so each (batch,
//! canvas length, forward rows) shape owns its own kernel instances ([`Kit`]), warmed up
//! eagerly per (kind, span rows) before any capture so that no scratch grows inside one; graphs
//! live in the step buffers' [`State`] and die with them. A failed capture runs the step
//! eagerly and turns graphs off (only the Session path's layer graphs, when one of those failed).

use super::{cuda_err, CudaTransformer, Kit, KvSel, LastLayerRows, State};
use crate::denoise::predict::{PredictRule, Remasking};
use crate::error::{Error, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::Ordering;

/// Most graphs kept per shape (block starts × k values); beyond it the set is cleared.
const MAX_GRAPHS_PER_SHAPE: usize = 64;

/// Most shapes with graph sets before the Session path's layers stop graphing new shapes.
const MAX_LAYER_GRAPH_SHAPES: usize = 4;

/// Whether CUDA graphs are enabled by the environment (`DLLM_CUDA_GRAPH=0` disables them).
pub fn graphs_from_env() -> bool {
    crate::backend::cuda::env_switch::flag("DLLM_CUDA_GRAPH", true)
}

/// Whether the Session path's forwards run their layers as CUDA graphs: only with
/// `DLLM_SESSION_GRAPHS=1` (session 4; its checks pass on an H200, where `dllm bench --session`
/// found it no faster than the eager Session path in session 9).
pub fn session_graphs_from_env() -> bool {
    crate::backend::cuda::env_switch::flag("DLLM_SESSION_GRAPHS", false)
}

/// What a graphed step runs before its head: a block forward against the K/V cache, or a full
/// forward (storing the K/V for later block steps or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum StepKind {
    Block,
    Full { store_cache: bool },
}

/// What a captured graph runs: a whole step, or only the layers of a forward (the Session path:
/// `Model::predict` and the cached span forward, whose heads run eagerly over a varying number
/// of query rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum GraphKind {
    Step(StepKind),
    Layers {
        full: bool,
        store_cache: bool,
        kv: KvSel,
    },
}

/// Graph-cache key of a step within one shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct StepKey {
    kind: GraphKind,
    /// The predicted span (a full step's forward covers the whole canvas whatever the span, so
    /// the span's end is part of the key: the graph bakes in the number of query rows).
    start: usize,
    end: usize,
    k: usize,
    mask_token: u32,
    vocab_size: usize,
}

/// Shape of a step: (batch, canvas length, rows of its forward: the block's, or the canvas
/// length for a full forward).
pub(super) type ShapeKey = (usize, usize, usize);

/// A captured, instantiated step (or Session-path layers).
pub(super) struct StepGraph(CudaGraph);

// SAFETY: CUDA graph objects are not internally synchronised and must not be used from two
// threads at once. A `StepGraph` lives only inside the model's `Mutex<Option<State>>`: it is
// created, launched and dropped with that lock held, so every access is serialised.
unsafe impl Send for StepGraph {}

/// The graphs captured at one shape (steps and Session-path layers), with the kernel instances
/// they were captured with.
pub(super) struct GraphSet {
    pub(super) kit: Kit,
    /// The (kind, span rows) `kit` has run eagerly once at this shape (its scratch is sized for
    /// them: a step's head and sampler scale with its span).
    pub(super) warmed: HashSet<(GraphKind, usize)>,
    pub(super) graphs: HashMap<StepKey, StepGraph>,
}

impl GraphSet {
    /// Whether the Session path's layers have run at this shape (warmed, and maybe captured).
    fn holds_layers(&self) -> bool {
        self.warmed
            .iter()
            .any(|(k, _)| matches!(k, GraphKind::Layers { .. }))
    }
}

impl CudaTransformer {
    /// A step through the graph cache (its query rows uploaded by the caller: the graph reads
    /// them as device data): the first step of a shape runs eagerly with the shape's own kernel
    /// instances (sizing their scratch), the first step of each (kind, block start, `k`) is
    /// captured and launched, later ones are replayed.
    pub(super) fn step_graphed(
        &self,
        st: &mut State,
        span: &Range<usize>,
        fwd_len: usize,
        kind: StepKind,
        rule: &PredictRule,
        k: usize,
    ) -> Result<()> {
        let shape: ShapeKey = (st.batch, st.seq, fwd_len);
        let key = StepKey {
            kind: GraphKind::Step(kind),
            start: span.start,
            end: span.end,
            k,
            mask_token: rule.mask_token,
            vocab_size: rule.vocab_size,
        };
        self.graphed(st, shape, key, &|m, kit, st| {
            m.step_launches(kit, st, span, kind, rule, k)
        })
    }

    /// `launch` through the graph cache of `shape` under `key`: the first run of a kind at a
    /// shape is eager with the shape's own kernel instances (sizing their scratch), the first
    /// run of each key is captured and launched, later ones are replayed. A failed capture turns
    /// graphs off for the model and runs `launch` eagerly with the model's own kernels.
    fn graphed(
        &self,
        st: &mut State,
        shape: ShapeKey,
        key: StepKey,
        launch: &dyn Fn(&Self, &Kit, &mut State) -> Result<()>,
    ) -> Result<()> {
        let loaded = match st.graph_sets.remove(&shape) {
            Some(set) => Ok(set),
            None => Kit::load(&self.dev).map(|kit| GraphSet {
                kit,
                warmed: Default::default(),
                graphs: HashMap::new(),
            }),
        };
        match loaded {
            Ok(mut set) => match self.run_graph_set(&mut set, st, key, launch) {
                Ok(()) => {
                    st.graph_sets.insert(shape, set);
                    Ok(())
                }
                Err(GraphFail::Step(e)) => {
                    st.graph_sets.insert(shape, set);
                    Err(e)
                }
                Err(GraphFail::Capture(e)) => {
                    // Nothing of this step ran (a capture only records): turn graphs off for
                    // this model (only the Session path's layer graphs when one of those
                    // failed), remember why, and run the step eagerly with the model's own
                    // kernels.
                    drop(set);
                    if matches!(key.kind, GraphKind::Layers { .. }) {
                        self.session_graphs.store(false, Ordering::Relaxed);
                        self.note_graph_error(format!("session-path layers: {e}"));
                    } else {
                        self.graphs_failed(st, e.to_string());
                    }
                    launch(self, &self.kit, st)
                }
            },
            Err(e) => {
                self.graphs_failed(st, format!("loading the graph kernels: {e}"));
                launch(self, &self.kit, st)
            }
        }
    }

    /// The layers of a forward over rows `start..start + len` ([`CudaTransformer::layers`] with
    /// the model's kernels), captured and replayed as a graph when `DLLM_SESSION_GRAPHS=1`
    /// ([`session_graphs_from_env`]), graphs are on and no op profile is recording. The Session
    /// path uses it for its no-cache and cached span forwards; its heads stay eager, as do the
    /// forwards whose last layer is narrowed (`narrow`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layers_maybe_graphed(
        &self,
        st: &mut State,
        start: usize,
        len: usize,
        full: bool,
        store_cache: bool,
        kv: KvSel,
        narrow: Option<usize>,
    ) -> Result<()> {
        let shape: ShapeKey = (st.batch, st.seq, len);
        // Each new shape loads (and self-tests) its own kernel instances: a shape is graphed
        // from its second sighting on (a prefix-cache span, whose row count changes every
        // block, is seen once per step of its block), and at most MAX_LAYER_GRAPH_SHAPES
        // shapes hold layer graphs.
        let known = st
            .graph_sets
            .get(&shape)
            .is_some_and(GraphSet::holds_layers);
        let layer_sets = st
            .graph_sets
            .values()
            .filter(|set| set.holds_layers())
            .count();
        let seen_before = !st.layer_shapes_seen.insert(shape);
        // A narrowed forward runs eagerly: the Session's query count changes nearly every step,
        // so graphs keyed on it would mostly be captured and seldom replayed.
        let graphable = self.session_graphs.load(Ordering::Relaxed)
            && (known || (seen_before && layer_sets < MAX_LAYER_GRAPH_SHAPES))
            && !st.padded
            && narrow.is_none()
            && self.graphs_enabled()
            && !self.profiler.recording();
        if !graphable {
            return self.layers(&self.kit, st, start, len, full, store_cache, kv, narrow);
        }
        let key = StepKey {
            kind: GraphKind::Layers {
                full,
                store_cache,
                kv,
            },
            start,
            end: start + len,
            k: 0,
            mask_token: 0,
            vocab_size: 0,
        };
        // A failed replay, or a capture whose launch fails after its host code recorded the
        // rows, leaves no row to predict from.
        let graphed = self.graphed(st, shape, key, &|m, kit, st| {
            m.layers(kit, st, start, len, full, store_cache, kv, None)
        });
        if let Err(e) = graphed {
            st.last_rows = LastLayerRows::Stale;
            return Err(e);
        }
        // What `layers` records on the host (a replay does not run it).
        st.fwd_len = len;
        st.last_rows = LastLayerRows::All;
        Ok(())
    }

    /// Turns graphs off for this model after a failure that left nothing half-run.
    fn graphs_failed(&self, st: &mut State, why: String) {
        st.graph_sets.clear();
        self.graphs.store(false, Ordering::Relaxed);
        self.note_graph_error(why);
    }

    fn note_graph_error(&self, why: String) {
        *self.graph_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    fn run_graph_set(
        &self,
        set: &mut GraphSet,
        st: &mut State,
        key: StepKey,
        launch: &dyn Fn(&Self, &Kit, &mut State) -> Result<()>,
    ) -> std::result::Result<(), GraphFail> {
        let warm_key = (key.kind, key.end - key.start);
        if !set.warmed.contains(&warm_key) {
            launch(self, &set.kit, st).map_err(GraphFail::Step)?;
            set.warmed.insert(warm_key);
            return Ok(());
        }
        if let Some(graph) = set.graphs.get(&key) {
            return graph
                .0
                .launch()
                .map_err(|e| GraphFail::Step(cuda_err("launch step graph", e)));
        }
        if set.graphs.len() >= MAX_GRAPHS_PER_SHAPE {
            set.graphs.clear();
        }
        let stream = &self.dev.stream;
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| GraphFail::Capture(cuda_err("begin step capture", e)))?;
        // No profiling event may land in the capture (a profile cannot open meanwhile, and an
        // open one skips this step's operations).
        self.profiler.set_capturing(true);
        let launched = launch(self, &set.kit, st);
        self.profiler.set_capturing(false);
        // Always end the capture, also when a launch failed, so the stream is usable again.
        let ended = stream.end_capture(CUgraphInstantiate_flags(0));
        launched.map_err(|e| GraphFail::Capture(Error::Backend(format!("captured step: {e}"))))?;
        let graph = ended
            .map_err(|e| GraphFail::Capture(cuda_err("end step capture", e)))?
            .ok_or_else(|| {
                GraphFail::Capture(Error::Backend("CUDA step capture produced no graph".into()))
            })?;
        graph
            .launch()
            .map_err(|e| GraphFail::Step(cuda_err("launch step graph", e)))?;
        set.graphs.insert(key, StepGraph(graph));
        Ok(())
    }

    /// Why graphs were turned off by a failed capture, if one failed.
    pub fn graph_error(&self) -> Option<String> {
        self.graph_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// How a graphed step failed.
pub(super) enum GraphFail {
    /// Capturing or instantiating failed; nothing of the step ran, so it can run eagerly.
    Capture(Error),
    /// The step itself failed (eager warm-up or replay).
    Step(Error),
}

/// Whether `rule` gives the same predictions at every step index (no random draws), so a
/// captured step can be replayed at any step.
pub(super) fn rule_is_step_free(rule: &PredictRule) -> bool {
    rule.temperature == 0.0 && rule.remasking == Remasking::LowConfidence
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(temperature: f64, remasking: Remasking, step: u64) -> PredictRule {
        PredictRule {
            temperature,
            remasking,
            seed: 3,
            step,
            mask_token: 7,
            vocab_size: 50,
        }
    }

    #[test]
    fn only_greedy_low_confidence_steps_are_replayable() {
        assert!(rule_is_step_free(&rule(0.0, Remasking::LowConfidence, 0)));
        assert!(rule_is_step_free(&rule(0.0, Remasking::LowConfidence, 9)));
        assert!(!rule_is_step_free(&rule(0.7, Remasking::LowConfidence, 0)));
        assert!(!rule_is_step_free(&rule(0.0, Remasking::Random, 0)));
    }

    #[test]
    fn step_free_rules_give_the_same_predictions_at_every_step() {
        // The property the graph cache relies on, checked against the CPU prediction rule.
        let row: Vec<f32> = (0..50)
            .map(|j| ((j * 37 % 11) as f32) * 0.3 - 1.0)
            .collect();
        for pos in [0usize, 5, 130] {
            let a = crate::denoise::predict::predict_row(
                &row,
                pos,
                &rule(0.0, Remasking::LowConfidence, 0),
            );
            let b = crate::denoise::predict::predict_row(
                &row,
                pos,
                &rule(0.0, Remasking::LowConfidence, 41),
            );
            assert_eq!(a, b);
            let c =
                crate::denoise::predict::predict_row(&row, pos, &rule(0.0, Remasking::Random, 0));
            let d =
                crate::denoise::predict::predict_row(&row, pos, &rule(0.0, Remasking::Random, 41));
            assert_ne!(
                c.confidence, d.confidence,
                "random confidence is keyed by the step"
            );
        }
    }
}
