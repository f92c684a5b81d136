//! Index math of a padded batched forward ([`super::transformer::CudaTransformer`]'s
//! `predict_batch`): which canvases share one padded forward, the padded `[batch, seq]` id
//! layout, the query rows of each canvas in it, and which canvases share a prediction rule.
//!
//! Pure functions on host data, so the layout is tested without a GPU.

use crate::denoise::predict::PredictRule;

/// Splits canvases of lengths `lens` into padded sub-batches: lists of canvas indices, each run
/// as one forward over `members × L` rows where `L` is the longest member. Canvases are taken
/// longest first (ties in input order) and a sub-batch grows while `members × L ≤ max_rows`
/// and it has fewer than `max_rows / longest of all` members (at least 1); a canvas longer
/// than `max_rows` gets a sub-batch of its own. Every index appears exactly once.
///
/// The member cap matters because the device buffers are sized `(most members) × (longest
/// canvas)` and never shrink: without it a long canvas followed by many short ones would size
/// them for far more rows than any one forward uses (e.g. 1 × 4096 then 64 × 64 rows →
/// 64 × 4096).
pub fn plan_sub_batches(lens: &[usize], max_rows: usize) -> Vec<Vec<usize>> {
    let longest = lens.iter().copied().max().unwrap_or(1).max(1);
    let max_members = (max_rows / longest).max(1);
    let mut order: Vec<usize> = (0..lens.len()).collect();
    // Stable: equal lengths keep their input order.
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut seq = 0;
    for i in order {
        match groups.last_mut() {
            // Lengths never grow within a group (longest first), so `seq` stays its longest.
            Some(g) if g.len() < max_members && (g.len() + 1) * seq <= max_rows => g.push(i),
            _ => {
                seq = lens[i];
                groups.push(vec![i]);
            }
        }
    }
    groups
}

/// The ids of `canvases` as `canvases.len()` rows of `seq` ids, each canvas followed by `pad`
/// up to `seq`. Every canvas must be at most `seq` long.
pub fn pad_canvases(canvases: &[&[u32]], seq: usize, pad: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(canvases.len() * seq);
    for c in canvases {
        debug_assert!(c.len() <= seq);
        out.extend_from_slice(c);
        out.resize(out.len() + seq - c.len(), pad);
    }
    out
}

/// The forward rows and positions of the queries of several canvases of a padded batch
/// (`(slot, queries)`: canvas `slot` of the batch, its rows `slot·seq ..`), in the given order:
/// query `q` of slot `b` reads row `b·seq + source(q)` (`source` = the model's
/// [`crate::config::ModelConfig::source_position`]) and keys its random draws by position `q`.
pub fn query_rows(
    members: &[(usize, &[usize])],
    seq: usize,
    source: impl Fn(usize) -> usize,
) -> (Vec<usize>, Vec<usize>) {
    let n: usize = members.iter().map(|(_, q)| q.len()).sum();
    let (mut rows, mut pos) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for &(slot, queries) in members {
        for &q in queries {
            rows.push(slot * seq + source(q));
            pos.push(q);
        }
    }
    (rows, pos)
}

/// Groups `rules` by equality: one list of indices per distinct rule, in order of first
/// appearance, indices ascending within each.
pub fn rule_groups(rules: &[&PredictRule]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        match groups.iter_mut().find(|g| rules[g[0]] == *r) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoise::predict::Remasking;

    #[test]
    fn sub_batches_take_the_longest_first_and_respect_the_row_budget() {
        // Lengths 7, 33, 64, 100, 128 with 300 rows: at most 300 / 128 = 2 members each;
        // 128 + 100 (2·128 = 256 ≤ 300), then 64 + 33, then 7.
        let lens = [7, 33, 64, 100, 128];
        assert_eq!(
            plan_sub_batches(&lens, 300),
            vec![vec![4, 3], vec![2, 1], vec![0]]
        );
        // A budget that fits all five: 5·128 = 640.
        assert_eq!(plan_sub_batches(&lens, 640), vec![vec![4, 3, 2, 1, 0]]);
        // A canvas longer than the budget runs alone (and caps the others at 1 member each);
        // equal lengths keep their order.
        assert_eq!(
            plan_sub_batches(&[50, 500, 50, 50], 100),
            vec![vec![1], vec![0], vec![2], vec![3]]
        );
        assert_eq!(
            plan_sub_batches(&[50, 50, 50, 50, 50], 100),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
        assert!(plan_sub_batches(&[], 100).is_empty());
    }

    #[test]
    fn every_canvas_lands_in_exactly_one_sub_batch_within_budget() {
        let lens: Vec<usize> = (0..40).map(|i| 1 + (i * 37) % 90).collect();
        let groups = plan_sub_batches(&lens, 256);
        let mut seen: Vec<usize> = groups.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
        // Buffers sized (most members) × (longest canvas) stay within the budget.
        let most = groups.iter().map(Vec::len).max().unwrap();
        assert!(most * lens.iter().max().unwrap() <= 256);
        for g in &groups {
            let longest = g.iter().map(|&i| lens[i]).max().unwrap();
            assert_eq!(lens[g[0]], longest, "the first member sets L");
            assert!(g.len() * longest <= 256 || g.len() == 1);
        }
    }

    #[test]
    fn canvases_are_padded_to_the_common_length() {
        let (a, b) = ([1u32, 2, 3], [4u32]);
        assert_eq!(pad_canvases(&[&a, &b], 4, 9), vec![1, 2, 3, 9, 4, 9, 9, 9]);
        assert_eq!(pad_canvases(&[&a], 3, 9), vec![1, 2, 3]);
    }

    #[test]
    fn query_rows_follow_the_slot_and_the_shift() {
        let (qa, qb): (&[usize], &[usize]) = (&[0, 2], &[0, 1, 5]);
        // Unshifted (LLaDA): row = slot·seq + q.
        let (rows, pos) = query_rows(&[(1, qa), (0, qb)], 8, |p| p);
        assert_eq!(rows, vec![8, 10, 0, 1, 5]);
        assert_eq!(pos, vec![0, 2, 0, 1, 5]);
        // Shifted (Dream): row = slot·seq + max(q − 1, 0); positions stay the queries.
        let (rows, pos) = query_rows(&[(1, qa), (0, qb)], 8, |p: usize| p.saturating_sub(1));
        assert_eq!(rows, vec![8, 9, 0, 0, 4]);
        assert_eq!(pos, vec![0, 2, 0, 1, 5]);
    }

    #[test]
    fn equal_rules_share_a_group() {
        let rule = |temperature: f64, seed: u64| PredictRule {
            temperature,
            remasking: Remasking::LowConfidence,
            seed,
            step: 3,
            mask_token: 7,
            vocab_size: 50,
        };
        let (a, b, c) = (rule(0.0, 0), rule(0.7, 1), rule(0.7, 2));
        let groups = rule_groups(&[&a, &b, &a, &c, &b]);
        assert_eq!(groups, vec![vec![0, 2], vec![1, 4], vec![3]]);
        assert!(rule_groups(&[]).is_empty());
    }
}
