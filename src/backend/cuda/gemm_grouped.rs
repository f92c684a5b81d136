//! Host side of `gemm_grouped_mg{1..8}` and `gemm_grouped_seq_mg{1..8}` (cuda/gemm_grouped.cu, the input
//! rows gathered or in order): every expert of a mixture-of-experts
//! layer in one launch. The rows were grouped by expert on the device (`moe_group` in
//! cuda/moe.cu, [`super::moe`]): expert `e` owns rows `off[e]..off[e] + cnt[e]` of the output,
//! and output row `i` reads input row `a_rows[i]`. The kernel is the skinny GEMM's body with
//! gathered input rows, one block per (chunk of `8·G` rows, weight tile, expert); the host picks
//! `G` and the chunk count from the most rows one expert can receive (every row picks an expert
//! at most once, so the row count): blocks past their expert's rows return at once.

use super::gemm::{check_align, Epilogue, GemmOut};
use super::launch::Launch;
use super::{cuda_err, CudaDevice};
use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, CudaView, DevicePtr, LaunchConfig, PushKernelArg};

/// Output rows per 8-token mma group of the skinny body.
const GROUP_ROWS: usize = 8;
/// Most mma groups of one chunk (`gemm_grouped_mg8`).
const MAX_GROUPS: usize = 8;
/// Weight rows per block and threads per block (`SKINNY_ROWS`, `SKINNY_THREADS` in
/// cuda/gemm_skinny.cuh).
const BLOCK_ROWS: usize = 64;
const THREADS: u32 = 128;
/// The grid's z extent (one expert per z index) is at most this.
pub const MAX_EXPERTS: usize = 65_535;

/// The grouping of a grouped GEMM's rows (device buffers written by `moe_group`).
pub struct Groups<'a, 'b> {
    /// `[pairs]`: the input row of each output row; `None`: output row `i` reads input row
    /// `i` (the input already in grouped order).
    pub a_rows: Option<&'a CudaView<'b, i32>>,
    /// `[experts]`: each expert's first output row and row count.
    pub off: &'a CudaView<'b, i32>,
    pub cnt: &'a CudaView<'b, i32>,
    /// Output rows in all.
    pub pairs: usize,
    /// At least every expert's row count (the kernel's rows per chunk and its chunk count come
    /// from it, [`launch_grid`]: rows past it would be left unwritten). A forward's row count
    /// bounds them all, each row choosing an expert at most once.
    pub max_rows: usize,
}

/// The grouped GEMM's launch: `groups` mma groups per chunk (`gemm_grouped_mg{groups}`), the
/// grid `(chunks, tiles, experts)` of 128-thread blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchGrid {
    pub groups: usize,
    pub chunks: usize,
    pub tiles: usize,
    pub experts: usize,
}

/// The launch for experts of at most `max_rows` rows each and `n` output columns.
pub fn launch_grid(max_rows: usize, n: usize, experts: usize) -> LaunchGrid {
    let groups = groups_for(max_rows);
    LaunchGrid {
        groups,
        chunks: max_rows.div_ceil(GROUP_ROWS * groups).max(1),
        tiles: n.div_ceil(BLOCK_ROWS),
        experts,
    }
}

/// The shape of a grouped GEMM: `experts` weight matrices of `[n, k]` stacked in one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupedShape {
    pub experts: usize,
    pub n: usize,
    pub k: usize,
    /// Rows of the input matrix (`a_rows` indexes below it; without `a_rows`, at least the
    /// output's rows).
    pub a_rows: usize,
}

/// The loaded grouped GEMM kernels.
pub struct GroupedGemm {
    /// `gemm_grouped_mg{1..8}` (gathered rows) and `gemm_grouped_seq_mg{1..8}` (rows in order).
    gather: Vec<CudaFunction>,
    in_order: Vec<CudaFunction>,
}

/// The kernel's mma groups per chunk for experts of up to `max_rows` rows.
pub fn groups_for(max_rows: usize) -> usize {
    max_rows.div_ceil(GROUP_ROWS).clamp(1, MAX_GROUPS)
}

