//! The checkpoint loader on hand-written good and malformed safetensors files and indexes.

use dllm::config::ModelConfig;
use dllm::error::{Error, ErrorKind};
use dllm::model::llada::layout::llada_tensors;
use dllm::weights::{DType, TensorSpec, WeightStore};
use half::{bf16, f16};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn embedded() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llada-code")
}

/// A safetensors file: 8-byte length, the header text verbatim, then `data`.
fn st_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn entry(dtype: &str, shape: &[usize], begin: usize, end: usize) -> Value {
    json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]})
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Opens a directory holding only `model.safetensors` = `bytes`; returns the error text.
fn open_single_err(bytes: &[u8]) -> (Error, String) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "model.safetensors", bytes);
    let e = WeightStore::open(dir.path()).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("model.safetensors"),
        "error does not name the file: {s}"
    );
    (e, s)
}

fn open_header_err(header: &Value, data_len: usize) -> (Error, String) {
    open_single_err(&st_bytes(&header.to_string(), &vec![0u8; data_len]))
}

#[test]
fn file_shorter_than_the_length_field() {
    let (e, s) = open_single_err(&[1, 2, 3, 4, 5]);
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(s.contains("shorter than the 8-byte"), "{s}");
    let (_, s) = open_single_err(&[]);
    assert!(s.contains("0 bytes"), "{s}");
}

#[test]
fn header_length_beyond_the_file() {
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let (e, s) = open_single_err(&b);
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(
        s.contains("header length 1000") && s.contains("beyond"),
        "{s}"
    );
    // A length whose 8 + N overflows must not panic either.
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let (_, s) = open_single_err(&b);
    assert!(s.contains("beyond"), "{s}");
}

#[test]
fn header_not_utf8() {
    let mut b = 4u64.to_le_bytes().to_vec();
    b.extend_from_slice(&[0x7b, 0xff, 0xfe, 0x7d]);
    let (_, s) = open_single_err(&b);
    assert!(s.contains("UTF-8"), "{s}");
}

#[test]
fn header_not_json_or_not_an_object() {
    let (e, s) = open_single_err(&st_bytes("{\"a\": ", &[]));
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(s.contains("not a valid JSON object"), "{s}");
    let (_, s) = open_single_err(&st_bytes("[1, 2]", &[]));
    assert!(s.contains("not a valid JSON object"), "{s}");
    let (_, s) = open_header_err(&json!({"w": 3}), 0);
    assert!(
        s.contains("tensor `w`") && s.contains("not a JSON object"),
        "{s}"
    );
}

#[test]
fn entry_missing_a_field() {
    for field in ["dtype", "shape", "data_offsets"] {
        let mut e = entry("F32", &[2], 0, 8);
        e.as_object_mut().unwrap().remove(field);
        let (err, s) = open_header_err(&json!({"blk.w": e}), 8);
        assert_eq!(err.kind(), ErrorKind::Format);
        assert!(
            s.contains("tensor `blk.w`") && s.contains(&format!("missing `{field}`")),
            "{s}"
        );
    }
    // Wrong types are named too.
    let (_, s) = open_header_err(
        &json!({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}),
        4,
    );
    assert!(s.contains("`shape`"), "{s}");
    let (_, s) = open_header_err(
        &json!({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}),
        4,
    );
    assert!(s.contains("`data_offsets`"), "{s}");
    let (_, s) = open_header_err(
        &json!({"w": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}),
        4,
    );
    assert!(s.contains("`dtype`"), "{s}");
}

#[test]
fn unknown_dtype_fails_at_open() {
    let (e, s) = open_header_err(&json!({"w": entry("Q9", &[2], 0, 2)}), 2);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(s.contains("tensor `w`") && s.contains("Q9"), "{s}");
}

