//! The GPU check harness contract: result types every kernel family's `self_check` / `bench`
//! returns, plus the small helpers they share (device upload and download, relative L2 error,
//! deterministic random inputs, bf16 packing, poison patterns, event-timed medians).
//!
//! Nothing here panics on bad data: a NaN or a length mismatch becomes an infinite error, and a
//! failed CUDA call becomes a failed [`CheckResult`] via [`CheckResult::from_result`].

use super::{cuda_err, CudaDevice};
use crate::denoise::rng;
use crate::error::Result;
use half::bf16;
use serde::Serialize;

/// Bit pattern used to poison fp32 outputs before a kernel runs (a quiet NaN with payload).
pub const POISON_F32_BITS: u32 = 0x7FC0_DEAD;
/// Bit pattern used to poison bf16 outputs (a quiet bf16 NaN with payload).
pub const POISON_BF16_BITS: u16 = 0x7FDE;
/// Relative L2 tolerance for fp32 paths.
pub const TOL_F32: f64 = 1e-5;
/// Relative L2 tolerance for bf16 paths.
pub const TOL_BF16: f64 = 1e-2;

/// One correctness check: a kernel's output against an independent host reference.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: String,
    /// Relative L2 error (`‖got − want‖ / ‖want‖`); infinite when the output is unusable.
    pub rel_err: f64,
    pub tol: f64,
    pub passed: bool,
    pub detail: String,
}

impl CheckResult {
    /// A check that passes when `rel_err` is finite and at most `tol`.
    pub fn new(name: impl Into<String>, rel_err: f64, tol: f64, detail: impl Into<String>) -> Self {
        CheckResult {
            name: name.into(),
            rel_err,
            tol,
            passed: rel_err.is_finite() && rel_err <= tol,
            detail: detail.into(),
        }
    }

    /// A check that could not run (error while setting up or launching).
    pub fn failed(name: impl Into<String>, why: impl std::fmt::Display) -> Self {
        CheckResult {
            name: name.into(),
            rel_err: f64::INFINITY,
            tol: 0.0,
            passed: false,
            detail: format!("error: {why}"),
        }
    }

    /// An exact (pass/fail) check: `rel_err` is 0 on success and 1 on failure.
    pub fn exact(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        CheckResult::new(name, if ok { 0.0 } else { 1.0 }, 0.0, detail)
    }

    /// Turns the outcome of a check body (`(rel_err, detail)`) into a result; an error fails it.
    pub fn from_result(name: impl Into<String>, tol: f64, r: Result<(f64, String)>) -> Self {
        let name = name.into();
        match r {
            Ok((e, detail)) => CheckResult::new(name, e, tol, detail),
            Err(e) => CheckResult::failed(name, e),
        }
    }
}

/// One timing: median milliseconds plus optional achieved bandwidth / arithmetic rate.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub name: String,
    pub ms: f64,
    pub gbps: Option<f64>,
    pub tflops: Option<f64>,
    pub detail: String,
}

impl BenchResult {
    /// A timing of `ms` that moved `bytes` and did `flops` floating-point operations.
    pub fn new(
        name: impl Into<String>,
        ms: f64,
        bytes: Option<f64>,
        flops: Option<f64>,
        detail: impl Into<String>,
    ) -> Self {
        let secs = ms / 1e3;
        BenchResult {
            name: name.into(),
            ms,
            gbps: bytes.map(|b| b / secs / 1e9),
            tflops: flops.map(|f| f / secs / 1e12),
            detail: detail.into(),
        }
    }

    /// A benchmark that could not run.
    pub fn failed(name: impl Into<String>, why: impl std::fmt::Display) -> Self {
        BenchResult {
            name: name.into(),
            ms: f64::NAN,
            gbps: None,
            tflops: None,
            detail: format!("error: {why}"),
        }
    }
}

/// Index of the largest value of `row` (the first of equals; 0 for an empty or all-NaN row).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// How many rows of `logits` (`width` wide) have their argmax at `want[r]`, and of how many.
pub fn argmax_agreement(logits: &[f32], width: usize, want: &[usize]) -> (usize, usize) {
    let rows = logits.len() / width;
    let agree = (0..rows.min(want.len()))
        .filter(|&r| argmax(&logits[r * width..(r + 1) * width]) == want[r])
        .count();
    (agree, want.len())
}

/// `v` copied to a new device buffer (a check's inputs).
pub fn upload<T: cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    v: &[T],
) -> Result<cudarc::driver::CudaSlice<T>> {
    dev.stream
        .clone_htod(v)
        .map_err(|e| cuda_err("check: upload", e))
}

/// `b` copied back to the host (after the stream's queued work).
pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
    dev: &CudaDevice,
    b: &cudarc::driver::CudaSlice<T>,
) -> Result<Vec<T>> {
    dev.stream
        .clone_dtoh(b)
        .map_err(|e| cuda_err("check: download", e))
}

