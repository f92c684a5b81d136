//! The last layer of a full step run only for the rows its prediction reads
//! ([`KernelChoice::query_last_layer`]): every row still needs the last layer's keys and values
//! (the attention of the queried rows reads them, a refresh stores them), but its queries,
//! attention output, MLP and residual only matter for the rows the LM head reads. The CPU
//! backend does the same (`CpuTransformer::hidden_rows`); here the queried rows' q and residual
//! are gathered after the QKV projection, attention runs `per` query rows per canvas against
//! the canvas's `len` keys, and the attention output and MLP run on `batch · per` rows whose
//! residual then sits in the LM head's input buffer, in query order.
//!
//! Which steps narrow is host logic, decided from the query rows alone and unit-tested here.

use super::KernelChoice;
use crate::error::{Error, Result};

/// Query rows per canvas when the last layer of a full forward over `batch` canvases of `len`
/// rows can run only for the query rows `idx` (indices into the forward's rows, canvas-major),
/// at most `cap` of them (the LM head's input buffer holds their residual): each canvas has
/// the same number of queries, all among its own rows, and fewer than `len` (else nothing is
/// saved). Repeated or unsorted rows are fine (each query row is computed once per query).
pub(super) fn query_rows_per_canvas(
    idx: &[i32],
    batch: usize,
    len: usize,
    cap: usize,
) -> Option<usize> {
    if batch == 0 || idx.is_empty() || !idx.len().is_multiple_of(batch) || idx.len() > cap {
        return None;
    }
    let per = idx.len() / batch;
    if per >= len {
        return None;
    }
    let own_rows = idx.chunks(per).enumerate().all(|(b, rows)| {
        rows.iter()
            .all(|&r| usize::try_from(r).is_ok_and(|r| (b * len..(b + 1) * len).contains(&r)))
    });
    own_rows.then_some(per)
}

/// Whether the switch allows narrowing at all (the reference kernels never narrow: they are
/// the plain model the fast path is checked against).
pub(super) fn allowed(kernels: &KernelChoice) -> bool {
    kernels.query_last_layer && !kernels.naive_gemm && !kernels.naive_attention
}

/// Rows of the last forward whose final residual exists, kept on the host beside the device
/// state: what the LM head may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LastLayerRows {
    /// Every row, in `x`.
    All,
    /// The current query rows only, in `hq` in query order (the last layer ran only for them).
    Queries,
    /// None usable: the forward failed or has not run on these canvases, or it ran its last
    /// layer only for queries replaced since. Nothing can be predicted before another forward.
    Stale,
}

impl LastLayerRows {
    /// After a forward that finished (narrowed to the query rows or not).
    pub fn finished(narrowed: bool) -> Self {
        if narrowed {
            LastLayerRows::Queries
        } else {
            LastLayerRows::All
        }
    }

    /// After the query rows changed: a narrowed forward's rows no longer belong to them.
    pub fn after_query_change(self) -> Self {
        match self {
            LastLayerRows::Queries => LastLayerRows::Stale,
            other => other,
        }
    }

    /// Whether the LM head over `n` query rows (`chunk` per head pass) finds them already in
    /// `hq` (`true`, a narrowed forward's, all in one pass) or gathers them from `x` (`false`);
    /// an error when neither holds them.
    pub fn head_reads_narrowed(self, n: usize, chunk: usize) -> Result<bool> {
        match self {
            LastLayerRows::All => Ok(false),
            LastLayerRows::Queries if n <= chunk => Ok(true),
            _ => Err(Error::State(format!(
                "the last forward did not finish the rows of these {n} queries (it failed, or \
                 ran its last layer only for other query rows): run a forward for them first"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span_rows(batch: usize, len: usize, span: std::ops::Range<usize>) -> Vec<i32> {
        (0..batch)
            .flat_map(|b| span.clone().map(move |p| (b * len + p) as i32))
            .collect()
    }

    #[test]
    fn a_steps_block_of_queries_narrows_to_its_rows_per_canvas() {
        // b1 no-cache step: 32 queries of 384 rows.
        assert_eq!(
            query_rows_per_canvas(&span_rows(1, 384, 128..160), 1, 384, 256),
            Some(32)
        );
        // b8 refresh: 8 × 32 queries, exactly the head buffer's 256 rows.
        assert_eq!(
            query_rows_per_canvas(&span_rows(8, 384, 352..384), 8, 384, 256),
            Some(32)
        );
        // Shifted logits (Dream): the rows before the positions, still the canvas's own.
        assert_eq!(
            query_rows_per_canvas(&span_rows(2, 40, 7..15), 2, 40, 256),
            Some(8)
        );
        // Unsorted and repeated rows of the right canvases.
        assert_eq!(
            query_rows_per_canvas(&[5, 3, 3, 13, 10, 11], 2, 8, 256),
            Some(3)
        );
    }

    #[test]
    fn queries_that_do_not_fit_the_shape_keep_every_row() {
        // More query rows than the head buffer holds.
        assert_eq!(
            query_rows_per_canvas(&span_rows(9, 384, 352..384), 9, 384, 256),
            None
        );
        // Every row queried: nothing to save.
        assert_eq!(
            query_rows_per_canvas(&span_rows(1, 32, 0..32), 1, 32, 256),
            None
        );
        // A canvas's query in another canvas's rows.
        assert_eq!(query_rows_per_canvas(&[1, 2, 3, 4], 2, 4, 256), None);
        // Uneven counts per canvas, none at all, negative rows, no canvases.
        assert_eq!(query_rows_per_canvas(&[1, 2, 5], 2, 4, 256), None);
        assert_eq!(query_rows_per_canvas(&[], 1, 4, 256), None);
        assert_eq!(query_rows_per_canvas(&[-1], 1, 4, 256), None);
        assert_eq!(query_rows_per_canvas(&[0], 0, 4, 256), None);
    }

    #[test]
    fn only_the_fast_kernels_with_the_switch_narrow() {
        let fast = KernelChoice {
            query_last_layer: true,
            ..KernelChoice::fast()
        };
        assert!(allowed(&fast));
        assert!(!allowed(&KernelChoice {
            query_last_layer: false,
            ..fast
        }));
        assert!(!allowed(&KernelChoice {
            query_last_layer: true,
            ..KernelChoice::reference()
        }));
    }

    #[test]
    fn the_head_reads_only_rows_a_finished_forward_left_for_its_queries() {
        use LastLayerRows::*;
        // A full forward: the head gathers from x, whatever the queries do later.
        let all = LastLayerRows::finished(false);
        assert!(!all.head_reads_narrowed(32, 256).unwrap());
        assert_eq!(all.after_query_change(), All);
        // A narrowed one: its rows are in hq, in one head pass, until the queries change.
        let q = LastLayerRows::finished(true);
        assert_eq!(q, Queries);
        assert!(q.head_reads_narrowed(32, 256).unwrap());
        assert!(q.head_reads_narrowed(300, 256).is_err());
        let changed = q.after_query_change();
        assert_eq!(changed, Stale);
        // Stale stays stale (changing back does not bring the rows back) and is refused.
        assert_eq!(changed.after_query_change(), Stale);
        let e = changed.head_reads_narrowed(32, 256).unwrap_err();
        assert!(
            matches!(e, Error::State(_)) && e.to_string().contains("32 queries"),
            "{e}"
        );
    }
}
