//! The C ABI end to end: builds the C tests and examples of `ffi/` with the system C compiler,
//! links them once against libdllm.so and once against libdllm.a, runs them (and under valgrind
//! when it is installed), compares the C driver with the Rust `Session`, and checks
//! `include/dllm.h` against `src/ffi` with bindgen so that signatures cannot drift.
//!
//! The C programs load the embedded tiny model on the CPU backend only (no CUDA library is ever
//! opened, which keeps valgrind's view clean). The library artifacts are those cargo built for
//! this test run, next to the test executable (`target/<profile>/deps`).

use dllm::denoise::{
    generation_canvas, infill_canvas, CacheMode, CommitPolicy, CreditParams, Decoding,
    GenerationParams, Remasking, SampleFilter, Session,
};
use dllm::model::{load_model, Backend};
use dllm::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llada-code");
/// The self-checking C tests (each exits 0 when every check passed).
const C_TESTS: [&str; 6] = [
    "test_model",
    "test_tokenize",
    "test_session",
    "test_decoding",
    "test_threads",
    "test_batch",
];
/// Every C program built: the tests, the parity driver and the examples.
const PROGRAMS: [(&str, &str); 10] = [
    ("test_model", "ffi/tests/test_model.c"),
    ("test_tokenize", "ffi/tests/test_tokenize.c"),
    ("test_session", "ffi/tests/test_session.c"),
    ("test_decoding", "ffi/tests/test_decoding.c"),
    ("test_threads", "ffi/tests/test_threads.c"),
    ("test_batch", "ffi/tests/test_batch.c"),
    ("parity", "ffi/tests/parity.c"),
    ("generate", "ffi/examples/generate.c"),
    ("infill", "ffi/examples/infill.c"),
    ("choose", "ffi/examples/choose.c"),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding libdllm.so, libdllm.a and libdllm.rlib built with this test.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let deps = exe.parent().expect("deps directory").to_path_buf();
        let candidates = [deps.clone(), deps.parent().unwrap().to_path_buf()];
        candidates
            .iter()
            .find(|d| d.join("libdllm.so").exists() && d.join("libdllm.a").exists())
            .unwrap_or_else(|| panic!("libdllm.so and libdllm.a not found in {candidates:?}"))
            .clone()
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Link {
    Shared,
    Static,
}

/// The C programs, compiled once per test process.
struct Built {
    dir: PathBuf,
}

impl Built {
    fn exe(&self, name: &str, link: Link) -> PathBuf {
        self.dir.join(format!("{name}-{link:?}").to_lowercase())
    }
}

fn compiler() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".to_string())
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = lib_dir().join("c_abi");
        std::fs::create_dir_all(&dir).unwrap();
        let built = Built { dir };
        let lib = lib_dir();
        for (name, src) in PROGRAMS {
            // Static linking (a large archive) only for the self-checking tests.
            let links: &[Link] = if C_TESTS.contains(&name) {
                &[Link::Shared, Link::Static]
            } else {
                &[Link::Shared]
            };
            for &link in links {
                let mut cmd = Command::new(compiler());
                cmd.current_dir(root())
                    .args([
                        "-std=c99",
                        "-Wall",
                        "-Wextra",
                        "-Wpedantic",
                        "-Werror",
                        "-g",
                        "-O1",
                    ])
                    .args(["-Iinclude", "-Iffi/tests", src, "-o"])
                    .arg(built.exe(name, link));
                match link {
                    Link::Shared => {
                        cmd.arg(format!("-L{}", lib.display()))
                            .arg("-ldllm")
                            .arg(format!("-Wl,-rpath,{}", lib.display()));
                    }
                    Link::Static => {
                        // The native libraries a Rust staticlib needs on Linux
                        // (`rustc --print native-static-libs`).
                        cmd.arg(lib.join("libdllm.a"))
                            .arg("-Wl,--gc-sections")
                            .args([
                                "-lgcc_s",
                                "-lutil",
                                "-lrt",
                                "-lpthread",
                                "-lm",
                                "-ldl",
                                "-lc",
                            ]);
                    }
                }
                cmd.args(["-pthread", "-lm"]);
                let out = cmd
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", compiler()));
                assert!(
                    out.status.success(),
                    "compiling {src} ({link:?}) failed:\n{:?}\n{}",
                    cmd,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        built
    })
}

/// Runs `cmd` with a deadline (a hung program fails the test instead of hanging it).
fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut v).ok();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut v).ok();
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!("{desc} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_c_tests(link: Link) {
    let built = built();
    for name in C_TESTS {
        let mut cmd = Command::new(built.exe(name, link));
        cmd.arg(MODEL).env_remove("LD_LIBRARY_PATH");
        let out = run_with_timeout(cmd, Duration::from_secs(600));
        assert!(
            out.status.success(),
            "{name} ({link:?}) failed: {}",
            describe(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("checks passed"), "{name}: {stdout}");
    }
}

#[test]
fn c_tests_pass_with_the_shared_library() {
    run_c_tests(Link::Shared);
}

/// The static programs have no rpath and run without LD_LIBRARY_PATH: they cannot be using
/// libdllm.so.
#[test]
fn c_tests_pass_with_the_static_library() {
    run_c_tests(Link::Static);
}

fn valgrind_available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Writes `bytes` to `path` through a new file renamed over it: a program that has the old file
/// memory-mapped (a C test of a concurrent run, or of another checkout whose target directory
/// shares this file by a hard link) keeps its intact copy instead of faulting (SIGBUS) on a
/// truncated one.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A LLaDA checkpoint with the tiny model's tokenizer, vocabulary, special ids and maximum
/// length but a 1-layer, 16-wide transformer, so that the many forward passes of the C tests
/// stay cheap under valgrind (which checks the ABI layer, not the arithmetic). The weights are
/// a fixed pseudo-random pattern; norms are 1.
fn micro_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = lib_dir().join("c_abi").join("micro-model");
        std::fs::create_dir_all(&dir).unwrap();
        let (d, mlp, vocab) = (16usize, 32usize, 8192usize);
        let config = serde_json::json!({
            "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": d,
            "n_heads": 2, "n_kv_heads": 2, "n_layers": 1, "mlp_hidden_size": mlp,
            "vocab_size": vocab, "embedding_size": vocab, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5, "max_sequence_length": 1024, "mask_token_id": 1,
            "eos_token_id": 0, "pad_token_id": 2, "weight_tying": false,
            "include_bias": false, "include_qkv_bias": false
        });
        replace_file(&dir.join("config.json"), config.to_string().as_bytes());
        replace_file(
            &dir.join("tokenizer.json"),
            &std::fs::read(Path::new(MODEL).join("tokenizer.json")).unwrap(),
        );
        let b = "model.transformer.blocks.0.";
        let shapes: Vec<(String, Vec<usize>)> = vec![
            ("model.transformer.wte.weight".into(), vec![vocab, d]),
            (format!("{b}q_proj.weight"), vec![d, d]),
            (format!("{b}k_proj.weight"), vec![d, d]),
            (format!("{b}v_proj.weight"), vec![d, d]),
            (format!("{b}attn_out.weight"), vec![d, d]),
            (format!("{b}ff_proj.weight"), vec![mlp, d]),
            (format!("{b}up_proj.weight"), vec![mlp, d]),
            (format!("{b}ff_out.weight"), vec![d, mlp]),
            (format!("{b}attn_norm.weight"), vec![d]),
            (format!("{b}ff_norm.weight"), vec![d]),
            ("model.transformer.ln_f.weight".into(), vec![d]),
            ("model.transformer.ff_out.weight".into(), vec![vocab, d]),
        ];
        let data: Vec<Vec<u8>> = shapes
            .iter()
            .enumerate()
            .map(|(t, (name, shape))| {
                let n: usize = shape.iter().product();
                (0..n)
                    .flat_map(|i| {
                        let x = if name.ends_with("norm.weight") || name.contains("ln_f") {
                            1.0
                        } else {
                            let h = (i as u64 + 1)
                                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                                .wrapping_add(t as u64)
                                >> 40;
                            (h % 2001) as f32 / 1000.0 - 1.0
                        };
                        half::bf16::from_f32(x).to_bits().to_le_bytes()
                    })
                    .collect()
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = shapes
            .iter()
            .zip(&data)
            .map(|((name, shape), bytes)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::BF16,
                    shape.clone(),
                    bytes,
                )
                .unwrap();
                (name.clone(), view)
            })
            .collect();
        let bytes = safetensors::tensor::serialize(views, None).unwrap();
        replace_file(&dir.join("model.safetensors"), &bytes);
        dir
    })
}

