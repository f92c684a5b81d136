//! Index math of a padded batched forward ([`super::transformer::CudaTransformer`]'s
//! `predict_batch`): which canvases share one padded forward, the padded `[batch, seq]` id
//! layout, the query rows of each canvas in it, and which canvases share a prediction rule.
//!
//! Pure functions on host data, so the layout is tested without a GPU.

use crate::denoise::predict::PredictRule;
use crate::error::{Error, Result};
use std::ops::Range;

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

/// One canvas's queries in a batched forward (a padded batch, or a pack of cached spans) whose
/// canvases each contribute `len` rows: member `b`'s rows `b·len ..` hold its positions
/// `start ..`.
#[derive(Debug, Clone, Copy)]
pub struct QueryMember<'q> {
    pub start: usize,
    pub queries: &'q [usize],
    pub rule: &'q PredictRule,
}

/// The query rows of a batched forward, grouped by rule ([`rule_rows`]): the rows and
/// positions to upload, each distinct rule's range of them (one sampler launch each), and how
/// to hand the predictions back per member ([`RuleRows::split`]).
#[derive(Debug)]
pub struct RuleRows<'q> {
    pub idx: Vec<i32>,
    pub pos: Vec<i32>,
    pub ranges: Vec<(Range<usize>, &'q PredictRule)>,
    groups: Vec<Vec<usize>>,
}

/// Groups `members` by rule ([`rule_groups`]) and lists their queries' rows, rule by rule:
/// query `q` of member `b` reads row `b·len + source(q) − start` (`source` = the model's
/// [`crate::config::ModelConfig::source_position`]) and keys its random draws by position `q`.
/// A query whose source row lies outside its member's rows, or a row or position past `i32`, is
/// an error naming it.
pub fn rule_rows<'q>(
    members: &[QueryMember<'q>],
    len: usize,
    source: impl Fn(usize) -> usize,
) -> Result<RuleRows<'q>> {
    let rules: Vec<&PredictRule> = members.iter().map(|m| m.rule).collect();
    let groups = rule_groups(&rules);
    let to_i32 = |what: &str, v: usize| {
        i32::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} exceeds i32")))
    };
    let (mut idx, mut pos, mut ranges) = (Vec::new(), Vec::new(), Vec::new());
    for group in &groups {
        let begin = idx.len();
        for &b in group {
            let m = &members[b];
            for &q in m.queries {
                let src = source(q);
                if src < m.start || src >= m.start + len {
                    return Err(Error::invalid(format!(
                        "query {q} (source row {src}) is outside the rows {}..{}",
                        m.start,
                        m.start + len
                    )));
                }
                idx.push(to_i32("query row", b * len + src - m.start)?);
                pos.push(to_i32("query position", q)?);
            }
        }
        ranges.push((begin..idx.len(), rules[group[0]]));
    }
    Ok(RuleRows {
        idx,
        pos,
        ranges,
        groups,
    })
}

impl RuleRows<'_> {
    /// Query rows in all.
    pub fn total(&self) -> usize {
        self.idx.len()
    }

    /// The predictions of every query row (in upload order) handed back per member, each in
    /// its queries' order.
    pub fn split<T>(&self, preds: Vec<T>, members: &[QueryMember<'_>]) -> Vec<Vec<T>> {
        let mut preds = preds.into_iter();
        let mut out: Vec<Vec<T>> = (0..members.len()).map(|_| Vec::new()).collect();
        for group in &self.groups {
            for &b in group {
                out[b] = preds.by_ref().take(members[b].queries.len()).collect();
            }
        }
        out
    }
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
    fn query_rows_follow_the_member_its_start_and_the_shift() {
        let rule = |step| PredictRule {
            temperature: 0.0,
            remasking: Remasking::LowConfidence,
            seed: 0,
            step,
            mask_token: 7,
            vocab_size: 50,
        };
        let (r0, r1) = (rule(0), rule(1));
        // A padded batch (every start 0, rows of 8): row = b·8 + q.
        let (qa, qb): (&[usize], &[usize]) = (&[0, 2], &[0, 1, 5]);
        let padded = [
            QueryMember {
                start: 0,
                queries: qb,
                rule: &r0,
            },
            QueryMember {
                start: 0,
                queries: qa,
                rule: &r0,
            },
        ];
        let rows = rule_rows(&padded, 8, |p| p).unwrap();
        assert_eq!(rows.idx, vec![0, 1, 5, 8, 10]);
        assert_eq!(rows.pos, vec![0, 1, 5, 0, 2]);
        assert_eq!(rows.ranges.len(), 1);
        // Shifted (Dream): row = b·8 + max(q − 1, 0); positions stay the queries.
        let rows = rule_rows(&padded, 8, |p: usize| p.saturating_sub(1)).unwrap();
        assert_eq!(rows.idx, vec![0, 0, 4, 8, 9]);
        // Cached spans of 32 rows at their own starts; member 1 has its own rule, so its rows
        // come after the first rule's (members 0 and 2), and the predictions go back to each
        // member in its queries' order.
        let (a, b, c) = ([100usize, 103], [41usize], [7usize, 9, 8]);
        let spans = [
            QueryMember {
                start: 96,
                queries: &a,
                rule: &r0,
            },
            QueryMember {
                start: 0,
                queries: &c,
                rule: &r1,
            },
            QueryMember {
                start: 40,
                queries: &b,
                rule: &r0,
            },
        ];
        let rows = rule_rows(&spans, 32, |q| q).unwrap();
        assert_eq!(rows.idx, vec![4, 7, 64 + 1, 32 + 7, 32 + 9, 32 + 8]);
        assert_eq!(rows.pos, vec![100, 103, 41, 7, 9, 8]);
        let ranges: Vec<Range<usize>> = rows.ranges.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(ranges, vec![0..3, 3..6]);
        assert_eq!(rows.total(), 6);
        let back = rows.split(vec![10, 11, 12, 13, 14, 15], &spans);
        assert_eq!(back, vec![vec![10, 11], vec![13, 14, 15], vec![12]]);
        // A source row outside its member's rows is refused, naming the query.
        let e = rule_rows(&spans, 8, |q| q).unwrap_err().to_string();
        assert!(
            e.contains("query 9 (source row 9) is outside the rows 0..8"),
            "{e}"
        );
        let e = rule_rows(&spans, 32, |q| q - 97).unwrap_err().to_string();
        assert!(e.contains("query 100 (source row 3)"), "{e}");
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
