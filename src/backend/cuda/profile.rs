//! Per-operation GPU time of eager steps (`dllm bench --profile`): while a recording is open,
//! the transformer records a CUDA event on its stream after each operation (embedding, each
//! norm, GEMM, RoPE, attention, SwiGLU, the LM head, sampling, commit), and the time between
//! consecutive events is that operation's share of the step. Eager launches only: a captured
//! graph has no events, so profiled steps run with graphs off, and each share includes the gap
//! before its kernel (launch latency; in a graph that gap is smaller). Recording costs one event
//! per operation and is off otherwise (one relaxed atomic load per operation).

use super::cuda_err;
use crate::error::{Error, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Total time of one operation label over a recording.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpTime {
    pub op: &'static str,
    pub ms: f64,
    /// Operations recorded under this label.
    pub calls: usize,
}

/// Events of the open recording: the start, then one per operation.
struct Recording {
    start: CudaEvent,
    marks: Vec<(&'static str, CudaEvent)>,
}

/// The recorder a transformer owns.
#[derive(Default)]
pub struct OpProfiler {
    on: AtomicBool,
    /// A stream capture is in progress: marks are skipped (an event recorded into a capture
    /// would not time anything and could not be queried).
    capturing: AtomicBool,
    rec: Mutex<Option<Recording>>,
}

impl OpProfiler {
    /// Opens a recording at the current end of `stream` (a previous open one is dropped);
    /// refused while a graph capture is in progress on it.
    pub fn start(&self, stream: &CudaStream) -> Result<()> {
        if self.capturing.load(Ordering::Relaxed) {
            return Err(Error::State(
                "op profile: a CUDA graph capture is in progress on the model's stream".into(),
            ));
        }
        let start = timed_event(stream)?;
        *self.lock() = Some(Recording {
            start,
            marks: Vec::new(),
        });
        self.on.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Whether a recording is open.
    pub fn recording(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Brackets a stream capture (marks are skipped inside it).
    pub fn set_capturing(&self, on: bool) {
        self.capturing.store(on, Ordering::Relaxed);
    }

    /// Ends the operation `op` (everything launched since the previous mark); nothing when no
    /// recording is open.
    pub fn mark(&self, stream: &CudaStream, op: &'static str) -> Result<()> {
        if !self.recording() || self.capturing.load(Ordering::Relaxed) {
            return Ok(());
        }
        let ev = timed_event(stream)?;
        if let Some(rec) = self.lock().as_mut() {
            rec.marks.push((op, ev));
        }
        Ok(())
    }

    /// Closes the recording: waits for its last event and returns each label's total, in the
    /// order the labels first appeared.
    pub fn finish(&self) -> Result<Vec<OpTime>> {
        self.on.store(false, Ordering::Relaxed);
        let rec = self
            .lock()
            .take()
            .ok_or_else(|| Error::State("op profile: no recording open".into()))?;
        let mut stamps = Vec::with_capacity(rec.marks.len());
        for (_, ev) in &rec.marks {
            let ms = rec
                .start
                .elapsed_ms(ev)
                .map_err(|e| cuda_err("op profile: event time", e))?;
            stamps.push(f64::from(ms));
        }
        let labels: Vec<&'static str> = rec.marks.iter().map(|(l, _)| *l).collect();
        Ok(attribute(&labels, &stamps))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Recording>> {
        self.rec.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn timed_event(stream: &CudaStream) -> Result<CudaEvent> {
    stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| cuda_err("op profile: record event", e))
}

/// Sums the intervals between consecutive stamps (ms since the start; stamp `i` ends operation
/// `labels[i]`, which began at stamp `i − 1` or at 0) per label, in first-appearance order.
pub fn attribute(labels: &[&'static str], stamps: &[f64]) -> Vec<OpTime> {
    let mut out: Vec<OpTime> = Vec::new();
    let mut prev = 0.0;
    for (&op, &t) in labels.iter().zip(stamps) {
        let ms = (t - prev).max(0.0);
        prev = t;
        add(&mut out, &OpTime { op, ms, calls: 1 });
    }
    out
}

/// Adds `step` into `total` (label by label, new labels appended).
pub fn accumulate(total: &mut Vec<OpTime>, step: &[OpTime]) {
    for s in step {
        add(total, s);
    }
}

/// Adds `t` to its label's entry of `total`, or appends it.
fn add(total: &mut Vec<OpTime>, t: &OpTime) {
    match total.iter_mut().find(|o| o.op == t.op) {
        Some(o) => {
            o.ms += t.ms;
            o.calls += t.calls;
        }
        None => total.push(t.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_go_to_the_operation_they_end() {
        // gemm 0–2, norm 2–2.5, gemm 2.5–4.5, norm 4.5–5.
        let t = attribute(&["gemm", "norm", "gemm", "norm"], &[2.0, 2.5, 4.5, 5.0]);
        assert_eq!(
            t,
            vec![
                OpTime {
                    op: "gemm",
                    ms: 4.0,
                    calls: 2
                },
                OpTime {
                    op: "norm",
                    ms: 1.0,
                    calls: 2
                },
            ]
        );
        // The parts add up to the last stamp.
        assert_eq!(t.iter().map(|o| o.ms).sum::<f64>(), 5.0);
        assert!(attribute(&[], &[]).is_empty());
    }

    #[test]
    fn steps_accumulate_label_by_label() {
        let mut total = attribute(&["a", "b"], &[1.0, 3.0]);
        accumulate(&mut total, &attribute(&["b", "c"], &[0.5, 0.75]));
        let got: Vec<(&str, f64, usize)> = total.iter().map(|o| (o.op, o.ms, o.calls)).collect();
        assert_eq!(got, vec![("a", 1.0, 1), ("b", 2.5, 2), ("c", 0.25, 1)]);
    }
}
