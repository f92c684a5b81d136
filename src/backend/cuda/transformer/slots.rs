//! Device K/V cache slots of the Session path: each Session cache ([`KvCache::id`]) keeps its
//! K/V in its own [`CacheSlot`] (up to [`cache_slots_from_env`] per model, the least recently
//! used one reassigned beyond), so Session caches that alternate their steps (several sessions,
//! or a guided session's two canvases) keep their K/V instead of refreshing one shared cache.
//! The slot policy ([`pick_slot_of`]) is host logic, unit-tested here.

use super::{alloc, CudaTransformer, State};
use crate::error::Error;
use crate::error::Result;
#[cfg(doc)]
use crate::model::kv_cache::KvCache;
use cudarc::driver::CudaSlice;
use std::sync::atomic::Ordering;

/// The device K/V cache of one Session cache ([`KvCache::id`]): every layer's K and V rows of
/// one canvas of at most `seq_cap` tokens. Several slots let Session caches that alternate their
/// steps (two sessions, or a guided session's conditional and unconditional canvases) keep their
/// K/V instead of refreshing one shared cache at every step.
pub(super) struct CacheSlot {
    pub(super) k: Vec<CudaSlice<u16>>,
    pub(super) v: Vec<CudaSlice<u16>>,
    /// The Session cache whose K/V it holds.
    pub(super) owner: u64,
    /// The canvas length they were stored for.
    pub(super) seq: usize,
    /// When it was last used ([`State::slot_clock`]), for least-recently-used eviction.
    pub(super) last_use: u64,
}

/// Most Session cache slots a model keeps by default (each holds `n_layers · seq_cap · kv_dim ·
/// 2` bf16 values: 200 MB for LLaDA-8B at 384 tokens); beyond it the least recently used is
/// reassigned. `DLLM_CACHE_SLOTS=N` (1..=16) sets another count ([`cache_slots_from_env`]).
const MAX_CACHE_SLOTS: usize = 4;

/// The Session cache slot count: `DLLM_CACHE_SLOTS` when it is 1..=16, else
/// `MAX_CACHE_SLOTS`. One slot is the behaviour before slots (alternating caches refresh).
pub fn cache_slots_from_env() -> usize {
    crate::backend::cuda::env_switch::count("DLLM_CACHE_SLOTS", 1..=16).unwrap_or(MAX_CACHE_SLOTS)
}

impl CudaTransformer {
    /// The slot for Session cache `owner` and a canvas of `len` tokens: its own (restamped), a
    /// new one while fewer than `policy.max` exist (and memory allows), else the least recently
    /// used one not owned by `policy.keep`, reassigned (its buffers reallocated if they hold
    /// fewer than `len` rows: slots outlive step buffer reallocations). Its K/V are then to be
    /// stored by a refresh.
    pub(super) fn claim_slot(
        &self,
        st: &mut State,
        owner: u64,
        len: usize,
        policy: SlotPolicy<'_>,
    ) -> Result<usize> {
        st.slot_clock += 1;
        let now = st.slot_clock;
        let kv = self.kv_dim();
        let j = match pick_slot(&st.slots, owner, policy) {
            SlotPick::Own(j) | SlotPick::Evict(j) => {
                // A slot kept from smaller step buffers may be too short for this canvas.
                if slot_rows(&st.slots[j], kv) < len {
                    // Graphs may hold the old buffers' addresses.
                    st.graph_sets.clear();
                    let slot = &mut st.slots[j];
                    // Emptied (and owned by no cache) until the new buffers exist: freed first.
                    (slot.k, slot.v, slot.owner, slot.seq) = (Vec::new(), Vec::new(), NO_OWNER, 0);
                    (slot.k, slot.v) = self.alloc_kv(st.seq_cap * kv, "cache slot")?;
                }
                j
            }
            SlotPick::New => match self.alloc_kv(st.seq_cap * kv, "cache slot") {
                Ok((k, v)) => {
                    st.slots.push(CacheSlot {
                        k,
                        v,
                        owner,
                        seq: len,
                        last_use: now,
                    });
                    st.slots.len() - 1
                }
                // Out of memory for another slot: reuse the least recently used one that is
                // long enough and not kept.
                Err(e) => st
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| slot_rows(s, kv) >= len && !policy.keep.contains(&s.owner))
                    .min_by_key(|(_, s)| s.last_use)
                    .map(|(j, _)| j)
                    .ok_or(e)?,
            },
            SlotPick::NoneFree => {
                return Err(Error::State(format!(
                    "no cache slot for a canvas: all {} hold other canvases of the batch",
                    st.slots.len()
                )));
            }
        };
        let slot = &mut st.slots[j];
        slot.owner = owner;
        slot.seq = len;
        slot.last_use = now;
        Ok(j)
    }

    /// K and V buffers of `elems` bf16 values for every layer (`what` names them in errors):
    /// a cache slot's, or the main cache's.
    #[allow(clippy::type_complexity)]
    pub(super) fn alloc_kv(
        &self,
        elems: usize,
        what: &str,
    ) -> Result<(Vec<CudaSlice<u16>>, Vec<CudaSlice<u16>>)> {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for _ in 0..self.cfg.n_layers {
            k.push(alloc(&self.dev, elems, &format!("K {what}"))?);
            v.push(alloc(&self.dev, elems, &format!("V {what}"))?);
        }
        Ok((k, v))
    }

    /// The slot policy of a cache stepped alone: up to the model's slot count, any slot may go.
    pub(super) fn alone_slots(&self) -> SlotPolicy<'static> {
        SlotPolicy {
            max: self.cache_slots,
            keep: &[],
        }
    }

    /// Span steps of Session caches that found their slot reassigned and ran as refreshes, so
    /// far (0 while at most `MAX_CACHE_SLOTS` caches alternate).
    pub fn cache_slot_misses(&self) -> usize {
        self.slot_misses.load(Ordering::Relaxed)
    }
}

