//! Host side of `cuda/sampling.cu`: per-row prediction (the GPU twin of
//! [`crate::denoise::predict::predict_row`]) and the per-canvas commit step (the GPU twin of
//! [`crate::denoise::commit::top_k`] and the Fast-dLLM threshold rule), with their self-checks
//! and benches.
//!
//! Only the small commit record (count, positions, tokens per canvas) needs to come back to the
//! host each step; logits, predictions and the canvas stay on the device.

use super::check::{self, BenchResult, CheckResult};
use super::launch::Launch;
use super::scratch::{grow_retaining, zeroed};
use super::{cuda_err, CudaDevice};
use crate::denoise::commit::{top_k, Candidate};
use crate::denoise::predict::{predict_row, PredictRule, Remasking};
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use std::sync::{Arc, Mutex};

/// Threads per block of `predict_partial` (`PREDICT_THREADS` in the .cu file).
const PREDICT_THREADS: u32 = 256;
/// Bytes of one `PredictPartial` record.
const PARTIAL_BYTES: usize = 40;
/// Blocks the split of a predict launch aims for (about two waves on an H100/H200).
const TARGET_BLOCKS: usize = 264;
/// Smallest chunk of a row one block handles.
const MIN_CHUNK: usize = 4096;
/// Calls per timed bench sample.
const BENCH_REPS: usize = 10;
/// Largest number of rows per canvas the commit kernel handles (one thread per row).
pub const MAX_COMMIT_ROWS: usize = 1024;

/// How a position's confidence is scored (kernel `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfidenceMode {
    /// Softmax probability of the chosen token over the whole row (LLaDA `low_confidence`).
    LowConfidence = 0,
    /// `uniform(seed, step, position, RANDOM_CONFIDENCE_INDEX)` (LLaDA `random`).
    Random = 1,
    /// `p1 − p2`, the two largest softmax probabilities of the row (Dream `topk_margin`).
    Margin = 2,
    /// `Σ p ln p` over the row (Dream `entropy`; larger = more confident).
    Entropy = 3,
}

impl From<Remasking> for ConfidenceMode {
    fn from(r: Remasking) -> Self {
        match r {
            Remasking::LowConfidence => ConfidenceMode::LowConfidence,
            Remasking::Random => ConfidenceMode::Random,
            Remasking::Margin => ConfidenceMode::Margin,
            Remasking::Entropy => ConfidenceMode::Entropy,
        }
    }
}

/// Which positions of a canvas block are committed in one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CommitRule {
    /// The `k` most confident still-masked positions (ties to the lower position, NaN last).
    TopK(usize),
    /// The most confident still-masked position plus every other with confidence ≥ the value
    /// (Fast-dLLM threshold rule).
    Threshold(f64),
}

/// The loaded sampling kernels.
pub struct Sampler {
    stream: Arc<CudaStream>,
    /// Launch with programmatic dependent launch ([`super::launch`]).
    pdl: bool,
    partial_fn: CudaFunction,
    finalize_fn: CudaFunction,
    commit_fn: CudaFunction,
    /// Partial records of `predict_partial`, with the buffers they replaced (grow-only, see
    /// [`super::scratch`]).
    scratch: Mutex<(CudaSlice<u8>, Vec<CudaSlice<u8>>)>,
}

fn need(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(Error::invalid(format!(
            "sampling {what}: buffer holds {have} elements, needs {want}"
        )));
    }
    Ok(())
}

/// Row split of a predict launch: (splits, chunk), chunk a multiple of 4, splits·chunk ≥ width
/// (public for the kernels' CPU emulation, tests/kernel_emulation.rs).
pub fn split_plan(rows: usize, width: usize) -> (usize, usize) {
    let max_splits = (width / MIN_CHUNK).max(1);
    let splits = TARGET_BLOCKS.div_ceil(rows.max(1)).clamp(1, max_splits);
    let chunk = width.div_ceil(splits).div_ceil(4) * 4;
    (width.div_ceil(chunk).max(1), chunk)
}

/// Elements of the commit record for `batch` canvases of `rows_per_canvas` rows: per canvas
/// `[count, positions (rows slots), tokens (rows slots)]`, unused slots −1, positions ascending.
pub fn commit_record_len(batch: usize, rows_per_canvas: usize) -> usize {
    batch * (1 + 2 * rows_per_canvas)
}

