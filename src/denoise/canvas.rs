//! Building canvases: token sequences where mask tokens mark the positions to generate, and the
//! canvas syntax of the CLI (`text [MASK:n] text [ONEOF:a|b] …`).

use crate::error::{Error, Result};

/// One piece of a canvas written in the canvas syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanvasPart {
    /// Fixed text (tokenized on its own).
    Text(String),
    /// A gap of this many mask tokens.
    Masks(usize),
    /// A one-token gap generated as one of these choices (`[ONEOF:a|b|c]`), each a single
    /// token tokenized on its own; see [`super::constraint`].
    OneOf(Vec<String>),
}

/// A canvas built from [`CanvasPart`]s: its ids, and the allowed ids of each `[ONEOF:…]` gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltCanvas {
    pub ids: Vec<u32>,
    /// `(position, allowed ids)` of each [`CanvasPart::OneOf`], in canvas order: give them to
    /// [`super::Session::constrain`].
    pub choices: Vec<(usize, Vec<u32>)>,
}

const MASK_TAG: &str = "[MASK:";
const ONEOF_TAG: &str = "[ONEOF:";

/// Parses the canvas syntax: text with any number of gaps `[MASK:n]` (`n ≥ 1` decimal) and
/// one-token choices `[ONEOF:a|b|c]` (`|`-separated, none empty; spaces are part of a choice).
/// Any other text, including a lone `[MASK]`, is fixed text. Empty text pieces are dropped.
///
/// Errors ([`Error::InvalidArgument`], naming the byte offset): `[MASK:` not followed by a
/// positive number and `]`; `[ONEOF:` not followed by non-empty choices and `]`.
pub fn parse_canvas(spec: &str) -> Result<Vec<CanvasPart>> {
    let mut parts = Vec::new();
    let mut rest = spec;
    let mut offset = 0;
    while let Some((i, tag)) = [MASK_TAG, ONEOF_TAG]
        .iter()
        .filter_map(|&t| rest.find(t).map(|i| (i, t)))
        .min()
    {
        if i > 0 {
            parts.push(CanvasPart::Text(rest[..i].to_string()));
        }
        let after = &rest[i + tag.len()..];
        let close = after.find(']');
        let part = close.and_then(|c| gap_body(tag, &after[..c]));
        match (part, close) {
            (Some(part), Some(c)) => {
                parts.push(part);
                let used = i + tag.len() + c + 1;
                offset += used;
                rest = &rest[used..];
            }
            _ => {
                let (what, example) = if tag == MASK_TAG {
                    ("a positive count", "[MASK:16]")
                } else {
                    (
                        "choices separated by `|`, none empty,",
                        "[ONEOF:True|False]",
                    )
                };
                return Err(Error::invalid(format!(
                    "canvas: `{tag}` at byte {} must be followed by {what} and `]`, as in {example}",
                    offset + i
                )));
            }
        }
    }
    if !rest.is_empty() {
        parts.push(CanvasPart::Text(rest.to_string()));
    }
    Ok(parts)
}

/// The part a gap tag's body (between the tag and `]`) stands for, `None` if malformed.
fn gap_body(tag: &str, body: &str) -> Option<CanvasPart> {
    if tag == MASK_TAG {
        (!body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()))
            .then(|| body.parse::<usize>().ok())
            .flatten()
            .filter(|&n| n > 0)
            .map(CanvasPart::Masks)
    } else {
        let choices: Vec<String> = body.split('|').map(str::to_string).collect();
        (!choices.iter().any(String::is_empty)).then_some(CanvasPart::OneOf(choices))
    }
}

