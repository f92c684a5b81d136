//! The [`Model`] trait on the device (the Session path, `dllm generate`, the C ABI's sessions):
//! one canvas's forward and logits, predictions with or without the device K/V cache slots
//! ([`super::slots`]), and padded batches ([`super::padding`]); each sets its query rows and
//! runs the shared layers and head of [`CudaTransformer`].

use super::*;
use crate::backend::cuda::padding::QueryMember;
use crate::model::CachedQuery;

impl Model for CudaTransformer {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn backend_name(&self) -> &'static str {
        "cuda"
    }

    fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.logits(ids, true)
    }

    fn raw_forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.logits(ids, false)
    }

    fn logits_at(&self, ids: &[u32], positions: &[usize]) -> Result<Vec<f32>> {
        check_ids(&self.cfg, ids)?;
        check_queries(positions, ids.len())?;
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        self.logits_of(ids, positions.iter().map(|&p| (self.source_position(p), p)))
    }

    fn supports_kv_cache(&self) -> bool {
        true
    }

    fn logits_cached(
        &self,
        ids: &[u32],
        queries: &[usize],
        cache: &mut KvCache,
        step: &CacheStep,
    ) -> Result<Vec<f32>> {
        let mut g = self.lock();
        let st = self.cached_forward(&mut g, ids, queries, cache, step, self.alone_slots())?;
        self.download_query_logits(st)
    }

    fn predict_cached(
        &self,
        ids: &[u32],
        queries: &[usize],
        rule: &PredictRule,
        cache: &mut KvCache,
        step: &CacheStep,
    ) -> Result<Vec<Prediction>> {
        let mut g = self.lock();
        let mut it = CachedQuery {
            ids,
            queries,
            rule,
            cache,
            step: step.clone(),
        };
        self.predict_cached_locked(&mut g, &mut it, self.alone_slots())
    }

    fn packs_cached_batches(&self) -> bool {
        self.packed_sessions()
    }

    /// Packed (the span steps of the batch in one forward, refreshes padded) when
    /// [`CudaTransformer::packed_sessions`], else one by one.
    fn predict_cached_batch(&self, items: &mut [CachedQuery<'_>]) -> Result<Vec<Vec<Prediction>>> {
        if self.packed_sessions() {
            self.predict_cached_packed(items)
        } else {
            crate::model::predict_cached_each(self, items)
        }
    }

    fn predict(
        &self,
        ids: &[u32],
        queries: &[usize],
        rule: &PredictRule,
    ) -> Result<Vec<Prediction>> {
        let mut g = self.lock();
        self.set_canvases_locked(&mut g, ids, 1, ids.len())?;
        let st = g.as_mut().expect("set above");
        check_queries(queries, ids.len())?;
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        // The query rows first: the last layer may run only for them.
        let (idx, pos) = self.query_rows(queries, 0..ids.len())?;
        self.set_queries(st, idx, pos)?;
        let narrow = self.narrowing(st, true);
        self.layers_maybe_graphed(st, 0, ids.len(), true, false, KvSel::Main, narrow)?;
        self.predict_queries(&self.kit, st, rule)?;
        self.download_predictions(st, queries.len())
    }

    /// Padded batched forwards: the canvases with queries are grouped into sub-batches of at
    /// most [`MAX_BATCH_ROWS`] padded rows ([`padding::plan_sub_batches`]), each one full
    /// forward over its canvases padded to its longest (`CudaTransformer::predict_padded`).
    /// Every canvas is checked first (errors name it); a canvas without queries gets no rows.
    fn predict_batch(&self, items: &[BatchQuery<'_>]) -> Result<Vec<Vec<Prediction>>> {
        for (i, it) in items.iter().enumerate() {
            check_ids(&self.cfg, it.ids)
                .and_then(|()| check_queries(it.queries, it.ids.len()))
                .map_err(|e| in_canvas(i, e))?;
        }
        let live: Vec<usize> = (0..items.len())
            .filter(|&i| !items[i].queries.is_empty())
            .collect();
        let lens: Vec<usize> = live.iter().map(|&i| items[i].ids.len()).collect();
        let mut out = vec![Vec::new(); items.len()];
        let mut g = self.lock();
        for group in padding::plan_sub_batches(&lens, MAX_BATCH_ROWS) {
            let members: Vec<&BatchQuery<'_>> = group.iter().map(|&j| &items[live[j]]).collect();
            let preds = self.predict_padded(&mut g, &members)?;
            for (&j, p) in group.iter().zip(preds) {
                out[live[j]] = p;
            }
        }
        Ok(out)
    }
}

/// Prefixes an invalid-argument error with the batch canvas it is about.
pub(super) fn in_canvas(i: usize, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("batch canvas {i}: {m}")),
        other => other,
    }
}

