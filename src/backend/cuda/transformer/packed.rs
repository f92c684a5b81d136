//! Packed cached steps ([`Model::predict_cached_batch`] on the device, opt-in with
//! `DLLM_PACKED_SESSIONS=1`): the span steps of several Session caches run as one forward over
//! their span rows (every weight streamed once for all of them, as the engine's batched block
//! step does), each canvas writing its span's K/V into, and attending against, its own cache
//! slot through [`CanvasKv`] (the slots are separate allocations; canvases may differ in
//! length and span position); spans are packed with spans of the same length. Refreshes run as
//! padded batches ([`Model::predict_batch`]'s layout), each canvas storing its K/V in its own
//! slot; a span step whose slot was reassigned runs alone, as a refresh.
//!
//! The row and position arithmetic ([`packed_query_rows`]) is host code, unit-tested here.

use super::model_impl::in_canvas;
use super::*;
use crate::backend::cuda::canvas_kv::CanvasCache;
use crate::model::CachedQuery;
use std::collections::BTreeMap;

/// Whether Session span steps of a batch are packed into one forward: `DLLM_PACKED_SESSIONS=1`
/// (off by default until checked on a GPU: `dllm-gpu-check`'s
/// `model.packed cached sessions == alone`).
pub fn packed_sessions_from_env() -> bool {
    crate::backend::cuda::env_switch::flag("DLLM_PACKED_SESSIONS", false)
}

/// One canvas of a packed forward: its cache slot, the position of its first computed row,
/// the keys it attends to (its canvas length), its queries and their rule.
pub(super) struct PackedMember<'q> {
    pub slot: usize,
    pub start: usize,
    pub keys: usize,
    pub queries: &'q [usize],
    pub rule: &'q PredictRule,
}