/// The owner of a slot whose buffers are being replaced (no Session cache has this id).
const NO_OWNER: u64 = u64::MAX;

/// How many slots a claim may use, and whose slots it must not take: the other caches of a
/// packed batch (so the batch's canvases never evict, or share, each other's slots).
#[derive(Debug, Clone, Copy)]
pub(super) struct SlotPolicy<'a> {
    pub max: usize,
    pub keep: &'a [u64],
}

/// Rows of K/V a slot's buffers hold (0 for emptied buffers).
fn slot_rows(slot: &CacheSlot, kv_dim: usize) -> usize {
    slot.k.first().map_or(0, |k| k.len() / kv_dim.max(1))
}

/// Where a refresh of Session cache `owner` stores its K/V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotPick {
    /// Its own slot.
    Own(usize),
    /// A new slot (fewer than the most exist).
    New,
    /// The least recently used slot not kept, reassigned.
    Evict(usize),
    /// Every slot is kept. Not reached by the packed batches (they keep their other canvases'
    /// slots, fewer than the slots they allow); reported as an error, never a panic.
    NoneFree,
}

pub(super) fn pick_slot(slots: &[CacheSlot], owner: u64, policy: SlotPolicy<'_>) -> SlotPick {
    pick_slot_of(slots.iter().map(|s| (s.owner, s.last_use)), owner, policy)
}

/// [`pick_slot`] over `(owner, last_use)` pairs.
pub(super) fn pick_slot_of(
    slots: impl Iterator<Item = (u64, u64)>,
    owner: u64,
    policy: SlotPolicy<'_>,
) -> SlotPick {
    let slots: Vec<(u64, u64)> = slots.collect();
    if let Some(j) = slots.iter().position(|&(o, _)| o == owner) {
        SlotPick::Own(j)
    } else if slots.len() < policy.max {
        SlotPick::New
    } else {
        slots
            .iter()
            .enumerate()
            .filter(|(_, (o, _))| !policy.keep.contains(o))
            .min_by_key(|(_, (_, used))| *used)
            .map_or(SlotPick::NoneFree, |(j, _)| SlotPick::Evict(j))
    }
}

/// The slot holding Session cache `owner`'s K/V for a canvas of `len` tokens.
pub(super) fn slot_of(slots: &[CacheSlot], owner: u64, len: usize) -> Option<usize> {
    slots.iter().position(|s| s.owner == owner && s.seq == len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_slots_are_kept_per_owner_then_recycled_least_recently_used() {
        let policy = SlotPolicy { max: 3, keep: &[] };
        let pick = |slots: &[(u64, u64)], owner| pick_slot_of(slots.iter().copied(), owner, policy);
        // A cache's own slot, whatever the others.
        assert_eq!(pick(&[(7, 1), (9, 5)], 9), SlotPick::Own(1));
        // A new cache gets a new slot while fewer than the most exist ...
        assert_eq!(pick(&[], 4), SlotPick::New);
        assert_eq!(pick(&[(7, 1), (9, 5)], 4), SlotPick::New);
        // ... then the least recently used one.
        assert_eq!(pick(&[(7, 8), (9, 5), (3, 6)], 4), SlotPick::Evict(1));
        assert_eq!(pick(&[(7, 2), (9, 5), (3, 6)], 4), SlotPick::Evict(0));
        // Two sessions alternating (or a guided session's two canvases) keep two slots: each
        // refresh finds its own, so their span steps never evict each other.
        let mut slots: Vec<(u64, u64)> = Vec::new();
        for (t, owner) in [1u64, 2, 1, 2, 1, 2].into_iter().enumerate() {
            match pick(&slots, owner) {
                SlotPick::Own(j) => slots[j].1 = t as u64,
                SlotPick::New => slots.push((owner, t as u64)),
                other => panic!("{other:?} with only two caches"),
            }
        }
        assert_eq!(slots.len(), 2);
    }

    #[test]
    fn a_batch_never_takes_its_own_canvases_slots() {
        // Slots of caches 7, 9 and 3, all in use; 9 and 3 belong to the same packed batch as
        // the claimer: the least recently used one outside it goes, however recent.
        let slots = [(7u64, 8u64), (9, 5), (3, 6)];
        let keep = [9u64, 3];
        let policy = SlotPolicy {
            max: 3,
            keep: &keep,
        };
        assert_eq!(
            pick_slot_of(slots.iter().copied(), 4, policy),
            SlotPick::Evict(0)
        );
        // The claimer's own slot is its own, kept or not.
        assert_eq!(
            pick_slot_of(slots.iter().copied(), 9, policy),
            SlotPick::Own(1)
        );
        // Every slot kept: nothing to take (the caller reports it).
        let keep = [7u64, 9, 3];
        let policy = SlotPolicy {
            max: 3,
            keep: &keep,
        };
        assert_eq!(
            pick_slot_of(slots.iter().copied(), 4, policy),
            SlotPick::NoneFree
        );
        // Below the most, a new slot regardless.
        let policy = SlotPolicy {
            max: 4,
            keep: &keep,
        };
        assert_eq!(
            pick_slot_of(slots.iter().copied(), 4, policy),
            SlotPick::New
        );
    }
}