/// Checks a grouped GEMM's shape, buffer lengths and epilogue without a device: the kernel
/// reads `a` rows below `shape.a_rows` (the grouping's rows were built below it, or, without
/// a row map (`rows_len` `None`), the `pairs` output rows' own), every expert's `[n, k]`
/// weights, and writes `pairs` output rows.
pub fn validate(
    shape: GroupedShape,
    (a_len, w_len, out_covers): (usize, usize, usize),
    groups: (Option<usize>, usize, usize, usize),
    epi: Epilogue,
) -> Result<()> {
    let GroupedShape {
        experts,
        n,
        k,
        a_rows,
    } = shape;
    let (rows_len, off_len, cnt_len, pairs) = groups;
    let bad = |why: String| Err(Error::invalid(format!("grouped gemm: {why}")));
    if experts == 0 || experts > MAX_EXPERTS {
        return bad(format!("{experts} experts (1..={MAX_EXPERTS})"));
    }
    if n == 0 || k == 0 || !n.is_multiple_of(8) || !k.is_multiple_of(8) {
        return bad(format!("n={n}, k={k} must be positive multiples of 8"));
    }
    if n > i32::MAX as usize || k > i32::MAX as usize || pairs > i32::MAX as usize {
        return bad(format!("n={n}, k={k}, {pairs} rows exceed i32"));
    }
    match epi {
        Epilogue::StoreBf16 | Epilogue::StoreF32 => {}
        Epilogue::SwigluBf16 if n.is_multiple_of(16) => {}
        Epilogue::SwigluBf16 => return bad(format!("the fused SwiGLU needs n % 16 == 0, n={n}")),
        other => return bad(format!("no {other:?} epilogue")),
    }
    let need = |what: &str, have: usize, want: Option<usize>| match want {
        Some(w) if have >= w => Ok(()),
        _ => bad(format!("{what} holds {have} elements, needs {want:?}")),
    };
    need("A", a_len, a_rows.checked_mul(k))?;
    need(
        "W",
        w_len,
        experts.checked_mul(n).and_then(|x| x.checked_mul(k)),
    )?;
    need("C", out_covers, pairs.checked_mul(n))?;
    match rows_len {
        Some(len) => need("a_rows", len, Some(pairs))?,
        None if a_rows < pairs => {
            return bad(format!("{pairs} rows in order from an input of {a_rows}"))
        }
        None => {}
    }
    need("off", off_len, Some(experts))?;
    need("cnt", cnt_len, Some(experts))?;
    if a_rows == 0 && pairs > 0 {
        return bad("rows to gather but an empty input".into());
    }
    Ok(())
}

impl GroupedGemm {
    /// Loads both kernel families from the `gemm_grouped` module.
    pub fn load(dev: &CudaDevice) -> Result<GroupedGemm> {
        let family = |name: &str| {
            (1..=MAX_GROUPS)
                .map(|g| dev.function("gemm_grouped", &format!("{name}{g}")))
                .collect::<Result<Vec<_>>>()
        };
        Ok(GroupedGemm {
            gather: family("gemm_grouped_mg")?,
            in_order: family("gemm_grouped_seq_mg")?,
        })
    }

    /// `out[i] = a[a_rows[i]] · W_eᵀ` for every output row `i` of expert `e`, through `out`'s
    /// epilogue (bf16, fp32, or the fused SwiGLU of interleaved gate/up rows). `w` holds the
    /// experts' `[n, k]` matrices back to back.
    pub fn run(
        &self,
        dev: &CudaDevice,
        a: &CudaView<u16>,
        w: &CudaView<u16>,
        mut out: GemmOut<'_>,
        groups: &Groups,
        shape: GroupedShape,
    ) -> Result<()> {
        let epi = out.epilogue();
        validate(
            shape,
            (a.len(), w.len(), out.covers()),
            (
                groups.a_rows.map(|r| r.len()),
                groups.off.len(),
                groups.cnt.len(),
                groups.pairs,
            ),
            epi,
        )?;
        if groups.pairs == 0 {
            return Ok(());
        }
        check_align("A", a.device_ptr(&dev.stream).0, 16)?;
        check_align("W", w.device_ptr(&dev.stream).0, 16)?;
        let (addr, align) = out.addr_and_align(dev);
        check_align("C", addr, align)?;
        if groups.max_rows > groups.pairs {
            return Err(Error::invalid(format!(
                "grouped gemm: experts of {} rows among {} rows in all",
                groups.max_rows, groups.pairs
            )));
        }
        let LaunchGrid {
            groups: g,
            chunks,
            tiles,
            ..
        } = launch_grid(groups.max_rows, shape.n, shape.experts);
        if chunks > i32::MAX as usize || tiles > 65_535 {
            return Err(Error::invalid(format!(
                "grouped gemm: {chunks} row chunks × {tiles} weight tiles exceed the grid"
            )));
        }
        let (f, kname) = match groups.a_rows {
            Some(_) => (&self.gather[g - 1], "gemm_grouped_mg"),
            None => (&self.in_order[g - 1], "gemm_grouped_seq_mg"),
        };
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, tiles as u32, shape.experts as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // validate() bounded n, k by i32::MAX and the weights' length by experts · n · k.
        let (ni, ki, code) = (shape.n as i32, shape.k as i32, epi.code());
        let w_stride = (shape.n * shape.k) as i64;
        let mut b = Launch::new(&dev.stream, f, dev.pdl);
        b.arg(a);
        if let Some(rows) = groups.a_rows {
            b.arg(rows);
        }
        b.arg(w).arg(&w_stride);
        match &mut out {
            GemmOut::Bf16(c) | GemmOut::SwigluBf16(c) => b.arg(&*c),
            GemmOut::F32(c) => b.arg(&*c),
            GemmOut::AddF32(_) | GemmOut::RopeQkv(..) => unreachable!("validate refused it"),
        };
        b.arg(groups.off)
            .arg(groups.cnt)
            .arg(&ni)
            .arg(&ki)
            .arg(&code);
        // SAFETY: lengths checked by validate: A holds a_rows rows of k (the grouping's input
        // rows, written by moe_group as pair / k for pairs of rows below a_rows; without a row
        // map the output rows themselves, at most pairs ≤ a_rows), W experts
        // matrices of [n, k], C pairs rows, a_rows pairs entries, off / cnt one per expert;
        // moe_group's off[e] + cnt[e] ≤ pairs by construction (the counts partition the pairs).
        // Loads past n or past an expert's rows are predicated off; alignment checked above.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launch {kname}{g}"), e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> GroupedShape {
        GroupedShape {
            experts: 4,
            n: 32,
            k: 16,
            a_rows: 10,
        }
    }

