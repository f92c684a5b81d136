//! `dllm synth`: the tiny preset written to disk, reopened and validated.

use dllm::config::ModelConfig;
use dllm::model::llada::layout::{llada_tensors, LN_F, WTE};
use dllm::synth::{plan, synth_llada, Preset};
use dllm::weights::{DType, WeightStore};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn embedded() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llada-code")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn values(store: &WeightStore, name: &str) -> Vec<f32> {
    store.get(name).unwrap().to_f32_vec()
}

#[test]
fn tiny_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ckpt");
    let summary = synth_llada(Preset::Tiny, &out, 7).unwrap();

    // config.json: the same JSON as the embedded model's, field for field.
    assert_eq!(
        read_json(&out.join("config.json")),
        read_json(&embedded().join("config.json"))
    );
    let cfg = ModelConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(
        cfg,
        ModelConfig::from_file(&embedded().join("config.json")).unwrap()
    );

    // Same shard files, and every tensor in the same shard, as the embedded index.
    let ours = read_json(&out.join("model.safetensors.index.json"));
    let theirs = read_json(&embedded().join("model.safetensors.index.json"));
    assert_eq!(ours["weight_map"], theirs["weight_map"]);
    assert_eq!(
        ours["metadata"]["total_size"],
        theirs["metadata"]["total_size"]
    );
    assert!(!out.join("tokenizer.json").exists());

    let store = WeightStore::open(&out).unwrap();
    let report = store.validate(&llada_tensors(&cfg)).unwrap();
    assert!(report.unexpected.is_empty());
    assert_eq!(report.checked, 75);
    assert_eq!(summary.tensors, 75);
    assert_eq!(summary.parameters, 20_453_760);
    assert_eq!(summary.bytes, store.total_bytes());
    assert_eq!(store.dtypes(), vec![(DType::BF16, 75)]);
    assert_eq!(summary.files.len(), 2 + 4);
    let on_disk: u64 = summary
        .files
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(summary.file_bytes, on_disk);
    // Same shard file names as the embedded model.
    for (a, b) in store
        .shard_files()
        .iter()
        .zip(WeightStore::open(&embedded()).unwrap().shard_files())
    {
        assert_eq!(a.file_name(), b.file_name());
    }
    assert!(summary.to_string().contains("no tokenizer.json"));

    // Values: finite, varied, right scale.
    for name in store.tensor_names() {
        let v = values(&store, name);
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(var > 0.0, "{name} is constant");
        if name.ends_with("norm.weight") || name == LN_F {
            assert!((mean - 1.0).abs() < 0.02, "{name}: mean {mean}");
            assert!(v.iter().all(|&x| (0.89..=1.11).contains(&x)), "{name}");
        } else {
            assert!(mean.abs() < 0.002, "{name}: mean {mean}");
            assert!(
                (var.sqrt() - 0.02).abs() < 0.002,
                "{name}: std {}",
                var.sqrt()
            );
            assert!(v.iter().all(|&x| x != 0.0), "{name} has zeros");
        }
    }
    // Tensors differ from one another.
    assert_ne!(
        values(&store, "model.transformer.blocks.0.q_proj.weight"),
        values(&store, "model.transformer.blocks.0.k_proj.weight")
    );

    // Refuses to overwrite.
    let e = synth_llada(Preset::Tiny, &out, 7).unwrap_err().to_string();
    assert!(e.contains("refusing to overwrite"), "{e}");

    // Deterministic for a seed, different for another.
    let same = tmp.path().join("same");
    synth_llada(Preset::Tiny, &same, 7).unwrap();
    for f in &summary.files {
        let name = f.file_name().unwrap();
        assert_eq!(
            std::fs::read(f).unwrap(),
            std::fs::read(same.join(name)).unwrap(),
            "{name:?}"
        );
    }
    let other = tmp.path().join("other");
    synth_llada(Preset::Tiny, &other, 8).unwrap();
    let store8 = WeightStore::open(&other).unwrap();
    assert_ne!(values(&store, WTE), values(&store8, WTE));
    assert_ne!(values(&store, LN_F), values(&store8, LN_F));
}

#[test]
fn tiny_plan_matches_what_is_written_without_writing() {
    let p = plan(Preset::Tiny).unwrap();
    assert_eq!(p.shards.len(), 4);
    assert_eq!(p.total_bytes, 40_907_520);
    assert_eq!(p.parameters, 20_453_760);
    // Shard file sizes equal the embedded model's: same tensors in each shard.
    for s in &p.shards {
        let real = std::fs::metadata(embedded().join(&s.file_name))
            .unwrap()
            .len();
        let real_data = real - 8 - {
            let raw = std::fs::read(embedded().join(&s.file_name)).unwrap();
            u64::from_le_bytes(raw[..8].try_into().unwrap())
        };
        assert_eq!(s.data_bytes, real_data, "{}", s.file_name);
    }
}

/// Peak resident memory of this process, from /proc (Linux), in MB.
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The full 16 GB LLaDA-8B layout, written where `DLLM_SYNTH_8B_DIR` says (a fresh directory),
/// then opened and validated. Run with
/// `DLLM_SYNTH_8B_DIR=/path cargo test --release --test synth -- --ignored --nocapture`.
#[test]
#[ignore = "writes 16 GB; needs DLLM_SYNTH_8B_DIR"]
fn llada_8b_written_and_validated() {
    let Some(dir) = std::env::var_os("DLLM_SYNTH_8B_DIR") else {
        eprintln!("DLLM_SYNTH_8B_DIR not set; skipping");
        return;
    };
    let dir = PathBuf::from(dir);
    let summary = synth_llada(Preset::Llada8b, &dir, 1).unwrap();
    println!("{summary}");
    println!(
        "write: {:.2} GB/s, peak RSS {:?} MB",
        summary.file_bytes as f64 / 1e9 / summary.seconds,
        peak_rss_mb()
    );
    let t = std::time::Instant::now();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(&dir).unwrap();
    let report = store.validate(&llada_tensors(&cfg)).unwrap();
    assert_eq!(report.checked, 291);
    assert_eq!(store.total_bytes(), 16_031_162_368);
    assert_eq!(store.shard_files().len(), 6);
    println!("open + validate: {:.3} s", t.elapsed().as_secs_f64());
    let last = values(&store, LN_F);
    assert!(last.iter().all(|x| (0.89..=1.11).contains(x)));
    assert!(
        peak_rss_mb().is_none_or(|mb| mb < 1024.0),
        "peak RSS {:?} MB",
        peak_rss_mb()
    );
}
