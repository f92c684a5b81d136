//! Packed cached steps ([`Model::predict_cached_batch`] on the device, opt-in with
//! `DLLM_PACKED_SESSIONS=1`): the span steps of several Session caches run as one forward over
//! their span rows (every weight streamed once for all of them, as the engine's batched block
//! step does), each canvas writing its span's K/V into, and attending against, its own cache
//! slot through [`CanvasKv`] (the slots are separate allocations; canvases may differ in
//! length and span position); spans are packed with spans of the same length. Refreshes run as
//! padded batches ([`Model::predict_batch`]'s layout), each canvas storing its K/V in its own
//! slot; a span step whose slot was reassigned runs alone, as a refresh. When memory runs
//! short for a batch's slots or step buffers, its canvases run alone as a canvas stepped alone
//! does (taking the least recently used slots, whoever's). Forwards run without queries too
//! (a refresh still stores its K/V), as on the CPU backend.
//!
//! The query rows' arithmetic is [`padding::rule_rows`]'s (host code, unit-tested there), shared
//! with the padded batches.

use super::model_impl::in_canvas;
use super::*;
use crate::backend::cuda::canvas_kv::CanvasCache;
use crate::backend::cuda::padding::QueryMember;
use crate::error::ErrorKind;
use crate::model::CachedQuery;
use std::collections::BTreeMap;

/// Whether Session span steps of a batch are packed into one forward: `DLLM_PACKED_SESSIONS=1`
/// (off by default until checked on a GPU: `dllm-gpu-check`'s
/// `model.packed cached sessions == alone`).
pub fn packed_sessions_from_env() -> bool {
    crate::backend::cuda::env_switch::flag("DLLM_PACKED_SESSIONS", false)
}

