//! Mutated model directories never crash the loader: a `config.json` with every field replaced
//! by odd values (zero, negative, huge, wrong type, missing; the embedded LLaDA model's and a
//! synthesized Dream model's), `tokenizer.json` with random byte
//! edits and truncations, and a shard header or the shard index with random byte edits each
//! either load (and then run a forward) or fail with an error. A panic, or a process abort such
//! as the failed allocation a config with `n_layers: 4294967296` once caused, fails the test.
//! Deterministic: the edits come from fixed seeds.

mod common;

use common::odd::{panic_message, Rng};
use dllm::model::load::load_cpu;
use dllm::synth::{synth_checkpoint, Preset};
use dllm::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn embedded() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llada-code")
}

/// A copy of `src` (links to its files) with the files in `own` written instead.
fn model_dir_of(src: &Path, own: &[(&str, &[u8])]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_str().unwrap().to_string();
        if !own.iter().any(|(n, _)| *n == name) {
            std::os::unix::fs::symlink(e.path(), d.path().join(&name)).unwrap();
        }
    }
    for (name, bytes) in own {
        std::fs::write(d.path().join(name), bytes).unwrap();
    }
    d
}

/// Loads `dir` on the CPU and, when that works, runs one forward over 16 valid ids: Ok(true)
/// when both worked, Ok(false) for an error, Err with the message for a panic.
fn load_and_run(dir: &Path) -> Result<bool, String> {
    std::panic::catch_unwind(|| match load_cpu(dir) {
        Ok(m) => {
            let vocab = m.config().vocab_size.max(1);
            let ids: Vec<u32> = (0..16).map(|i| (i % vocab) as u32).collect();
            m.forward(&ids).is_ok()
        }
        Err(_) => false,
    })
    .map_err(panic_message)
}

#[test]
fn llada_config_fields_with_odd_values_load_or_fail_cleanly() {
    config_fields_with_odd_values_load_or_fail_cleanly(
        &embedded(),
        ("d_model", "n_heads", "n_kv_heads"),
    );
}

#[test]
fn dream_config_fields_with_odd_values_load_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    synth_checkpoint(Preset::DreamTiny, dir.path(), 3).unwrap();
    config_fields_with_odd_values_load_or_fail_cleanly(
        dir.path(),
        ("hidden_size", "num_attention_heads", "num_key_value_heads"),
    );
}

#[test]
fn llada_moe_config_fields_with_odd_values_load_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    synth_checkpoint(Preset::LladaMoeTiny, dir.path(), 3).unwrap();
    config_fields_with_odd_values_load_or_fail_cleanly(
        dir.path(),
        ("hidden_size", "num_attention_heads", "num_key_value_heads"),
    );
}

/// Every field of `src`'s config replaced by each odd value, and removed, and the head counts
/// (fields `heads`: width, query heads, K/V heads) varied together: each loads and runs a
/// forward, or fails with an error.
fn config_fields_with_odd_values_load_or_fail_cleanly(src: &Path, heads: (&str, &str, &str)) {
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let base: Value = serde_json::from_str(&text).unwrap();
    let values = [
        json!(0),
        json!(-1),
        json!(1),
        json!(3),
        json!(7),
        json!(65_536),
        json!(1e9),
        json!(1e30),
        json!(-1e30),
        json!(1e-30),
        json!(0.5),
        json!(4_294_967_296u64),
        json!(u64::MAX),
        json!("abc"),
        json!(true),
        json!([]),
        json!({}),
        Value::Null,
    ];
    let mut panics = Vec::new();
    let mut loaded = 0;
    let obj = base.as_object().unwrap();
    let mut run = |label: String, cfg: &serde_json::Map<String, Value>| {
        let bytes = serde_json::to_vec(cfg).unwrap();
        let dir = model_dir_of(src, &[("config.json", &bytes)]);
        match load_and_run(dir.path()) {
            Ok(ok) => loaded += usize::from(ok),
            Err(p) => panics.push(format!("{label}: {p}")),
        }
    };
    for key in obj.keys() {
        for v in &values {
            let mut cfg = obj.clone();
            cfg.insert(key.clone(), v.clone());
            run(format!("{key} = {v}"), &cfg);
        }
        let mut cfg = obj.clone();
        cfg.remove(key);
        run(format!("without {key}"), &cfg);
    }
    // Head counts against the width and each other.
    for d in [1, 6, 384, 768] {
        for (h, kv) in [(1, 1), (2, 1), (3, 3), (4, 3), (6, 4), (12, 5), (384, 384)] {
            let mut cfg = obj.clone();
            cfg.insert(heads.0.into(), json!(d));
            cfg.insert(heads.1.into(), json!(h));
            cfg.insert(heads.2.into(), json!(kv));
            run(format!("d_model {d} n_heads {h} n_kv_heads {kv}"), &cfg);
        }
    }
    assert!(
        panics.is_empty(),
        "{} panics:\n{}",
        panics.len(),
        panics.join("\n")
    );
    // The unchanged fields, and values equal to the originals, still load.
    assert!(loaded > 0);
}

#[test]
fn tokenizer_edits_load_or_fail_cleanly() {
    let bytes = std::fs::read(embedded().join("tokenizer.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let mut rng = Rng(12_345);
    let mut panics = Vec::new();
    for it in 0..300 {
        let mut b = bytes.clone();
        let all = 0..b.len();
        rng.edit(&mut b, all);
        if it % 10 == 0 {
            let cut = rng.next() % b.len();
            b.truncate(cut);
        }
        std::fs::write(&path, &b).unwrap();
        let r = std::panic::catch_unwind(|| {
            if let Ok(t) = Tokenizer::from_file(&path) {
                if let Ok(ids) = t.encode("def foo(x):\n    return x + 1  # héllo 😀") {
                    let _ = t.decode(&ids, true);
                }
                let _ = t.decode(&[0, 1, 2, 3, 5000, 8191, 8192, 100_000, u32::MAX], false);
            }
        });
        if let Err(p) = r {
            panics.push(format!("edit {it}: {}", panic_message(p)));
        }
    }
    assert!(
        panics.is_empty(),
        "{} panics:\n{}",
        panics.len(),
        panics.join("\n")
    );
}

#[test]
fn shard_header_and_index_edits_load_or_fail_cleanly() {
    let shard = "model-00004-of-00004.safetensors";
    let index = "model.safetensors.index.json";
    let shard_bytes = std::fs::read(embedded().join(shard)).unwrap();
    let index_bytes = std::fs::read(embedded().join(index)).unwrap();
    let header_end = 8 + u64::from_le_bytes(shard_bytes[..8].try_into().unwrap()) as usize;
    let mut rng = Rng(987_654_321);
    let mut panics = Vec::new();
    for it in 0..200 {
        let (mut s, mut ix) = (shard_bytes.clone(), index_bytes.clone());
        if it % 2 == 0 {
            rng.edit(&mut s, 8..header_end);
            if it % 20 == 0 {
                // The length field itself.
                let i = rng.next() % 8;
                s[i] = rng.next() as u8;
            }
        } else {
            let all = 0..ix.len();
            rng.edit(&mut ix, all);
        }
        if it % 30 == 7 {
            // Data cut short.
            let cut = header_end + rng.next() % (s.len() - header_end);
            s.truncate(cut);
        }
        let dir = model_dir_of(&embedded(), &[(shard, &s), (index, &ix)]);
        if let Err(p) = load_and_run(dir.path()) {
            panics.push(format!("edit {it}: {p}"));
        }
    }
    assert!(
        panics.is_empty(),
        "{} panics:\n{}",
        panics.len(),
        panics.join("\n")
    );
}
