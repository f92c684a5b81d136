//! Measurement (ignored by default) of the decoding strategies on the embedded tiny model:
//! parallel commit rules (`--threshold`, `--factor`, `--hierarchy`), self-correction
//! (`--revise`) and trace credit (`--credit`) against the fixed LLaDA schedule, on held-out Python
//! snippets written for this test. Prints the tables of docs/decoding-strategies.md:
//!
//! `cargo test --test decoding_measure -- --ignored --nocapture`
//!
//! Per snippet, a span of [`SPAN`] tokens is masked (the end: completion; the middle: infill)
//! and denoised. Metrics: forwards and tokens per forward; `exact` = fraction of span tokens equal
//! to the held-out original; `agree` = fraction equal to the fixed schedule's output; `nll` = the
//! model's strided pseudo-negative-log-likelihood of the produced span (mean over span positions
//! of −ln p(token), with the span positions of one residue class mod [`STRIDE`] masked together
//! and the rest of the final canvas visible: [`STRIDE`] forwards per output; lower = the model
//! finds the output more plausible).

use dllm::denoise::{CommitPolicy, CreditParams, Decoding, GenerationParams, Session};
use dllm::model::{load_cpu, Model};
use dllm::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::Arc;

const SPAN: usize = 16;
/// Pseudo-likelihood stride: positions `p ≡ j (mod STRIDE)` of the span are masked together.
const STRIDE: usize = 4;

/// Held-out Python, written for this measurement.
const SNIPPETS: &[&str] = &[
    "def clamp(value, low, high):\n    \"\"\"Limit value to the closed range [low, high].\"\"\"\n    if value < low:\n        return low\n    if value > high:\n        return high\n    return value\n",
    "def count_words(text):\n    counts = {}\n    for word in text.split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts\n",
    "def is_palindrome(s):\n    s = s.lower()\n    left, right = 0, len(s) - 1\n    while left < right:\n        if s[left] != s[right]:\n            return False\n        left += 1\n        right -= 1\n    return True\n",
    "def flatten(items):\n    result = []\n    for item in items:\n        if isinstance(item, list):\n            result.extend(flatten(item))\n        else:\n            result.append(item)\n    return result\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "def read_lines(path):\n    with open(path) as f:\n        return [line.strip() for line in f if line.strip()]\n\n\ndef write_lines(path, lines):\n    with open(path, 'w') as f:\n        f.write('\\n'.join(lines))\n",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n        if items[mid] == target:\n            return mid\n        if items[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1\n",
    "import os\n\n\ndef list_python_files(root):\n    found = []\n    for dirpath, _, filenames in os.walk(root):\n        for name in filenames:\n            if name.endswith('.py'):\n                found.append(os.path.join(dirpath, name))\n    return found\n",
    "def mean(values):\n    if not values:\n        raise ValueError('empty list')\n    return sum(values) / len(values)\n\n\ndef variance(values):\n    m = mean(values)\n    return sum((v - m) ** 2 for v in values) / len(values)\n",
    "def merge_dicts(a, b):\n    result = dict(a)\n    for key, value in b.items():\n        if key in result and isinstance(value, dict):\n            result[key] = merge_dicts(result[key], value)\n        else:\n            result[key] = value\n    return result\n",
    "def chunks(seq, size):\n    for i in range(0, len(seq), size):\n        yield seq[i:i + size]\n\n\ndef transpose(matrix):\n    return [list(row) for row in zip(*matrix)]\n",
    "class Counter:\n    def __init__(self, start=0):\n        self.value = start\n\n    def increment(self, step=1):\n        self.value += step\n        return self.value\n\n    def reset(self):\n        self.value = 0\n",
];

#[derive(Clone)]
struct Config {
    name: String,
    decoding: Decoding,
}

fn configs() -> Vec<Config> {
    let mut v = vec![Config {
        name: "fixed".into(),
        decoding: Decoding::default(),
    }];
    for t in [0.9, 0.7, 0.5] {
        v.push(Config {
            name: format!("--threshold {t}"),
            decoding: Decoding {
                commit: CommitPolicy::Threshold(t),
                ..Default::default()
            },
        });
    }
    for f in [0.5, 1.0] {
        v.push(Config {
            name: format!("--factor {f}"),
            decoding: Decoding {
                commit: CommitPolicy::Factor(f),
                ..Default::default()
            },
        });
    }
    for r in [0.05, 0.1, 0.2] {
        v.push(Config {
            name: format!("--revise {r}"),
            decoding: Decoding {
                revise: Some(r),
                ..Default::default()
            },
        });
    }
    v.push(Config {
        name: "--threshold 0.7 --revise 0.1".into(),
        decoding: Decoding {
            commit: CommitPolicy::Threshold(0.7),
            revise: Some(0.1),
            ..Default::default()
        },
    });
    let credited = [
        ("--threshold 0.9", CommitPolicy::Threshold(0.9)),
        ("--threshold 0.7", CommitPolicy::Threshold(0.7)),
        ("--factor 0.5", CommitPolicy::Factor(0.5)),
        ("--factor 1", CommitPolicy::Factor(1.0)),
    ];
    for (name, commit) in credited {
        v.push(Config {
            name: format!("{name} --credit"),
            decoding: Decoding {
                commit,
                credit: Some(CreditParams::default()),
                ..Default::default()
            },
        });
    }
    let hierarchical = [
        ("--hierarchy 0.4", None, 0.4),
        ("--hierarchy 0.2", None, 0.2),
        ("--threshold 0.9 --hierarchy 0.4", Some(0.9), 0.4),
        ("--threshold 0.7 --hierarchy 0.2", Some(0.7), 0.2),
    ];
    for (name, high, low) in hierarchical {
        v.push(Config {
            name: name.into(),
            decoding: Decoding {
                commit: CommitPolicy::Hierarchy { high, low },
                ..Default::default()
            },
        });
    }
    v
}

