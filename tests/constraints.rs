//! Per-position token constraints (`Session::constrain`, `Decoding::constraints`) on the tiny
//! model: a constrained position is generated as the model's choice among its allowed ids (the
//! argmax over them of the forward's row, computed here independently), with sampling too, after
//! a remask, and through the dual cache; a position allowed one id is certain and commits
//! first; bad constraints are refused with nothing changed.

use dllm::denoise::{CacheMode, Decoding, GenerationParams, SampleFilter, Session};
use dllm::model::{load_cpu, Model};
use std::path::Path;
use std::sync::Arc;

mod common;
use common::MODEL;

fn llada() -> Arc<dyn Model> {
    load_cpu(Path::new(MODEL)).unwrap()
}

/// "def add(a, b):\n" and `gen` masks; the prompt's length.
fn canvas(m: &dyn Model, gen: usize) -> (Vec<u32>, usize) {
    let tok = dllm::tokenizer::Tokenizer::from_model_dir(Path::new(MODEL)).unwrap();
    let mut c = tok.encode("def add(a, b):\n").unwrap();
    let prompt = c.len();
    c.resize(prompt + gen, m.config().mask_token_id);
    (c, prompt)
}

fn params(steps: usize, block_len: usize) -> GenerationParams {
    GenerationParams {
        steps,
        block_len,
        ..Default::default()
    }
}

/// The id of `allowed` with the largest logit in row `pos` of `m`'s forward of `canvas`
/// (ties to the lower id).
fn argmax_among(m: &dyn Model, canvas: &[u32], pos: usize, allowed: &[u32]) -> u32 {
    let width = m.config().logits_width();
    let logits = m.forward(canvas).unwrap();
    let row = &logits[pos * width..(pos + 1) * width];
    let mut sorted = allowed.to_vec();
    sorted.sort_unstable();
    let mut best = sorted[0];
    for &id in &sorted {
        if row[id as usize] > row[best as usize] {
            best = id;
        }
    }
    best
}

/// Three ids the unconstrained greedy run does not put at `pos`.
fn other_ids(unconstrained: u32, mask: u32) -> Vec<u32> {
    (40u32..)
        .filter(|&id| id != unconstrained && id != mask)
        .step_by(7)
        .take(3)
        .collect()
}

#[test]
fn a_constrained_position_takes_the_best_allowed_id() {
    let m = llada();
    let (c, prompt) = canvas(&*m, 1);
    // One mask, one step: the whole decision is this forward's row.
    let mut free = Session::new(m.clone(), c.clone(), params(1, 1)).unwrap();
    free.run().unwrap();
    let chosen = free.canvas()[prompt];
    let allowed = other_ids(chosen, m.config().mask_token_id);
    let mut s = Session::new(m.clone(), c.clone(), params(1, 1)).unwrap();
    s.constrain(prompt, &allowed).unwrap();
    s.run().unwrap();
    assert_eq!(s.canvas()[prompt], argmax_among(&*m, &c, prompt, &allowed));
    assert!(allowed.contains(&s.canvas()[prompt]));
}

#[test]
fn constraints_hold_when_sampling_with_filters_and_through_the_cache() {
    let m = llada();
    let (c, prompt) = canvas(&*m, 16);
    let mask = m.config().mask_token_id;
    let positions = [prompt, prompt + 5, prompt + 15];
    let sets: [&[u32]; 3] = [&[100, 200, 300], &[7], &[4000, 4001]];
    for (temperature, cache, top_k) in [
        (0.0, CacheMode::None, 0),
        (0.9, CacheMode::None, 0),
        (1.0, CacheMode::None, 2),
        (0.0, CacheMode::Dual, 0),
        (0.7, CacheMode::Prefix, 0),
    ] {
        for seed in 0..3 {
            let p = GenerationParams {
                temperature,
                seed,
                ..params(8, 8)
            };
            let mut s = Session::new(m.clone(), c.clone(), p).unwrap();
            s.set_decoding(Decoding {
                cache,
                filter: SampleFilter { top_k, top_p: 1.0 },
                ..Default::default()
            })
            .unwrap();
            for (&pos, set) in positions.iter().zip(sets) {
                s.constrain(pos, set).unwrap();
            }
            s.run().unwrap();
            for (&pos, set) in positions.iter().zip(sets) {
                let got = s.canvas()[pos];
                assert!(
                    set.contains(&got),
                    "T={temperature} {cache:?} top_k={top_k} seed {seed}: position {pos} is {got}, allowed {set:?}"
                );
            }
            assert!(!s.canvas().contains(&mask));
        }
    }
}

#[test]
fn a_single_allowed_id_is_certain_and_commits_first() {
    let m = llada();
    let (c, prompt) = canvas(&*m, 8);
    // One commit per step; the constrained position is the block's last.
    let mut s = Session::new(m.clone(), c, params(8, 8)).unwrap();
    let last = prompt + 7;
    s.constrain(last, &[123]).unwrap();
    let info = s.step().unwrap();
    assert_eq!(info.committed, vec![last]);
    assert_eq!(s.canvas()[last], 123);
}