/// Each C test under valgrind (shared-library builds: the static ones run the same code), on the
/// micro model, in parallel. Invalid reads/writes and "definitely" or "indirectly" lost blocks are
/// errors. "Possibly lost" is not: process-wide caches of the tokenizer's regex engine (pools of
/// hash tables reached through interior pointers) show up there nondeterministically; a leaked
/// dllm handle is "definitely lost" and still fails the test.
#[test]
fn c_tests_are_clean_under_valgrind() {
    if !valgrind_available() {
        eprintln!("valgrind not installed: skipping the memory checks of the C tests");
        return;
    }
    let built = built();
    let model = micro_model();
    let runs: Vec<_> = C_TESTS
        .iter()
        .map(|&name| {
            let mut cmd = Command::new("valgrind");
            // cargo puts target/<profile> on LD_LIBRARY_PATH, which outranks the rpath: a stale
            // libdllm.so there (from an earlier `cargo build`) must not be the one loaded.
            cmd.env_remove("LD_LIBRARY_PATH");
            cmd.args([
                "--error-exitcode=1",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite,indirect",
                "--show-leak-kinds=definite,indirect",
                "--quiet",
            ])
            .arg(format!(
                "--suppressions={}",
                root().join("ffi/tests/valgrind.supp").display()
            ))
            .arg(built.exe(name, Link::Shared))
            .arg(model);
            (
                name,
                std::thread::spawn(move || run_with_timeout(cmd, Duration::from_secs(900))),
            )
        })
        .collect();
    for (name, run) in runs {
        let out = run.join().unwrap();
        assert!(out.status.success(), "valgrind {name}: {}", describe(&out));
    }
}