/// `‖got − want‖₂ / ‖want‖₂` in f64; infinite on a length mismatch or any non-finite `got`.
/// When `want` is all zeros the absolute error norm is returned.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        let d = g as f64 - w as f64;
        num += d * d;
        den += (w as f64) * (w as f64);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// `n` deterministic uniform numbers in `[lo, hi)`, keyed by `seed` (independent of thread count).
pub fn random_f32(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|i| lo + (hi - lo) * rng::uniform(seed, 0x636865636B, 0, i as u64) as f32)
        .collect()
}

/// f32 values rounded to bf16 (nearest even), as raw bits.
pub fn to_bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
}

/// bf16 bits widened to f32.
pub fn from_bf16_bits(x: &[u16]) -> Vec<f32> {
    x.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// Rounds every value through bf16 (what the GPU sees after upload).
pub fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// Median of `iters` timings (ms, CUDA events around each call) after `warmup` untimed calls.
/// `f` enqueues work on `dev.stream`; errors from it or from the events are returned.
pub fn time_median_ms(
    dev: &CudaDevice,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    for i in 0..warmup {
        f(i)?;
    }
    dev.sync()?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::with_capacity(iters.max(1));
    for i in 0..iters.max(1) {
        let start = dev
            .stream
            .record_event(flags)
            .map_err(|e| cuda_err("record event", e))?;
        f(warmup + i)?;
        let end = dev
            .stream
            .record_event(flags)
            .map_err(|e| cuda_err("record event", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| cuda_err("event elapsed time", e))?;
        times.push(ms as f64);
    }
    Ok(median(&mut times))
}

/// Median of a list (sorts it in place); NaN for an empty list.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Prints checks and benches as two aligned text tables.
pub fn format_tables(checks: &[CheckResult], benches: &[BenchResult]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let w = checks
        .iter()
        .map(|c| c.name.len())
        .chain(benches.iter().map(|b| b.name.len()))
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        s,
        "{:<w$}  {:>10}  {:>8}  {:<4}  detail",
        "check", "rel_err", "tol", "ok"
    );
    for c in checks {
        let _ = writeln!(
            s,
            "{:<w$}  {:>10.3e}  {:>8.1e}  {:<4}  {}",
            c.name,
            c.rel_err,
            c.tol,
            if c.passed { "PASS" } else { "FAIL" },
            c.detail
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<w$}  {:>10}  {:>8}  {:>7}  detail",
        "bench", "ms", "GB/s", "TFLOP/s"
    );
    for b in benches {
        let opt =
            |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
        let _ = writeln!(
            s,
            "{:<w$}  {:>10.4}  {:>8}  {:>7}  {}",
            b.name,
            b.ms,
            opt(b.gbps, 0),
            opt(b.tflops, 1),
            b.detail
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_l2_hand_cases() {
        assert_eq!(rel_l2(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        // error (0, 1) over norm 5
        assert!((rel_l2(&[3.0, 5.0], &[3.0, 4.0]) - 0.2).abs() < 1e-12);
        assert_eq!(rel_l2(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(rel_l2(&[f32::NAN, 1.0], &[0.0, 1.0]), f64::INFINITY);
        assert_eq!(
            rel_l2(&[f32::from_bits(POISON_F32_BITS)], &[1.0]),
            f64::INFINITY
        );
        // all-zero reference: absolute norm
        assert!((rel_l2(&[3.0, 4.0], &[0.0, 0.0]) - 5.0).abs() < 1e-12);
    }

    #[test]
    fn poison_patterns_are_nan() {
        assert!(f32::from_bits(POISON_F32_BITS).is_nan());
        assert!(bf16::from_bits(POISON_BF16_BITS).is_nan());
    }

    #[test]
    fn check_result_pass_rules() {
        assert!(CheckResult::new("a", 1e-6, 1e-5, "").passed);
        assert!(!CheckResult::new("a", 2e-5, 1e-5, "").passed);
        assert!(!CheckResult::new("a", f64::NAN, 1e-5, "").passed);
        assert!(!CheckResult::failed("a", "boom").passed);
        assert!(CheckResult::exact("a", true, "").passed);
        assert!(!CheckResult::exact("a", false, "").passed);
        let r = CheckResult::from_result("a", 1e-2, Err(crate::error::Error::Backend("x".into())));
        assert!(!r.passed && r.detail.contains('x'));
    }

    #[test]
    fn bench_rates() {
        let b = BenchResult::new("copy", 2.0, Some(4e9), Some(2e12), "");
        assert!((b.gbps.unwrap() - 2000.0).abs() < 1e-9);
        assert!((b.tflops.unwrap() - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn median_and_random() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
        let a = random_f32(1, 100, -1.0, 1.0);
        assert_eq!(a, random_f32(1, 100, -1.0, 1.0));
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        assert_ne!(a, random_f32(2, 100, -1.0, 1.0));
        let bits = to_bf16_bits(&[1.0, -2.5]);
        assert_eq!(from_bf16_bits(&bits), vec![1.0, -2.5]);
    }
}
