//! Weight upload: checkpoint tensors converted to bf16 (or f32 for norms) on the host in
//! bounded staging chunks and copied to the device once, the fused matrices ([q|k|v], the
//! interleaved gate/up of the fused SwiGLU, the grouped q/k rows of the RoPE epilogue) assembled
//! on the way.

use super::*;
use crate::model::transformer::{FeedForward, SwiGluTensors};

/// Converts `count` elements of `v` starting at element `start` to bf16 bits.
fn to_bf16_bits(v: &TensorView, start: usize, out: &mut Vec<u16>, count: usize) {
    out.clear();
    match v.dtype {
        DType::BF16 => out.extend(
            v.data[start * 2..(start + count) * 2]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        ),
        DType::F16 | DType::F32 => {
            let mut f = vec![0f32; count];
            v.to_f32_range(start, &mut f);
            out.extend(f.iter().map(|&x| half::bf16::from_f32(x).to_bits()));
        }
    }
}

/// Uploads tensors stacked along their first axis into one bf16 device matrix.
pub(super) fn upload_stacked(dev: &CudaDevice, parts: &[TensorView]) -> Result<CudaSlice<u16>> {
    let runs: Vec<(&TensorView, usize, usize)> = parts.iter().map(|p| (p, 0, p.numel())).collect();
    upload_runs(dev, &runs)
}

/// Uploads the q, k and v matrices as one fused `[d + 2 kv, d]` bf16 matrix with every q and k
/// head's rows in the grouped order of the GEMM's RoPE epilogue ([`rope_layout`]).
pub(super) fn upload_qkv_grouped(
    dev: &CudaDevice,
    (q, k, v): (&TensorView, &TensorView, &TensorView),
    cfg: &ModelConfig,
) -> Result<CudaSlice<u16>> {
    let (d, hd) = (cfg.d_model, cfg.head_dim());
    let mut runs = Vec::new();
    for (t, heads) in [(q, cfg.n_heads), (k, cfg.n_kv_heads)] {
        rope_layout::for_each_run(heads, hd, |row, rows| runs.push((t, row * d, rows * d)));
    }
    runs.push((v, 0, v.numel()));
    upload_runs(dev, &runs)
}

/// The q and k projection biases concatenated, each head's values in the grouped order when
/// `grouped` (the order of the rows they add to).
pub(super) fn qk_rows(q: &[f32], k: &[f32], grouped: bool, cfg: &ModelConfig) -> Vec<f32> {
    let hd = cfg.head_dim();
    if !grouped {
        return [q, k].concat();
    }
    let mut out = rope_layout::permute_rows(q, cfg.n_heads, hd, 1);
    out.extend(rope_layout::permute_rows(k, cfg.n_kv_heads, hd, 1));
    out
}

/// Uploads the gate and up matrices (`[h, d]` each) as one `[2h, d]` bf16 matrix in the fused
/// SwiGLU's row order ([`swiglu_layout`]: 8 gate rows, the 8 matching up rows, …).
pub(super) fn upload_gate_up_fused(
    dev: &CudaDevice,
    gate: &TensorView,
    up: &TensorView,
    h: usize,
    d: usize,
) -> Result<CudaSlice<u16>> {
    let mut runs = Vec::with_capacity(2 * h / swiglu_layout::GROUP);
    push_gate_up_fused(&mut runs, gate, up, h, d);
    upload_runs(dev, &runs)
}

/// Appends the runs of one gate/up pair in the fused SwiGLU's row order.
fn push_gate_up_fused<'t, 'w>(
    runs: &mut Vec<(&'t TensorView<'w>, usize, usize)>,
    gate: &'t TensorView<'w>,
    up: &'t TensorView<'w>,
    h: usize,
    d: usize,
) {
    swiglu_layout::for_each_run(h, |src, rows| {
        runs.push(match src {
            swiglu_layout::FusedRow::Gate(r) => (gate, r * d, rows * d),
            swiglu_layout::FusedRow::Up(r) => (up, r * d, rows * d),
        })
    });
}

/// Uploads a mixture's experts (`(gate, up, down)` each, `[h, d]`, `[h, d]`, `[d, h]`) as one
/// `[E, 2h, d]` gate/up matrix (each expert's rows in the fused SwiGLU's order when `fused`,
/// else gate then up) and one `[E, d, h]` down matrix.
pub(super) fn upload_experts(
    dev: &CudaDevice,
    experts: &[(TensorView, TensorView, TensorView)],
    (h, d): (usize, usize),
    fused: bool,
) -> Result<(CudaSlice<u16>, CudaSlice<u16>)> {
    let mut runs = Vec::new();
    for (gate, up, _) in experts {
        if fused {
            push_gate_up_fused(&mut runs, gate, up, h, d);
        } else {
            runs.push((gate, 0, gate.numel()));
            runs.push((up, 0, up.numel()));
        }
    }
    let gate_up = upload_runs(dev, &runs)?;
    let downs: Vec<_> = experts
        .iter()
        .map(|(_, _, down)| (down, 0, down.numel()))
        .collect();
    Ok((gate_up, upload_runs(dev, &downs)?))
}

