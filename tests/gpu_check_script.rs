//! `scripts/gpu-check.sh` is the one thing a scarce GPU session runs; a typo in it costs that
//! session. These tests run it here against stub binaries (shell scripts standing in for `dllm`
//! and `dllm-gpu-check` that record their arguments and `DLLM_*` environment and write the
//! files the real ones would): each stage must call the binaries as intended, write its results
//! under the names the summary reads, and the summary must run over them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh scratch folder under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dllm-gpucheck-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn write_exec(path: &Path, body: &str) {
    fs::write(path, body).unwrap();
    let status = Command::new("chmod").arg("+x").arg(path).status().unwrap();
    assert!(status.success());
}

/// Stub `dllm` and `dllm-gpu-check` in `bin`, logging every call (arguments, then the sorted
/// `DLLM_*` variables) to `log`.
fn stub_binaries(bin: &Path, log: &Path) {
    let record = format!(
        r#"echo "$(basename "$0") $* | $(env | grep '^DLLM_' | sort | tr '\n' ' ')" >> '{}'"#,
        log.display()
    );
    // `dllm bench --suite DIR --suffix S` writes the three reports; a plain `bench --json` prints
    // one (the script redirects it into its file).
    let report = r#"{"backend":"cuda","batch":1,"tok_per_s":100.0,"ms_per_step":10.0,"canvas_hash":"00","graphs":true,"switches":{}}"#;
    write_exec(
        &bin.join("dllm"),
        &format!(
            r#"#!/usr/bin/env bash
{record}
dir=""; suffix=""
while [ $# -gt 0 ]; do
    case $1 in
        --suite) dir=$2; shift ;;
        --suffix) suffix=$2; shift ;;
    esac
    shift
done
if [ -n "$dir" ]; then
    for w in b1_dual_k4 b8_dual_k4 b1_none_k1; do echo '{report}' > "$dir/bench_$w$suffix.json"; done
fi
echo '{report}'
"#
        ),
    );
    write_exec(
        &bin.join("dllm-gpu-check"),
        &format!(
            r#"#!/usr/bin/env bash
{record}
while [ $# -gt 0 ]; do
    if [ "$1" = --json ]; then echo '{{"checks":[{{"name":"stub","passed":true,"rel_err":0,"tol":0,"detail":""}}],"benches":[]}}' > "$2"; fi
    shift
done
"#
        ),
    );
}

/// A stub compute-sanitizer in `bin` that logs its arguments (the binary it would run included).
fn stub_sanitizer(bin: &Path, log: &Path) {
    write_exec(
        &bin.join("compute-sanitizer"),
        &format!(
            "#!/usr/bin/env bash\necho \"compute-sanitizer $*\" >> '{}'\n",
            log.display()
        ),
    );
}

/// Runs `scripts/gpu-check.sh STAGES` with the stubs; returns (exit status, the call log, OUT).
fn run_script(name: &str, stages: &[&str]) -> (bool, String, PathBuf) {
    let root = scratch(name);
    let (bin, out, log) = (root.join("bin"), root.join("out"), root.join("calls.log"));
    fs::create_dir_all(&bin).unwrap();
    stub_binaries(&bin, &log);
    stub_sanitizer(&bin, &log);
    let status = Command::new("bash")
        .arg("scripts/gpu-check.sh")
        .args(stages)
        .env("BIN", &bin)
        .env("OUT", &out)
        .env("MODEL8B", root.join("llada8b"))
        .env("TINY", "models/tiny-llada-code")
        .env("NOGRAPH", "0")
        .env("SANITIZER", bin.join("compute-sanitizer"))
        .env_remove("RESULTS")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let log = fs::read_to_string(&log).unwrap_or_default();
    (status.status.success(), log, out)
}

#[test]
fn scripts_parse() {
    for script in [
        "scripts/gpu-check.sh",
        "scripts/build-gpu-bundle.sh",
        ".ci/run",
    ] {
        let status = Command::new("bash")
            .arg("-n")
            .arg(script)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "{script} does not parse");
    }
}