/// Builds the token canvas of `parts`: each text piece through `encode`, each gap as masks,
/// each `[ONEOF:…]` as one mask whose choices (each through `encode`) must be one token each.
///
/// Errors ([`Error::InvalidArgument`]): the canvas would hold more than `max_len` tokens (the
/// model's `max_seq_len`), checked before any gap is allocated; a choice that is not exactly
/// one token.
pub fn build_canvas(
    parts: &[CanvasPart],
    mut encode: impl FnMut(&str) -> Result<Vec<u32>>,
    mask: u32,
    max_len: usize,
) -> Result<BuiltCanvas> {
    let too_long = |what: String| {
        Error::invalid(format!(
            "canvas: {what} exceeds the model's max_seq_len {max_len}"
        ))
    };
    let mut c = Vec::new();
    let mut choices = Vec::new();
    for p in parts {
        match p {
            CanvasPart::Text(t) => c.extend(encode(t)?),
            CanvasPart::Masks(n) => {
                let len = c
                    .len()
                    .checked_add(*n)
                    .filter(|&l| l <= max_len)
                    .ok_or_else(|| {
                        too_long(format!("a gap of {n} masks after {} token(s)", c.len()))
                    })?;
                c.resize(len, mask);
            }
            CanvasPart::OneOf(options) => {
                let mut allowed = Vec::with_capacity(options.len());
                for o in options {
                    match encode(o)?[..] {
                        [id] => allowed.push(id),
                        ref ids => {
                            return Err(Error::invalid(format!(
                                "canvas: the choice {o:?} of [ONEOF:{}] is {} tokens; each choice \
                                 must be exactly one token (spaces count: \" True\" and \"True\" \
                                 differ)",
                                options.join("|").escape_debug(),
                                ids.len()
                            )))
                        }
                    }
                }
                choices.push((c.len(), allowed));
                c.push(mask);
            }
        }
        if c.len() > max_len {
            return Err(too_long(format!("{} token(s)", c.len())));
        }
    }
    Ok(BuiltCanvas { ids: c, choices })
}

/// Mask positions covering the byte range `start..end` of a text whose tokens end at the
/// byte offsets `ends` (token `i` covers `ends[i-1]..ends[i]`, token 0 starts at 0): every
/// token overlapping the range, so the range is widened to token boundaries. An empty range
/// selects the token containing `start` (the last token when `start` is at the end).
pub fn span_tokens(ends: &[usize], start: usize, end: usize) -> std::ops::Range<usize> {
    let begin_of = |i: usize| if i == 0 { 0 } else { ends[i - 1] };
    let first = ends
        .partition_point(|&e| e <= start)
        .min(ends.len().saturating_sub(1));
    let mut last = first + 1;
    while last < ends.len() && begin_of(last) < end {
        last += 1;
    }
    first..last.min(ends.len())
}

/// A generation canvas: `prompt` followed by `gen_len` mask tokens.
pub fn generation_canvas(prompt: &[u32], gen_len: usize, mask: u32) -> Vec<u32> {
    let mut c = Vec::with_capacity(prompt.len() + gen_len);
    c.extend_from_slice(prompt);
    c.resize(prompt.len() + gen_len, mask);
    c
}

/// An infill canvas: `prefix`, `n` mask tokens, then `suffix`.
pub fn infill_canvas(prefix: &[u32], n: usize, suffix: &[u32], mask: u32) -> Vec<u32> {
    let mut c = generation_canvas(prefix, n, mask);
    c.extend_from_slice(suffix);
    c
}

