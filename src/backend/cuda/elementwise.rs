//! Host side of `cuda/elementwise.cu`: typed launchers for RMSNorm, RoPE, the fused RoPE + K/V
//! cache write the model uses, SwiGLU (16-byte vectorised when aligned), embedding gather,
//! bf16↔f32 conversion, row gathers and the K/V cache scatter, plus their self-checks against
//! the CPU reference ops and their bandwidth benches.
//!
//! bf16 tensors are `u16` buffers holding bf16 bits. Every launcher checks that the views it is
//! given are long enough for the shape it is told and returns [`Error::InvalidArgument`]
//! otherwise, so a shape slip never becomes an out-of-bounds access.

use super::canvas_kv::CanvasKvLayer;
use super::check::{self, BenchResult, CheckResult, TOL_BF16, TOL_F32};
use super::launch::Launch;
use super::{cuda_err, CudaDevice};
use crate::backend::cpu;
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

/// Threads per block of the row kernels (must match `DLLM_ROW_THREADS` in the .cu file).
const ROW_THREADS: u32 = 256;
/// float4s of a row each thread of the RMSNorm kernels' vector path holds (must match
/// `DLLM_RMS_V4` in the .cu file).
const RMS_V4: usize = 8;

/// Whether the RMSNorm kernels' float4 path can take rows of width `d` (given 16-byte aligned
/// views): a multiple of 4 that the block's registers hold.
fn rmsnorm_vec_fits(d: usize) -> bool {
    d.is_multiple_of(4) && d <= 4 * ROW_THREADS as usize * RMS_V4
}
/// Largest `head_dim / 2` of `rope_qkv_bf16` (`DLLM_ROPE_MAX_HALF` in the .cu file).
const ROPE_MAX_HALF: usize = 512;
/// Threads per block of the grid-stride kernels.
const THREADS: u32 = 256;
/// Upper bound on blocks of a grid-stride launch.
const MAX_BLOCKS: usize = 8192;

fn grid_for(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn need(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(Error::invalid(format!(
            "elementwise {what}: buffer holds {have} elements, needs {want}"
        )));
    }
    Ok(())
}

/// Largest `f(r)` over `r < rows` for an index map of the form
/// `(r / rows_per_seq)·stride + offset + r % rows_per_seq` (non-decreasing within a sequence and
/// from one sequence to the next): the last row, or the last row of the last full sequence.
fn max_strided(rows: usize, rows_per_seq: usize, f: impl Fn(usize) -> usize) -> usize {
    let last_seq = (rows - 1) / rows_per_seq;
    let mut m = f(rows - 1);
    if last_seq > 0 {
        m = m.max(f(last_seq * rows_per_seq - 1));
    }
    m
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::invalid(format!("elementwise {what}: {v} does not fit in i32")))
}

/// Shape of a RoPE launch over a fused activation matrix (see `rope_bf16` in the .cu file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeShape {
    pub rows: usize,
    /// Elements between consecutive rows.
    pub row_stride: usize,
    /// Heads rotated starting at column 0 (queries).
    pub q_heads: usize,
    /// Heads rotated starting at column `k_col` (keys).
    pub k_heads: usize,
    pub k_col: usize,
    pub head_dim: usize,
    /// Row `r` has position `pos_offset + r % pos_period`.
    pub pos_period: usize,
    pub pos_offset: usize,
}

/// Shape of a strided row copy (see `copy_rows_bf16` in the .cu file): row `r` of the source
/// goes to destination row `(r / rows_per_seq) * dst_seq_rows + dst_row_offset + r % rows_per_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRows {
    pub rows: usize,
    pub width: usize,
    pub src_stride: usize,
    pub src_col: usize,
    pub dst_stride: usize,
    pub dst_col: usize,
    pub rows_per_seq: usize,
    pub dst_seq_rows: usize,
    pub dst_row_offset: usize,
}

impl CopyRows {
    /// Destination row of source row `r`.
    pub fn dst_row(&self, r: usize) -> usize {
        (r / self.rows_per_seq) * self.dst_seq_rows + self.dst_row_offset + r % self.rows_per_seq
    }
}

/// Where the ids of an embedding gather sit: row `r` reads
/// `ids[(r / rows_per_seq)·seq_stride + offset + r % rows_per_seq]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdLayout {
    pub rows_per_seq: usize,
    pub seq_stride: usize,
    pub offset: usize,
}

impl IdLayout {
    /// Index into the id buffer of row `r`.
    pub fn index(&self, r: usize) -> usize {
        (r / self.rows_per_seq) * self.seq_stride + self.offset + r % self.rows_per_seq
    }
}

/// Shape of a fused RoPE + K/V cache write over a fused QKV matrix (see `rope_qkv_bf16` in the
/// .cu file): q heads at column 0, k heads at `k_col`, v heads at `v_col`, each head `head_dim`
/// wide; row `r` has position `pos_offset + r % pos_period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeQkvShape {
    pub rows: usize,
    /// Elements between consecutive rows.
    pub row_stride: usize,
    pub q_heads: usize,
    /// Heads of k and of v.
    pub kv_heads: usize,
    pub k_col: usize,
    pub v_col: usize,
    pub head_dim: usize,
    pub pos_period: usize,
    pub pos_offset: usize,
    /// The q and k heads are in the grouped pair layout of the GEMM's RoPE epilogue
    /// ([`super::rope_layout`]) instead of the half-split one.
    pub grouped: bool,
}