#[test]
fn known_but_unsupported_dtypes_fail_when_used() {
    let dir = tempfile::tempdir().unwrap();
    let h = json!({"__metadata__": {"format": "pt"},
                   "ids": entry("I64", &[2], 0, 16),
                   "q": entry("F8_E4M3", &[4], 16, 20),
                   "w": entry("F32", &[1], 20, 24)});
    write(
        dir.path(),
        "model.safetensors",
        &st_bytes(&h.to_string(), &[0u8; 24]),
    );
    let store = WeightStore::open(dir.path()).unwrap();
    for (name, dt) in [("ids", "I64"), ("q", "F8_E4M3")] {
        let e = store.get(name).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let s = e.to_string();
        assert!(s.contains(&format!("`{name}`")) && s.contains(dt), "{s}");
        let e = store
            .validate(&[TensorSpec::new(name, vec![2])])
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }
    // Unused, they are only reported as extra.
    let r = store.validate(&[TensorSpec::new("w", vec![1])]).unwrap();
    assert_eq!(r.unexpected, vec!["ids".to_string(), "q".to_string()]);
    assert_eq!(store.dtypes(), vec![(DType::F32, 1)]);
}

#[test]
fn offsets_reversed_out_of_range_or_wrong_size() {
    let (_, s) = open_header_err(&json!({"w": entry("F32", &[2], 8, 0)}), 8);
    assert!(s.contains("tensor `w`") && s.contains("reversed"), "{s}");
    let (_, s) = open_header_err(&json!({"w": entry("F32", &[4], 0, 16)}), 8);
    assert!(
        s.contains("tensor `w`") && s.contains("beyond the data section (8 bytes)"),
        "{s}"
    );
    let (_, s) = open_header_err(&json!({"w": entry("F32", &[2], 0, 6)}), 8);
    assert!(
        s.contains("tensor `w`") && s.contains("span 6 bytes") && s.contains("needs 8"),
        "{s}"
    );
    let (_, s) = open_header_err(&json!({"w": entry("BF16", &[3, 3], 0, 8)}), 18);
    assert!(s.contains("needs 18"), "{s}");
    // Shape products that overflow usize are an error, not a panic.
    let huge = usize::MAX / 2;
    let (_, s) = open_header_err(&json!({"w": entry("F32", &[huge, 4], 0, 8)}), 8);
    assert!(s.contains("tensor `w`"), "{s}");
}

#[test]
fn overlapping_tensors() {
    let h = json!({"a": entry("F32", &[2], 0, 8), "b": entry("F32", &[2], 4, 12)});
    let (e, s) = open_header_err(&h, 12);
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(
        s.contains("`a`") && s.contains("`b`") && s.contains("overlap"),
        "{s}"
    );
    // Adjacent tensors and zero-sized tensors inside another's range are fine.
    let dir = tempfile::tempdir().unwrap();
    let h = json!({"a": entry("F32", &[2], 0, 8), "b": entry("F32", &[1], 8, 12),
                   "z": entry("F32", &[0], 4, 4)});
    write(
        dir.path(),
        "model.safetensors",
        &st_bytes(&h.to_string(), &[0u8; 12]),
    );
    WeightStore::open(dir.path()).unwrap();
}

