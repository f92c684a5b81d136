//! The live views of the `dllm` binary (`--visual`, `--stream`) and `--revise`, end to end on
//! the embedded tiny model, with stdout a pipe (not a terminal).

use std::process::Output;

mod common;
use common::{run_dllm, stdout_ok, MODEL};

/// `dllm generate` of 16 tokens in 8 steps, blocks of 4, with `extra` options; progress kept.
fn dllm_loud(extra: &[&str]) -> Output {
    let mut args = vec![
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
        "4",
    ];
    args.extend_from_slice(extra);
    run_dllm(&args, None)
}

/// [`dllm_loud`] with `--quiet`.
fn dllm(extra: &[&str]) -> Output {
    dllm_loud(&[extra, &["--quiet"]].concat())
}

fn stdout(o: &Output) -> String {
    stdout_ok(o)
}

#[test]
fn stream_prints_the_same_text_as_a_plain_run() {
    let plain = stdout(&dllm(&[]));
    let streamed = stdout(&dllm(&["--stream"]));
    assert_eq!(streamed, plain);
    assert!(plain.starts_with("def add(a, b):"), "{plain}");
}

#[test]
fn visual_without_a_terminal_prints_one_plain_line_per_step_then_the_text() {
    let plain = stdout(&dllm(&[]));
    let out = stdout(&dllm(&["--visual"]));
    assert!(!out.contains('\x1b'), "escape codes in a pipe: {out:?}");
    let lines: Vec<&str> = out.lines().collect();
    // 8 steps of 4 blocks, 2 tokens each; blocks of 4 positions after the prompt.
    let steps: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("step "))
        .collect();
    assert_eq!(steps.len(), 8, "{out}");
    assert!(
        steps[0].starts_with("step 1/8 committed 2 masks_left 14"),
        "{}",
        steps[0]
    );
    assert!(steps[1].contains("block_done 0 "), "{}", steps[1]);
    assert!(
        steps[7].starts_with("step 8/8 committed 2 masks_left 0"),
        "{}",
        steps[7]
    );
    assert!(out.ends_with(&plain), "{out}\nvs\n{plain}");
}

#[test]
fn views_conflict_with_json_and_bad_revise_is_one_error_line() {
    for extra in [
        ["--visual", "--json"],
        ["--stream", "--json"],
        ["--visual", "--stream"],
    ] {
        let o = dllm(&extra);
        assert!(!o.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("cannot be used with"), "{err}");
    }
    let o = dllm(&["--revise", "1.5"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("revise") && lines[0].contains("1.5"),
        "{err}"
    );
}

#[test]
fn revise_runs_to_completion_and_reports_its_re_maskings() {
    let o = dllm(&["--revise", "0.3", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["revisions"].as_u64().is_some(), "{v}");
    assert!(v["forward_steps"].as_u64().unwrap() <= 8, "{v}");
    let canvas = v["canvas"].as_array().unwrap();
    assert!(
        canvas.iter().all(|t| t.as_u64() != Some(1)),
        "a mask is left: {v}"
    );
}

#[test]
fn chat_stream_prints_only_the_answer_as_a_plain_chat_run() {
    let plain = stdout(&dllm(&["--chat"]));
    let streamed = stdout(&dllm(&["--chat", "--stream"]));
    assert_eq!(streamed, plain);
    // The template's own text (the prompt, its headers) is not part of the answer.
    assert!(!streamed.contains("def add(a, b):"), "{streamed}");
    assert!(!streamed.contains("<|"), "{streamed}");
}

#[test]
fn the_closing_summary_counts_the_forwards_that_ran() {
    // --threshold 0 commits a whole block per forward: 4 blocks, 4 forwards of 8 scheduled.
    let out = dllm_loud(&["--threshold", "0"]);
    stdout_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("4 steps (of 8 scheduled) in "), "{err}");
    // Without parallel decoding every scheduled step runs a forward.
    let err = String::from_utf8_lossy(&dllm_loud(&[]).stderr).to_string();
    assert!(err.contains("8 steps in "), "{err}");
}

#[test]
fn a_failed_write_of_the_result_is_an_error_naming_standard_output() {
    let Ok(full) = std::fs::File::options().write(true).open("/dev/full") else {
        eprintln!("no /dev/full here: skipped");
        return;
    };
    for args in [
        &["info", "--model", MODEL, "--backend", "cpu"][..],
        &[
            "generate",
            "--model",
            MODEL,
            "--backend",
            "cpu",
            "--prompt",
            "x = ",
            "--gen-len",
            "4",
            "--steps",
            "4",
            "--quiet",
        ][..],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dllm"))
            .args(args)
            .env("RAYON_NUM_THREADS", "2")
            .stdout(full.try_clone().unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("error: standard output: ") && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}