#[test]
fn stages_call_the_binaries_and_write_what_the_summary_reads() {
    let (ok, log, out) = run_script(
        "stages",
        &[
            "bench", "csplit", "rope", "fold", "qll", "combo", "keys264", "sanitize", "summary",
        ],
    );
    assert!(ok, "a stage failed:\n{log}");
    // The workloads run as one suite per variant, with the variant's switches.
    let suites: Vec<&str> = log.lines().filter(|l| l.contains("--suite")).collect();
    assert_eq!(suites.len(), 9, "{log}");
    let suite = |suffix: &str| {
        suites
            .iter()
            .find(|l| l.contains(&format!("--suffix {suffix} ")) || l.ends_with(suffix))
            .copied()
            .unwrap_or_else(|| panic!("no suite with suffix {suffix:?}:\n{log}"))
    };
    assert!(suite("_csplit").contains("DLLM_GEMM_CLUSTER_SPLIT=1"));
    assert!(suite("_rope").contains("DLLM_FUSED_ROPE=1"));
    assert!(suite("_fold").contains("DLLM_NORM_FOLD=1"));
    assert!(suite("_qll").contains("DLLM_QUERY_LAST_LAYER=1"));
    assert!(
        suite("_tail").contains("DLLM_NORM_FOLD=1") && suite("_tail").contains("DLLM_FUSED_MLP=1")
    );
    let combo = suite("_combo");
    for var in [
        "DLLM_GEMM_CLUSTER_SPLIT=1",
        "DLLM_FUSED_ROPE=1",
        "DLLM_GEMM_STREAM_BLOCKS=auto",
        "DLLM_NORM_FOLD=1",
        "DLLM_QUERY_LAST_LAYER=1",
    ] {
        assert!(combo.contains(var), "{combo}");
    }
    let tail = suite("_combotail");
    assert!(tail.contains("DLLM_FUSED_MLP=1") && tail.contains("DLLM_QUERY_LAST_LAYER=1"));
    assert!(!tail.contains("DLLM_LAYER_CHAIN=1"), "{tail}");
    let chain = suite("_combochain");
    assert!(chain.contains("DLLM_FUSED_MLP=1") && chain.contains("DLLM_LAYER_CHAIN=1"));
    assert!(suites.iter().any(|l| l.contains("--profile")), "{log}");
    // Each suite's reports are where the summary looks for them.
    for suffix in [
        "",
        "_csplit",
        "_rope",
        "_fold",
        "_tail",
        "_qll",
        "_combo",
        "_combotail",
        "_combochain",
    ] {
        for w in ["b1_dual_k4", "b8_dual_k4", "b1_none_k1"] {
            let f = out.join(format!("bench_{w}{suffix}.json"));
            assert!(f.exists(), "{} missing", f.display());
        }
    }
    // keys264: its checks and the two batch-1 workloads, with the unit count set.
    assert!(log
        .lines()
        .any(|l| l.starts_with("dllm-gpu-check") && l.contains("DLLM_ATTN_KEYS_UNITS=264")));
    for w in ["b1_dual_k4_keys264", "b1_none_k1_keys264"] {
        assert!(out.join(format!("bench_{w}.json")).exists(), "{w}");
    }
    for check in [
        "check_csplit.json",
        "check_rope.json",
        "check_fold.json",
        "check_fold_mlp.json",
        "check_qll.json",
        "check_combo.json",
        "check_combotail.json",
        "check_combochain.json",
        "check_keys264.json",
    ] {
        assert!(out.join(check).exists(), "{check}");
    }
    // fold: the model checks with the fused MLP too; sanitize: its own checks under memcheck.
    assert!(log.lines().any(|l| l.starts_with("dllm-gpu-check")
        && l.contains("DLLM_FUSED_MLP=1")
        && l.contains("DLLM_NORM_FOLD=1")));
    assert!(log
        .lines()
        .any(|l| l.starts_with("compute-sanitizer --tool memcheck")
            && l.contains("--only norm_fold")));
    for tool in ["memcheck", "racecheck"] {
        assert!(log.lines().any(
            |l| l.starts_with(&format!("compute-sanitizer --tool {tool}"))
                && l.contains("--mlp-shape 28,384,1024")
        ));
    }
    // The summary read them all.
    let summary = fs::read_to_string(out.join("summary.txt")).unwrap();
    for label in [
        "cspl", "rope", "fold", "tail", "qll", "combo", "cmbT", "cmbC", "k264",
    ] {
        assert!(summary.contains(label), "summary lacks {label}:\n{summary}");
    }
    let _ = fs::remove_dir_all(out.parent().unwrap());
}

/// The names of the stages a run recorded in OUT/stages.tsv, in order.
fn stage_names(out: &Path) -> Vec<String> {
    fs::read_to_string(out.join("stages.tsv"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split('\t').next().map(str::to_string))
        .collect()
}

#[test]
fn next_expands_to_the_planned_stages() {
    // `next` with every stage's binary stubbed: the stage names it ran, in order.
    let (_, log, out) = run_script("next", &["next"]);
    let names = stage_names(&out);
    for want in [
        "check",
        "synth",
        "bench_suite",
        "peer",
        "combo",
        "bench_suite_combo",
        "combotail",
        "bench_suite_combotail",
        "combochain",
        "bench_suite_combochain",
        "sanitize_FOLD_memcheck",
        "sanitize_TAIL_racecheck",
        "bench_b8_dual_k4_session",
        "bench_b8_dual_k4_session_packed",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not run: {names:?}");
    }
    // The packed sessions' timing comes last (a call cut short loses it first), after the
    // sanitizer stages.
    let at = |name: &str| names.iter().position(|n| n == name).unwrap();
    assert!(at("bench_b8_dual_k4_session") > at("sanitize_TAIL_racecheck"));
    // Both b8 Session runs, the second with the switch.
    let session_b8: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("--batch 8") && l.contains("--session"))
        .collect();
    assert_eq!(session_b8.len(), 2, "{session_b8:?}");
    assert!(
        !session_b8[0].contains("DLLM_PACKED_SESSIONS"),
        "{}",
        session_b8[0]
    );
    assert!(
        session_b8[1].contains("DLLM_PACKED_SESSIONS=1"),
        "{}",
        session_b8[1]
    );
    let _ = fs::remove_dir_all(out.parent().unwrap());
    // `next2`: each switch alone, the narrowed last layer and the RMSNorm fold first.
    let (_, _, out) = run_script("next2", &["next2"]);
    let names = stage_names(&out);
    for want in [
        "synth",
        "qll",
        "bench_suite_qll",
        "fold",
        "fold_mlp",
        "bench_suite_fold",
        "csplit",
        "bench_suite_csplit",
        "rope",
        "bench_suite_rope",
        "bench_suite_mlp",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not run: {names:?}");
    }
    let _ = fs::remove_dir_all(out.parent().unwrap());
}
