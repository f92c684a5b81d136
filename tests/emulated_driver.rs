//! The whole CUDA backend on a machine without a GPU: `dllm` and `dllm-gpu-check` run with the
//! emulated driver (`cuda/emu/libcuda_emu.cpp`, built by `scripts/emu-driver.sh`) as their
//! `libcuda.so.1`, so the backend's host code (plans, buffer sizes, argument lists, the load-time
//! self-tests, graph capture, the opt-in paths) drives the real kernels, run on the CPU, and what
//! it computes is compared with the CPU backend.
//!
//! Not covered: the device's rounding, memory model and speed.
//!
//! Needs a C++20 compiler and a build with compiled kernels (nvcc): CI (`CI` set) has both and
//! fails without them; elsewhere the tests are skipped with a message.

mod common;

use common::emulation::built_or_skip;
use common::{canvas_ids, json_ok, MODEL};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The folder holding the built `libcuda.so.1`, or `None` (skipped) outside CI without a
/// compiler or compiled kernels.
fn driver() -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        if !dllm::backend::cuda::kernels_compiled() {
            return Err("skip: this build has no compiled CUDA kernels (no nvcc)".into());
        }
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        if Command::new(&cxx).arg("--version").output().is_err() {
            return Err(format!("skip: no C++ compiler `{cxx}`"));
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu-driver");
        let status = Command::new("bash")
            .arg(root.join("scripts/emu-driver.sh"))
            .arg(&out)
            .status()
            .map_err(|e| format!("skip: cannot run bash: {e}"))?;
        if !status.success() {
            return Err(format!("scripts/emu-driver.sh failed ({status})"));
        }
        Ok(out)
    });
    built_or_skip(built)
}