#[test]
fn duplicate_names_in_one_header() {
    let a = entry("F32", &[1], 0, 4).to_string();
    let b = entry("F32", &[1], 4, 8).to_string();
    let header = format!(r#"{{"w": {a}, "other": {b}, "w": {b}}}"#);
    let (e, s) = open_single_err(&st_bytes(&header, &[0u8; 8]));
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(s.contains("duplicate") && s.contains("`w`"), "{s}");
}

/// A sharded checkpoint: `shards` = (file name, [(tensor, f32 value)]), index `weight_map`.
fn sharded(shards: &[(&str, &[(&str, f32)])], weight_map: Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (file, tensors) in shards {
        let mut h = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, v) in tensors.iter() {
            h.insert(
                name.to_string(),
                entry("F32", &[1], data.len(), data.len() + 4),
            );
            data.extend_from_slice(&v.to_le_bytes());
        }
        write(
            dir.path(),
            file,
            &st_bytes(&Value::Object(h).to_string(), &data),
        );
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    write(
        dir.path(),
        "model.safetensors.index.json",
        index.to_string().as_bytes(),
    );
    dir
}

#[test]
fn good_sharded_checkpoint_reads_each_tensor_from_its_shard() {
    let dir = sharded(
        &[
            ("s1.safetensors", &[("a", 1.5), ("b", -2.0)]),
            ("s2.safetensors", &[("c", 3.25)]),
        ],
        json!({"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}),
    );
    let store = WeightStore::open(dir.path()).unwrap();
    assert_eq!(store.tensor_names(), vec!["a", "b", "c"]);
    assert_eq!(store.shard_files().len(), 2);
    assert_eq!(store.get("b").unwrap().to_f32_vec(), vec![-2.0]);
    assert_eq!(store.get("c").unwrap().to_f32_vec(), vec![3.25]);
    assert_eq!(store.total_bytes(), 12);
    let e = store.get("zz").unwrap_err().to_string();
    assert!(
        e.contains("`zz`") && e.contains("missing from the checkpoint"),
        "{e}"
    );
}

#[test]
fn tensor_in_two_shards() {
    let dir = sharded(
        &[
            ("s1.safetensors", &[("a", 1.0)]),
            ("s2.safetensors", &[("a", 2.0), ("b", 3.0)]),
        ],
        json!({"a": "s1.safetensors", "b": "s2.safetensors"}),
    );
    let s = WeightStore::open(dir.path()).unwrap_err().to_string();
    assert!(s.contains("`a`") && s.contains("two shards"), "{s}");
    assert!(
        s.contains("s1.safetensors") && s.contains("s2.safetensors"),
        "{s}"
    );
}

#[test]
fn index_names_a_missing_shard() {
    let dir = sharded(
        &[("s1.safetensors", &[("a", 1.0)])],
        json!({"a": "s1.safetensors", "b": "s2.safetensors"}),
    );
    let e = WeightStore::open(dir.path()).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("s2.safetensors") && s.contains("does not exist"),
        "{s}"
    );
}

#[test]
fn index_names_the_wrong_shard() {
    let dir = sharded(
        &[
            ("s1.safetensors", &[("a", 1.0)]),
            ("s2.safetensors", &[("b", 2.0)]),
        ],
        json!({"a": "s2.safetensors", "b": "s1.safetensors"}),
    );
    let e = WeightStore::open(dir.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Format);
    let s = e.to_string();
    assert!(
        s.contains("tensor `a`") && s.contains("puts it in shard s2.safetensors"),
        "{s}"
    );
    assert!(s.contains("it is in shard s1.safetensors"), "{s}");
    // When the shard actually holding it is not in the index at all, s1 is never opened.
    let dir = sharded(
        &[
            ("s1.safetensors", &[("a", 1.0)]),
            ("s2.safetensors", &[("b", 2.0)]),
        ],
        json!({"a": "s2.safetensors", "b": "s2.safetensors"}),
    );
    let s = WeightStore::open(dir.path()).unwrap_err().to_string();
    assert!(
        s.contains("tensor `a`") && s.contains("s2.safetensors") && s.contains("does not hold it"),
        "{s}"
    );
}

#[test]
fn tensor_in_a_shard_but_not_in_the_index() {
    let dir = sharded(
        &[("s1.safetensors", &[("a", 1.0), ("stray", 2.0)])],
        json!({"a": "s1.safetensors"}),
    );
    let s = WeightStore::open(dir.path()).unwrap_err().to_string();
    assert!(
        s.contains("tensor `stray`") && s.contains("absent from the weight_map"),
        "{s}"
    );
}

#[test]
fn index_names_a_tensor_no_shard_holds() {
    let dir = sharded(
        &[("s1.safetensors", &[("a", 1.0)])],
        json!({"a": "s1.safetensors", "ghost": "s1.safetensors"}),
    );
    let s = WeightStore::open(dir.path()).unwrap_err().to_string();
    assert!(
        s.contains("tensor `ghost`") && s.contains("does not hold it"),
        "{s}"
    );
}

#[test]
fn shard_names_must_be_plain_file_names() {
    for bad in ["../s1.safetensors", "sub/s1.safetensors", "/etc/passwd"] {
        let dir = sharded(&[("s1.safetensors", &[("a", 1.0)])], json!({"a": bad}));
        let s = WeightStore::open(dir.path()).unwrap_err().to_string();
        assert!(
            s.contains("model.safetensors.index.json") && s.contains("not a plain file name"),
            "{bad}: {s}"
        );
    }
}

#[test]
fn duplicate_tensor_in_the_index_and_malformed_index() {
    let dir = sharded(&[("s1.safetensors", &[("a", 1.0)])], json!({}));
    let text = r#"{"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}}"#;
    write(dir.path(), "model.safetensors.index.json", text.as_bytes());
    let s = WeightStore::open(dir.path()).unwrap_err().to_string();
    assert!(
        s.contains("model.safetensors.index.json") && s.contains("duplicate key `a`"),
        "{s}"
    );
    write(
        dir.path(),
        "model.safetensors.index.json",
        b"{\"weight_map\": ",
    );
    let s = WeightStore::open(dir.path()).unwrap_err().to_string();
    assert!(s.contains("model.safetensors.index.json"), "{s}");
}

#[test]
fn directory_without_a_checkpoint_or_with_ambiguous_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = WeightStore::open(dir.path()).unwrap_err().to_string();
    assert!(s.contains("no checkpoint"), "{s}");
    let good = st_bytes(
        &json!({"w": entry("F32", &[1], 0, 4)}).to_string(),
        &1.0f32.to_le_bytes(),
    );
    write(dir.path(), "a.safetensors", &good);
    write(dir.path(), "b.safetensors", &good);
    let s = WeightStore::open(dir.path()).unwrap_err().to_string();
    assert!(
        s.contains("a.safetensors") && s.contains("b.safetensors") && s.contains("index"),
        "{s}"
    );
    let s = WeightStore::open(&dir.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(s.contains("nope"), "{s}");
}

/// Writes a single-file F32 checkpoint holding `specs` (values 0.5).
fn write_specs(dir: &Path, specs: &[TensorSpec]) {
    let mut h = serde_json::Map::new();
    let mut off = 0;
    for s in specs {
        let n = 4 * s.numel();
        h.insert(s.name.clone(), entry("F32", &s.shape, off, off + n));
        off += n;
    }
    let data: Vec<u8> = std::iter::repeat_n(0.5f32.to_le_bytes(), off / 4)
        .flatten()
        .collect();
    write(
        dir,
        "model.safetensors",
        &st_bytes(&Value::Object(h).to_string(), &data),
    );
}

fn small_config() -> ModelConfig {
    ModelConfig::from_json(&json!({"model_type": "llada", "d_model": 16, "n_heads": 2,
        "n_layers": 2, "mlp_hidden_size": 24, "vocab_size": 40, "embedding_size": 48,
        "mask_token_id": 3, "eos_token_id": 1, "pad_token_id": 1}))
    .unwrap()
}

#[test]
fn shape_not_matching_the_config_names_tensor_expected_and_found() {
    let cfg = small_config();
    let mut specs = llada_tensors(&cfg);
    let target = "model.transformer.blocks.1.k_proj.weight";
    specs.iter_mut().find(|s| s.name == target).unwrap().shape = vec![16, 8];
    let dir = tempfile::tempdir().unwrap();
    write_specs(dir.path(), &specs);
    let store = WeightStore::open(dir.path()).unwrap();
    let e = store.validate(&llada_tensors(&cfg)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Format);
    let s = e.to_string();
    assert!(
        s.contains(target) && s.contains("expected shape [16, 16], found [16, 8]"),
        "{s}"
    );
    let s = store.get_shaped(target, &[16, 16]).unwrap_err().to_string();
    assert!(s.contains("found [16, 8]"), "{s}");
}

#[test]
fn missing_tensor_and_extra_tensor() {
    let cfg = small_config();
    let mut specs = llada_tensors(&cfg);
    specs.retain(|s| s.name != "model.transformer.ln_f.weight");
    specs.push(TensorSpec::new(
        "model.transformer.blocks.0.rotary.inv_freq",
        vec![4],
    ));
    let dir = tempfile::tempdir().unwrap();
    write_specs(dir.path(), &specs);
    let store = WeightStore::open(dir.path()).unwrap();
    let s = store
        .validate(&llada_tensors(&cfg))
        .unwrap_err()
        .to_string();
    assert!(
        s.contains("model.transformer.ln_f.weight") && s.contains("missing"),
        "{s}"
    );
    let mut expected = llada_tensors(&cfg);
    expected.retain(|s| s.name != "model.transformer.ln_f.weight");
    let r = store.validate(&expected).unwrap();
    assert_eq!(
        r.unexpected,
        vec!["model.transformer.blocks.0.rotary.inv_freq".to_string()]
    );
    assert_eq!(r.checked, expected.len());
}

#[test]
fn single_file_with_each_dtype_zero_sized_and_scalar_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let vals = [1.5f32, -0.25, 3.0e-3, 65504.0];
    let mut data = Vec::new();
    for v in vals {
        data.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
    }
    for v in vals {
        data.extend_from_slice(&f16::from_f32(v).to_le_bytes());
    }
    for v in vals {
        data.extend_from_slice(&v.to_le_bytes());
    }
    data.extend_from_slice(&7.0f32.to_le_bytes());
    let h = json!({"__metadata__": {"format": "pt"},
                   "b": entry("BF16", &[2, 2], 0, 8),
                   "h": entry("F16", &[4], 8, 16),
                   "f": entry("F32", &[1, 4], 16, 32),
                   "scalar": entry("F32", &[], 32, 36),
                   "empty": entry("BF16", &[0, 3], 36, 36)});
    // Any single *.safetensors file name is accepted when there is no model.safetensors.
    let file = write(
        dir.path(),
        "weights.safetensors",
        &st_bytes(&h.to_string(), &data),
    );
    for store in [
        WeightStore::open(dir.path()).unwrap(),
        WeightStore::open(&file).unwrap(),
    ] {
        let b = store.get("b").unwrap();
        assert_eq!((b.dtype, b.shape), (DType::BF16, &[2usize, 2][..]));
        let expect_bf16: Vec<f32> = vals.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
        assert_eq!(b.to_f32_vec(), expect_bf16);
        assert_eq!(b.to_f32_vec()[0], 1.5);
        let expect_f16: Vec<f32> = vals.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
        assert_eq!(store.get("h").unwrap().to_f32_vec(), expect_f16);
        assert_eq!(store.get("h").unwrap().to_f32_vec()[3], 65504.0);
        assert_eq!(store.get("f").unwrap().to_f32_vec(), vals.to_vec());
        let s = store.get("scalar").unwrap();
        assert_eq!((s.numel(), s.to_f32_vec()), (1, vec![7.0]));
        let e = store.get("empty").unwrap();
        assert_eq!((e.numel(), e.data.len()), (0, 0));
        assert!(e.to_f32_vec().is_empty());
        assert_eq!(store.tensor_names(), vec!["b", "empty", "f", "h", "scalar"]);
        assert_eq!(store.total_bytes(), 36);
        assert_eq!(store.shard_files(), std::slice::from_ref(&file));
        assert_eq!(
            store.dtypes(),
            vec![(DType::BF16, 2), (DType::F32, 2), (DType::F16, 1)]
        );
    }
}

#[test]
fn embedded_model_opens_and_validates() {
    let dir = embedded();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(&dir).unwrap();
    let expected = llada_tensors(&cfg);
    let report = store.validate(&expected).unwrap();
    assert_eq!(report.checked, 8 * 9 + 3);
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    // training_report.json of the embedded model says 20453760 parameters.
    assert_eq!(report.parameters, 20_453_760);
    assert_eq!(cfg.parameter_count(), 20_453_760);
    assert_eq!(store.total_bytes(), 2 * 20_453_760);
    assert_eq!(store.index_total_size(), Some(40_907_520));
    assert_eq!(store.shard_files().len(), 4);
    assert_eq!(store.dtypes(), vec![(DType::BF16, 75)]);

    // The view's bytes are the bytes at the header's offsets, read independently.
    let name = "model.transformer.ln_f.weight";
    let shard = dir.join("model-00003-of-00004.safetensors");
    let raw = std::fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    let off = &header[name]["data_offsets"];
    let (b, e) = (
        off[0].as_u64().unwrap() as usize,
        off[1].as_u64().unwrap() as usize,
    );
    let view = store.get(name).unwrap();
    assert_eq!(view.data, &raw[8 + n + b..8 + n + e]);
    let w = view.to_f32_vec();
    assert_eq!(w.len(), 384);
    assert!(w.iter().all(|x| x.is_finite()));
}