impl CudaTransformer {
    /// One padded forward over `members` (checked, each with queries): the canvases padded with
    /// [`PAD_ID`] to the longest length `L` are uploaded as `members.len()` canvases of `L`
    /// (which drops the device K/V cache's contents and owner, as every upload does), their real
    /// lengths go to `kv_len` so attention ignores the padding keys, and one full forward runs
    /// without storing K/V. Then, per distinct rule ([`padding::rule_groups`]), the LM head and
    /// the sampler run over that rule's canvases' query rows ([`padding::rule_rows`]: canvas
    /// `b`'s query `q` reads row `b·L + source_position(q)` and keys its random draws by `q`,
    /// as [`Model::predict`] does for the canvas alone). Returns the predictions per member.
    fn predict_padded(
        &self,
        g: &mut Option<State>,
        members: &[&BatchQuery<'_>],
    ) -> Result<Vec<Vec<Prediction>>> {
        let canvases: Vec<&[u32]> = members.iter().map(|m| m.ids).collect();
        let seq = self.upload_padded(g, &canvases)?;
        let st = g.as_mut().expect("set above");
        // Every member's query rows, grouped by rule: one LM-head pass over all of them, one
        // sampler launch per rule and head chunk over that rule's rows. Set before the forward:
        // its last layer may run only for them (one rule and as many queries in every canvas).
        let queries: Vec<QueryMember<'_>> = members
            .iter()
            .map(|m| QueryMember {
                start: 0,
                queries: m.queries,
                rule: m.rule,
            })
            .collect();
        let rows = padding::rule_rows(&queries, seq, |p| self.source_position(p))?;
        self.set_queries(st, rows.idx.clone(), rows.pos.clone())?;
        let narrow = self.narrowing(st, true);
        // Canvases of equal length are not padded: their layers may run as a graph.
        self.layers_maybe_graphed(st, 0, seq, true, false, KvSel::Main, narrow)?;
        self.predict_query_ranges(&self.kit, st, &rows.ranges)?;
        let preds = self.download_predictions(st, rows.total())?;
        Ok(rows.split(preds, &queries))
    }

    /// Uploads `canvases` padded with [`PAD_ID`] to the longest, `L`, as `canvases.len()`
    /// canvases of `L` (which drops the main K/V cache's contents, as every upload does), their
    /// real lengths to `kv_len` when they differ (attention then ignores the padding keys).
    /// Returns `L`.
    pub(super) fn upload_padded(
        &self,
        g: &mut Option<State>,
        canvases: &[&[u32]],
    ) -> Result<usize> {
        let seq = canvases.iter().map(|c| c.len()).max().unwrap_or(0);
        let ids = padding::pad_canvases(canvases, seq, PAD_ID);
        self.set_canvases_locked(g, &ids, canvases.len(), seq)?;
        let st = g.as_mut().expect("set above");
        let lens: Vec<i32> = canvases
            .iter()
            .map(|c| i32_of("canvas length", c.len()))
            .collect::<Result<_>>()?;
        if lens.iter().any(|&n| n as usize != seq) {
            self.dev
                .stream
                .memcpy_htod(&lens, &mut st.kv_len.slice_mut(0..lens.len()))
                .map_err(|e| cuda_err("upload canvas lengths", e))?;
            st.padded = true;
        }
        Ok(seq)
    }

    /// One full forward over `ids` and the logits of every position, downloaded: row `i` is the
    /// LM-head output at [`Self::source_position`]`(i)` when `shifted`, else at `i`.
    fn logits(&self, ids: &[u32], shifted: bool) -> Result<Vec<f32>> {
        let rows = (0..ids.len()).map(|i| (if shifted { self.source_position(i) } else { i }, i));
        self.logits_of(ids, rows)
    }

    /// One full forward (every layer over every row, K/V stored), then the LM head over the
    /// hidden rows `rows` yields (`(row, position)`: the row whose output is wanted, the
    /// position it predicts), downloaded in that order.
    fn logits_of(
        &self,
        ids: &[u32],
        rows: impl Iterator<Item = (usize, usize)>,
    ) -> Result<Vec<f32>> {
        let mut g = self.lock();
        self.set_canvases_locked(&mut g, ids, 1, ids.len())?;
        let st = g.as_mut().expect("set above");
        self.layers(&self.kit, st, 0, ids.len(), true, false, KvSel::Main, None)?;
        let (idx, pos): (Vec<i32>, Vec<i32>) = rows
            .map(|(r, p)| Ok((i32_of("row", r)?, i32_of("row", p)?)))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        self.set_queries(st, idx, pos)?;
        self.download_query_logits(st)
    }

    /// `ln_f` + LM head over the current query rows, logits downloaded (`[queries, width]`).
    pub(super) fn download_query_logits(&self, st: &mut State) -> Result<Vec<f32>> {
        let width = self.cfg.logits_width();
        let mut out = vec![0f32; st.q_host.0.len() * width];
        let stream = self.dev.stream.clone();
        self.head(&self.kit, st, |st, c0, rows| {
            stream
                .memcpy_dtoh(
                    &st.logits.slice(0..rows * width),
                    &mut out[c0 * width..(c0 + rows) * width],
                )
                .map_err(|e| cuda_err("download logits", e))
        })?;
        self.dev.sync()?;
        Ok(out)
    }

    /// The first `n` predictions of the last [`Self::predict_queries`], downloaded.
    pub(super) fn download_predictions(&self, st: &State, n: usize) -> Result<Vec<Prediction>> {
        let tokens = self
            .dev
            .stream
            .clone_dtoh(&st.tokens.slice(0..n))
            .map_err(|e| cuda_err("download tokens", e))?;
        let conf = self
            .dev
            .stream
            .clone_dtoh(&st.conf.slice(0..n))
            .map_err(|e| cuda_err("download confidences", e))?;
        tokens
            .into_iter()
            .zip(conf)
            .map(|(t, c)| {
                u32::try_from(t)
                    .map(|token| Prediction {
                        token,
                        confidence: c,
                    })
                    .map_err(|_| Error::Backend(format!("sampling kernel returned token {t}")))
            })
            .collect()
    }

    /// The Session's cached forward on the device cache (see [`crate::model::kv_cache`]): a
    /// refresh runs the full forward storing every layer's K/V into `cache`'s slot
    /// ([`CacheSlot`], claimed on its first refresh); a span step uploads the canvas and runs
    /// only the span's rows against that slot (writing their K/V) — or, when the slot was
    /// reassigned meanwhile (more alternating caches than [`MAX_CACHE_SLOTS`]), a refresh, which
    /// is exact. Then the query rows (each query's source row, which must lie in the computed
    /// rows) are set.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn cached_forward<'g>(
        &self,
        g: &'g mut std::sync::MutexGuard<'_, Option<State>>,
        ids: &[u32],
        queries: &[usize],
        cache: &mut KvCache,
        step: &CacheStep,
        slots: SlotPolicy<'_>,
    ) -> Result<&'g mut State> {
        self.check_cached_step(ids, queries, cache, step)?;
        let len = ids.len();
        let span = match step {
            CacheStep::Refresh => None,
            CacheStep::Span(r) => {
                let slot = g
                    .as_ref()
                    .and_then(|st| slot_of(&st.slots, cache.id(), len));
                if slot.is_none() {
                    // The slot was reassigned: this span step runs as a refresh.
                    self.slot_misses.fetch_add(1, Ordering::Relaxed);
                }
                slot.map(|j| (r.clone(), j))
            }
        };
        let fwd_start = match span {
            None => {
                self.set_canvases_locked(g, ids, 1, len)?;
                let st = g.as_mut().expect("set above");
                // The query rows first: the last layer may run only for them (every row's K/V
                // still go into the slot). Before the slot is claimed: an error here must not
                // leave it looking filled.
                let (idx, pos) = self.query_rows(queries, 0..len)?;
                self.set_queries(st, idx, pos)?;
                let narrow = self.narrowing(st, true);
                let j = self.claim_slot(st, cache.id(), len, slots)?;
                if let Err(e) =
                    self.layers(&self.kit, st, 0, len, true, true, KvSel::Slot(j), narrow)
                {
                    // A half-written slot must not serve a span step.
                    st.slots[j].seq = 0;
                    return Err(e);
                }
                cache.mark_filled();
                0
            }
            Some((r, j)) => {
                // The slot is in the current state, so its canvas fits without a reallocation.
                let fits = g.as_ref().is_some_and(|st| st.batch == 1 && st.seq == len);
                if fits {
                    let st = g.as_mut().expect("checked above");
                    self.update_canvas_ids(st, ids)?;
                    // The main cache no longer matches the device canvas.
                    st.cache_valid = false;
                } else {
                    self.set_canvases_locked(g, ids, 1, len)?;
                }
                let st = g.as_mut().expect("canvas set");
                st.slot_clock += 1;
                st.slots[j].last_use = st.slot_clock;
                self.layers_maybe_graphed(st, r.start, r.len(), false, true, KvSel::Slot(j), None)?;
                r.start
            }
        };
        let st = g.as_mut().expect("forward ran");
        let (idx, pos) = self.query_rows(queries, fwd_start..fwd_start + st.fwd_len)?;
        self.set_queries(st, idx, pos)?;
        Ok(st)
    }

    /// Checks one cached step before it touches anything: the ids, the cache's size, the
    /// queries, a span inside the canvas on a filled cache, and every query's source row in the
    /// computed rows. Returns those rows (the span, or the whole canvas for a refresh).
    pub(super) fn check_cached_step(
        &self,
        ids: &[u32],
        queries: &[usize],
        cache: &KvCache,
        step: &CacheStep,
    ) -> Result<Range<usize>> {
        check_ids(&self.cfg, ids)?;
        self.check_embeddable(ids)?;
        cache.check_fits(&self.cfg, ids.len())?;
        check_queries(queries, ids.len())?;
        let len = ids.len();
        let rows = match step {
            CacheStep::Refresh => 0..len,
            CacheStep::Span(r) => {
                if !cache.is_filled() {
                    return Err(Error::State(
                        "a cached span step needs a refresh of its cache first".into(),
                    ));
                }
                if r.is_empty() || r.end > len {
                    return Err(Error::invalid(format!(
                        "cached span {r:?} is empty or outside the canvas of {len}"
                    )));
                }
                r.clone()
            }
        };
        self.query_rows(queries, rows.clone())?;
        Ok(rows)
    }

    /// The rows (relative to `rows.start`) and positions of `queries` for a forward over the
    /// positions `rows` of one canvas: each query's source row, which must lie in `rows`.
    fn query_rows(&self, queries: &[usize], rows: Range<usize>) -> Result<(Vec<i32>, Vec<i32>)> {
        let mut idx = Vec::with_capacity(queries.len());
        let mut pos = Vec::with_capacity(queries.len());
        for &q in queries {
            let src = self.source_position(q);
            if !rows.contains(&src) {
                return Err(Error::invalid(format!(
                    "query {q} (source row {src}) is outside the computed rows {rows:?}"
                )));
            }
            idx.push(i32_of("query row", src - rows.start)?);
            pos.push(i32_of("query position", q)?);
        }
        Ok((idx, pos))
    }
}
