//! End-to-end tests of the `dllm` binary: outputs, JSON fields, and one clear error line (never a
//! panic) with a non-zero exit status for bad input.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{canvas_ids, json_ok, run_dllm, MODEL};

fn dllm(args: &[&str]) -> Output {
    run_dllm(args, None)
}

fn json(out: &Output) -> serde_json::Value {
    json_ok(out)
}

/// Asserts failure with exactly one `error:` line that mentions `needle`, and no panic text.
fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].contains(needle), "`{needle}` not in: {}", lines[0]);
}

#[test]
fn generate_json_reports_the_canvas_and_timing() {
    let out = dllm(&[
        "generate",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--prompt",
        "def add(a, b):",
        "--gen-len",
        "16",
        "--steps",
        "8",
        "--block-len",
        "8",
        "--json",
        "--quiet",
    ]);
    let v = json(&out);
    let canvas = v["canvas"].as_array().unwrap();
    let prompt_tokens = v["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(canvas.len(), prompt_tokens + 16);
    assert!(
        canvas.iter().all(|t| t.as_u64().unwrap() != 1),
        "no mask left in the canvas"
    );
    assert_eq!(v["steps"].as_u64(), Some(8));
    assert!(v["elapsed_s"].as_f64().unwrap() > 0.0);
    assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["text"].is_string());
    assert!(
        out.stderr.is_empty(),
        "--quiet prints nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn generate_is_deterministic_and_text_starts_with_prompt() {
    let args = [
        "generate",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--prompt",
        "import os\n",
        "--gen-len",
        "8",
        "--steps",
        "8",
        "--block-len",
        "8",
        "--temperature",
        "0.7",
        "--seed",
        "3",
        "--quiet",
    ];
    let a = dllm(&args);
    let b = dllm(&args);
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
    assert!(String::from_utf8_lossy(&a.stdout).starts_with("import os\n"));
}

#[test]
fn infill_keeps_prefix_and_suffix() {
    let v = json(&dllm(&[
        "infill",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--prefix",
        "def f(x):\n    return ",
        "--suffix",
        "\n\nprint(f(2))\n",
        "--gen-len",
        "6",
        "--steps",
        "6",
        "--json",
        "--quiet",
    ]));
    let canvas: Vec<u64> = v["canvas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert!(!canvas.contains(&1));
    assert_eq!(v["generated_tokens"].as_u64(), Some(6));
}

/// `[ONEOF:…]` gaps: each ends as one of its choices' tokens (sampled too), next to an ordinary
/// gap; a choice of several tokens and a malformed tag are clear errors.
#[test]
fn fill_one_of_picks_among_the_choices() {
    let tok = dllm::tokenizer::Tokenizer::from_model_dir(Path::new(MODEL)).unwrap();
    let one = |t: &str| {
        let ids = tok.encode_literal(t).unwrap();
        assert_eq!(ids.len(), 1, "{t:?} is one token");
        ids[0]
    };
    let prefix = tok.encode_literal("flag =").unwrap();
    let allowed = [one(" True"), one(" False")];
    let canvas_of = |slot: &str, temperature: &str| -> Vec<u32> {
        let spec = format!("flag ={slot}\\n[MASK:6]");
        let v = json(&dllm(&[
            "fill",
            "--model",
            MODEL,
            "--backend",
            "cpu",
            "--canvas",
            &spec,
            "--steps",
            "7",
            "--temperature",
            temperature,
            "--json",
            "--quiet",
        ]));
        canvas_ids(&v)
    };
    for temperature in ["0", "1.5"] {
        // Unconstrained, the model puts something else there, so the choice is the constraint's.
        let free = canvas_of("[MASK:1]", temperature)[prefix.len()];
        assert!(!allowed.contains(&free), "T={temperature}: {free}");
        let canvas = canvas_of("[ONEOF: True| False]", temperature);
        assert_eq!(&canvas[..prefix.len()], &prefix[..]);
        let chosen = canvas[prefix.len()];
        assert!(
            allowed.contains(&chosen),
            "T={temperature}: {chosen} not in {allowed:?}"
        );
        assert!(!canvas.contains(&1), "no mask left");
    }
    let long = dllm(&[
        "fill",
        "--model",
        MODEL,
        "--canvas",
        "x =[ONEOF: True|Falsey]",
    ]);
    assert_clean_error(&long, "\"Falsey\" of [ONEOF: True|Falsey] is 2 tokens");
    let bad = dllm(&["fill", "--model", MODEL, "--canvas", "x =[ONEOF:a||b]"]);
    assert_clean_error(&bad, "`[ONEOF:` at byte 3");
}

#[test]
fn generate_credit_and_hierarchy_run_the_sessions_rules_and_check_their_values() {
    use dllm::denoise::{CommitPolicy, CreditParams, Decoding, GenerationParams, Session};
    let prompt = "def fibonacci(n):";
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            MODEL,
            "--backend",
            "cpu",
            "--prompt",
            prompt,
            "--gen-len",
            "32",
            "--steps",
            "32",
            "--threshold",
            "0.9",
            "--json",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        json(&dllm(&args))
    };
    let m = dllm::model::load_cpu(Path::new(MODEL)).unwrap();
    let tok = dllm::tokenizer::Tokenizer::from_model_dir(Path::new(MODEL)).unwrap();
    let mut canvas = tok.encode(prompt).unwrap();
    canvas.resize(canvas.len() + 32, m.config().mask_token_id);
    let threshold = CommitPolicy::Threshold(0.9);
    for (extra, commit, credit) in [
        (&[][..], threshold, None),
        (&["--credit"][..], threshold, Some(CreditParams::default())),
        (
            &["--hierarchy", "0.3"][..],
            CommitPolicy::Hierarchy {
                high: Some(0.9),
                low: 0.3,
            },
            None,
        ),
        (
            &[
                "--credit",
                "--credit-alpha",
                "1.5",
                "--credit-gamma",
                "0.5",
                "--credit-decay",
                "0.3",
            ][..],
            threshold,
            Some(CreditParams {
                alpha: 1.5,
                gamma: 0.5,
                decay: 0.3,
            }),
        ),
    ] {
        let params = GenerationParams {
            steps: 32,
            block_len: 32,
            ..Default::default()
        };
        let mut s = Session::new(m.clone(), canvas.clone(), params).unwrap();
        s.set_decoding(Decoding {
            commit,
            credit,
            ..Default::default()
        })
        .unwrap();
        s.run().unwrap();
        let v = run(extra);
        assert_eq!(canvas_ids(&v), s.canvas(), "{extra:?}");
        assert_eq!(v["forward_steps"], s.forward_steps(), "{extra:?}");
    }
    let base = [
        "generate",
        "--model",
        MODEL,
        "--prompt",
        "x",
        "--gen-len",
        "8",
        "--steps",
        "8",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        dllm(&a)
    };
    let orphan = with(&["--credit-alpha", "0.5"]);
    assert_eq!(
        orphan.status.code(),
        Some(2),
        "a tuning flag needs --credit"
    );
    assert!(String::from_utf8_lossy(&orphan.stderr).contains("--credit"));
    assert_clean_error(&with(&["--credit", "--credit-decay", "2"]), "credit_decay");
    assert_clean_error(&with(&["--credit", "--credit-alpha", "0"]), "credit_alpha");
    assert_clean_error(&with(&["--credit", "--credit-gamma", "-1"]), "credit_gamma");
    let both = with(&["--hierarchy", "0.4", "--factor", "1"]);
    assert_eq!(
        both.status.code(),
        Some(2),
        "--hierarchy and --factor conflict"
    );
    assert_clean_error(&with(&["--hierarchy", "nan"]), "hierarchy");
    assert_clean_error(&with(&["--hierarchy", "0"]), "hierarchy low threshold");
}

#[test]
fn logits_json_has_one_row_per_id() {
    let v = json(&dllm(&[
        "logits",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--ids",
        "1460,6669,7085,1",
        "--json",
    ]));
    assert_eq!(v["ids"].as_array().unwrap().len(), 4);
    let rows = v["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.as_array().unwrap().len() == 8192));
}

#[test]
fn info_validates_the_embedded_model() {
    let v = json(&dllm(&["info", "--model", MODEL, "--json"]));
    assert_eq!(v["architecture"], "llada");
    assert_eq!(v["parameters"].as_u64(), Some(20_453_760));
    assert_eq!(v["shards"].as_array().unwrap().len(), 4);
    assert_eq!(v["valid"], true);
    // Device memory: the bf16 tensors as stored, with the 17 norms of 384 values widened to
    // f32; K and V of 8 layers × 1024 tokens × 384 values in bf16.
    let tensor_bytes = v["tensor_bytes"].as_u64().unwrap();
    assert_eq!(
        v["device_weight_bytes"].as_u64(),
        Some(tensor_bytes + 2 * 17 * 384)
    );
    assert_eq!(
        v["device_kv_cache_bytes_per_canvas"].as_u64(),
        Some(2 * 2 * 8 * 1024 * 384)
    );
    // Per canvas of 1024 rows: 4 i32 + 1 f64, f32 residual + 2 bf16 (384 each), bf16 qkv
    // (1152), gate|up (2048) and act (1024); its length (i32) and commit record (1 + 2 · 1024
    // i32). Shared: one LM-head chunk of 256 rows (f32 + bf16 hidden, f32 logits of 8192), and
    // the RMSNorm fold's buffers at one element each (it is off by default): 1 bf16, 2 f32.
    let per_row = 4 * 4 + 8 + 8 * 384 + 2 * (1152 + 2048 + 1024);
    assert_eq!(
        v["device_step_bytes_per_canvas"].as_u64(),
        Some(1024 * per_row + 4 + 4 * (1 + 2 * 1024))
    );
    assert_eq!(
        v["device_step_bytes_shared"].as_u64(),
        Some(256 * (6 * 384 + 4 * 8192) + 2 + 2 * 4)
    );
}

#[test]
fn bad_inputs_fail_with_one_clear_line() {
    let out = dllm(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert_clean_error(&out, "/nonexistent/model");

    let out = dllm(&[
        "generate",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--prompt",
        "x",
        "--gen-len",
        "96",
        "--steps",
        "10",
    ]);
    assert_clean_error(&out, "use 3, 6, 9");

    let out = dllm(&[
        "generate",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--prompt",
        "",
        "--gen-len",
        "0",
    ]);
    assert_clean_error(&out, "nothing to do");

    let out = dllm(&[
        "generate",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--prompt",
        "x",
        "--gen-len",
        "2000",
        "--steps",
        "63",
        "--block-len",
        "32",
    ]);
    assert_clean_error(&out, "max");

    // Sizes far past any limit: refused before anything is allocated (a 10^12-token gap
    // aborted the process; usize::MAX wrapped around to an empty run; 100 000 threads stalled
    // it).
    for (flag, value, needle) in [
        ("--gen-len", "1000000000000", "max_seq_len"),
        ("--gen-len", "18446744073709551615", "max_seq_len"),
        ("--steps", "18446744073709551615", "most supported"),
        ("--threads", "100000", "most supported"),
    ] {
        let out = dllm(&[
            "generate",
            "--model",
            MODEL,
            "--backend",
            "cpu",
            "--prompt",
            "x",
            flag,
            value,
        ]);
        assert_clean_error(&out, needle);
    }

    let out = dllm(&[
        "logits",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--ids",
        "1,99999",
    ]);
    assert_clean_error(&out, "99999");

    let out = dllm(&["logits", "--model", MODEL, "--ids", "1,x"]);
    assert_clean_error(&out, "`x`");

    let out = dllm(&[
        "generate",
        "--model",
        MODEL,
        "--prompt",
        "x",
        "--temperature=-1",
    ]);
    assert_clean_error(&out, "temperature");

    // A model folder whose config is malformed.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        b"{\"model_type\": \"gpt2\"}",
    )
    .unwrap();
    let out = dllm(&["info", "--model", dir.path().to_str().unwrap()]);
    assert_clean_error(&out, "gpt2");

    // A truncated shard.
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(MODEL).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let shard = dir.path().join("model-00002-of-00004.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let out = dllm(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--backend",
        "cpu",
        "--prompt",
        "x",
    ]);
    assert_clean_error(&out, "model-00002-of-00004.safetensors");
}

#[test]
fn odd_option_values_are_named_in_their_errors() {
    // A negative number is a bad value of its option, not an unknown argument.
    let out = dllm(&["generate", "--prompt", "x", "--gen-len", "-1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("invalid value '-1' for '--gen-len"), "{err}");
    // A decoding option's message says what is wrong once.
    let out = dllm(&[
        "generate",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--prompt",
        "x",
        "--top-p",
        "-0.5",
    ]);
    assert_clean_error(&out, "decoding options: top_p must be in (0, 1]");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("invalid argument").count(), 1, "{err}");
    // --suffix without --suite would be ignored.
    let out = dllm(&[
        "bench",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--suffix",
        "_x",
        "--gen-len",
        "8",
    ]);
    assert_clean_error(&out, "--suite");
}

#[test]
fn default_model_is_the_embedded_one() {
    assert!(Path::new(MODEL).join("config.json").exists());
    let out = Command::new(env!("CARGO_BIN_EXE_dllm"))
        .args(["info", "--json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("DLLM_MODEL")
        .output()
        .unwrap();
    assert_eq!(json(&out)["parameters"].as_u64(), Some(20_453_760));
}

/// `dllm info` reports the CUDA switches the environment sets (the session-3/4 defaults, and
/// what the variables turn off or on), on any machine.
#[test]
fn info_reports_the_cuda_switches() {
    let info = |env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dllm"));
        c.args(["info", "--model", MODEL, "--json"]);
        for v in [
            "DLLM_GEMM_STREAM",
            "DLLM_GEMM_TMA",
            "DLLM_ATTN_KEYS",
            "DLLM_PDL",
            "DLLM_SESSION_GRAPHS",
            "DLLM_CACHE_SLOTS",
            "DLLM_GEMM_STREAM_BLOCKS",
            "DLLM_FUSED_SWIGLU",
            "DLLM_FUSED_MLP",
            "DLLM_CUDA_SAFE",
            "DLLM_ATTN_KEYS_UNITS",
            "DLLM_CUDA_ARCH",
            "DLLM_KERNEL_DIR",
        ] {
            c.env_remove(v);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        json(&c.output().unwrap())["cuda_switches"].clone()
    };
    let d = info(&[]);
    assert_eq!(d["stream_gemm"], true);
    assert_eq!(d["tma_gemm"], true);
    assert_eq!(d["key_group_attention"], true);
    assert_eq!(d["pdl"], true);
    assert_eq!(d["cache_slots"], 4);
    assert_eq!(d["stream_gemm_blocks"], "one per SM");
    assert_eq!(d["stream_gemm_stages"], "as compiled");
    assert_eq!(d["fused_mlp"], false);
    assert_eq!(d["fused_swiglu"], true);
    assert_eq!(d["key_group_max_units"], "SM count");
    assert_eq!(d["kernel_build"], "by compute capability");
    assert_eq!(d["kernel_dir"], "embedded");
    // A kernel directory: the images found there that belong to an embedded module.
    let kd = tempfile::tempdir().unwrap();
    std::fs::write(kd.path().join("attention.ptx"), "x").unwrap();
    std::fs::write(kd.path().join("notes.txt"), "x").unwrap();
    let k = info(&[("DLLM_KERNEL_DIR", kd.path().to_str().unwrap())]);
    let found = if dllm::backend::cuda::kernels_compiled() {
        "attention.ptx"
    } else {
        "no kernel images"
    };
    assert_eq!(
        k["kernel_dir"],
        format!("{}: {found}", kd.path().display()).as_str()
    );
    let bad = info(&[("DLLM_KERNEL_DIR", "/nonexistent/kernels")]);
    let bad = bad["kernel_dir"].as_str().unwrap();
    assert!(
        bad.starts_with("unusable:") && bad.contains("/nonexistent/kernels is not a directory"),
        "{bad}"
    );
    let e = info(&[
        ("DLLM_GEMM_STREAM", "0"),
        ("DLLM_ATTN_KEYS", "0"),
        ("DLLM_PDL", " 0"),
        ("DLLM_CACHE_SLOTS", "1"),
        ("DLLM_GEMM_STREAM_BLOCKS", "99"),
        ("DLLM_FUSED_SWIGLU", "0"),
        ("DLLM_FUSED_MLP", "1"),
        ("DLLM_ATTN_KEYS_UNITS", "264"),
        ("DLLM_CUDA_ARCH", "80"),
    ]);
    assert_eq!(e["kernel_build"], "ampere (DLLM_CUDA_ARCH=80)");
    assert_eq!(e["stream_gemm"], false);
    assert_eq!(e["key_group_attention"], false);
    assert_eq!(e["pdl"], false);
    assert_eq!(e["tma_gemm"], true);
    assert_eq!(e["cache_slots"], 1);
    assert_eq!(e["stream_gemm_blocks"], 99);
    assert_eq!(e["fused_swiglu"], false);
    assert_eq!(e["fused_mlp"], true);
    assert_eq!(e["key_group_max_units"], 264);
    // The reference kernels have no fused SwiGLU.
    let safe = info(&[("DLLM_CUDA_SAFE", "1")]);
    assert_eq!(safe["fused_swiglu"], false);
    assert_eq!(safe["reference_kernels"], true);
}

/// `dllm-gpu-check --mlp-shape` refuses a shape that is not `M,D,H` (status 2) and, on any
/// machine, answers a well-formed one without a panic: the timings on a GPU with the stream
/// kernel, else one line saying why not (status 1).
#[test]
fn gpu_check_mlp_shape_arguments() {
    let run = |shape: &str| {
        Command::new(env!("CARGO_BIN_EXE_dllm-gpu-check"))
            .args(["--mlp-shape", shape])
            .output()
            .unwrap()
    };
    let bad = run("1,2");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--mlp-shape takes M,D,H"));
    let ok = run("3,64,128");
    let err = String::from_utf8_lossy(&ok.stderr);
    assert!(!err.contains("panicked"), "{err}");
    match ok.status.code() {
        Some(0) => assert!(String::from_utf8_lossy(&ok.stdout).contains("gemm.fused_mlp m3")),
        Some(1) => assert!(err.contains("--mlp-shape"), "{err}"),
        other => panic!("exit status {other:?}: {err}"),
    }
}

#[test]
fn bench_suite_arguments() {
    // The suite fixes the workloads' shapes: a shape flag beside it is an error, as is a suffix
    // without it.
    let dir = std::env::temp_dir().join(format!("dllm-suite-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let out = dllm(&["bench", "--model", MODEL, "--suite", d, "--batch", "2"]);
    assert_clean_error(&out, "--batch");
    let out = dllm(&["bench", "--model", MODEL, "--suffix", "_x"]);
    assert_clean_error(&out, "required arguments");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--suite <DIR>"));
    assert!(!dir.exists(), "nothing written for a refused call");
}

/// `--cpu-bf16` reaches the CPU model: `dllm info` says whether it is on (only where the CPU has
/// AVX-512 BF16), and `dllm logits --cpu-bf16` gives other logits than f32 there (the same
/// elsewhere), close to them (tests/cpu_bf16.rs holds them to the reference).
#[test]
fn cpu_bf16_is_reported_and_reaches_the_cpu_model() {
    let here = dllm::backend::cpu::skinny_bf16_available();
    let info = json(&dllm(&["info", "--model", MODEL, "--cpu-bf16", "--json"]));
    let line = info["cpu_bf16_activations"].as_str().unwrap();
    assert_eq!(line.starts_with("on"), here, "{line}");
    let logits = |extra: &[&'static str]| {
        let mut a = vec![
            "logits",
            "--model",
            MODEL,
            "--backend",
            "cpu",
            "--ids",
            "1460,6669,7085,1",
            "--json",
        ];
        a.extend_from_slice(extra);
        let v = json(&dllm(&a));
        let rows: Vec<f64> = v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect();
        rows
    };
    let (bf, f32) = (logits(&["--cpu-bf16"]), logits(&[]));
    assert_eq!(bf != f32, here);
    let err = bf
        .iter()
        .zip(&f32)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = f32.iter().map(|b| b.abs()).fold(0.0, f64::max);
    assert!(err <= 5e-2 * scale, "{err} against {scale}");
}