/// What the C parity driver prints, computed with the Rust API: per step the counts and the
/// positions that changed (the canvas diff), then the canvas.
fn rust_transcript(c: &ParityCase) -> String {
    let ParityCase {
        prompt,
        gen_len,
        params,
        decoding,
        lock,
        ..
    } = c;
    let model = load_model(Path::new(MODEL), Backend::Cpu).unwrap().model;
    let tok = Tokenizer::from_model_dir(Path::new(MODEL)).unwrap();
    let ids = tok.encode(prompt).unwrap();
    let mask = model.config().mask_token_id;
    let canvas = generation_canvas(&ids, *gen_len, mask);
    let mut s = Session::new(Arc::clone(&model), canvas, params.clone()).unwrap();
    s.set_decoding(decoding.clone()).unwrap();
    if let Some((k, t)) = lock {
        s.lock(ids.len() + k, *t).unwrap();
    }
    let mut text = String::new();
    loop {
        let before = s.canvas().to_vec();
        let report = s.step_report().unwrap();
        let info = report.info();
        // The canvas diff: positions that hold the mask now were re-masked, the others filled.
        let (remasked, filled): (Vec<usize>, Vec<usize>) = (0..before.len())
            .filter(|&p| before[p] != s.canvas()[p])
            .partition(|&p| s.canvas()[p] == mask);
        assert!(info.committed.iter().all(|p| filled.contains(p)));
        assert_eq!(remasked, report.remasked);
        text += &format!(
            "step {} committed {} masks_left {} done {} filled",
            info.step,
            filled.len(),
            info.masks_left,
            u8::from(info.done)
        );
        for p in filled {
            text += &format!(" {p}:{}", s.canvas()[p]);
        }
        text += " remasked";
        for p in remasked {
            text += &format!(" {p}");
        }
        text += "\n";
        if info.done {
            break;
        }
    }
    text += "canvas";
    for id in s.canvas() {
        text += &format!(" {id}");
    }
    text + "\n"
}

/// One parity case: the C driver's arguments and the Rust parameters they mean.
struct ParityCase {
    prompt: &'static str,
    gen_len: usize,
    params: GenerationParams,
    decoding: Decoding,
    /// `key=value` arguments of the driver for `decoding` (values as the C `float`s).
    options: Vec<String>,
    /// Generated position `k` (0 = first after the prompt) locked to a token before stepping.
    lock: Option<(usize, u32)>,
}

impl ParityCase {
    /// The same case with block K/V cache `mode` (`dllm_cache` value `value`).
    fn with_cache(mut self, mode: CacheMode, value: i32) -> Self {
        self.options.push(format!("cache={value}"));
        self.decoding.cache = mode;
        self
    }

    /// The same case with the vicinity cache update of `n` positions.
    fn with_vicinity(mut self, n: i32) -> Self {
        self.options.push(format!("vicinity={n}"));
        self.decoding.vicinity = n as usize;
        self
    }

