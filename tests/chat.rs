//! Chat: template rendering against hand-written prompts (built-in fallbacks and real-format
//! Jinja templates), `tokenizer_config.json` loading and its errors, answer stripping, and the
//! `dllm chat` / `dllm generate --chat` / `--schedule` command lines on the embedded tiny model.

use dllm::chat::template::{SpecialTokens, TokenizerConfig};
use dllm::chat::{answer_ids, stop_ids, strip_trailing, until_first, ChatTemplate, Message};
use dllm::config::{Arch, ModelConfig};
use dllm::tokenizer::Tokenizer;
use std::path::Path;
use std::process::Output;

mod common;
use common::{run_dllm, succeeded, MODEL};

/// The `chat_template` of LLaDA-8B-Instruct's tokenizer_config.json (it always ends with the
/// assistant header, whatever `add_generation_prompt` says).
const LLADA_INSTRUCT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}";

/// A ChatML template in the Qwen2.5 / Dream-v0-Instruct shape: a tools branch, a default
/// system prompt, whitespace-control tags on indented lines, `raise_exception`.
const CHATML_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {%- for tool in tools %}
        {{- "\n" }}{{- tool | tojson }}
    {%- endfor %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- raise_exception('tool calls are not supported') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

fn conversation() -> Vec<Message> {
    vec![
        Message::system("Be brief."),
        Message::user("  What is 2+2?\n"),
        Message::assistant("4"),
        Message::user("And 3+3?"),
    ]
}

const LLADA_EXPECTED: &str = "<|startoftext|>\
<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>";
const LLADA_GEN: &str = "<|start_header_id|>assistant<|end_header_id|>\n\n";

const DREAM_EXPECTED: &str = "<|im_start|>system\nBe brief.<|im_end|>\n\
<|im_start|>user\n  What is 2+2?\n<|im_end|>\n\
<|im_start|>assistant\n4<|im_end|>\n\
<|im_start|>user\nAnd 3+3?<|im_end|>\n";
const DREAM_GEN: &str = "<|im_start|>assistant\n";

fn llada_tokens() -> SpecialTokens {
    SpecialTokens {
        bos: Some("<|startoftext|>".into()),
        eos: Some("<|endoftext|>".into()),
        ..Default::default()
    }
}

#[test]
fn llada_fallback_renders_llama3_headers() {
    let t = ChatTemplate::builtin(Arch::Llada);
    assert_eq!(t.origin(), "built-in llada");
    let c = conversation();
    assert_eq!(
        t.render(&c, true).unwrap(),
        format!("{LLADA_EXPECTED}{LLADA_GEN}")
    );
    assert_eq!(t.render(&c, false).unwrap(), LLADA_EXPECTED);
    assert_eq!(
        t.render(&[Message::user("hi")], true).unwrap(),
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn dream_fallback_renders_chatml_with_default_system() {
    let t = ChatTemplate::builtin(Arch::Dream);
    let c = conversation();
    assert_eq!(
        t.render(&c, true).unwrap(),
        format!("{DREAM_EXPECTED}{DREAM_GEN}")
    );
    assert_eq!(t.render(&c, false).unwrap(), DREAM_EXPECTED);
    assert_eq!(
        t.render(&[Message::user("hi")], true).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn real_llada_template_renders_as_expected() {
    let t =
        ChatTemplate::from_jinja(LLADA_INSTRUCT_TEMPLATE, "llada.json", llada_tokens()).unwrap();
    let c = conversation();
    let with = format!("{LLADA_EXPECTED}{LLADA_GEN}");
    assert_eq!(t.render(&c, true).unwrap(), with);
    // This template ignores add_generation_prompt: the header is always there.
    assert_eq!(t.render(&c, false).unwrap(), with);
    // The built-in fallback agrees with it wherever the flag is set.
    let fallback = ChatTemplate::builtin(Arch::Llada);
    for n in 1..=c.len() {
        assert_eq!(
            t.render(&c[..n], true).unwrap(),
            fallback.render(&c[..n], true).unwrap(),
            "{n} messages"
        );
    }
}

#[test]
fn real_chatml_template_renders_as_expected() {
    let t =
        ChatTemplate::from_jinja(CHATML_TEMPLATE, "dream.jinja", SpecialTokens::default()).unwrap();
    let c = conversation();
    assert_eq!(
        t.render(&c, true).unwrap(),
        format!("{DREAM_EXPECTED}{DREAM_GEN}")
    );
    assert_eq!(t.render(&c, false).unwrap(), DREAM_EXPECTED);
    let fallback = ChatTemplate::builtin(Arch::Dream);
    let no_system = &c[1..];
    for agp in [false, true] {
        assert_eq!(
            t.render(no_system, agp).unwrap(),
            fallback.render(no_system, agp).unwrap()
        );
    }
    assert!(t.render(no_system, false).unwrap().starts_with(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user"
    ));
}

#[test]
fn template_errors_name_the_file() {
    let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be the user') }}{% endif %}ok";
    let t = ChatTemplate::from_jinja(src, "/m/tokenizer_config.json", SpecialTokens::default())
        .unwrap();
    assert_eq!(t.render(&[Message::user("x")], true).unwrap(), "ok");
    let e = t
        .render(&[Message::assistant("x")], true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/m/tokenizer_config.json") && e.contains("first turn must be the user"),
        "{e}"
    );
    let e = ChatTemplate::from_jinja(
        "{{ a + }}",
        "/m/chat_template.jinja",
        SpecialTokens::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("/m/chat_template.jinja"), "{e}");
}

fn model_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[test]
fn tokenizer_config_is_loaded_beside_the_model() {
    // String form, with the BOS token as an AddedToken object.
    let cfg = serde_json::json!({
        "bos_token": {"content": "<|startoftext|>", "special": true},
        "eos_token": "<|endoftext|>",
        "chat_template": LLADA_INSTRUCT_TEMPLATE,
    });
    // As in LLaDA's file: an integer beyond u64 elsewhere in the object.
    let text = cfg.to_string().replacen(
        '{',
        r#"{"model_max_length": 1000000000000000019884624838656, "#,
        1,
    );
    let dir = model_dir(&[("tokenizer_config.json", &text)]);
    // The architecture does not matter once a template is found.
    let t = ChatTemplate::for_model(dir.path(), Arch::Dream).unwrap();
    assert!(
        t.origin().ends_with("tokenizer_config.json"),
        "{}",
        t.origin()
    );
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        format!("{LLADA_EXPECTED}{LLADA_GEN}")
    );

    // List form: the "default" entry is used.
    let cfg = serde_json::json!({"chat_template": [
        {"name": "rag", "template": "RAG"},
        {"name": "default", "template": CHATML_TEMPLATE},
    ]});
    let dir = model_dir(&[("tokenizer_config.json", &cfg.to_string())]);
    let t = ChatTemplate::for_model(dir.path(), Arch::Llada).unwrap();
    assert_eq!(t.render(&conversation(), false).unwrap(), DREAM_EXPECTED);

    // chat_template.jinja wins over tokenizer_config.json.
    let dir = model_dir(&[
        ("tokenizer_config.json", &cfg.to_string()),
        ("chat_template.jinja", "[{{ messages | length }}]"),
    ]);
    let t = ChatTemplate::for_model(dir.path(), Arch::Llada).unwrap();
    assert_eq!(t.render(&conversation(), true).unwrap(), "[4]");

    // A config without chat_template: the architecture's fallback.
    let dir = model_dir(&[("tokenizer_config.json", r#"{"eos_token": "<|im_end|>"}"#)]);
    let t = ChatTemplate::for_model(dir.path(), Arch::Dream).unwrap();
    assert_eq!(t, ChatTemplate::builtin(Arch::Dream));
}

#[test]
fn missing_config_falls_back_by_architecture() {
    let dir = model_dir(&[]);
    assert_eq!(
        TokenizerConfig::from_file(&dir.path().join("tokenizer_config.json")).unwrap(),
        None
    );
    for arch in [Arch::Llada, Arch::Dream] {
        let t = ChatTemplate::for_model(dir.path(), arch).unwrap();
        assert_eq!(t, ChatTemplate::builtin(arch));
    }
    // The embedded model has no tokenizer_config.json: LLaDA's fallback.
    let t = ChatTemplate::for_model(Path::new(MODEL), Arch::Llada).unwrap();
    assert_eq!(t.origin(), "built-in llada");
}

#[test]
fn malformed_config_or_template_is_an_error_naming_the_file() {
    for (text, needle) in [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        (r#"{"chat_template": 7}"#, "chat_template"),
        (
            r#"{"chat_template": [{"name": "tool_use", "template": "x"}]}"#,
            "default",
        ),
        (r#"{"bos_token": ["<s>"]}"#, "bos_token"),
        (r#"{"chat_template": "{% for m in messages %}"}"#, "compile"),
    ] {
        let dir = model_dir(&[("tokenizer_config.json", text)]);
        let path = dir.path().join("tokenizer_config.json");
        let e = ChatTemplate::for_model(dir.path(), Arch::Llada)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains(needle),
            "{text}: {e}"
        );
    }
    let dir = model_dir(&[("chat_template.jinja", "{% endfor %}")]);
    let e = ChatTemplate::for_model(dir.path(), Arch::Llada)
        .unwrap_err()
        .to_string();
    assert!(e.contains("chat_template.jinja"), "{e}");
}

#[test]
fn answers_lose_trailing_stop_runs() {
    let tok = Tokenizer::from_model_dir(Path::new(MODEL)).unwrap();
    let cfg = ModelConfig::from_file(&Path::new(MODEL).join("config.json")).unwrap();
    let stops = stop_ids(&cfg, &tok);
    // The tiny model: EOS 0 (`<|endoftext|>`), pad 2; it knows no <|eot_id|> / <|im_end|>.
    assert_eq!(stops, vec![0, 2]);
    let text = tok.encode("x = 1").unwrap();
    let mut ids = text.clone();
    ids.extend([0, 2, 0, 0]);
    assert_eq!(strip_trailing(&ids, &stops), &text[..]);
    let mut mid = text.clone();
    mid.extend([0, 7, 0]);
    assert_eq!(strip_trailing(&mid, &stops), &mid[..mid.len() - 1]);
    assert_eq!(until_first(&mid, &stops), &text[..]);
    // What generate / chat / --batch-file print: the chat answer stops at the first stop token,
    // plain text only loses its trailing run.
    assert_eq!(answer_ids(&mid, &stops, true), &text[..]);
    assert_eq!(answer_ids(&mid, &stops, false), &mid[..mid.len() - 1]);
}

fn dllm(args: &[&str], stdin: Option<&str>) -> Output {
    succeeded(run_dllm(args, stdin))
}

const SMALL: [&str; 10] = [
    "--model",
    MODEL,
    "--backend",
    "cpu",
    "--gen-len",
    "8",
    "--steps",
    "4",
    "--block-len",
    "8",
];

#[test]
fn chat_loop_answers_each_turn_and_resets() {
    let args: Vec<&str> = ["chat"].iter().chain(&SMALL).copied().collect();
    // Plain text: exits 0 on /quit, after two answers.
    let out = dllm(&args, Some("hi\n/reset\nhello\n/quit\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("(history cleared)").count(), 1, "{stderr}");
    assert!(!out.stdout.is_empty());

    // JSON lines: one object per answer; /reset restarts the history, EOF ends the loop.
    let mut json_args = args.clone();
    json_args.push("--json");
    let out = dllm(&json_args, Some("hi\n/reset\nhello\n\nagain\n"));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let turns: Vec<u64> = lines.iter().map(|v| v["turn"].as_u64().unwrap()).collect();
    assert_eq!(turns, vec![1, 1, 2]);
    // The first two prompts are one-turn conversations, rendered by the LLaDA fallback.
    let tok = Tokenizer::from_model_dir(Path::new(MODEL)).unwrap();
    let t = ChatTemplate::builtin(Arch::Llada);
    for (v, msg) in lines.iter().zip(["hi", "hello"]) {
        let want = tok
            .encode(&t.render(&[Message::user(msg)], true).unwrap())
            .unwrap()
            .len();
        assert_eq!(v["prompt_tokens"].as_u64().unwrap() as usize, want, "{v}");
        assert!(v["answer"].is_string());
    }
    // The third prompt holds the second exchange, then "again".
    let second = lines[1]["answer"].as_str().unwrap();
    let history = [
        Message::user("hello"),
        Message::assistant(second),
        Message::user("again"),
    ];
    let want = tok
        .encode(&t.render(&history, true).unwrap())
        .unwrap()
        .len();
    assert_eq!(lines[2]["prompt_tokens"].as_u64().unwrap() as usize, want);
}

#[test]
fn chat_visual_prints_each_step_then_the_same_answers() {
    let args: Vec<&str> = ["chat", "--quiet"].iter().chain(&SMALL).copied().collect();
    let plain = dllm(&args, Some("hi\nhello\n"));
    assert!(plain.status.success());
    let mut visual_args = args.clone();
    visual_args.push("--visual");
    let out = dllm(&visual_args, Some("hi\nhello\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // stdout is a pipe here: one plain line per step (4 steps per answer) before each answer;
    // without those lines the output is exactly the plain run's.
    let (steps, rest): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| l.starts_with("step "));
    let numbers: Vec<String> = steps
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect();
    assert_eq!(
        numbers,
        ["1/4", "2/4", "3/4", "4/4", "1/4", "2/4", "3/4", "4/4"],
        "{text}"
    );
    let plain_text = String::from_utf8_lossy(&plain.stdout).to_string();
    assert_eq!(rest, plain_text.lines().collect::<Vec<_>>());
    // --stream does not apply to chat: a one-line error, exit 1.
    let mut stream_args = args.clone();
    stream_args.push("--stream");
    let out = run_dllm(&stream_args, Some("hi\n"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--stream"));
}

#[test]
fn generate_chat_wraps_the_prompt_and_prints_the_answer() {
    let mut args: Vec<&str> = ["generate", "--chat", "--prompt", "Write a function"]
        .iter()
        .chain(&SMALL)
        .copied()
        .collect();
    args.push("--quiet");
    let plain = dllm(&args, None);
    args.push("--json");
    let v: serde_json::Value = serde_json::from_slice(&dllm(&args, None).stdout).unwrap();
    let tok = Tokenizer::from_model_dir(Path::new(MODEL)).unwrap();
    let wrapped = ChatTemplate::builtin(Arch::Llada)
        .render(&[Message::user("Write a function")], true)
        .unwrap();
    assert_eq!(
        v["prompt_tokens"].as_u64().unwrap() as usize,
        tok.encode(&wrapped).unwrap().len()
    );
    // Plain output is the answer alone (greedy, so both runs agree).
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        format!("{}\n", v["text"].as_str().unwrap())
    );
}

#[test]
fn schedule_flag_selects_dream_counts() {
    // 16 masks, block 4 → 4 LLaDA blocks: 5 steps is invalid for LLaDA, fine for Dream.
    let base = [
        "generate",
        "--model",
        MODEL,
        "--backend",
        "cpu",
        "--prompt",
        "def f(x):",
        "--gen-len",
        "16",
        "--block-len",
        "4",
        "--steps",
        "5",
        "--json",
        "--quiet",
    ];
    let mut args = base.to_vec();
    args.extend(["--schedule", "dream"]);
    let v: serde_json::Value = serde_json::from_slice(&dllm(&args, None).stdout).unwrap();
    assert_eq!(v["steps"], 5);
    assert_eq!(v["generated_tokens"], 16);
    let out = run_dllm(&base, None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a multiple"));
}