impl RopeQkvShape {
    /// Checks that caches of `k_len` / `v_len` elements with `seq_rows` rows per sequence hold
    /// every row this shape writes.
    pub fn check_cache(&self, k_len: usize, v_len: usize, seq_rows: usize) -> Result<()> {
        if seq_rows < self.pos_offset + self.pos_period {
            return Err(Error::invalid(format!(
                "rope_qkv: cache of {seq_rows} rows per sequence is shorter than the positions in {self:?}"
            )));
        }
        if self.rows == 0 {
            return Ok(());
        }
        let last = max_strided(self.rows, self.pos_period, |r| self.cache_row(r, seq_rows));
        let kvw = self.kv_width();
        need("rope_qkv k cache", k_len, (last + 1) * kvw)?;
        need("rope_qkv v cache", v_len, (last + 1) * kvw)
    }

    /// Width of one k (or v) row: `kv_heads · head_dim`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Cache row written for activation row `r` in a cache of `seq_rows` rows per sequence.
    pub fn cache_row(&self, r: usize, seq_rows: usize) -> usize {
        (r / self.pos_period) * seq_rows + self.pos_offset + r % self.pos_period
    }
}

/// Where [`Elementwise::rope_qkv`] also writes the rotated K and the V rows: caches of
/// `[sequences, seq_rows, kv_width]`.
pub struct KvDst<'a, 'b> {
    pub k: &'a mut CudaViewMut<'b, u16>,
    pub v: &'a mut CudaViewMut<'b, u16>,
    pub seq_rows: usize,
}

/// Where [`Elementwise::rope_qkv`] writes the rotated K and the V rows.
pub enum RopeDst<'a, 'b> {
    /// Nowhere: RoPE in place only.
    None,
    /// Batch caches ([`KvDst`]).
    Batch(KvDst<'a, 'b>),
    /// Each canvas's own cache, at its own positions ([`CanvasKvLayer`]): canvas `c` (rows
    /// `c·pos_period..`) at positions `starts[c] + r % pos_period`; the shape's `pos_offset`
    /// is not used.
    Canvases(&'a CanvasKvLayer<'b>),
}

impl<'a, 'b> From<Option<KvDst<'a, 'b>>> for RopeDst<'a, 'b> {
    /// Batch caches, or nowhere.
    fn from(cache: Option<KvDst<'a, 'b>>) -> Self {
        cache.map_or(RopeDst::None, RopeDst::Batch)
    }
}

/// The loaded element-wise kernels.
pub struct Elementwise {
    stream: Arc<CudaStream>,
    /// Launch with programmatic dependent launch ([`super::launch`]).
    pdl: bool,
    rmsnorm_bf16_fn: CudaFunction,
    rmsnorm_f32_fn: CudaFunction,
    rope_fn: CudaFunction,
    rope_qkv_fn: CudaFunction,
    rope_table_fn: CudaFunction,
    swiglu_fn: CudaFunction,
    swiglu_v8_fn: CudaFunction,
    embedding_fn: CudaFunction,
    bf16_to_f32_fn: CudaFunction,
    f32_to_bf16_fn: CudaFunction,
    gather_fn: CudaFunction,
    gather_bf16_fn: CudaFunction,
    copy_rows_fn: CudaFunction,
    fill_fn: CudaFunction,
    norm_heads_fn: CudaFunction,
}