    /// The same case with self-correction threshold `r` (as the C `float`).
    fn with_revise(mut self, r: f32) -> Self {
        self.options.push(format!("revise={r}"));
        self.decoding.revise = Some(r as f64);
        self
    }

    /// The same case with trace credit (the constants as the C `float`s).
    fn with_credit(mut self, alpha: f32, gamma: f32, decay: f32) -> Self {
        self.options.push(format!("credit_alpha={alpha}"));
        self.options.push(format!("credit_gamma={gamma}"));
        self.options.push(format!("credit_decay={decay}"));
        self.decoding.credit = Some(CreditParams {
            alpha: alpha as f64,
            gamma: gamma as f64,
            decay: decay as f64,
        });
        self
    }

    /// The same case with the hierarchical rule at `low` (as the C `float`); the case's
    /// threshold (0 = none) is its high threshold.
    fn with_hierarchy(mut self, low: f32) -> Self {
        self.options.push(format!("hierarchy_low={low}"));
        let high = match self.decoding.commit {
            CommitPolicy::Threshold(t) => Some(t),
            _ => None,
        };
        self.decoding.commit = CommitPolicy::Hierarchy {
            high,
            low: low as f64,
        };
        self
    }

    fn with_lock(mut self, k: usize, token: u32) -> Self {
        self.options.push(format!("lock={k}:{token}"));
        self.lock = Some((k, token));
        self
    }
}

/// A case whose decoding fields are given as the C `float`s they are in the struct.
fn case(
    prompt: &'static str,
    gen_len: usize,
    params: GenerationParams,
    (threshold, factor, top_k, top_p, cfg_scale, stop_at_eos): (f32, f32, usize, f32, f32, bool),
) -> ParityCase {
    let commit = if threshold > 0.0 {
        CommitPolicy::Threshold(threshold as f64)
    } else if factor > 0.0 {
        CommitPolicy::Factor(factor as f64)
    } else {
        CommitPolicy::Schedule
    };
    let decoding = Decoding {
        commit,
        filter: SampleFilter {
            top_k,
            top_p: top_p as f64,
        },
        cfg_scale: cfg_scale as f64,
        stop_at_eos,
        cache: CacheMode::None,
        vicinity: 0,
        revise: None,
        constraints: Default::default(),
        credit: None,
    };
    let options = vec![
        format!("threshold={threshold}"),
        format!("factor={factor}"),
        format!("top_k={top_k}"),
        format!("top_p={top_p}"),
        format!("cfg_scale={cfg_scale}"),
        format!("stop_at_eos={}", u8::from(stop_at_eos)),
    ];
    ParityCase {
        prompt,
        gen_len,
        params,
        decoding,
        options,
        lock: None,
    }
}