#[test]
fn a_remasked_position_is_generated_under_its_constraint() {
    let m = llada();
    let (c, prompt) = canvas(&*m, 8);
    let mut s = Session::new(m.clone(), c, params(4, 8)).unwrap();
    s.run().unwrap();
    let pos = prompt + 2;
    let allowed = other_ids(s.canvas()[pos], m.config().mask_token_id);
    // Constraining a position that holds a token keeps the token ...
    s.constrain(pos, &allowed).unwrap();
    let kept = s.canvas()[pos];
    assert!(!allowed.contains(&kept));
    // ... and applies when it is generated again.
    s.remask(pos, pos + 1).unwrap();
    s.run().unwrap();
    assert!(allowed.contains(&s.canvas()[pos]), "{}", s.canvas()[pos]);
}

#[test]
fn bad_constraints_are_refused_and_an_empty_set_lifts_one() {
    let m = llada();
    let (c, prompt) = canvas(&*m, 4);
    let (mask, vocab) = (m.config().mask_token_id, m.config().vocab_size as u32);
    let mut s = Session::new(m.clone(), c.clone(), params(4, 4)).unwrap();
    s.constrain(prompt, &[50]).unwrap();
    let before = s.decoding().clone();
    for (pos, ids, needle) in [
        (c.len(), vec![50], "outside the canvas"),
        (prompt, vec![50, mask], "mask"),
        (prompt, vec![vocab], "outside the vocabulary"),
    ] {
        let e = s.constrain(pos, &ids).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
        assert_eq!(s.decoding(), &before);
    }
    // Constraints given through Decoding are checked against the canvas too.
    let mut d = Decoding::default();
    d.constraints
        .set(c.len() + 5, &[50], c.len() + 6, 8192, mask)
        .unwrap();
    assert!(s.set_decoding(d).is_err());
    assert_eq!(s.decoding(), &before);
    // Lifted: the reference loop again (the device path, not host logits).
    s.constrain(prompt, &[]).unwrap();
    assert!(!s.decoding().needs_logits());
    s.run().unwrap();
    let mut free = Session::new(m.clone(), c, params(4, 4)).unwrap();
    free.run().unwrap();
    assert_eq!(s.canvas(), free.canvas());
}

/// Guidance so strong that every logit overflows (`cfg_scale` only has to be finite) leaves
/// a constrained position inside its allowed ids (it once got id 0, the first candidate).
#[test]
fn overflowing_logits_keep_a_constrained_position_inside_its_set() {
    let m = llada();
    let (c, prompt) = canvas(&*m, 4);
    for allowed in [&[300u32][..], &[301, 302]] {
        let mut s = Session::new(m.clone(), c.clone(), params(4, 4)).unwrap();
        s.set_decoding(Decoding {
            cfg_scale: 1e300,
            ..Default::default()
        })
        .unwrap();
        s.constrain(prompt + 1, allowed).unwrap();
        s.run().unwrap();
        assert!(
            allowed.contains(&s.canvas()[prompt + 1]),
            "{}",
            s.canvas()[prompt + 1]
        );
    }
}

/// With `stop_at_eos`, an EOS fills the rest of its gap, but not a position whose constraint
/// excludes EOS: that one is still generated, inside its set.
#[test]
fn an_eos_stop_leaves_a_constrained_position_to_be_generated() {
    let m = llada();
    let (c, prompt) = canvas(&*m, 8);
    let eos = m.config().eos_token_id;
    let mut s = Session::new(m.clone(), c, params(8, 8)).unwrap();
    s.set_decoding(Decoding {
        stop_at_eos: true,
        ..Default::default()
    })
    .unwrap();
    s.constrain(prompt, &[eos]).unwrap(); // certain: the first commit, and the stop
    s.constrain(prompt + 5, &[100, 200]).unwrap();
    s.step().unwrap();
    assert_eq!(s.canvas()[prompt], eos);
    assert_eq!(
        s.canvas()[prompt + 5],
        m.config().mask_token_id,
        "left to be generated"
    );
    s.run().unwrap();
    for k in 1..8 {
        let t = s.canvas()[prompt + k];
        if k == 5 {
            assert!(t == 100 || t == 200, "{t}");
        } else {
            assert_eq!(t, eos, "position {k} after the stop");
        }
    }
}

/// Self-correction judges a constrained position by the distribution it was generated from:
/// a position allowed one id (probability 1) is never sent back, where the unconstrained
/// probability of that id once got it re-masked.
#[test]
fn self_correction_never_remasks_a_single_allowed_id() {
    let m = llada();
    let (c, prompt) = canvas(&*m, 8);
    let tok = dllm::tokenizer::Tokenizer::from_model_dir(Path::new(MODEL)).unwrap();
    let import = tok.encode_literal(" import").unwrap();
    assert_eq!(import.len(), 1);
    let mut s = Session::new(m.clone(), c, params(8, 8)).unwrap();
    s.set_decoding(Decoding {
        revise: Some(0.5),
        ..Default::default()
    })
    .unwrap();
    s.constrain(prompt, &import).unwrap();
    let mut remasked = Vec::new();
    while !s.is_done() {
        remasked.extend(s.step_report().unwrap().remasked);
    }
    assert!(!remasked.contains(&prompt), "{remasked:?}");
    assert_eq!(s.canvas()[prompt], import[0]);
}

/// Only a step that predicts a constrained position needs host logits.
#[test]
fn host_logits_only_for_steps_that_predict_a_constrained_position() {
    let mut d = Decoding::default();
    d.constraints.set(5, &[9], 10, 16, 1).unwrap();
    assert!(d.needs_logits());
    assert!(!d.needs_logits_at(&[1, 2, 3]));
    assert!(d.needs_logits_at(&[4, 5]));
}
