//! Lockstep (teacher-forced) comparison of two sessions, on the embedded tiny LLaDA (CPU):
//! - a model against itself agrees at every prediction, and the run generates what a free
//!   session generates;
//! - a follower whose logits carry a bounded perturbation (at most `eps` per logit) stays in
//!   lockstep, its token disagreements are near-ties within the bound derived below, and the
//!   leader still generates what it generates alone;
//! - a follower that answers for the wrong rows is caught (low agreement, gaps far from a tie);
//! - sessions that do not start alike are refused before anything runs.

use dllm::config::ModelConfig;
use dllm::denoise::rng;
use dllm::denoise::{run_lockstep, CacheMode, Decoding, GenerationParams, Session};
use dllm::error::Result;
use dllm::model::{load_cpu, CacheStep, KvCache, Model};
use dllm::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::Arc;

const LLADA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llada-code");

fn llada() -> Arc<dyn Model> {
    load_cpu(Path::new(LLADA)).unwrap()
}

/// A Python prompt followed by `gen` masks.
fn canvas(m: &dyn Model, gen: usize) -> Vec<u32> {
    let tok = Tokenizer::from_model_dir(Path::new(LLADA)).unwrap();
    let mut c = tok.encode("def add(a, b):\n    ").unwrap();
    c.resize(c.len() + gen, m.config().mask_token_id);
    c
}

fn params() -> GenerationParams {
    GenerationParams {
        steps: 32,
        block_len: 16,
        ..GenerationParams::default()
    }
}

fn session(m: &Arc<dyn Model>, cache: CacheMode) -> Session {
    let mut s = Session::new(m.clone(), canvas(&**m, 64), params()).unwrap();
    s.set_decoding(Decoding {
        cache,
        ..Decoding::default()
    })
    .unwrap();
    s
}

fn free_run(m: &Arc<dyn Model>, cache: CacheMode) -> Vec<u32> {
    let mut s = session(m, cache);
    s.run().unwrap();
    s.canvas().to_vec()
}

/// How a wrapped model changes the inner model's logits rows.
#[derive(Clone, Copy)]
enum Twist {
    /// Adds `eps · (2u − 1)` to every logit, `u` uniform keyed by (position, token).
    Noise(f32),
    /// Answers each query with the row of the next query (the last with the first's).
    RotateRows,
}

/// The inner model with its logits twisted, through the cache as well (the trait's
/// `predict_cached` predicts on the twisted `logits_cached` rows).
struct Twisted {
    inner: Arc<dyn Model>,
    twist: Twist,
}

impl Twisted {
    fn apply(&self, logits: &mut [f32], positions: &[usize]) {
        let w = self.inner.config().logits_width();
        match self.twist {
            Twist::Noise(eps) => {
                for (row, &p) in logits.chunks_mut(w).zip(positions) {
                    for (j, l) in row.iter_mut().enumerate() {
                        let u = rng::uniform(7, 0, p as u64, j as u64) as f32;
                        *l += eps * (2.0 * u - 1.0);
                    }
                }
            }
            Twist::RotateRows => {
                if !positions.is_empty() {
                    logits.rotate_left(w);
                }
            }
        }
    }
}

impl Model for Twisted {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn backend_name(&self) -> &'static str {
        "twisted"
    }
    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut l = self.inner.forward(ids)?;
        let all: Vec<usize> = (0..ids.len()).collect();
        self.apply(&mut l, &all);
        Ok(l)
    }
    fn supports_kv_cache(&self) -> bool {
        self.inner.supports_kv_cache()
    }
    fn logits_cached(
        &self,
        ids: &[u32],
        queries: &[usize],
        cache: &mut KvCache,
        step: &CacheStep,
    ) -> Result<Vec<f32>> {
        let mut l = self.inner.logits_cached(ids, queries, cache, step)?;
        self.apply(&mut l, queries);
        Ok(l)
    }
}