#[test]
fn c_driver_matches_the_rust_session() {
    const OFF: (f32, f32, usize, f32, f32, bool) = (0.0, 0.0, 0, 1.0, 0.0, false);
    let eos = load_model(Path::new(MODEL), Backend::Cpu)
        .unwrap()
        .model
        .config()
        .eos_token_id;
    // The temperature as the C `float` the driver parses.
    let gp = |steps, block_len, temperature: f32, remasking, seed| GenerationParams {
        steps,
        block_len,
        temperature: temperature as f64,
        remasking,
        seed,
        ..Default::default()
    };
    let cases = [
        case(
            "def fib(n):\n",
            16,
            gp(8, 8, 0.0, Remasking::LowConfidence, 0),
            OFF,
        ),
        case(
            "import numpy as np\n",
            12,
            gp(6, 4, 0.8, Remasking::Random, 7),
            OFF,
        ),
        case(
            "class Stack:\n",
            10,
            gp(9, 4, 0.5, Remasking::LowConfidence, 12345678901),
            OFF,
        ),
        // Version-2 fields: the threshold rule (blocks end early), the factor rule with margin,
        // entropy with top-k / top-p sampling and guidance, stop at EOS.
        case(
            "def fib(n):\n",
            16,
            gp(16, 8, 0.0, Remasking::LowConfidence, 0),
            (0.9, 0.0, 0, 1.0, 0.0, false),
        ),
        case(
            "import os\n",
            12,
            gp(12, 4, 0.0, Remasking::Margin, 0),
            (0.0, 1.0, 0, 1.0, 0.0, false),
        ),
        case(
            "class Stack:\n",
            10,
            gp(10, 5, 0.8, Remasking::Entropy, 3),
            (0.0, 0.0, 5, 0.9, 0.5, false),
        ),
        // The tiny model rarely writes EOS itself: one locked at generated position 6 stops
        // the session once positions 0..6 are filled, the rest becoming EOS.
        case(
            "def add(a, b):\n    return a + b\n",
            24,
            gp(24, 8, 0.0, Remasking::LowConfidence, 0),
            (0.7, 0.0, 0, 1.0, 0.0, true),
        )
        .with_lock(6, eos),
        // Block K/V caches (the later steps of each block run on the cache).
        case(
            "def fib(n):\n",
            16,
            gp(8, 8, 0.0, Remasking::LowConfidence, 0),
            OFF,
        )
        .with_cache(CacheMode::Dual, 2),
        case(
            "import os\n",
            12,
            gp(12, 4, 0.0, Remasking::Margin, 0),
            (0.0, 1.0, 0, 1.0, 0.0, false),
        )
        .with_cache(CacheMode::Prefix, 1),
        // Self-correction (host logits every step): at 0.99 the tiny model re-masks 15 tokens
        // here, which come back through dllm_session_last_remasks and are filled again.
        case(
            "def fib(n):\n",
            16,
            gp(16, 8, 0.0, Remasking::LowConfidence, 0),
            OFF,
        )
        .with_revise(0.99),
        // Trace credit (host logits every step): dInfer's constants with the threshold rule,
        // and other constants with sampling through the dual cache.
        case(
            "def fib(n):\n",
            16,
            gp(16, 8, 0.0, Remasking::LowConfidence, 0),
            (0.9, 0.0, 0, 1.0, 0.0, false),
        )
        .with_credit(0.7, 0.2, 0.8),
        case(
            "class Stack:\n",
            12,
            gp(12, 6, 0.6, Remasking::LowConfidence, 5),
            (0.0, 1.0, 0, 1.0, 0.0, false),
        )
        .with_credit(1.5, 0.5, 0.3)
        .with_cache(CacheMode::Dual, 2),
        // The hierarchical rule, alone and with a high threshold and credit.
        case(
            "import numpy as np\n",
            16,
            gp(16, 8, 0.0, Remasking::LowConfidence, 0),
            OFF,
        )
        .with_hierarchy(0.3),
        case(
            "def fib(n):\n",
            16,
            gp(16, 16, 0.0, Remasking::LowConfidence, 0),
            (0.8, 0.0, 0, 1.0, 0.0, false),
        )
        .with_hierarchy(0.2)
        .with_credit(0.7, 0.2, 0.8),
        // The vicinity cache update: dual-cache steps over the block and 4 positions a side.
        case(
            "class Stack:\n",
            24,
            gp(12, 8, 0.0, Remasking::LowConfidence, 0),
            OFF,
        )
        .with_cache(CacheMode::Dual, 2)
        .with_vicinity(4),
    ];
    let built = built();
    for c in cases {
        let remasking = match c.params.remasking {
            Remasking::LowConfidence => 0,
            Remasking::Random => 1,
            Remasking::Margin => 2,
            Remasking::Entropy => 3,
        };
        let mut cmd = Command::new(built.exe("parity", Link::Shared));
        // cargo puts target/<profile> on LD_LIBRARY_PATH, which outranks the rpath: a stale
        // libdllm.so there (from an earlier `cargo build`) must not be the one loaded.
        cmd.env_remove("LD_LIBRARY_PATH");
        cmd.arg(MODEL)
            .arg(c.prompt)
            .arg(c.gen_len.to_string())
            .arg(c.params.steps.to_string())
            .arg(c.params.block_len.to_string())
            .arg(c.params.temperature.to_string())
            .arg(remasking.to_string())
            .arg(c.params.seed.to_string())
            .args(&c.options);
        let out = run_with_timeout(cmd, Duration::from_secs(300));
        assert!(out.status.success(), "parity: {}", describe(&out));
        let got = String::from_utf8(out.stdout).unwrap();
        let rust = rust_transcript(&c);
        if c.decoding.revise.is_some() {
            // The case must re-mask something, or it does not test dllm_session_last_remasks.
            assert!(
                rust.lines()
                    .any(|l| !l.ends_with(" remasked") && l.contains(" remasked ")),
                "no step of the revise case re-masked a position:\n{rust}"
            );
        }
        assert_eq!(
            got, rust,
            "C and Rust differ for {:?} {:?} {:?}",
            c.prompt, c.params, c.decoding
        );
    }
}