    #[test]
    fn groups_cover_the_largest_expert_up_to_eight() {
        assert_eq!(groups_for(0), 1);
        assert_eq!(groups_for(1), 1);
        assert_eq!(groups_for(8), 1);
        assert_eq!(groups_for(9), 2);
        assert_eq!(groups_for(32), 4);
        assert_eq!(groups_for(64), 8);
        assert_eq!(groups_for(3072), 8);
    }

    #[test]
    fn validate_accepts_exact_buffers_and_names_the_short_one() {
        let s = shape();
        let ok = (10 * 16, 4 * 32 * 16, 20 * 32);
        assert!(validate(s, ok, (Some(20), 4, 4, 20), Epilogue::StoreF32).is_ok());
        assert!(validate(s, ok, (Some(20), 4, 4, 20), Epilogue::SwigluBf16).is_ok());
        let short = [
            ((10 * 16 - 1, ok.1, ok.2), (Some(20), 4, 4, 20), "A holds"),
            ((ok.0, ok.1 - 1, ok.2), (Some(20), 4, 4, 20), "W holds"),
            ((ok.0, ok.1, ok.2 - 1), (Some(20), 4, 4, 20), "C holds"),
            (ok, (Some(19), 4, 4, 20), "a_rows holds"),
            (ok, (Some(20), 3, 4, 20), "off holds"),
            (ok, (Some(20), 4, 3, 20), "cnt holds"),
        ];
        for (lens, groups, what) in short {
            let e = validate(s, lens, groups, Epilogue::StoreBf16).unwrap_err();
            assert!(e.to_string().contains(what), "{e} should name {what}");
        }
    }

    #[test]
    fn validate_refuses_shapes_and_epilogues_the_kernel_lacks() {
        let ok = (10 * 16, 4 * 32 * 16, 20 * 32);
        let g = (Some(20), 4, 4, 20);
        for (s, epi) in [
            (GroupedShape { n: 12, ..shape() }, Epilogue::StoreBf16),
            (GroupedShape { k: 0, ..shape() }, Epilogue::StoreBf16),
            (
                GroupedShape {
                    experts: 0,
                    ..shape()
                },
                Epilogue::StoreBf16,
            ),
            (
                GroupedShape {
                    n: 24,
                    experts: 1,
                    ..shape()
                },
                Epilogue::SwigluBf16,
            ),
            (shape(), Epilogue::AddF32),
            (shape(), Epilogue::RopeQkv),
            (
                GroupedShape {
                    a_rows: 0,
                    ..shape()
                },
                Epilogue::StoreBf16,
            ),
        ] {
            assert!(validate(s, ok, g, epi).is_err(), "{s:?} {epi:?}");
        }
        // In order: the input must hold the output's rows.
        let s = GroupedShape {
            a_rows: 20,
            ..shape()
        };
        let lens = (20 * 16, ok.1, ok.2);
        assert!(validate(s, lens, (None, 4, 4, 20), Epilogue::StoreF32).is_ok());
        let s = GroupedShape {
            a_rows: 19,
            ..shape()
        };
        assert!(validate(s, lens, (None, 4, 4, 20), Epilogue::StoreF32).is_err());
    }
}