impl Elementwise {
    /// Loads every kernel of `cuda/elementwise.cu`.
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        let f = |name: &str| dev.function("elementwise", name);
        Ok(Elementwise {
            stream: dev.stream.clone(),
            pdl: dev.pdl,
            rmsnorm_bf16_fn: f("rmsnorm_f32_bf16")?,
            rmsnorm_f32_fn: f("rmsnorm_f32_f32")?,
            rope_fn: f("rope_bf16")?,
            rope_qkv_fn: f("rope_qkv_bf16")?,
            rope_table_fn: f("rope_table_f32")?,
            swiglu_fn: f("swiglu_bf16")?,
            swiglu_v8_fn: f("swiglu_bf16_v8")?,
            embedding_fn: f("embedding_bf16_f32")?,
            bf16_to_f32_fn: f("bf16_to_f32")?,
            f32_to_bf16_fn: f("f32_to_bf16")?,
            gather_fn: f("gather_rows_f32")?,
            gather_bf16_fn: f("gather_rows_bf16")?,
            copy_rows_fn: f("copy_rows_bf16")?,
            fill_fn: f("fill_u32")?,
            norm_heads_fn: f("rmsnorm_heads_bf16")?,
        })
    }

    /// `out[r] = bf16(x[r] · rsqrt(mean(x[r]²) + eps) · w)` for `rows` rows of width `d`.
    pub fn rmsnorm_bf16(
        &self,
        x: &CudaView<f32>,
        w: &CudaView<f32>,
        out: &mut CudaViewMut<u16>,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        self.rmsnorm(
            &self.rmsnorm_bf16_fn,
            "rmsnorm_f32_bf16",
            x,
            w,
            out,
            (rows, d, eps),
        )
    }

    /// RMSNorm with fp32 output.
    pub fn rmsnorm_f32(
        &self,
        x: &CudaView<f32>,
        w: &CudaView<f32>,
        out: &mut CudaViewMut<f32>,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        self.rmsnorm(
            &self.rmsnorm_f32_fn,
            "rmsnorm_f32_f32",
            x,
            w,
            out,
            (rows, d, eps),
        )
    }

    /// Shared launcher of the two RMSNorm kernels (they differ only in the output type).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm<T: DeviceRepr>(
        &self,
        f: &CudaFunction,
        name: &str,
        x: &CudaView<f32>,
        w: &CudaView<f32>,
        out: &mut CudaViewMut<T>,
        (rows, d, eps): (usize, usize, f32),
    ) -> Result<()> {
        need("rmsnorm x", x.len(), rows * d)?;
        need("rmsnorm weight", w.len(), d)?;
        need("rmsnorm out", out.len(), rows * d)?;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let d32 = to_i32("rmsnorm d", d)?;
        let aligned = {
            let (xp, _g1) = x.device_ptr(&self.stream);
            let (wp, _g2) = w.device_ptr(&self.stream);
            let (op, _g3) = out.device_ptr(&self.stream);
            xp % 16 == 0 && wp % 16 == 0 && op % 16 == 0
        };
        let vec = i32::from(aligned && rmsnorm_vec_fits(d));
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = Launch::new(&self.stream, f, self.pdl);
        b.arg(x).arg(w).arg(out).arg(&d32).arg(&eps).arg(&vec);
        // SAFETY: x, w, out hold at least rows*d, d, rows*d elements (checked above); the kernel
        // reads/writes exactly those ranges with one block per row. The float4 path runs only
        // with 16-byte aligned views and d a multiple of 4 that its registers hold
        // (rmsnorm_vec_fits), so every vector access is aligned and inside its row.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launch {name}"), e))?;
        Ok(())
    }

    /// RoPE in place on the q and k heads of `buf` (bf16), `inv_freq` from
    /// [`cpu::rope_inv_freq`] uploaded once.
    pub fn rope(
        &self,
        buf: &mut CudaViewMut<u16>,
        inv_freq: &CudaView<f32>,
        s: RopeShape,
    ) -> Result<()> {
        if !s.head_dim.is_multiple_of(2) || s.pos_period == 0 {
            return Err(Error::invalid(format!("elementwise rope: bad shape {s:?}")));
        }
        need("rope inv_freq", inv_freq.len(), s.head_dim / 2)?;
        let q_end = s.q_heads * s.head_dim;
        let k_end = s.k_col + s.k_heads * s.head_dim;
        if q_end > s.row_stride || (s.k_heads > 0 && k_end > s.row_stride) {
            return Err(Error::invalid(format!(
                "elementwise rope: heads exceed the row stride in {s:?}"
            )));
        }
        if s.rows == 0 {
            return Ok(());
        }
        need(
            "rope buf",
            buf.len(),
            (s.rows - 1) * s.row_stride + q_end.max(k_end),
        )?;
        let args = [
            to_i32("rope rows", s.rows)?,
            to_i32("rope row_stride", s.row_stride)?,
            to_i32("rope q_heads", s.q_heads)?,
            to_i32("rope k_heads", s.k_heads)?,
            to_i32("rope k_col", s.k_col)?,
            to_i32("rope head_dim", s.head_dim)?,
            to_i32("rope pos_period", s.pos_period)?,
            to_i32("rope pos_offset", s.pos_offset)?,
        ];
        to_i32("rope last position", s.pos_offset + s.pos_period)?;
        let total = s.rows * (s.q_heads + s.k_heads) * (s.head_dim / 2);
        let mut b = Launch::new(&self.stream, &self.rope_fn, self.pdl);
        b.arg(buf).arg(inv_freq);
        for a in &args {
            b.arg(a);
        }
        // SAFETY: every (row, head, i) touched lies inside rows*row_stride, checked above.
        unsafe { b.launch(grid_for(total)) }.map_err(|e| cuda_err("launch rope_bf16", e))?;
        Ok(())
    }

    /// `out[r, j] = silu(gu[r, j]) · gu[r, h + j]` for `rows` rows (`gu` is `[rows, 2h]`); 16-byte
    /// accesses when `h % 8 == 0` and both views are 16-byte aligned.
    pub fn swiglu(
        &self,
        gu: &CudaView<u16>,
        out: &mut CudaViewMut<u16>,
        rows: usize,
        h: usize,
    ) -> Result<()> {
        self.swiglu_variant(gu, out, rows, h, true)
    }

    /// [`Elementwise::swiglu`]; `allow_vec = false` forces the scalar kernel (checks).
    pub fn swiglu_variant(
        &self,
        gu: &CudaView<u16>,
        out: &mut CudaViewMut<u16>,
        rows: usize,
        h: usize,
        allow_vec: bool,
    ) -> Result<()> {
        need("swiglu gate|up", gu.len(), rows * 2 * h)?;
        need("swiglu out", out.len(), rows * h)?;
        if rows * h == 0 {
            return Ok(());
        }
        let (r32, h32) = (to_i32("swiglu rows", rows)?, to_i32("swiglu h", 2 * h)? / 2);
        let aligned = {
            let (gp, _g1) = gu.device_ptr(&self.stream);
            let (op, _g2) = out.device_ptr(&self.stream);
            gp % 16 == 0 && op % 16 == 0
        };
        let vec = allow_vec && h.is_multiple_of(8) && aligned;
        let (f, total) = if vec {
            (&self.swiglu_v8_fn, rows * h / 8)
        } else {
            (&self.swiglu_fn, rows * h)
        };
        let mut b = Launch::new(&self.stream, f, self.pdl);
        b.arg(gu).arg(out).arg(&r32).arg(&h32);
        // SAFETY: lengths checked above; the 16-byte kernel runs only with h % 8 == 0 and
        // 16-byte aligned views, so every vector access is aligned and inside its row.
        unsafe { b.launch(grid_for(total)) }.map_err(|e| cuda_err("launch swiglu", e))?;
        Ok(())
    }

    /// `table[2 (p · half + i) ..][..2] = (cos, sin)(p · inv_freq[i])` for `p < positions`,
    /// `i < half` (fp32, `rope_qkv_bf16`'s arithmetic): the table of the GEMM's RoPE epilogue.
    pub fn rope_table(
        &self,
        table: &mut CudaSlice<f32>,
        inv_freq: &CudaView<f32>,
        positions: usize,
        half: usize,
    ) -> Result<()> {
        let total = positions
            .checked_mul(half)
            .filter(|&t| t <= i32::MAX as usize)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "elementwise rope_table: {positions} positions × {half} do not fit in i32"
                ))
            })?;
        need("rope_table inv_freq", inv_freq.len(), half)?;
        need("rope_table table", table.len(), 2 * total)?;
        if total == 0 {
            return Ok(());
        }
        let (p, h) = (positions as i32, half as i32);
        let mut b = Launch::new(&self.stream, &self.rope_table_fn, self.pdl);
        b.arg(table).arg(inv_freq).arg(&p).arg(&h);
        // SAFETY: the kernel writes float2 t < positions·half of `table` (2·total floats,
        // checked) and reads inv_freq[i < half] (checked).
        unsafe { b.launch(grid_for(total)) }.map_err(|e| cuda_err("launch rope_table_f32", e))
    }

    /// RMSNorm of every q head (weights `q_w`) and k head (`k_w`, `head_dim` each) of `qkv` in
    /// place, laid out as `shape` says (its positions, v columns and cache are not used; the
    /// heads must be in the half-split layout, not the grouped one): LLaDA-MoE's q/k norms.
    pub fn rmsnorm_heads(
        &self,
        qkv: &mut CudaViewMut<u16>,
        (q_w, k_w): (&CudaView<f32>, &CudaView<f32>),
        shape: &RopeQkvShape,
        eps: f32,
    ) -> Result<()> {
        let s = shape;
        let heads = s.q_heads + s.kv_heads;
        if s.rows == 0 || heads == 0 {
            return Ok(());
        }
        if s.grouped
            || s.head_dim == 0
            || s.q_heads * s.head_dim > s.k_col
            || s.k_col + s.kv_heads * s.head_dim > s.row_stride
        {
            return Err(Error::invalid(format!(
                "elementwise rmsnorm_heads: heads do not fit the rows of {s:?}"
            )));
        }
        need(
            "rmsnorm_heads qkv",
            qkv.len(),
            (s.rows - 1) * s.row_stride + s.k_col + s.kv_heads * s.head_dim,
        )?;
        need("rmsnorm_heads q weight", q_w.len(), s.head_dim)?;
        need("rmsnorm_heads k weight", k_w.len(), s.head_dim)?;
        let items = s.rows * heads;
        let warps = (ROW_THREADS / 32) as usize;
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(items.div_ceil(warps)).map_err(|_| {
                    Error::invalid(format!("elementwise rmsnorm_heads: {items} heads"))
                })?,
                1,
                1,
            ),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let i = |v| to_i32("rmsnorm_heads shape", v);
        let (rows, stride, qh) = (i(s.rows)?, i(s.row_stride)?, i(s.q_heads)?);
        let (kvh, kcol, hd) = (i(s.kv_heads)?, i(s.k_col)?, i(s.head_dim)?);
        let mut b = Launch::new(&self.stream, &self.norm_heads_fn, self.pdl);
        b.arg(qkv)
            .arg(&rows)
            .arg(&stride)
            .arg(&qh)
            .arg(&kvh)
            .arg(&kcol)
            .arg(&hd)
            .arg(q_w)
            .arg(k_w)
            .arg(&eps);
        // SAFETY: every head of every row lies inside qkv (checked above), the weights hold
        // head_dim values each (checked).
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch rmsnorm_heads_bf16", e))
    }

    /// Fused RoPE on the q and k heads of `qkv` (in place) and the write of the rotated K and
    /// of V where `dst` says ([`RopeDst`]): the batch cache rows [`RopeQkvShape::cache_row`],
    /// each canvas's own cache (the packed cached steps), or nowhere. One launch replaces
    /// [`Elementwise::rope`] plus two [`Elementwise::copy_rows_bf16`].
    /// `bias` (fp32, one value per qkv column, at least up to the end of the v columns) is
    /// added to q, k and v first (projection biases; v is updated in place). `prefetch`: a
    /// buffer the following kernels read, requested into L2 by the launch (a hint: skipped
    /// unless 16-byte aligned; its whole 16-byte units).
    pub fn rope_qkv(
        &self,
        qkv: &mut CudaViewMut<u16>,
        inv_freq: &CudaView<f32>,
        bias: Option<&CudaView<f32>>,
        s: RopeQkvShape,
        dst: RopeDst<'_, '_>,
        prefetch: Option<&CudaView<u16>>,
    ) -> Result<()> {
        self.rope_qkv_variant(qkv, inv_freq, bias, s, dst, true, prefetch)
    }

    /// [`Elementwise::rope_qkv`]; `allow_vec = false` forces the scalar path (checks).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qkv_variant(
        &self,
        qkv: &mut CudaViewMut<u16>,
        inv_freq: &CudaView<f32>,
        bias: Option<&CudaView<f32>>,
        s: RopeQkvShape,
        dst: RopeDst<'_, '_>,
        allow_vec: bool,
        prefetch: Option<&CudaView<u16>>,
    ) -> Result<()> {
        let bad = |why: &str| Error::invalid(format!("elementwise rope_qkv: {why} in {s:?}"));
        if !s.head_dim.is_multiple_of(2) || s.head_dim == 0 || s.head_dim / 2 > ROPE_MAX_HALF {
            return Err(bad("head_dim must be even and at most 1024"));
        }
        if s.grouped && !super::rope_layout::supported(s.head_dim) {
            return Err(bad("the grouped layout needs head_dim a multiple of 16"));
        }
        if s.pos_period == 0 {
            return Err(bad("pos_period must be positive"));
        }
        need("rope_qkv inv_freq", inv_freq.len(), s.head_dim / 2)?;
        let kvw = s.kv_width();
        let ranges = [
            (0, s.q_heads * s.head_dim),
            (s.k_col, s.k_col + kvw),
            (s.v_col, s.v_col + kvw),
        ];
        if ranges.iter().any(|r| r.1 > s.row_stride) {
            return Err(bad("heads exceed the row stride"));
        }
        let overlap = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
        if kvw > 0
            && (overlap(ranges[0], ranges[1])
                || overlap(ranges[0], ranges[2])
                || overlap(ranges[1], ranges[2]))
        {
            return Err(bad("q, k and v columns overlap"));
        }
        if s.rows == 0 {
            return Ok(());
        }
        let row_end = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        need(
            "rope_qkv qkv",
            qkv.len(),
            (s.rows - 1) * s.row_stride + row_end,
        )?;
        if let Some(b) = bias {
            need("rope_qkv bias", b.len(), row_end)?;
        }
        if s.rows > i32::MAX as usize {
            return Err(bad("too many rows"));
        }
        let args = [
            to_i32("rope_qkv row_stride", s.row_stride)?,
            to_i32("rope_qkv q_heads", s.q_heads)?,
            to_i32("rope_qkv kv_heads", s.kv_heads)?,
            to_i32("rope_qkv k_col", s.k_col)?,
            to_i32("rope_qkv v_col", s.v_col)?,
            to_i32("rope_qkv head_dim", s.head_dim)?,
            to_i32("rope_qkv pos_period", s.pos_period)?,
            to_i32("rope_qkv pos_offset", s.pos_offset)?,
        ];
        to_i32("rope_qkv last position", s.pos_offset + s.pos_period)?;
        let qkv_ptr = qkv.device_ptr(&self.stream).0;
        let mut aligned = qkv_ptr % 16 == 0;
        let null: u64 = 0;
        let (mut kp, mut vp, mut seq_rows) = (null, null, 0i32);
        let (mut starts_p, mut table_p) = (null, null);
        let mut guards = Vec::new();
        match dst {
            RopeDst::None => {}
            RopeDst::Batch(c) => {
                s.check_cache(c.k.len(), c.v.len(), c.seq_rows)?;
                seq_rows = to_i32("rope_qkv cache rows", c.seq_rows)?;
                let (k, gk) = c.k.device_ptr_mut(&self.stream);
                let (v, gv) = c.v.device_ptr_mut(&self.stream);
                aligned &= k % 16 == 0 && v % 16 == 0;
                (kp, vp) = (k, v);
                guards.push(gk);
                guards.push(gv);
            }
            RopeDst::Canvases(c) => {
                let n = c.host.canvases();
                if s.rows != n * s.pos_period || c.kv_width != kvw {
                    return Err(bad(&format!(
                        "{n} canvases of {} rows of width {} do not make these rows",
                        s.pos_period, c.kv_width
                    )));
                }
                need("rope_qkv canvas table", c.table.len(), 2 * n)?;
                need("rope_qkv canvas starts", c.starts.len(), n)?;
                c.host.check_rows(s.pos_period)?;
                aligned &= c.host.aligned;
                let (t, gt) = c.table.device_ptr(&self.stream);
                let (st, gs) = c.starts.device_ptr(&self.stream);
                (table_p, starts_p) = (t, st);
                guards.push(gt);
                guards.push(gs);
            }
        }
        let vec = allow_vec
            && aligned
            && s.head_dim.is_multiple_of(16)
            && s.row_stride.is_multiple_of(8)
            && s.k_col.is_multiple_of(8)
            && s.v_col.is_multiple_of(8);
        let vec_i = i32::from(vec);
        let cfg = LaunchConfig {
            grid_dim: (s.rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let bias_ptr: u64 = bias.map_or(0, |b| b.device_ptr(&self.stream).0);
        let mut b = Launch::new(&self.stream, &self.rope_qkv_fn, self.pdl);
        b.arg(qkv).arg(inv_freq).arg(&bias_ptr).arg(&kp).arg(&vp);
        for a in &args {
            b.arg(a);
        }
        b.arg(&seq_rows).arg(&vec_i);
        let (pf_ptr, pf_bytes) = prefetch
            .map(|p| (p.device_ptr(&self.stream).0, (p.len() * 2) as i64 & !15))
            .filter(|&(ptr, bytes)| ptr % 16 == 0 && bytes > 0)
            .unwrap_or((0, 0));
        b.arg(&pf_ptr).arg(&pf_bytes);
        let grouped = i32::from(s.grouped);
        b.arg(&grouped).arg(&starts_p).arg(&table_p);
        // SAFETY: argument order and types match `rope_qkv_bf16`; with per-canvas caches, the
        // rows are exactly canvases × pos_period, the table holds 2 · canvases addresses of live
        // buffers of at least `rows` rows each and every canvas's positions lie below them
        // (CanvasHost::check_rows, on the host copy uploaded with the table); the grouped layout keeps every
        // pair inside its head (head_dim a multiple of 16, checked above); the L2 prefetch (a hint that
        // reads nothing into the kernel) covers whole 16-byte units of a live, aligned view; every row touched lies inside
        // the qkv view and every cache row inside the cache views (checked above), the bias
        // (when present) covers every column read (checked above); the q, k and
        // v column ranges are disjoint, so no thread reads what another writes; the vector path
        // runs only with 16-byte aligned bases, strides and columns.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launch rope_qkv_bf16", e))?;
        drop(guards);
        Ok(())
    }

    /// `out[r] = f32(table[ids[r]])` for `rows` ids; ids ≥ `vocab` give NaN rows.
    pub fn embedding(
        &self,
        table: &CudaView<u16>,
        ids: &CudaView<u32>,
        out: &mut CudaViewMut<f32>,
        rows: usize,
        d: usize,
        vocab: usize,
    ) -> Result<()> {
        let layout = IdLayout {
            rows_per_seq: rows.max(1),
            seq_stride: 0,
            offset: 0,
        };
        self.embedding_strided(table, ids, out, rows, d, vocab, layout)
    }

    /// Embedding of a slice of each canvas of an id matrix: row `r` reads the id at
    /// `(r / rows_per_seq)·seq_stride + offset + r % rows_per_seq` (see [`IdLayout`]).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_strided(
        &self,
        table: &CudaView<u16>,
        ids: &CudaView<u32>,
        out: &mut CudaViewMut<f32>,
        rows: usize,
        d: usize,
        vocab: usize,
        l: IdLayout,
    ) -> Result<()> {
        if rows * d == 0 {
            return Ok(());
        }
        if l.rows_per_seq == 0 {
            return Err(Error::invalid(
                "elementwise embedding: rows_per_seq must be positive",
            ));
        }
        need("embedding table", table.len(), vocab * d)?;
        need(
            "embedding ids",
            ids.len(),
            max_strided(rows, l.rows_per_seq, |r| l.index(r)) + 1,
        )?;
        need("embedding out", out.len(), rows * d)?;
        let a = [
            to_i32("embedding rows", rows)?,
            to_i32("embedding d", d)?,
            to_i32("embedding vocab", vocab)?,
            to_i32("embedding rows_per_seq", l.rows_per_seq)?,
            to_i32("embedding seq_stride", l.seq_stride)?,
            to_i32("embedding offset", l.offset)?,
        ];
        let mut b = Launch::new(&self.stream, &self.embedding_fn, self.pdl);
        b.arg(table).arg(ids).arg(out);
        for x in &a {
            b.arg(x);
        }
        // SAFETY: lengths checked above (the largest id index is the last row's, or the end of
        // the first sequence when strides are small); ids are bounds-checked in the kernel.
        unsafe { b.launch(grid_for(rows * d)) }
            .map_err(|e| cuda_err("launch embedding_bf16_f32", e))?;
        Ok(())
    }

    /// Widens `n` bf16 values to f32.
    pub fn bf16_to_f32(
        &self,
        src: &CudaView<u16>,
        dst: &mut CudaViewMut<f32>,
        n: usize,
    ) -> Result<()> {
        self.convert(&self.bf16_to_f32_fn, "bf16_to_f32", src, dst, n)
    }

    /// Rounds `n` f32 values to bf16 (nearest even).
    pub fn f32_to_bf16(
        &self,
        src: &CudaView<f32>,
        dst: &mut CudaViewMut<u16>,
        n: usize,
    ) -> Result<()> {
        self.convert(&self.f32_to_bf16_fn, "f32_to_bf16", src, dst, n)
    }

    /// One launch of the element-wise conversion kernel `f` (`src`, `dst`, `n` as i64; one
    /// output per input) over `n` values.
    fn convert<S: DeviceRepr, D: DeviceRepr>(
        &self,
        f: &CudaFunction,
        name: &str,
        src: &CudaView<S>,
        dst: &mut CudaViewMut<D>,
        n: usize,
    ) -> Result<()> {
        need(&format!("{name} src"), src.len(), n)?;
        need(&format!("{name} dst"), dst.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as i64;
        let mut b = Launch::new(&self.stream, f, self.pdl);
        b.arg(src).arg(dst).arg(&n64);
        // SAFETY: lengths checked above; the kernel reads src[i] and writes dst[i] for i < n.
        unsafe { b.launch(grid_for(n)) }.map_err(|e| cuda_err(&format!("launch {name}"), e))?;
        Ok(())
    }

    /// `out[i] = src[idx[i]]` for `n_idx` rows of width `d`; `src_rows` bounds the indices
    /// (checked on the host by the caller that built `idx`; documented here for the contract).
    pub fn gather_rows_f32(
        &self,
        src: &CudaView<f32>,
        idx: &CudaView<i32>,
        out: &mut CudaViewMut<f32>,
        n_idx: usize,
        d: usize,
    ) -> Result<()> {
        need("gather idx", idx.len(), n_idx)?;
        need("gather out", out.len(), n_idx * d)?;
        if n_idx * d == 0 {
            return Ok(());
        }
        let (n32, d32) = (to_i32("gather rows", n_idx)?, to_i32("gather d", d)?);
        let mut b = Launch::new(&self.stream, &self.gather_fn, self.pdl);
        b.arg(src).arg(idx).arg(out).arg(&n32).arg(&d32);
        // SAFETY: out and idx lengths checked; every index was validated against src's row
        // count by the caller when the index list was built.
        unsafe { b.launch(grid_for(n_idx * d)) }
            .map_err(|e| cuda_err("launch gather_rows_f32", e))?;
        Ok(())
    }

    /// `out[i, 0..width] = src[idx[i] · src_stride + 0..width]` (bf16) for every row `i` of
    /// `idx`: the query rows' q out of the fused QKV matrix. `src_rows` rows of `src` are
    /// addressable (checked against its length); the caller built `idx` below `src_rows`.
    pub fn gather_rows_bf16(
        &self,
        src: &CudaView<u16>,
        src_rows: usize,
        src_stride: usize,
        idx: &CudaView<i32>,
        out: &mut CudaViewMut<u16>,
        width: usize,
    ) -> Result<()> {
        let n_idx = idx.len();
        if n_idx == 0 || width == 0 {
            return Ok(());
        }
        if width > src_stride || src_rows == 0 {
            return Err(Error::invalid(format!(
                "elementwise gather_rows_bf16: {width} columns of {src_rows} rows of stride {src_stride}"
            )));
        }
        need(
            "gather_bf16 src",
            src.len(),
            (src_rows - 1) * src_stride + width,
        )?;
        need("gather_bf16 idx", idx.len(), n_idx)?;
        need("gather_bf16 out", out.len(), n_idx * width)?;
        let a = [
            to_i32("gather_bf16 src_stride", src_stride)?,
            to_i32("gather_bf16 rows", n_idx)?,
            to_i32("gather_bf16 width", width)?,
        ];
        let mut b = Launch::new(&self.stream, &self.gather_bf16_fn, self.pdl);
        b.arg(src)
            .arg(&a[0])
            .arg(idx)
            .arg(out)
            .arg(&a[1])
            .arg(&a[2]);
        // SAFETY: out holds n_idx rows of width; src holds src_rows rows and the caller's
        // indices are below src_rows.
        unsafe { b.launch(grid_for(n_idx * width)) }
            .map_err(|e| cuda_err("launch gather_rows_bf16", e))?;
        Ok(())
    }

    /// Strided bf16 row copy (K/V cache scatter, Q extraction); see [`CopyRows`].
    pub fn copy_rows_bf16(
        &self,
        src: &CudaView<u16>,
        dst: &mut CudaViewMut<u16>,
        c: CopyRows,
    ) -> Result<()> {
        if c.rows == 0 || c.width == 0 {
            return Ok(());
        }
        if c.rows_per_seq == 0
            || c.src_col + c.width > c.src_stride
            || c.dst_col + c.width > c.dst_stride
        {
            return Err(Error::invalid(format!(
                "elementwise copy_rows: bad shape {c:?}"
            )));
        }
        need(
            "copy_rows src",
            src.len(),
            (c.rows - 1) * c.src_stride + c.src_col + c.width,
        )?;
        let max_row = max_strided(c.rows, c.rows_per_seq, |r| c.dst_row(r));
        need(
            "copy_rows dst",
            dst.len(),
            max_row * c.dst_stride + c.dst_col + c.width,
        )?;
        let a = [
            to_i32("copy_rows src_stride", c.src_stride)?,
            to_i32("copy_rows src_col", c.src_col)?,
            to_i32("copy_rows dst_stride", c.dst_stride)?,
            to_i32("copy_rows dst_col", c.dst_col)?,
            to_i32("copy_rows rows", c.rows)?,
            to_i32("copy_rows width", c.width)?,
            to_i32("copy_rows rows_per_seq", c.rows_per_seq)?,
            to_i32("copy_rows dst_seq_rows", c.dst_seq_rows)?,
            to_i32("copy_rows dst_row_offset", c.dst_row_offset)?,
        ];
        let mut b = Launch::new(&self.stream, &self.copy_rows_fn, self.pdl);
        b.arg(src)
            .arg(&a[0])
            .arg(&a[1])
            .arg(dst)
            .arg(&a[2])
            .arg(&a[3]);
        for x in &a[4..] {
            b.arg(x);
        }
        // SAFETY: the largest source and destination offsets were checked against the views.
        unsafe { b.launch(grid_for(c.rows * c.width)) }
            .map_err(|e| cuda_err("launch copy_rows_bf16", e))?;
        Ok(())
    }

    /// Fills an f32 buffer with the bit pattern `bits` (poisoning before a check).
    pub fn fill_f32_bits(&self, out: &mut CudaViewMut<f32>, bits: u32) -> Result<()> {
        let n = out.len();
        if n == 0 {
            return Ok(());
        }
        let n64 = n as i64;
        let mut b = Launch::new(&self.stream, &self.fill_fn, self.pdl);
        b.arg(out).arg(&bits).arg(&n64);
        // SAFETY: writes exactly out.len() 32-bit words, the size of the f32 view.
        unsafe { b.launch(grid_for(n)) }.map_err(|e| cuda_err("launch fill_u32", e))?;
        Ok(())
    }
}

mod checks;
pub use checks::{bench, self_check};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_index_maps_and_their_maximum() {
        let l = IdLayout {
            rows_per_seq: 4,
            seq_stride: 10,
            offset: 3,
        };
        assert_eq!(
            (0..8).map(|r| l.index(r)).collect::<Vec<_>>(),
            vec![3, 4, 5, 6, 13, 14, 15, 16]
        );
        let brute = |rows: usize, f: &dyn Fn(usize) -> usize| (0..rows).map(f).max().unwrap();
        for rows in 1..12 {
            for rps in 1..6 {
                for stride in [0usize, 2, 7] {
                    let l = IdLayout {
                        rows_per_seq: rps,
                        seq_stride: stride,
                        offset: 1,
                    };
                    assert_eq!(
                        max_strided(rows, rps, |r| l.index(r)),
                        brute(rows, &|r| l.index(r)),
                        "{rows} {rps} {stride}"
                    );
                }
            }
        }
        let c = CopyRows {
            rows: 6,
            width: 7,
            src_stride: 19,
            src_col: 5,
            dst_stride: 9,
            dst_col: 1,
            rows_per_seq: 3,
            dst_seq_rows: 10,
            dst_row_offset: 4,
        };
        assert_eq!(
            (0..6).map(|r| c.dst_row(r)).collect::<Vec<_>>(),
            vec![4, 5, 6, 14, 15, 16]
        );
    }

    #[test]
    fn rmsnorm_vector_path_takes_only_rows_its_threads_cover() {
        // 256 threads x 8 float4 = 8192 floats: the model widths (4096) fit, odd widths do not.
        assert!(rmsnorm_vec_fits(4096) && rmsnorm_vec_fits(8192) && rmsnorm_vec_fits(388));
        assert!(!rmsnorm_vec_fits(8196) && !rmsnorm_vec_fits(389) && !rmsnorm_vec_fits(4094));
    }

    #[test]
    fn rope_qkv_cache_rows_follow_each_sequence_block() {
        // 2 sequences of a 3-row block at positions 5..8, cache of 10 rows per sequence.
        let s = RopeQkvShape {
            rows: 6,
            row_stride: 40,
            q_heads: 2,
            kv_heads: 1,
            k_col: 16,
            v_col: 24,
            head_dim: 8,
            pos_period: 3,
            pos_offset: 5,
            grouped: false,
        };
        assert_eq!(s.kv_width(), 8);
        assert_eq!(
            (0..6).map(|r| s.cache_row(r, 10)).collect::<Vec<_>>(),
            vec![5, 6, 7, 15, 16, 17]
        );
        assert_eq!(max_strided(6, 3, |r| s.cache_row(r, 10)), 17);
    }
}