#[test]
fn examples_print_what_the_rust_api_computes() {
    let built = built();
    let model = load_model(Path::new(MODEL), Backend::Cpu).unwrap().model;
    let cfg = model.config().clone();
    let tok = Tokenizer::from_model_dir(Path::new(MODEL)).unwrap();

    // generate: prompt, 16 masks, 8 steps, blocks of 32 (one block).
    let prompt = "def add(a, b):";
    let mut cmd = Command::new(built.exe("generate", Link::Shared));
    // cargo puts target/<profile> on LD_LIBRARY_PATH, which outranks the rpath: a stale
    // libdllm.so there (from an earlier `cargo build`) must not be the one loaded.
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd.args([MODEL, prompt, "16", "8"])
        .env("DLLM_BACKEND", "cpu");
    let out = run_with_timeout(cmd, Duration::from_secs(300));
    assert!(out.status.success(), "generate: {}", describe(&out));
    let ids = tok.encode(prompt).unwrap();
    let canvas = generation_canvas(&ids, 16, cfg.mask_token_id);
    let params = GenerationParams {
        steps: 8,
        block_len: 32,
        ..GenerationParams::default()
    };
    let mut s = Session::new(Arc::clone(&model), canvas, params).unwrap();
    s.run().unwrap();
    let generated: Vec<u32> = s.canvas()[ids.len()..]
        .iter()
        .copied()
        .take_while(|&t| t != cfg.eos_token_id)
        .collect();
    let want = format!("{prompt}{}\n", tok.decode(&generated, false).unwrap());
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert_eq!(progress.matches("masks left").count(), 8, "{progress}");
    assert!(progress.contains("model loaded on cpu"), "{progress}");

    // infill: prefix, 8 masks, suffix, 8 steps in one block.
    let (prefix, suffix) = ("def area(r):\n    ", "\n    return a\n");
    let mut cmd = Command::new(built.exe("infill", Link::Shared));
    // cargo puts target/<profile> on LD_LIBRARY_PATH, which outranks the rpath: a stale
    // libdllm.so there (from an earlier `cargo build`) must not be the one loaded.
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd.args([MODEL, prefix, suffix, "8"])
        .env("DLLM_BACKEND", "cpu");
    let out = run_with_timeout(cmd, Duration::from_secs(300));
    assert!(out.status.success(), "infill: {}", describe(&out));
    let (p, q) = (tok.encode(prefix).unwrap(), tok.encode(suffix).unwrap());
    let canvas = infill_canvas(&p, 8, &q, cfg.mask_token_id);
    let params = GenerationParams {
        steps: 8,
        block_len: 8,
        ..GenerationParams::default()
    };
    let mut s = Session::new(Arc::clone(&model), canvas, params).unwrap();
    s.run().unwrap();
    let gap = tok
        .decode(&s.canvas()[p.len()..p.len() + 8], false)
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{prefix}[{gap}]{suffix}\n")
    );
    // choose: prefix, one slot allowed three tokens, 8 free tokens, one block of 9 steps.
    let (prefix, choices) = ("flag =", [" True", " False", " None"]);
    let mut cmd = Command::new(built.exe("choose", Link::Shared));
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd.args([MODEL, prefix, "8"])
        .args(choices)
        .env("DLLM_BACKEND", "cpu");
    let out = run_with_timeout(cmd, Duration::from_secs(300));
    assert!(out.status.success(), "choose: {}", describe(&out));
    let p = tok.encode_literal(prefix).unwrap();
    let allowed: Vec<u32> = choices
        .iter()
        .map(|c| tok.encode_literal(c).unwrap()[0])
        .collect();
    let canvas = generation_canvas(&p, 9, cfg.mask_token_id);
    let params = GenerationParams {
        steps: 9,
        block_len: 9,
        ..GenerationParams::default()
    };
    let mut s = Session::new(Arc::clone(&model), canvas, params).unwrap();
    s.constrain(p.len(), &allowed).unwrap();
    s.run().unwrap();
    let slot = s.canvas()[p.len()];
    assert!(allowed.contains(&slot));
    let text = tok.decode(&s.canvas()[p.len() + 1..], false).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{prefix}[{}]{text}\n", tok.decode(&[slot], false).unwrap())
    );
    // A choice of several tokens is refused.
    let mut cmd = Command::new(built.exe("choose", Link::Shared));
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd.args([MODEL, prefix, "8", " True", " Falsey"])
        .env("DLLM_BACKEND", "cpu");
    let out = run_with_timeout(cmd, Duration::from_secs(300));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\" Falsey\" is 2 tokens"));
}