/// Decodes a downloaded commit record into `(position, token)` lists, one per canvas.
pub fn parse_commit_record(
    rec: &[i32],
    batch: usize,
    rows_per_canvas: usize,
) -> Result<Vec<Vec<(usize, u32)>>> {
    need(
        "commit record",
        rec.len(),
        commit_record_len(batch, rows_per_canvas),
    )?;
    let n = rows_per_canvas;
    (0..batch)
        .map(|b| {
            let r = &rec[b * (1 + 2 * n)..(b + 1) * (1 + 2 * n)];
            let count = usize::try_from(r[0])
                .ok()
                .filter(|&c| c <= n)
                .ok_or_else(|| {
                    Error::Backend(format!("commit record of canvas {b}: bad count {}", r[0]))
                })?;
            (0..count)
                .map(
                    |i| match (usize::try_from(r[1 + i]), u32::try_from(r[1 + n + i])) {
                        (Ok(p), Ok(t)) => Ok((p, t)),
                        _ => Err(Error::Backend(format!(
                            "commit record of canvas {b}: bad entry {i}"
                        ))),
                    },
                )
                .collect()
        })
        .collect()
}

impl Sampler {
    /// Loads the kernels of `cuda/sampling.cu`.
    pub fn load(dev: &CudaDevice) -> Result<Self> {
        let f = |name: &str| dev.function("sampling", name);
        Ok(Sampler {
            stream: dev.stream.clone(),
            pdl: dev.pdl,
            partial_fn: f("predict_partial")?,
            finalize_fn: f("predict_finalize")?,
            commit_fn: f("commit_kernel")?,
            scratch: Mutex::new((
                zeroed(&dev.stream, PARTIAL_BYTES, "sampler", "partials")?,
                Vec::new(),
            )),
        })
    }

    /// Predicts `rows` rows of fp32 logits (row-major, `width` per row): token and confidence as
    /// [`predict_row`] computes them, with `positions[r]` keying the random draws of row `r`.
    #[allow(clippy::too_many_arguments)]
    pub fn predict(
        &self,
        logits: &CudaView<f32>,
        rows: usize,
        width: usize,
        positions: &CudaView<i32>,
        rule: &PredictRule,
        out_tokens: &mut CudaViewMut<i32>,
        out_conf: &mut CudaViewMut<f64>,
    ) -> Result<()> {
        self.predict_mode(
            logits,
            rows,
            width,
            positions,
            rule,
            rule.remasking.into(),
            out_tokens,
            out_conf,
        )
    }