/// Mean over `span` of −ln p(canvas[p]), the positions of each residue class mod [`STRIDE`]
/// masked together.
fn pseudo_nll(model: &Arc<dyn Model>, canvas: &[u32], span: std::ops::Range<usize>) -> f64 {
    let width = model.config().logits_width();
    let mask = model.config().mask_token_id;
    let mut total = 0.0;
    for j in 0..STRIDE {
        let class: Vec<usize> = span.clone().filter(|p| p % STRIDE == j).collect();
        let mut c = canvas.to_vec();
        for &p in &class {
            c[p] = mask;
        }
        let logits = model.forward(&c).unwrap();
        for &p in &class {
            let row = &logits[p * width..(p + 1) * width];
            total -= dllm::denoise::predict::softmax_prob(row, canvas[p] as usize).ln();
        }
    }
    total / span.len() as f64
}

struct Row {
    forwards: usize,
    tokens: usize,
    exact: usize,
    agree: usize,
    nll: f64,
    revisions: usize,
}

#[test]
#[ignore = "measurement: prints the tables of docs/decoding-strategies.md (about 5 minutes on 2 cores)"]
fn measure_decoding_strategies_on_the_tiny_model() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llada-code");
    let model = load_cpu(&dir).unwrap();
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let mask = model.config().mask_token_id;
    let configs = configs();
    for (task, block_len) in [("completion", 8usize), ("infill", SPAN)] {
        let mut rows: Vec<Row> = configs
            .iter()
            .map(|_| Row {
                forwards: 0,
                tokens: 0,
                exact: 0,
                agree: 0,
                nll: 0.0,
                revisions: 0,
            })
            .collect();
        let mut truth_nll = 0.0;
        for (i, snippet) in SNIPPETS.iter().enumerate() {
            eprintln!("{task}: snippet {}/{}", i + 1, SNIPPETS.len());
            let ids = tok.encode(snippet).unwrap();
            assert!(
                ids.len() >= SPAN + 12,
                "snippet of {} tokens is too short: {snippet}",
                ids.len()
            );
            let start = match task {
                "completion" => ids.len() - SPAN,
                _ => (ids.len() - SPAN) / 2,
            };
            let span = start..start + SPAN;
            let mut canvas = ids.clone();
            canvas[span.clone()].fill(mask);
            truth_nll += pseudo_nll(&model, &ids, span.clone());
            let mut fixed_out: Option<Vec<u32>> = None;
            for (c, row) in configs.iter().zip(&mut rows) {
                let params = GenerationParams {
                    steps: SPAN,
                    block_len,
                    ..Default::default()
                };
                let mut s = Session::new(model.clone(), canvas.clone(), params).unwrap();
                s.set_decoding(c.decoding.clone()).unwrap();
                s.run().unwrap();
                assert_eq!(s.masks_left(), 0, "{}", c.name);
                assert!(s.forward_steps() <= SPAN, "{}", c.name);
                let out = s.canvas().to_vec();
                let fixed = fixed_out.get_or_insert_with(|| out.clone());
                row.forwards += s.forward_steps();
                row.tokens += SPAN;
                row.exact += span.clone().filter(|&p| out[p] == ids[p]).count();
                row.agree += span.clone().filter(|&p| out[p] == fixed[p]).count();
                row.nll += pseudo_nll(&model, &out, span.clone());
                row.revisions += s.revisions();
            }
        }
        let n = SNIPPETS.len() as f64;
        println!(
            "\n{task}: {} snippets, {SPAN} masked tokens each, --steps {SPAN} --block-len {block_len}; \
             pseudo-NLL of the held-out original: {:.3}\n",
            SNIPPETS.len(),
            truth_nll / n
        );
        println!("| rule | forwards | tokens/forward | exact | agree | nll | re-maskings |");
        println!("|---|---|---|---|---|---|---|");
        for (c, r) in configs.iter().zip(&rows) {
            println!(
                "| `{}` | {:.1} | {:.2} | {:.3} | {:.3} | {:.3} | {:.1} |",
                c.name,
                r.forwards as f64 / n,
                r.tokens as f64 / r.forwards as f64,
                r.exact as f64 / r.tokens as f64,
                r.agree as f64 / r.tokens as f64,
                r.nll / n,
                r.revisions as f64 / n
            );
        }
        // The fixed schedule is one token per forward and agrees with itself.
        assert_eq!(rows[0].forwards, rows[0].tokens);
        assert_eq!(rows[0].agree, rows[0].tokens);
    }
}