/// The example of `ffi/README.md` compiles as printed and runs.
#[test]
fn readme_example_builds_and_runs() {
    let readme = std::fs::read_to_string(root().join("ffi/README.md")).unwrap();
    let start = readme
        .find("```c\n")
        .expect("a ```c block in ffi/README.md")
        + 5;
    let code = &readme[start..start + readme[start..].find("```").unwrap()];
    let dir = lib_dir().join("c_abi");
    std::fs::create_dir_all(&dir).unwrap();
    let (src, exe) = (dir.join("readme_example.c"), dir.join("readme_example"));
    replace_file(&src, code.as_bytes());
    let lib = lib_dir();
    let out = Command::new(compiler())
        .current_dir(root())
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-Iinclude"])
        .arg(&src)
        .arg(format!("-L{}", lib.display()))
        .arg("-ldllm")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let mut cmd = Command::new(&exe);
    // cargo puts target/<profile> on LD_LIBRARY_PATH, which outranks the rpath: a stale
    // libdllm.so there (from an earlier `cargo build`) must not be the one loaded.
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd.current_dir(root());
    let out = run_with_timeout(cmd, Duration::from_secs(300));
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("def fib(n):"), "{stdout}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .matches("masks left")
            .count(),
        32
    );
}

/// The header is valid C++ (the `extern "C"` guards) as well as pedantic C99 (the C tests).
#[test]
fn header_compiles_as_cpp() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let src = lib_dir().join("c_abi_header_check.cpp");
    replace_file(
        &src,
        b"#include \"dllm.h\"\n\
         static_assert(sizeof(dllm_sampling_params) == 88, \"v4 layout\");\n\
         static_assert(offsetof(dllm_sampling_params, threshold) == 32, \"v1 prefix\");\n\
         static_assert(offsetof(dllm_sampling_params, credit_alpha) == 64, \"v2 prefix\");\n\
         static_assert(offsetof(dllm_sampling_params, vicinity) == 80, \"v3 prefix\");\n\
         int main() { return dllm_abi_version() == DLLM_ABI_VERSION ? 0 : 1; }\n",
    );
    let out = match Command::new(&cxx)
        .current_dir(root())
        .args([
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-Wpedantic",
            "-Werror",
            "-fsyntax-only",
        ])
        .arg("-Iinclude")
        .arg(&src)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("no C++ compiler ({cxx}: {e}): skipping");
            return;
        }
    };
    assert!(out.status.success(), "{}", describe(&out));
}

// ---------------------------------------------------------------------------------------------
// Header ↔ Rust: bindgen generates declarations from include/dllm.h; a generated Rust file
// asserts that every exported Rust function has exactly the header's function-pointer type,
// that the parameter structs have the same layout and that every constant has the same value.
// It is compiled with rustc against the libdllm.rlib of this build: a drift fails to compile.
// ---------------------------------------------------------------------------------------------

/// Types the ABI defines; in the function declarations they are replaced by dllm's own.
const ABI_TYPES: [&str; 5] = [
    "dllm_model",
    "dllm_session",
    "dllm_model_params",
    "dllm_sampling_params",
    "dllm_step_info",
];
/// The plain structs whose layouts are compared field by field.
const ABI_STRUCTS: [&str; 3] = [
    "dllm_model_params",
    "dllm_sampling_params",
    "dllm_step_info",
];

fn bindgen_header(with_types: bool) -> String {
    let mut b = bindgen::Builder::default()
        .header(root().join("include/dllm.h").to_str().unwrap())
        .allowlist_file(".*dllm\\.h")
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate_comments(false)
        .formatter(bindgen::Formatter::None);
    if !with_types {
        for t in ABI_TYPES {
            b = b.blocklist_type(t);
        }
    }
    b.generate()
        .expect("bindgen failed on include/dllm.h (is libclang installed?)")
        .to_string()
}