fn twisted(twist: Twist) -> Arc<dyn Model> {
    Arc::new(Twisted {
        inner: llada(),
        twist,
    })
}

#[test]
fn a_model_against_itself_agrees_at_every_prediction() {
    let m = llada();
    for cache in [CacheMode::None, CacheMode::Dual] {
        let (mut a, mut b) = (session(&m, cache), session(&m, cache));
        let total = a.total_steps();
        let r = run_lockstep(&mut a, &mut b).unwrap();
        assert_eq!(r.steps, total, "{cache:?}");
        // Each step queries its block's remaining masks: 4 blocks of 16, 8 steps of 2 commits.
        assert_eq!(r.predictions, 4 * (16 + 14 + 12 + 10 + 8 + 6 + 4 + 2));
        assert!(r.tokens.is_empty() && r.commits.is_empty(), "{cache:?}");
        assert_eq!(r.confidence_rel_l2, 0.0);
        assert_eq!(r.token_agreement(), 1.0);
        assert_eq!(r.canvas, free_run(&m, cache), "{cache:?}");
        assert_eq!(a.canvas(), b.canvas());
    }
}

/// With every logit moved by at most `eps`, an argmax can flip from `a` to `b` only when
/// `l_a − l_b ≤ 2 eps`; then the follower's top probability `p'_b` is within a factor
/// `e^{±4 eps}` of the leader's `p_a` (each probability moves by at most `e^{±2 eps}`), so the
/// two confidences differ by at most `p_a (e^{4 eps} − 1) ≤ e^{4 eps} − 1`.
#[test]
fn a_perturbed_follower_disagrees_only_at_near_ties() {
    let leader_model = llada();
    let eps = 0.05f32;
    let bound = (4.0 * eps as f64).exp() - 1.0;
    for cache in [CacheMode::None, CacheMode::Dual] {
        let follower_model = twisted(Twist::Noise(eps));
        let (mut a, mut b) = (
            session(&leader_model, cache),
            session(&follower_model, cache),
        );
        let r = run_lockstep(&mut a, &mut b).unwrap();
        assert!(r.token_agreement() > 0.9, "{cache:?}: {r:?}");
        assert!(r.widest_token_gap() <= bound, "{cache:?}: {r:?}");
        assert!(r.confidence_rel_l2 > 0.0 && r.confidence_rel_l2 < bound);
        // Teacher forcing: the leader is not steered by the follower.
        assert_eq!(r.canvas, free_run(&leader_model, cache), "{cache:?}");
        assert_eq!(b.canvas(), a.canvas());
    }
}

#[test]
fn a_follower_answering_for_the_wrong_rows_is_caught() {
    let leader_model = llada();
    for cache in [CacheMode::None, CacheMode::Dual] {
        let follower_model = twisted(Twist::RotateRows);
        let (mut a, mut b) = (
            session(&leader_model, cache),
            session(&follower_model, cache),
        );
        let r = run_lockstep(&mut a, &mut b).unwrap();
        assert!(r.token_agreement() < 0.8, "{cache:?}: {r:?}");
        assert!(r.widest_token_gap() > 0.2, "{cache:?}: {r:?}");
    }
}

#[test]
fn sessions_that_start_differently_are_refused() {
    let m = llada();
    let mut a = session(&m, CacheMode::Dual);
    let mut b = session(&m, CacheMode::None);
    let e = run_lockstep(&mut a, &mut b).unwrap_err();
    assert!(e.to_string().contains("decoding options"), "{e}");
    let mut c = Session::new(m.clone(), canvas(&*m, 32), params()).unwrap();
    let mut d = session(&m, CacheMode::None);
    let e = run_lockstep(&mut c, &mut d).unwrap_err();
    assert!(e.to_string().contains("canvases"), "{e}");
    // Nothing ran.
    assert_eq!((c.steps_taken(), d.steps_taken()), (0, 0));
}