/// One canvas of a packed forward: its cache slot, the keys it attends to (its canvas
/// length), and its computed rows' first position, queries and rule.
struct PackedMember<'q> {
    slot: usize,
    keys: usize,
    rows: QueryMember<'q>,
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
        if let Some((j, i)) = keep
            .iter()
            .enumerate()
            .find_map(|(j, id)| keep[..j].iter().position(|x| x == id).map(|i| (j, i)))
        {
            return Err(Error::invalid(format!(
                "batch canvases {i} and {j} name one K/V cache"
            )));
        }
        let slots = SlotPolicy {
            max: self.cache_slots.max(items.len()),
            keep: &keep,
        };
        let mut out = vec![Vec::new(); items.len()];
        let mut g = self.lock();
        // Refreshes first, in padded sub-batches (one alone runs as predict_cached does). When
        // memory runs short for the batch's slots or buffers, its canvases run alone, taking
        // the least recently used slots as a canvas stepped alone does.
        let (refreshes, spans): (Vec<usize>, Vec<usize>) =
            (0..items.len()).partition(|&i| items[i].step == CacheStep::Refresh);
        let lens: Vec<usize> = refreshes.iter().map(|&i| items[i].ids.len()).collect();
        for group in padding::plan_sub_batches(&lens, MAX_BATCH_ROWS) {
            let pack: Vec<usize> = group.iter().map(|&j| refreshes[j]).collect();
            if let [i] = pack[..] {
                out[i] = self.predict_one(&mut g, &mut items[i], slots)?;
                continue;
            }
            let run = self.predict_refresh_pack(&mut g, items, &pack, slots);
            self.settle_pack(&mut g, items, &pack, run, slots, &mut out)?;
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
                None => out[i] = self.predict_one(&mut g, it, slots)?,
            }
        }
        for (len, members) in packs {
            let per_pack = (MAX_BATCH_ROWS / len).max(1);
            for pack in members.chunks(per_pack) {
                if let [(i, _)] = pack {
                    // Alone: the single-canvas path (graphed like a session's own steps).
                    out[*i] = self.predict_one(&mut g, &mut items[*i], slots)?;
                    continue;
                }
                let run = self.predict_span_pack(&mut g, items, &rows, pack, len);
                let members: Vec<usize> = pack.iter().map(|&(i, _)| i).collect();
                self.settle_pack(&mut g, items, &members, run, slots, &mut out)?;
            }
        }
        Ok(out)
    }

    /// [`Model::predict_cached`] under the held lock, its slot claimed under `slots`. The
    /// forward runs without queries too (a refresh stores the K/V, a span writes its rows').
    pub(super) fn predict_cached_locked(
        &self,
        g: &mut std::sync::MutexGuard<'_, Option<State>>,
        it: &mut CachedQuery<'_>,
        slots: SlotPolicy<'_>,
    ) -> Result<Vec<Prediction>> {
        let st = self.cached_forward(g, it.ids, it.queries, it.cache, &it.step, slots)?;
        if it.queries.is_empty() {
            return Ok(Vec::new());
        }
        self.predict_queries(&self.kit, st, it.rule)?;
        self.download_predictions(st, it.queries.len())
    }

    /// Puts a pack's predictions (`run`, one per item of `pack`) into `out`; when the pack ran
    /// out of memory (its slots or step buffers), runs its items alone instead.
    fn settle_pack(
        &self,
        g: &mut std::sync::MutexGuard<'_, Option<State>>,
        items: &mut [CachedQuery<'_>],
        pack: &[usize],
        run: Result<Vec<Vec<Prediction>>>,
        slots: SlotPolicy<'_>,
        out: &mut [Vec<Prediction>],
    ) -> Result<()> {
        match run {
            Ok(preds) => {
                for (&i, p) in pack.iter().zip(preds) {
                    out[i] = p;
                }
            }
            Err(e) if e.kind() == ErrorKind::OutOfMemory => {
                for &i in pack {
                    out[i] = self.predict_one(g, &mut items[i], slots)?;
                }
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// One canvas of a packed batch alone, its slot claimed under the batch's `slots`; when
    /// that runs out of memory, again as a canvas stepped alone (any least recently used slot
    /// may go, a batch canvas's too: its next step then refreshes).
    fn predict_one(
        &self,
        g: &mut std::sync::MutexGuard<'_, Option<State>>,
        it: &mut CachedQuery<'_>,
        slots: SlotPolicy<'_>,
    ) -> Result<Vec<Prediction>> {
        match self.predict_cached_locked(g, it, slots) {
            Err(e) if e.kind() == ErrorKind::OutOfMemory => {
                self.predict_cached_locked(g, it, self.alone_slots())
            }
            r => r,
        }
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
                keys: items[i].ids.len(),
                rows: QueryMember {
                    start: rows[i].start,
                    queries: items[i].queries,
                    rule: items[i].rule,
                },
            })
            .collect();
        for (m, &(i, _)) in members.iter().zip(pack) {
            // Still this canvas's (no claim of this batch takes another canvas's slot).
            let slot = &st.slots[m.slot];
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
        let canvases: Vec<&[u32]> = pack.iter().map(|&i| items[i].ids).collect();
        let seq = self.upload_padded(g, &canvases)?;
        let st = g.as_mut().expect("canvases set");
        let mut members = Vec::with_capacity(pack.len());
        for &i in pack {
            let it = &items[i];
            let slot = self.claim_slot(st, it.cache.id(), seq, slots)?;
            // Filled only by a forward that completes.
            st.slots[slot].seq = 0;
            members.push(PackedMember {
                slot,
                keys: it.ids.len(),
                rows: QueryMember {
                    start: 0,
                    queries: it.queries,
                    rule: it.rule,
                },
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
                start: m.rows.start,
                keys: m.keys,
            })
            .collect();
        let canvas_kv = CanvasKv::upload(&self.dev, &caches, self.cfg.n_layers, self.kv_dim())?;
        canvas_kv.host().check_rows(len)?;
        let queries: Vec<QueryMember<'_>> = members.iter().map(|m| m.rows).collect();
        let rows = padding::rule_rows(&queries, len, |q| self.source_position(q))?;
        self.set_queries(st, rows.idx.clone(), rows.pos.clone())?;
        st.canvas_kv = Some(canvas_kv);
        let run = forward(st);
        // The table points into the slots: gone with this forward.
        st.canvas_kv = None;
        run?;
        if rows.total() == 0 {
            return Ok(vec![Vec::new(); members.len()]);
        }
        self.predict_query_ranges(&self.kit, st, &rows.ranges)?;
        let preds = self.download_predictions(st, rows.total())?;
        Ok(rows.split(preds, &queries))
    }
}