/// Uploads a layer's feed-forward (`d` wide, hidden `h`, each expert's with a mixture; gate
/// and up interleaved when `fused`); returns it with its bf16 bytes.
pub(super) fn upload_ffn(
    dev: &CudaDevice,
    store: &WeightStore,
    ffn: &FeedForward,
    (d, h): (usize, usize),
    fused: bool,
) -> Result<(LayerFfn, usize)> {
    let swiglu = |t: &SwiGluTensors| -> Result<_> {
        Ok((
            store.get_shaped(&t.gate, &[h, d])?,
            store.get_shaped(&t.up, &[h, d])?,
            store.get_shaped(&t.down, &[d, h])?,
        ))
    };
    match ffn {
        FeedForward::Dense(t) => {
            let (g, u, f) = swiglu(t)?;
            let gate_up = if fused {
                upload_gate_up_fused(dev, &g, &u, h, d)?
            } else {
                upload_stacked(dev, &[g, u])?
            };
            let ff_out = upload_stacked(dev, &[f])?;
            Ok((LayerFfn::Dense { gate_up, ff_out }, 2 * 3 * d * h))
        }
        FeedForward::Experts { router, experts } => {
            let e = experts.len();
            let router = upload_stacked(dev, &[store.get_shaped(router, &[e, d])?])?;
            let views = experts.iter().map(swiglu).collect::<Result<Vec<_>>>()?;
            let (gate_up, down) = upload_experts(dev, &views, (h, d), fused)?;
            let w = ExpertWeights {
                router,
                gate_up,
                down,
            };
            Ok((LayerFfn::Experts(w), 2 * e * (d + 3 * d * h)))
        }
    }
}

/// Uploads `runs` (tensor, first element, element count) back to back into one bf16 device
/// buffer, converted through a staging buffer of at most [`UPLOAD_CHUNK`] elements.
fn upload_runs(dev: &CudaDevice, runs: &[(&TensorView, usize, usize)]) -> Result<CudaSlice<u16>> {
    let total: usize = runs.iter().map(|r| r.2).sum();
    let mut dst = alloc::<u16>(dev, total, runs.first().map_or("weights", |r| r.0.name))?;
    let spans: Vec<(usize, usize)> = runs
        .iter()
        .map(|&(_, start, count)| (start, count))
        .collect();
    let (mut staged, mut buf, mut off) = (Vec::new(), Vec::new(), 0usize);
    for batch in staging_batches(&spans, UPLOAD_CHUNK) {
        staged.clear();
        for &(i, start, count) in &batch {
            to_bf16_bits(runs[i].0, start, &mut buf, count);
            staged.extend_from_slice(&buf);
        }
        let name = batch.last().map_or("weights", |&(i, _, _)| runs[i].0.name);
        let mut view = dst.slice_mut(off..off + staged.len());
        dev.stream
            .memcpy_htod(staged.as_slice(), &mut view)
            .map_err(|e| cuda_err(&format!("upload tensor `{name}`"), e))?;
        // The staging buffer is refilled next: wait for the copy.
        dev.sync()?;
        off += staged.len();
    }
    Ok(dst)
}

/// The pieces of `spans` (first element, element count), in order, grouped into staging batches
/// of `chunk` elements (the last may hold fewer): each piece (span index, first element, count).
fn staging_batches(spans: &[(usize, usize)], chunk: usize) -> Vec<Vec<(usize, usize, usize)>> {
    let chunk = chunk.max(1);
    let (mut batches, mut batch, mut filled) = (Vec::new(), Vec::new(), 0usize);
    for (i, &(start, count)) in spans.iter().enumerate() {
        let mut done = 0;
        while done < count {
            let c = (chunk - filled).min(count - done);
            batch.push((i, start + done, c));
            (done, filled) = (done + c, filled + c);
            if filled == chunk {
                batches.push(std::mem::take(&mut batch));
                filled = 0;
            }
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

pub(super) fn upload_f32(dev: &CudaDevice, v: &TensorView) -> Result<CudaSlice<f32>> {
    dev.stream
        .clone_htod(&v.to_f32_vec())
        .map_err(|e| memory::alloc_err(&format!("upload tensor `{}`", v.name), e))
}

#[cfg(test)]
mod tests {
    use super::staging_batches;

    /// The batches, laid end to end, are exactly the spans' elements in order; every batch but
    /// the last is full, none is over.
    #[test]
    fn staging_batches_cover_every_span_in_order() {
        for (spans, chunk) in [
            (vec![(0usize, 10usize), (5, 7), (100, 3)], 4usize),
            (vec![(0, 8), (8, 8)], 16),
            (vec![(3, 40)], 7),
            (vec![(0, 5), (0, 0), (9, 1)], 1),
            (vec![], 4),
        ] {
            let want: Vec<(usize, usize)> = spans
                .iter()
                .enumerate()
                .flat_map(|(i, &(s, c))| (s..s + c).map(move |e| (i, e)))
                .collect();
            let batches = staging_batches(&spans, chunk);
            let got: Vec<(usize, usize)> = batches
                .iter()
                .flatten()
                .flat_map(|&(i, s, c)| (s..s + c).map(move |e| (i, e)))
                .collect();
            assert_eq!(got, want, "{spans:?} in chunks of {chunk}");
            for (b, batch) in batches.iter().enumerate() {
                let n: usize = batch.iter().map(|p| p.2).sum();
                assert!(n <= chunk && n > 0);
                if b + 1 < batches.len() {
                    assert_eq!(n, chunk, "batch {b} of {spans:?} not full");
                }
            }
        }
    }
}