    /// [`Sampler::predict`] with an explicit confidence mode (margin and entropy included).
    #[allow(clippy::too_many_arguments)]
    pub fn predict_mode(
        &self,
        logits: &CudaView<f32>,
        rows: usize,
        width: usize,
        positions: &CudaView<i32>,
        rule: &PredictRule,
        mode: ConfidenceMode,
        out_tokens: &mut CudaViewMut<i32>,
        out_conf: &mut CudaViewMut<f64>,
    ) -> Result<()> {
        if width == 0 || width > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "sampling: logits width {width} must be in 1..=i32::MAX"
            )));
        }
        need("logits", logits.len(), rows * width)?;
        need("positions", positions.len(), rows)?;
        need("out_tokens", out_tokens.len(), rows)?;
        need("out_conf", out_conf.len(), rows)?;
        if rows > 65535 {
            return Err(Error::invalid(format!(
                "sampling: {rows} rows exceed 65535 per launch"
            )));
        }
        if !rule.temperature.is_finite() || rule.temperature < 0.0 {
            return Err(Error::invalid(format!(
                "sampling: temperature {} must be finite and >= 0",
                rule.temperature
            )));
        }
        let vocab_n = rule.vocab_size.min(width);
        let mask = i32::try_from(rule.mask_token).unwrap_or(-1);
        let first: usize = if rule.mask_token == 0 { 1 } else { 0 };
        if first >= vocab_n {
            return Err(Error::invalid(format!(
                "sampling: no candidate token (vocab_size {}, width {width}, mask {})",
                rule.vocab_size, rule.mask_token
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let (splits, chunk) = split_plan(rows, width);
        let bytes = rows * splits * PARTIAL_BYTES;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let (scratch, retired) = &mut *guard;
        grow_retaining(&self.stream, scratch, retired, bytes, "sampler", "partials")?;
        let (width_l, chunk_l) = (width as i64, chunk as i64);
        let vec_ok: i32 = {
            let (ptr, _guard) = logits.device_ptr(&self.stream);
            i32::from(width.is_multiple_of(4) && ptr % 16 == 0)
        };
        let (vocab_i, first_i, mode_i) = (vocab_n as i32, first as i32, mode as i32);
        let (t, seed, step) = (rule.temperature, rule.seed, rule.step);
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, rows as u32, 1),
            block_dim: (PREDICT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = Launch::new(&self.stream, &self.partial_fn, self.pdl);
        b.arg(logits)
            .arg(&width_l)
            .arg(positions)
            .arg(&vocab_i)
            .arg(&mask)
            .arg(&first_i);
        b.arg(&t)
            .arg(&seed)
            .arg(&step)
            .arg(&mode_i)
            .arg(&chunk_l)
            .arg(&vec_ok)
            .arg(&mut *scratch);
        // SAFETY: argument order and types match `predict_partial`; logits holds rows·width
        // floats, positions `rows` ints, the scratch rows·splits partial records, and every block
        // reads only [split·chunk, min(width, (split+1)·chunk)) of its own row.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch predict_partial", e))?;
        let (rows_i, splits_i) = (rows as i32, splits as i32);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(128) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = Launch::new(&self.stream, &self.finalize_fn, self.pdl);
        b.arg(logits)
            .arg(&width_l)
            .arg(positions)
            .arg(&rows_i)
            .arg(&splits_i)
            .arg(&first_i);
        b.arg(&t)
            .arg(&seed)
            .arg(&step)
            .arg(&mode_i)
            .arg(&*scratch)
            .arg(out_tokens)
            .arg(out_conf);
        // SAFETY: argument order and types match `predict_finalize`; threads past `rows` return,
        // and the scratch holds the rows·splits records written by the launch above.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch predict_finalize", e))?;
        Ok(())
    }

    /// Commits predictions into the device canvas `[batch, canvas_len]` (i32 token ids).
    ///
    /// Rows `b·rows_per_canvas ..` belong to canvas `b`; row `r` proposes `tokens[r]` with
    /// `conf[r]` at `positions[r]`. A row competes only while its canvas position still holds
    /// `mask_token` (duplicate positions: the first row counts). The chosen tokens are written
    /// into the canvas and recorded in `record` (see [`commit_record_len`] and
    /// [`parse_commit_record`]).
    #[allow(clippy::too_many_arguments)]
    pub fn commit(
        &self,
        canvas: &mut CudaViewMut<i32>,
        canvas_len: usize,
        batch: usize,
        tokens: &CudaView<i32>,
        conf: &CudaView<f64>,
        positions: &CudaView<i32>,
        rows_per_canvas: usize,
        mask_token: u32,
        rule: CommitRule,
        record: &mut CudaViewMut<i32>,
    ) -> Result<()> {
        if rows_per_canvas == 0 || rows_per_canvas > MAX_COMMIT_ROWS {
            return Err(Error::invalid(format!(
                "commit: rows_per_canvas {rows_per_canvas} must be in 1..={MAX_COMMIT_ROWS}"
            )));
        }
        if batch > 65535 {
            return Err(Error::invalid(format!(
                "commit: batch {batch} exceeds 65535"
            )));
        }
        let mask = i32::try_from(mask_token).map_err(|_| {
            Error::invalid(format!(
                "commit: mask token {mask_token} does not fit in i32"
            ))
        })?;
        let rows = batch * rows_per_canvas;
        need("canvas", canvas.len(), batch * canvas_len)?;
        need("tokens", tokens.len(), rows)?;
        need("conf", conf.len(), rows)?;
        need("positions", positions.len(), rows)?;
        need(
            "record",
            record.len(),
            commit_record_len(batch, rows_per_canvas),
        )?;
        if batch == 0 {
            return Ok(());
        }
        let (k, threshold, use_threshold) = match rule {
            CommitRule::TopK(k) => (k.min(i32::MAX as usize) as i32, 0.0f64, 0i32),
            CommitRule::Threshold(t) => (0, t, 1),
        };
        let (len_l, n_i) = (canvas_len as i64, rows_per_canvas as i32);
        let threads = rows_per_canvas.div_ceil(32) * 32;
        let cfg = LaunchConfig {
            grid_dim: (batch as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: (rows_per_canvas * 20) as u32,
        };
        let mut b = Launch::new(&self.stream, &self.commit_fn, self.pdl);
        b.arg(canvas)
            .arg(&len_l)
            .arg(tokens)
            .arg(conf)
            .arg(positions)
            .arg(&n_i)
            .arg(&mask);
        b.arg(&k).arg(&threshold).arg(&use_threshold).arg(record);
        // SAFETY: argument order and types match `commit_kernel`; all buffers were checked
        // against batch·rows_per_canvas, positions outside the canvas are ignored on the device,
        // and the shared memory holds the kernel's 20 bytes per row.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch commit_kernel", e))?;
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------------
// Self-check and bench.

/// The host confidence the kernel must reproduce: [`predict_row`] under `mode`'s remasking
/// (all four modes are defined there).
fn host_confidence(row: &[f32], mode: ConfidenceMode, rule: &PredictRule, pos: usize) -> f64 {
    let remasking = match mode {
        ConfidenceMode::LowConfidence => Remasking::LowConfidence,
        ConfidenceMode::Random => Remasking::Random,
        ConfidenceMode::Margin => Remasking::Margin,
        ConfidenceMode::Entropy => Remasking::Entropy,
    };
    let r = PredictRule {
        remasking,
        ..rule.clone()
    };
    predict_row(row, pos, &r).confidence
}

/// Random logits with a few planted exact ties (max repeated, mask and padding ids large).
fn make_logits(seed: u64, rows: usize, width: usize, rule: &PredictRule) -> Vec<f32> {
    let mut l = check::random_f32(seed, rows * width, -8.0, 8.0);
    for r in 0..rows {
        let row = &mut l[r * width..(r + 1) * width];
        if r % 3 == 2 {
            continue; // plain random row
        }
        // The mask token and ids past vocab_size carry the largest logits: they must be skipped.
        if (rule.mask_token as usize) < width {
            row[rule.mask_token as usize] = 30.0;
        }
        for x in row.iter_mut().skip(rule.vocab_size) {
            *x = 31.0;
        }
        // An exact tie for the greedy argmax on even rows: ids 5 and 3 + r get the same top value.
        if r % 2 == 0 && width > 8 + r {
            row[5] = 20.0;
            row[3 + r % 5] = 20.0;
        }
    }
    l
}

fn check_predict(
    dev: &CudaDevice,
    sampler: &Sampler,
    rows: usize,
    width: usize,
    t: f64,
    mode: ConfidenceMode,
) -> Result<(f64, String)> {
    let rule = PredictRule {
        temperature: t,
        remasking: Remasking::LowConfidence,
        seed: 1234 + rows as u64,
        step: 17,
        mask_token: (width / 2) as u32,
        vocab_size: width - 3,
    };
    let logits = make_logits(rows as u64 * 31 + width as u64, rows, width, &rule);
    let positions: Vec<i32> = (0..rows).map(|r| (r * 7 + 3) as i32).collect();
    let s = &dev.stream;
    let dl = s
        .clone_htod(&logits)
        .map_err(|e| cuda_err("upload logits", e))?;
    let dp = s
        .clone_htod(&positions)
        .map_err(|e| cuda_err("upload positions", e))?;
    let mut dt = s
        .clone_htod(&vec![-7i32; rows])
        .map_err(|e| cuda_err("upload tokens", e))?;
    let mut dc = s
        .clone_htod(&vec![f64::NAN; rows])
        .map_err(|e| cuda_err("upload conf", e))?;
    sampler.predict_mode(
        &dl.as_view(),
        rows,
        width,
        &dp.as_view(),
        &rule,
        mode,
        &mut dt.as_view_mut(),
        &mut dc.as_view_mut(),
    )?;
    dev.sync()?;
    let tok = s
        .clone_dtoh(&dt)
        .map_err(|e| cuda_err("download tokens", e))?;
    let conf = s
        .clone_dtoh(&dc)
        .map_err(|e| cuda_err("download conf", e))?;
    let mut worst = 0f64;
    let mut mismatches = 0;
    let mut first_bad = String::new();
    for r in 0..rows {
        let row = &logits[r * width..(r + 1) * width];
        let pos = positions[r] as usize;
        let want = predict_row(row, pos, &rule);
        let want_conf = host_confidence(row, mode, &rule, pos);
        if tok[r] as i64 != want.token as i64 {
            mismatches += 1;
            if first_bad.is_empty() {
                first_bad = format!("; row {r}: token {} vs host {}", tok[r], want.token);
            }
        }
        let e = if want_conf == conf[r] {
            0.0
        } else {
            ((conf[r] - want_conf) / want_conf.abs().max(1e-300)).abs()
        };
        worst = worst.max(if e.is_nan() { f64::INFINITY } else { e });
    }
    let err = if mismatches > 0 { f64::INFINITY } else { worst };
    Ok((
        err,
        format!("{mismatches} token mismatches, worst conf rel err {worst:.2e}{first_bad}"),
    ))
}

/// Host twin of the commit kernel, built on [`crate::denoise::commit`]: commits into `canvas`
/// and returns each canvas's `(position, token)` commits in ascending position (public for the
/// kernel's CPU emulation, tests/kernel_emulation.rs).
#[allow(clippy::too_many_arguments)]
pub fn host_commit(
    canvas: &mut [i32],
    canvas_len: usize,
    tokens: &[i32],
    conf: &[f64],
    pos: &[i32],
    n: usize,
    mask: i32,
    rule: CommitRule,
) -> Vec<Vec<(usize, u32)>> {
    let batch = canvas.len() / canvas_len;
    let mut all = Vec::new();
    for b in 0..batch {
        let cv = &mut canvas[b * canvas_len..(b + 1) * canvas_len];
        let mut cands = Vec::new();
        let mut rows = Vec::new();
        for i in 0..n {
            let r = b * n + i;
            let p = pos[r];
            let dup = (0..i).any(|j| pos[b * n + j] == p);
            if p >= 0 && (p as usize) < canvas_len && cv[p as usize] == mask && !dup {
                cands.push(Candidate {
                    position: p as usize,
                    confidence: conf[r],
                });
                rows.push(r);
            }
        }
        let chosen: Vec<usize> = match rule {
            CommitRule::TopK(k) => top_k(&cands, k),
            CommitRule::Threshold(t) => {
                let order = top_k(&cands, cands.len());
                order
                    .iter()
                    .enumerate()
                    .filter(|&(i, &c)| i == 0 || cands[c].confidence >= t)
                    .map(|(_, &c)| c)
                    .collect()
            }
        };
        let mut rec: Vec<(usize, u32)> = chosen
            .iter()
            .map(|&c| (cands[c].position, tokens[rows[c]] as u32))
            .collect();
        rec.sort_by_key(|e| e.0);
        for &(p, t) in &rec {
            cv[p] = t as i32;
        }
        all.push(rec);
    }
    all
}

/// The inputs of one commit launch: `batch` canvases of `canvas_len` tokens (mostly masked) and
/// `n` candidate rows each.
pub struct CommitCase {
    pub canvas_len: usize,
    pub mask: i32,
    pub canvas: Vec<i32>,
    pub positions: Vec<i32>,
    pub conf: Vec<f64>,
    pub tokens: Vec<i32>,
}

/// A commit case that exercises the rule's corners: mostly a block of consecutive positions,
/// with repeated and out-of-range positions, positions already committed, quantised confidences
/// (exact ties), NaN and −∞ (public for the kernel's CPU emulation).
pub fn commit_case(seed: u64, batch: usize, n: usize) -> CommitCase {
    let canvas_len = 3 * n + 11;
    let mask = 126336;
    let u = check::random_f32(seed, batch * (canvas_len + 3 * n), 0.0, 1.0);
    let canvas: Vec<i32> = (0..batch * canvas_len)
        .map(|i| if u[i] < 0.7 { mask } else { (i % 1000) as i32 })
        .collect();
    let extra = &u[batch * canvas_len..];
    let mut pos = Vec::new();
    let mut conf = Vec::new();
    let mut tokens = Vec::new();
    for b in 0..batch {
        for i in 0..n {
            let r = b * n + i;
            let p = if extra[r] < 0.05 {
                (i / 2) as i32
            } else if extra[r] > 0.97 {
                canvas_len as i32 + 3
            } else {
                (5 + i) as i32
            };
            pos.push(p);
            let c = (extra[batch * n + r] * 8.0).floor() as f64 / 8.0;
            let c = if extra[2 * batch * n + r] < 0.04 {
                f64::NAN
            } else if extra[2 * batch * n + r] > 0.97 {
                f64::NEG_INFINITY
            } else {
                c
            };
            conf.push(c);
            tokens.push((1000 + b * 100 + i) as i32);
        }
    }
    CommitCase {
        canvas_len,
        mask,
        canvas,
        positions: pos,
        conf,
        tokens,
    }
}

fn check_commit(
    dev: &CudaDevice,
    sampler: &Sampler,
    batch: usize,
    n: usize,
    rule: CommitRule,
    seed: u64,
) -> Result<(f64, String)> {
    let CommitCase {
        canvas_len,
        mask,
        mut canvas,
        positions: pos,
        conf,
        tokens,
    } = commit_case(seed, batch, n);
    let s = &dev.stream;
    let mut dcv = s
        .clone_htod(&canvas)
        .map_err(|e| cuda_err("upload canvas", e))?;
    let dt = s
        .clone_htod(&tokens)
        .map_err(|e| cuda_err("upload tokens", e))?;
    let dc = s
        .clone_htod(&conf)
        .map_err(|e| cuda_err("upload conf", e))?;
    let dp = s
        .clone_htod(&pos)
        .map_err(|e| cuda_err("upload positions", e))?;
    let mut drec = s
        .clone_htod(&vec![i32::MIN; commit_record_len(batch, n)])
        .map_err(|e| cuda_err("upload record", e))?;
    sampler.commit(
        &mut dcv.as_view_mut(),
        canvas_len,
        batch,
        &dt.as_view(),
        &dc.as_view(),
        &dp.as_view(),
        n,
        mask as u32,
        rule,
        &mut drec.as_view_mut(),
    )?;
    dev.sync()?;
    let got_canvas = s
        .clone_dtoh(&dcv)
        .map_err(|e| cuda_err("download canvas", e))?;
    let rec = s
        .clone_dtoh(&drec)
        .map_err(|e| cuda_err("download record", e))?;
    let got = parse_commit_record(&rec, batch, n)?;
    let want = host_commit(&mut canvas, canvas_len, &tokens, &conf, &pos, n, mask, rule);
    let committed: usize = want.iter().map(|c| c.len()).sum();
    let ok = got == want && got_canvas == canvas;
    Ok((
        if ok { 0.0 } else { 1.0 },
        format!(
            "{committed} commits over {batch} canvases{}",
            if ok {
                String::new()
            } else {
                format!("; got {got:?} want {want:?}")
            }
        ),
    ))
}

/// Checks predictions against [`predict_row`] (identical ids, confidences within 1e-9 relative)
/// and the commit kernel against [`crate::denoise::commit::top_k`] and the threshold rule.
pub fn self_check(dev: &CudaDevice) -> Vec<CheckResult> {
    let sampler = match Sampler::load(dev) {
        Ok(s) => s,
        Err(e) => return vec![CheckResult::failed("sampling load", e)],
    };
    let mut out = Vec::new();
    for &(rows, width) in &[
        (1usize, 126464usize),
        (5, 8195),
        (32, 126464),
        (256, 8195),
        (5, 1000),
        (3, 126464),
    ] {
        for &t in &[0.0, 0.7, 0.1] {
            for mode in [
                ConfidenceMode::LowConfidence,
                ConfidenceMode::Random,
                ConfidenceMode::Margin,
                ConfidenceMode::Entropy,
            ] {
                // Keep the run short: all modes on the small shapes, low-confidence elsewhere.
                if rows * width > 2_000_000
                    && mode != ConfidenceMode::LowConfidence
                    && mode != ConfidenceMode::Random
                {
                    continue;
                }
                let name = format!("sampling predict R{rows} w{width} T{t} {mode:?}");
                out.push(CheckResult::from_result(
                    name,
                    1e-9,
                    check_predict(dev, &sampler, rows, width, t, mode),
                ));
            }
        }
    }
    for &(batch, n, rule) in &[
        (1usize, 32usize, CommitRule::TopK(4)),
        (3, 32, CommitRule::TopK(1)),
        (8, 64, CommitRule::TopK(7)),
        (2, 5, CommitRule::TopK(100)),
        (3, 32, CommitRule::Threshold(0.5)),
        (4, 64, CommitRule::Threshold(0.9)),
        (2, 17, CommitRule::Threshold(2.0)),
        (1, 300, CommitRule::TopK(40)),
    ] {
        let name = format!("sampling commit b{batch} rows{n} {rule:?}");
        out.push(CheckResult::from_result(
            name,
            0.0,
            check_commit(
                dev,
                &sampler,
                batch,
                n,
                rule,
                7 + batch as u64 * 13 + n as u64,
            ),
        ));
    }
    out
}

fn bench_predict(dev: &CudaDevice, sampler: &Sampler, rows: usize, t: f64) -> Result<BenchResult> {
    let width = 126464;
    // Rotate over copies so that the set read across iterations exceeds the L2 cache.
    let copies = (120_000_000 / (rows * width * 4)).clamp(1, 8);
    let s = &dev.stream;
    let host = check::random_f32(9, rows * width, -8.0, 8.0);
    let mut bufs = Vec::new();
    for _ in 0..copies {
        bufs.push(
            s.clone_htod(&host)
                .map_err(|e| cuda_err("upload logits", e))?,
        );
    }
    let positions: Vec<i32> = (0..rows as i32).collect();
    let dp = s
        .clone_htod(&positions)
        .map_err(|e| cuda_err("upload positions", e))?;
    let mut dt = s
        .alloc_zeros::<i32>(rows)
        .map_err(|e| cuda_err("alloc tokens", e))?;
    let mut dc = s
        .alloc_zeros::<f64>(rows)
        .map_err(|e| cuda_err("alloc conf", e))?;
    let rule = PredictRule {
        temperature: t,
        remasking: Remasking::LowConfidence,
        seed: 5,
        step: 0,
        mask_token: 126336,
        vocab_size: width,
    };
    // BENCH_REPS queued calls per timed sample (host launch overhead hidden, as in the model).
    let ms = check::time_median_ms(dev, 2, 10, |i| {
        for r in 0..BENCH_REPS {
            sampler.predict(
                &bufs[(i * BENCH_REPS + r) % copies].as_view(),
                rows,
                width,
                &dp.as_view(),
                &rule,
                &mut dt.as_view_mut(),
                &mut dc.as_view_mut(),
            )?;
        }
        Ok(())
    })? / BENCH_REPS as f64;
    Ok(BenchResult::new(
        format!("sampling predict R{rows} w{width} T{t}"),
        ms,
        Some((rows * width * 4) as f64),
        None,
        format!("GB/s of logits read; {copies} rotating copies; mean of {BENCH_REPS} queued calls"),
    ))
}

/// Times predict over 32 and 256 rows of width 126464 (greedy and sampled) and one commit.
pub fn bench(dev: &CudaDevice) -> Vec<BenchResult> {
    let sampler = match Sampler::load(dev) {
        Ok(s) => s,
        Err(e) => return vec![BenchResult::failed("sampling load", e)],
    };
    let mut out = Vec::new();
    for &(rows, t) in &[(32usize, 0.0), (256, 0.0), (32, 0.7), (256, 0.7)] {
        out.push(
            bench_predict(dev, &sampler, rows, t).unwrap_or_else(|e| {
                BenchResult::failed(format!("sampling predict R{rows} T{t}"), e)
            }),
        );
    }
    let commit = || -> Result<BenchResult> {
        let (batch, n, len) = (8usize, 32usize, 384usize);
        let s = &dev.stream;
        let mut canvas = s
            .clone_htod(&vec![126336i32; batch * len])
            .map_err(|e| cuda_err("upload canvas", e))?;
        let tokens = s
            .alloc_zeros::<i32>(batch * n)
            .map_err(|e| cuda_err("alloc", e))?;
        let conf = s
            .clone_htod(
                &check::random_f32(3, batch * n, 0.0, 1.0)
                    .iter()
                    .map(|&x| x as f64)
                    .collect::<Vec<_>>(),
            )
            .map_err(|e| cuda_err("upload conf", e))?;
        let pos = s
            .clone_htod(
                &(0..batch * n)
                    .map(|i| (128 + i % n) as i32)
                    .collect::<Vec<_>>(),
            )
            .map_err(|e| cuda_err("upload positions", e))?;
        let mut rec = s
            .alloc_zeros::<i32>(commit_record_len(batch, n))
            .map_err(|e| cuda_err("alloc record", e))?;
        let ms = check::time_median_ms(dev, 3, 20, |_| {
            sampler.commit(
                &mut canvas.as_view_mut(),
                len,
                batch,
                &tokens.as_view(),
                &conf.as_view(),
                &pos.as_view(),
                n,
                0,
                CommitRule::TopK(4),
                &mut rec.as_view_mut(),
            )
        })?;
        Ok(BenchResult::new(
            "sampling commit b8 rows32 top4",
            ms,
            None,
            None,
            "launch-bound",
        ))
    };
    out.push(commit().unwrap_or_else(|e| BenchResult::failed("sampling commit", e)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the GPU self-check and bench (needs a CUDA device: `cargo test -- --ignored`).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gpu_self_check_and_bench() {
        let dev = CudaDevice::open(0).expect("open CUDA device 0");
        let checks = self_check(&dev);
        let benches = bench(&dev);
        println!("{}", check::format_tables(&checks, &benches));
        assert!(checks.iter().all(|c| c.passed), "a sampling check failed");
    }

    #[test]
    fn split_plan_covers_the_row() {
        for &(rows, width) in &[
            (1usize, 126464usize),
            (32, 126464),
            (256, 126464),
            (5, 8195),
            (3, 7),
            (1, 1),
        ] {
            let (splits, chunk) = split_plan(rows, width);
            assert_eq!(chunk % 4, 0);
            assert!(splits * chunk >= width, "{rows} {width}");
            assert!(
                (splits - 1) * chunk < width,
                "no empty split: {rows} {width}"
            );
        }
        assert_eq!(split_plan(32, 126464).0, 9);
    }

    #[test]
    fn commit_record_round_trip() {
        // Two canvases of 3 rows: [count, p0 p1 p2, t0 t1 t2].
        let rec = [2, 4, 9, -1, 70, 71, -1, 0, -1, -1, -1, -1, -1, -1];
        let got = parse_commit_record(&rec, 2, 3).unwrap();
        assert_eq!(got, vec![vec![(4, 70), (9, 71)], vec![]]);
        assert!(parse_commit_record(&[5, 0, 0, 0, 0, 0, 0], 1, 3).is_err());
        assert!(parse_commit_record(&[1, 2], 1, 3).is_err());
    }

    #[test]
    fn host_commit_threshold_keeps_the_best_and_ties_go_low() {
        let mask = 9;
        let mut canvas = vec![mask; 8];
        canvas[2] = 1; // not masked: never committed
        let pos = [1, 2, 3, 4];
        let conf = [0.5, 0.99, 0.5, 0.2];
        let tok = [11, 12, 13, 14];
        let got = host_commit(
            &mut canvas.clone(),
            8,
            &tok,
            &conf,
            &pos,
            4,
            mask,
            CommitRule::Threshold(0.9),
        );
        assert_eq!(
            got,
            vec![vec![(1, 11)]],
            "nothing reaches 0.9: the best (tie 0.5 → position 1) alone"
        );
        let got = host_commit(
            &mut canvas,
            8,
            &tok,
            &conf,
            &pos,
            4,
            mask,
            CommitRule::TopK(2),
        );
        assert_eq!(got, vec![vec![(1, 11), (3, 13)]]);
        assert_eq!(canvas[1], 11);
        assert_eq!(canvas[3], 13);
    }
}