/// `bin args` with the emulated driver and `env`; fails the test unless it exits 0.
fn run(driver: &Path, bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("LD_LIBRARY_PATH", driver)
        .env("DLLM_EMU_SMS", "8");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the binary");
    assert!(
        out.status.success(),
        "{bin} {args:?} {env:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn dllm() -> &'static str {
    env!("CARGO_BIN_EXE_dllm")
}

/// `dllm generate --model MODEL --backend backend --json args` with the emulated driver.
fn generate(driver: &Path, backend: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut all = vec!["generate", "--model", MODEL, "--backend", backend, "--json"];
    all.extend_from_slice(args);
    run(driver, dllm(), &all, env)
}

/// The generated positions of the final canvas in a one-prompt `dllm generate --json` run.
fn generated(out: &Output) -> Vec<u32> {
    let v = json_ok(out);
    let prompt = v["prompt_tokens"].as_u64().expect("prompt_tokens") as usize;
    canvas_ids(&v)[prompt..].to_vec()
}

/// `dllm generate --json` on `backend`: the generated positions of one prompt's canvas.
fn canvas(driver: &Path, backend: &str, args: &[&str], env: &[(&str, &str)]) -> Vec<u32> {
    generated(&generate(driver, backend, args, env))
}

/// At most one generated position in 16 may differ (a near-tie the device's and the CPU's
/// different summation orders may break either way); the message says how many did.
fn assert_close(what: &str, gpu: &[u32], cpu: &[u32]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: canvas lengths");
    let differ = gpu.iter().zip(cpu).filter(|(a, b)| a != b).count();
    assert!(
        differ <= gpu.len() / 16,
        "{what}: {differ} of {} positions differ\n emulated GPU {gpu:?}\n CPU          {cpu:?}",
        gpu.len()
    );
}

const SHORT: [&str; 10] = [
    "--prompt",
    "def fibonacci(n):",
    "--gen-len",
    "16",
    "--steps",
    "8",
    "--block-len",
    "8",
    "--cache",
    "CACHE",
];

fn short(cache: &'static str) -> Vec<&'static str> {
    SHORT
        .iter()
        .map(|a| if *a == "CACHE" { cache } else { a })
        .collect()
}

/// No cache and the dual cache, and on the dual cache the host-logits paths of sessions 19–20:
/// trace credit (`--credit`: every step's logits of the queried rows) and the vicinity cache
/// update (`--vicinity`: span steps wider than the block).
#[test]
fn generation_on_the_emulated_gpu_matches_the_cpu() {
    let Some(d) = driver() else { return };
    for (cache, extra) in [
        ("none", &[][..]),
        ("dual", &[][..]),
        ("dual", &["--credit"][..]),
        ("dual", &["--vicinity", "4"][..]),
    ] {
        let mut args = short(cache);
        args.extend_from_slice(extra);
        let cpu = canvas(d, "cpu", &args, &[]);
        let gpu = canvas(d, "cuda", &args, &[]);
        assert_close(&format!("cache {cache} {extra:?}"), &gpu, &cpu);
    }
}

/// `dllm generate --json` on the emulated GPU with `env` and the launch trace: the final canvas
/// and the trace lines of the steps (after the load-time self-tests).
fn traced(driver: &Path, args: &[&str], env: &[(&str, &str)]) -> (Vec<u32>, Vec<String>) {
    let out = generate(driver, "cuda", args, &with_trace(env));
    let canvas = generated(&out);
    let steps = String::from_utf8_lossy(&out.stderr)
        .lines()
        .skip_while(|l| !l.contains("embedding_bf16_f32"))
        .map(str::to_owned)
        .collect();
    (canvas, steps)
}

/// `env` and `DLLM_EMU_TRACE=1` (the emulated driver's launch trace on stderr).
fn with_trace<'a>(env: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = env.to_vec();
    all.push(("DLLM_EMU_TRACE", "1"));
    all
}

/// Asserts that some step launched a kernel whose name starts with `prefix` (and contains
/// `also`).
fn assert_launched(steps: &[String], prefix: &str, also: &str, why: &str) {
    assert!(
        steps
            .iter()
            .any(|l| l.contains(&format!(" {prefix}")) && l.contains(also)),
        "no {prefix}*{also} kernel launched by the steps ({why}); {} step launches, the first {:?}",
        steps.len(),
        steps.iter().take(12).collect::<Vec<_>>()
    );
}

/// Every kernel opt-in that a batch-1 dual-cache run can use, together, with the Session path's
/// steps captured as CUDA graphs (`DLLM_SESSION_GRAPHS`) and replayed; the trace shows that the
/// fused kernels ran (a failed load-time self-test would have turned them off silently) and that
/// graphs were replayed (a failed capture falls back to eager launches silently).
#[test]
fn the_opt_in_kernels_run_and_match_the_cpu() {
    let Some(d) = driver() else { return };
    let args = short("dual");
    let cpu = canvas(d, "cpu", &args, &[]);
    let opt_ins = [
        ("DLLM_FUSED_ROPE", "1"),
        ("DLLM_NORM_FOLD", "1"),
        ("DLLM_FUSED_MLP", "1"),
        ("DLLM_LAYER_CHAIN", "1"),
        ("DLLM_QUERY_LAST_LAYER", "1"),
        ("DLLM_GEMM_STREAM_BLOCKS", "auto"),
        ("DLLM_SESSION_GRAPHS", "1"),
    ];
    let (gpu, steps) = traced(d, &args, &opt_ins);
    assert!(
        steps.iter().any(|l| l.contains("graph replayed")),
        "no graph replayed"
    );
    assert_launched(&steps, "gemm_stream_chain_mg", "", "DLLM_LAYER_CHAIN");
    assert_launched(&steps, "gemm_stream_tail_mg", "", "DLLM_NORM_FOLD");
    assert_close("opt-ins", &gpu, &cpu);
}

/// One no-cache step of a canvas of the prompt's 19 tokens and `gen` more.
fn wide(gen: &'static str) -> Vec<&'static str> {
    vec![
        "--prompt",
        "import os\nimport sys\n\ndef main(argv):\n    \"\"\"Parse the arguments.\"\"\"",
        "--gen-len",
        gen,
        "--steps",
        "1",
        "--block-len",
        gen,
        "--cache",
        "none",
    ]
}

/// A canvas of two M tiles (19 + 128 rows), so the projections run the TMA GEMM's cluster pairs
/// (the weight tile multicast into both blocks, remote mbarrier arrivals): Hopper's default.
#[test]
fn the_tma_cluster_pairs_match_the_cpu() {
    let Some(d) = driver() else { return };
    let args = wide("128");
    let cpu = canvas(d, "cpu", &args, &[]);
    let (gpu, steps) = traced(d, &args, &[]);
    assert_launched(&steps, "gemm_tma_wg", "", "M of two tiles");
    assert_close("TMA pairs", &gpu, &cpu);
}

/// The GEMM's load-time self-tests (each kernel on odd shapes against the naive kernel, through
/// the launch paths the forwards use) pass for every GEMM kernel, the opt-ins included: the
/// cluster split (`DLLM_GEMM_CLUSTER_SPLIT`, which the tiny model's shapes never pick), the TMA
/// quads (`DLLM_GEMM_TMA4`) and the fused MLP; `dllm info --backend cuda` reports any kernel
/// asked for but not in use.
#[test]
fn every_gemm_kernel_passes_its_load_time_self_test() {
    let Some(d) = driver() else { return };
    let env = [
        ("DLLM_GEMM_CLUSTER_SPLIT", "1"),
        ("DLLM_GEMM_TMA4", "1"),
        ("DLLM_FUSED_MLP", "1"),
        ("DLLM_EMU_TRACE", "1"),
    ];
    let out = run(
        d,
        dllm(),
        &["info", "--model", MODEL, "--backend", "cuda", "--json"],
        &env,
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(
        v["cuda_kernels_not_in_use"],
        serde_json::json!([]),
        "{}",
        v["cuda_device"]
    );
    // The self-tests ran the opt-in kernels.
    let trace = String::from_utf8_lossy(&out.stderr);
    for kernel in [
        "gemm_wgmma_wg2_cs2",
        "gemm_wgmma_wg3_cs3",
        "gemm_tma4_wg2",
        "gemm_tma_wg3",
    ] {
        assert!(
            trace.contains(&format!(" {kernel} ")),
            "{kernel} never ran in the self-tests"
        );
    }
}

/// Cached sessions of a batch file, one after another and packed into one forward
/// (`DLLM_PACKED_SESSIONS`), against the CPU's; the packed run makes fewer forwards (embedding
/// launches) than the sessions one after another.
#[test]
fn batched_sessions_match_the_cpu() {
    let Some(d) = driver() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.txt");
    std::fs::write(&file, "def add(a, b):\nclass Stack:\nimport os\n").unwrap();
    let file = file.to_str().unwrap();
    // The texts, and the number of forwards on the emulated GPU.
    let run_batch = |backend: &str, env: &[(&str, &str)]| -> (Vec<String>, usize) {
        let args = [
            "--batch-file",
            file,
            "--gen-len",
            "8",
            "--steps",
            "4",
            "--block-len",
            "8",
            "--cache",
            "dual",
        ];
        let out = generate(d, backend, &args, &with_trace(env));
        let texts = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].to_string())
            .collect();
        let forwards = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains(" embedding_bf16_f32 "))
            .count();
        (texts, forwards)
    };
    let (cpu, _) = run_batch("cpu", &[]);
    assert_eq!(cpu.len(), 3);
    let (alone, alone_forwards) = run_batch("cuda", &[]);
    assert_eq!(alone, cpu, "sessions one after another");
    let (packed, packed_forwards) = run_batch("cuda", &[("DLLM_PACKED_SESSIONS", "1")]);
    assert_eq!(packed, cpu, "packed sessions");
    assert!(
        packed_forwards < alone_forwards,
        "packed sessions made {packed_forwards} forwards, one after another {alone_forwards}"
    );
}

/// `dllm-gpu-check`'s mixture checks (its kernels and launchers against CPU references on fresh
/// inputs: routing, grouping, the grouped GEMM, head norms, whole mixtures), the one CUDA path no
/// LLaDA or Dream generation runs. (Its other parts pass too, `sampling` and `elementwise` in
/// seconds, but are left to the generations here to keep CI short.)
#[test]
fn the_gpu_checks_pass_on_the_emulated_gpu() {
    let Some(d) = driver() else { return };
    let out = run(
        d,
        env!("CARGO_BIN_EXE_dllm-gpu-check"),
        &["--model", MODEL, "--only", "moe", "--no-bench"],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains("checks,"))
        .unwrap_or("");
    assert!(
        summary.ends_with(" 0 failed") && !summary.starts_with("0 checks"),
        "summary {summary:?}\n{text}"
    );
}