/// The forward rows and positions of the queries of a packed span forward whose canvases each
/// contribute `len` rows (member `b`'s rows `b·len ..`, its span starting at `start`), for the
/// members in `order`: query `q` of member `b` reads row `b·len + source(q) − start` and keys
/// its random draws by position `q`. A query whose source row lies outside its member's span is
/// an error naming it.
pub(super) fn packed_query_rows(
    members: &[PackedMember<'_>],
    order: &[usize],
    len: usize,
    source: impl Fn(usize) -> usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let (mut rows, mut pos) = (Vec::new(), Vec::new());
    for &b in order {
        let m = &members[b];
        for &q in m.queries {
            let src = source(q);
            if src < m.start || src >= m.start + len {
                return Err(Error::invalid(format!(
                    "query {q} (source row {src}) is outside the span {}..{}",
                    m.start,
                    m.start + len
                )));
            }
            rows.push(b * len + src - m.start);
            pos.push(q);
        }
    }
    Ok((rows, pos))
}

impl CudaTransformer {
    /// Enables or disables packed cached steps for later batches (the default comes from
    /// `DLLM_PACKED_SESSIONS`).
    pub fn set_packed_sessions(&self, on: bool) {
        self.packed_sessions.store(on, Ordering::Relaxed);
    }

    /// Whether [`Model::predict_cached_batch`] packs span steps.
    pub fn packed_sessions(&self) -> bool {
        self.packed_sessions.load(Ordering::Relaxed)
    }

    /// [`Model::predict_cached_batch`] (see the module docs). Every item is checked before any
    /// cache changes; the batch may hold one slot per canvas (beyond `DLLM_CACHE_SLOTS`), so
    /// its caches do not evict each other.
    pub(super) fn predict_cached_packed(
        &self,
        items: &mut [CachedQuery<'_>],
    ) -> Result<Vec<Vec<Prediction>>> {
        let mut rows = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            let r = self
                .check_cached_step(it.ids, it.queries, it.cache, &it.step)
                .map_err(|e| in_canvas(i, e))?;
            rows.push(r);
        }
        // One slot per canvas, none taken by another canvas of the batch.
        let keep: Vec<u64> = items.iter().map(|it| it.cache.id()).collect();
        let slots = SlotPolicy {
            max: self.cache_slots.max(items.len()),
            keep: &keep,
        };
        let mut out = vec![Vec::new(); items.len()];
        let mut g = self.lock();
        // Refreshes first, in padded sub-batches (one alone runs as predict_cached does).
        let (refreshes, spans): (Vec<usize>, Vec<usize>) = (0..items.len())
            .filter(|&i| !items[i].queries.is_empty())
            .partition(|&i| items[i].step == CacheStep::Refresh);
        let lens: Vec<usize> = refreshes.iter().map(|&i| items[i].ids.len()).collect();
        for group in padding::plan_sub_batches(&lens, MAX_BATCH_ROWS) {
            let pack: Vec<usize> = group.iter().map(|&j| refreshes[j]).collect();
            if let [i] = pack[..] {
                out[i] = self.predict_cached_locked(&mut g, &mut items[i], slots)?;
                continue;
            }
            let preds = self.predict_refresh_pack(&mut g, items, &pack, slots)?;
            for (&i, p) in pack.iter().zip(preds) {
                out[i] = p;
            }
        }
        // Spans whose slot is in place, by span length; the others run alone (as refreshes).
        let mut packs: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
        for i in spans {
            let it = &mut items[i];
            let slot = g
                .as_ref()
                .and_then(|st| slot_of(&st.slots, it.cache.id(), it.ids.len()));
            match slot {
                Some(j) => packs.entry(rows[i].len()).or_default().push((i, j)),
                None => out[i] = self.predict_cached_locked(&mut g, it, slots)?,
            }
        }
        for (len, members) in packs {
            let per_pack = (MAX_BATCH_ROWS / len).max(1);
            for pack in members.chunks(per_pack) {
                if let [(i, _)] = pack {
                    // Alone: the single-canvas path (graphed like a session's own steps).
                    out[*i] = self.predict_cached_locked(&mut g, &mut items[*i], slots)?;
                    continue;
                }
                let preds = self.predict_span_pack(&mut g, items, &rows, pack, len)?;
                for (&(i, _), p) in pack.iter().zip(preds) {
                    out[i] = p;
                }
            }
        }
        Ok(out)
    }

    /// [`Model::predict_cached`] under the held lock, its slot claimed under `slots`.
    pub(super) fn predict_cached_locked(
        &self,
        g: &mut std::sync::MutexGuard<'_, Option<State>>,
        it: &mut CachedQuery<'_>,
        slots: SlotPolicy<'_>,
    ) -> Result<Vec<Prediction>> {
        if it.queries.is_empty() {
            return Ok(Vec::new());
        }
        let st = self.cached_forward(g, it.ids, it.queries, it.cache, &it.step, slots)?;
        self.predict_queries(&self.kit, st, it.rule)?;
        self.download_predictions(st, it.queries.len())
    }

    /// One packed span forward over `pack` (item index, slot; at least two, every span `len`
    /// rows, `rows[i]` item `i`'s span) and its predictions per member.
    fn predict_span_pack(
        &self,
        g: &mut std::sync::MutexGuard<'_, Option<State>>,
        items: &[CachedQuery<'_>],
        rows: &[Range<usize>],
        pack: &[(usize, usize)],
        len: usize,
    ) -> Result<Vec<Vec<Prediction>>> {
        let n = pack.len();
        let mut span_ids = Vec::with_capacity(n * len);
        for &(i, _) in pack {
            span_ids.extend_from_slice(&items[i].ids[rows[i].clone()]);
        }
        // The span rows as `n` canvases of `len` ids (the slots survive a reallocation).
        self.set_canvases_locked(g, &span_ids, n, len)?;
        let st = g.as_mut().expect("canvases set");
        let members: Vec<PackedMember<'_>> = pack
            .iter()
            .map(|&(i, j)| PackedMember {
                slot: j,
                start: rows[i].start,
                keys: items[i].ids.len(),
                queries: items[i].queries,
                rule: items[i].rule,
            })
            .collect();
        for (m, &(i, _)) in members.iter().zip(pack) {
            // Still this canvas's (no claim of this batch takes another canvas's slot).
            let slot = &mut st.slots[m.slot];
            if slot.owner != items[i].cache.id() || slot.seq != m.keys {
                return Err(Error::State(format!(
                    "cache slot {} no longer holds batch canvas {i}",
                    m.slot
                )));
            }
            st.slot_clock += 1;
            st.slots[m.slot].last_use = st.slot_clock;
        }
        self.predict_members(st, &members, len, |st| {
            self.layers(&self.kit, st, 0, len, false, true, KvSel::Canvases, None)
        })
    }

    /// One padded refresh forward over the items `pack` (at least two refreshes): every canvas
    /// padded to the longest, `L` (the padding keys masked, as [`Model::predict_batch`] does),
    /// each storing its K/V in its own slot (claimed here, holding `L` rows: the padding rows'
    /// K/V land past the canvas and are never read) and marked filled once the forward is done.
    fn predict_refresh_pack(
        &self,
        g: &mut std::sync::MutexGuard<'_, Option<State>>,
        items: &mut [CachedQuery<'_>],
        pack: &[usize],
        slots: SlotPolicy<'_>,
    ) -> Result<Vec<Vec<Prediction>>> {
        let seq = pack.iter().map(|&i| items[i].ids.len()).max().unwrap_or(0);
        let canvases: Vec<&[u32]> = pack.iter().map(|&i| items[i].ids).collect();
        let ids = padding::pad_canvases(&canvases, seq, PAD_ID);
        self.set_canvases_locked(g, &ids, pack.len(), seq)?;
        let st = g.as_mut().expect("canvases set");
        let lens: Vec<i32> = pack
            .iter()
            .map(|&i| i32_of("canvas length", items[i].ids.len()))
            .collect::<Result<_>>()?;
        if lens.iter().any(|&n| n as usize != seq) {
            self.dev
                .stream
                .memcpy_htod(&lens, &mut st.kv_len.slice_mut(0..lens.len()))
                .map_err(|e| cuda_err("upload canvas lengths", e))?;
            st.padded = true;
        }
        let mut members = Vec::with_capacity(pack.len());
        for &i in pack {
            let it = &items[i];
            let slot = self.claim_slot(st, it.cache.id(), seq, slots)?;
            // Filled only by a forward that completes.
            st.slots[slot].seq = 0;
            members.push(PackedMember {
                slot,
                start: 0,
                keys: it.ids.len(),
                queries: it.queries,
                rule: it.rule,
            });
        }
        let preds = self.predict_members(st, &members, seq, |st| {
            // The query rows are set: the last layer may run only for them.
            let narrow = self.narrowing(st, true);
            self.layers(&self.kit, st, 0, seq, true, true, KvSel::Canvases, narrow)
        })?;
        for (m, &i) in members.iter().zip(pack) {
            st.slots[m.slot].seq = m.keys;
            items[i].cache.mark_filled();
        }
        Ok(preds)
    }

    /// The part of a packed forward after its canvases are uploaded: the members' slots as a
    /// [`CanvasKv`] (rows `start..start + len` written, `keys` read), their queries grouped by
    /// rule (one LM-head pass, one sampler launch per rule), `forward`, then the predictions per
    /// member. The address table is dropped whatever happens.
    fn predict_members(
        &self,
        st: &mut State,
        members: &[PackedMember<'_>],
        len: usize,
        forward: impl FnOnce(&mut State) -> Result<()>,
    ) -> Result<Vec<Vec<Prediction>>> {
        let caches: Vec<CanvasCache<'_>> = members
            .iter()
            .map(|m| CanvasCache {
                k: &st.slots[m.slot].k,
                v: &st.slots[m.slot].v,
                start: m.start,
                keys: m.keys,
            })
            .collect();
        let canvas_kv = CanvasKv::upload(&self.dev, &caches, self.cfg.n_layers, self.kv_dim())?;
        canvas_kv.host().check_rows(len)?;
        let rules: Vec<&PredictRule> = members.iter().map(|m| m.rule).collect();
        let groups = padding::rule_groups(&rules);
        let (mut idx, mut pos) = (Vec::new(), Vec::new());
        let mut ranges = Vec::with_capacity(groups.len());
        for group in &groups {
            let (r, p) = packed_query_rows(members, group, len, |q| self.source_position(q))?;
            let begin = idx.len();
            for (r, p) in r.into_iter().zip(p) {
                idx.push(i32_of("query row", r)?);
                pos.push(i32_of("query position", p)?);
            }
            ranges.push((begin..idx.len(), rules[group[0]]));
        }
        let total = idx.len();
        self.set_queries(st, idx, pos)?;
        st.canvas_kv = Some(canvas_kv);
        let run = forward(st);
        // The table points into the slots: gone with this forward.
        st.canvas_kv = None;
        run?;
        self.predict_query_ranges(&self.kit, st, &ranges)?;
        let mut preds = self.download_predictions(st, total)?.into_iter();
        let mut out = vec![Vec::new(); members.len()];
        for group in &groups {
            for &b in group {
                out[b] = preds.by_ref().take(members[b].queries.len()).collect();
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_queries_read_their_own_members_span_rows() {
        let (a, b, c) = ([100usize, 103], [41usize], [7usize, 9, 8]);
        let rule = PredictRule {
            temperature: 0.0,
            remasking: crate::denoise::predict::Remasking::LowConfidence,
            seed: 0,
            step: 0,
            mask_token: 0,
            vocab_size: 1,
        };
        let member = |start, queries| PackedMember {
            slot: 0,
            start,
            keys: 128,
            queries,
            rule: &rule,
        };
        let members = [member(96, &a[..]), member(32, &b[..]), member(0, &c[..])];
        // Spans of 32 rows: member 0 rows 0.., member 1 rows 32.., member 2 rows 64...
        let (rows, pos) = packed_query_rows(&members, &[0, 1, 2], 32, |q| q).unwrap();
        assert_eq!(rows, vec![4, 7, 32 + 9, 64 + 7, 64 + 9, 64 + 8]);
        assert_eq!(pos, vec![100, 103, 41, 7, 9, 8]);
        // A rule group takes its members in its order; their rows stay their own.
        let (rows, pos) = packed_query_rows(&members, &[2, 0], 32, |q| q).unwrap();
        assert_eq!(rows, vec![71, 73, 72, 4, 7]);
        assert_eq!(pos, vec![7, 9, 8, 100, 103]);
        // Shifted architectures read the row before the query (Dream: q − 1).
        let (rows, _) = packed_query_rows(&members, &[1], 32, |q| q - 1).unwrap();
        assert_eq!(rows, vec![32 + 8]);
        // A source row outside the member's span is refused, naming the query.
        let e = packed_query_rows(&members, &[2], 8, |q| q)
            .unwrap_err()
            .to_string();
        assert!(e.contains("query 9") && e.contains("span 0..8"), "{e}");
        let e = packed_query_rows(&members, &[0], 32, |q| q - 97)
            .unwrap_err()
            .to_string();
        assert!(e.contains("query 100 (source row 3)"), "{e}");
    }
}