/// Positions of `canvas` holding `mask`, in increasing order.
pub fn masked_positions(canvas: &[u32], mask: u32) -> Vec<usize> {
    canvas
        .iter()
        .enumerate()
        .filter_map(|(i, &t)| (t == mask).then_some(i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_canvases() {
        assert_eq!(generation_canvas(&[5, 6], 3, 1), vec![5, 6, 1, 1, 1]);
        assert_eq!(generation_canvas(&[], 2, 9), vec![9, 9]);
        assert_eq!(infill_canvas(&[5], 2, &[7, 8], 1), vec![5, 1, 1, 7, 8]);
        assert_eq!(masked_positions(&[1, 5, 1, 1, 7, 1], 1), vec![0, 2, 3, 5]);
    }

    #[test]
    fn parses_the_canvas_syntax() {
        use CanvasPart::*;
        assert_eq!(
            parse_canvas("def f():\n    return [MASK:4]\n\n[MASK:16]").unwrap(),
            vec![
                Text("def f():\n    return ".into()),
                Masks(4),
                Text("\n\n".into()),
                Masks(16)
            ]
        );
        assert_eq!(
            parse_canvas("[MASK:2][MASK:3]x").unwrap(),
            vec![Masks(2), Masks(3), Text("x".into())]
        );
        assert_eq!(
            parse_canvas("a [MASK] b").unwrap(),
            vec![Text("a [MASK] b".into())]
        );
        assert_eq!(parse_canvas("").unwrap(), vec![]);
        for bad in [
            "x[MASK:0]",
            "x[MASK:]",
            "x[MASK:3",
            "x[MASK:-1]",
            "x[MASK:a]",
            "ab[MASK:2]c[MASK: 2]",
        ] {
            let e = parse_canvas(bad).unwrap_err().to_string();
            assert!(e.contains("[MASK:") && e.contains("byte"), "{bad}: {e}");
        }
        assert!(parse_canvas("ab[MASK:2]c[MASK: 2]")
            .unwrap_err()
            .to_string()
            .contains("byte 11"));
        let enc = |t: &str| Ok(t.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(
            build_canvas(&parse_canvas("ab[MASK:2]c").unwrap(), enc, 0, 16)
                .unwrap()
                .ids,
            vec![97, 98, 0, 0, 99]
        );
    }

    #[test]
    fn parses_and_builds_one_token_choices() {
        use CanvasPart::*;
        assert_eq!(
            parse_canvas("x =[ONEOF: True| False]\n[MASK:2]").unwrap(),
            vec![
                Text("x =".into()),
                OneOf(vec![" True".into(), " False".into()]),
                Text("\n".into()),
                Masks(2)
            ]
        );
        assert_eq!(
            parse_canvas("[ONEOF:a]").unwrap(),
            vec![OneOf(vec!["a".into()])]
        );
        for (bad, byte) in [
            ("ab[ONEOF:]", 2),
            ("[ONEOF:a||b]", 0),
            ("x[ONEOF:a|]", 1),
            ("x[ONEOF:a|b", 1),
            ("[MASK:1][ONEOF:|a]", 8),
        ] {
            let e = parse_canvas(bad).unwrap_err().to_string();
            assert!(
                e.contains("[ONEOF:") && e.contains(&format!("byte {byte}")),
                "{bad}: {e}"
            );
        }
        // One byte = one token here: a choice of two bytes is two tokens.
        let enc = |t: &str| Ok(t.bytes().map(u32::from).collect::<Vec<_>>());
        let built =
            build_canvas(&parse_canvas("a[ONEOF:x|y]b[ONEOF:z]").unwrap(), enc, 0, 16).unwrap();
        assert_eq!(built.ids, vec![97, 0, 98, 0]);
        assert_eq!(built.choices, vec![(1, vec![120, 121]), (3, vec![122])]);
        let e = build_canvas(&parse_canvas("a[ONEOF:x|yz]").unwrap(), enc, 0, 16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"yz\"") && e.contains("2 tokens"), "{e}");
        // The tag is quoted escaped: one line even when a choice holds a newline.
        let e = build_canvas(&parse_canvas("a[ONEOF:\n|yz]").unwrap(), enc, 0, 16)
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n') && e.contains("[ONEOF:\\n|yz]"), "{e}");
        assert!(build_canvas(&parse_canvas("abc[ONEOF:x]").unwrap(), enc, 0, 3).is_err());
    }

    #[test]
    fn a_canvas_longer_than_the_limit_is_refused_before_it_is_allocated() {
        let enc = |t: &str| Ok(t.bytes().map(u32::from).collect());
        for spec in [
            "ab[MASK:15]",
            "[MASK:18446744073709551615]x",
            "abcdefghijklmnopq",
        ] {
            let e = build_canvas(&parse_canvas(spec).unwrap(), enc, 0, 16)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("exceeds the model's max_seq_len 16"),
                "{spec}: {e}"
            );
        }
        // The gap after text that already fills the limit, and one past u64 when added.
        let parts = [CanvasPart::Text("a".into()), CanvasPart::Masks(usize::MAX)];
        assert!(build_canvas(&parts, enc, 0, 16).is_err());
        assert_eq!(
            build_canvas(&parse_canvas("ab[MASK:14]").unwrap(), enc, 0, 16)
                .unwrap()
                .ids
                .len(),
            16
        );
    }

    #[test]
    fn spans_widen_to_token_boundaries() {
        // Tokens cover 0..3, 3..5, 5..9, 9..10.
        let ends = [3, 5, 9, 10];
        assert_eq!(span_tokens(&ends, 0, 3), 0..1);
        assert_eq!(span_tokens(&ends, 2, 4), 0..2);
        assert_eq!(span_tokens(&ends, 3, 5), 1..2);
        assert_eq!(span_tokens(&ends, 4, 6), 1..3);
        assert_eq!(span_tokens(&ends, 6, 10), 2..4);
        assert_eq!(span_tokens(&ends, 0, 10), 0..4);
        assert_eq!(span_tokens(&ends, 4, 4), 1..2);
        assert_eq!(span_tokens(&ends, 10, 10), 3..4);
    }
}