/// `(name, argument count)` of every function declared in bindgen output.
fn declared_functions(bindings: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for piece in bindings.split("pub fn ").skip(1) {
        let name: String = piece
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let open = piece.find('(').unwrap();
        let mut depth = 0;
        let mut args = String::new();
        for ch in piece[open..].chars() {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            args.push(ch);
            if depth == 0 {
                break;
            }
        }
        let inner = args[1..args.len() - 1].trim();
        let n = if inner.is_empty() {
            0
        } else {
            inner.trim_end_matches(',').split(',').count()
        };
        out.push((name, n));
    }
    out
}

/// Names following `keyword` in bindgen output (e.g. `pub const `).
fn names_after(bindings: &str, keyword: &str) -> Vec<String> {
    bindings
        .split(keyword)
        .skip(1)
        .map(|p| {
            p.trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// The field names of `struct name` in bindgen output.
fn struct_fields(bindings: &str, name: &str) -> Vec<String> {
    let key = format!("pub struct {name} {{");
    let start = bindings
        .find(&key)
        .unwrap_or_else(|| panic!("{name} not in bindings"))
        + key.len();
    let body = &bindings[start..start + bindings[start..].find('}').unwrap()];
    body.split(',')
        .filter_map(|f| f.trim().strip_prefix("pub "))
        .map(|f| f.split(':').next().unwrap().trim().to_string())
        .collect()
}

/// `extern "C" fn` names defined in src/ffi.
fn rust_exports() -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root().join("src/ffi")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        names.extend(names_after(&text, "extern \"C\" fn "));
    }
    names.sort();
    names
}

#[test]
fn header_matches_the_rust_exports() {
    let fns_src = bindgen_header(false);
    let types_src = bindgen_header(true);
    let functions = declared_functions(&fns_src);
    let mut header_names: Vec<String> = functions.iter().map(|(n, _)| n.clone()).collect();
    header_names.sort();
    assert!(
        header_names.len() >= 21,
        "too few functions parsed: {header_names:?}"
    );
    assert_eq!(
        rust_exports(),
        header_names,
        "src/ffi exports and include/dllm.h declarations differ"
    );

    let mut check = String::from(
        "#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case, dead_code)]\n\
         #![allow(clashing_extern_declarations, improper_ctypes)]\n\
         mod fns {\n    use dllm::ffi::{",
    );
    check += &ABI_TYPES.join(", ");
    check += "};\n";
    check += &fns_src;
    check += "\n}\nmod types {\n";
    check += &types_src;
    check += "\n}\nfn same<T>(_: T, _: T) {}\npub fn functions() {\n";
    for (name, n) in &functions {
        let sig = format!("unsafe extern \"C\" fn({}) -> _", vec!["_"; *n].join(", "));
        check += &format!("    same(fns::{name} as {sig}, dllm::ffi::{name} as {sig});\n");
    }
    check += "}\n";
    for s in ABI_STRUCTS {
        check += &format!(
            "const _: () = assert!(std::mem::size_of::<types::{s}>() == \
             std::mem::size_of::<dllm::ffi::{s}>());\n\
             const _: () = assert!(std::mem::align_of::<types::{s}>() == \
             std::mem::align_of::<dllm::ffi::{s}>());\n"
        );
        for f in struct_fields(&types_src, s) {
            check += &format!(
                "const _: () = assert!(std::mem::offset_of!(types::{s}, {f}) == \
                 std::mem::offset_of!(dllm::ffi::{s}, {f}));\n\
                 fn _{s}_{f}(a: types::{s}, b: dllm::ffi::{s}) {{ same(a.{f}, b.{f}); }}\n"
            );
        }
    }
    let constants = names_after(&types_src, "pub const ");
    assert!(
        constants.contains(&"DLLM_ERR_INTERNAL".to_string()),
        "{constants:?}"
    );
    for c in &constants {
        check += &format!("const _: () = assert!(types::{c} as i64 == dllm::ffi::{c} as i64);\n");
    }

    let dir = lib_dir().join("c_abi_bindgen");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("abi_check.rs");
    replace_file(&file, check.as_bytes());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let out = Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "lib",
            "--crate-name",
            "dllm_abi_check",
        ])
        .args(["--emit", "metadata", "--out-dir"])
        .arg(&dir)
        .arg("--extern")
        .arg(format!("dllm={}", lib_dir().join("libdllm.rlib").display()))
        .arg(format!("-Ldependency={}", lib_dir().display()))
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc}: {e}"));
    assert!(
        out.status.success(),
        "src/ffi does not match include/dllm.h ({}):\n{}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
