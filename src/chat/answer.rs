//! Cleaning a generated answer: the end-of-text, padding and end-of-turn tokens a model writes
//! after its answer are not part of it.

use crate::config::ModelConfig;
use crate::tokenizer::Tokenizer;

/// End-of-turn tokens of the chat formats (LLaDA's, Dream's, LLaDA-MoE's, end of text), removed
/// from answers when the tokenizer knows them.
pub const END_OF_TURN_TOKENS: [&str; 4] =
    ["<|eot_id|>", "<|im_end|>", "<|role_end|>", "<|endoftext|>"];

/// The ids that end an answer: the config's EOS and pad ids, and the ids of
/// [`END_OF_TURN_TOKENS`] in `tok`. Sorted, without duplicates.
pub fn stop_ids(cfg: &ModelConfig, tok: &Tokenizer) -> Vec<u32> {
    let mut ids = vec![cfg.eos_token_id, cfg.pad_token_id];
    ids.extend(END_OF_TURN_TOKENS.iter().filter_map(|t| tok.token_to_id(t)));
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `ids` without its trailing run of `stops`.
pub fn strip_trailing<'a>(ids: &'a [u32], stops: &[u32]) -> &'a [u32] {
    let keep = ids.len() - ids.iter().rev().take_while(|t| stops.contains(t)).count();
    &ids[..keep]
}

/// `ids` up to (without) the first of `stops`: the answer of a chat turn, which ends where
/// the model ends its turn.
pub fn until_first<'a>(ids: &'a [u32], stops: &[u32]) -> &'a [u32] {
    let end = ids
        .iter()
        .position(|t| stops.contains(t))
        .unwrap_or(ids.len());
    &ids[..end]
}

/// The part of `generated` that is text: a chat answer ends at the first stop token
/// ([`until_first`]); otherwise only the trailing run of stop tokens (padding) is dropped
/// ([`strip_trailing`]).
pub fn answer_ids<'a>(generated: &'a [u32], stops: &[u32], chat: bool) -> &'a [u32] {
    if chat {
        until_first(generated, stops)
    } else {
        strip_trailing(generated, stops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_the_trailing_run() {
        let stops = [0, 9];
        assert_eq!(strip_trailing(&[5, 0, 6, 9, 0, 9], &stops), &[5, 0, 6]);
        assert_eq!(strip_trailing(&[5, 6], &stops), &[5, 6]);
        assert_eq!(strip_trailing(&[0, 9], &stops), &[] as &[u32]);
        assert_eq!(strip_trailing(&[], &stops), &[] as &[u32]);
        assert_eq!(strip_trailing(&[1, 0], &[]), &[1, 0]);
    }

    #[test]
    fn the_llada_moe_turn_end_stops_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let added = |id: u32, t: &str| {
            serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({"version": "1.0",
            "added_tokens": [added(3, "<|role_end|>"), added(4, "<|endoftext|>")],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "<unk>",
                "vocab": {"a": 0, "b": 1, "<unk>": 2, "<|role_end|>": 3, "<|endoftext|>": 4}}});
        std::fs::write(&path, json.to_string()).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        let cfg = ModelConfig::from_json(&serde_json::json!({"model_type": "lladamoe",
            "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
            "expert_intermediate_size": 8, "num_experts": 2, "num_experts_per_tok": 1,
            "vocab_size": 6, "rope_theta": 5e4, "mask_token_id": 5, "eos_token_id": 4}))
        .unwrap();
        let stops = stop_ids(&cfg, &tok);
        assert_eq!(stops, vec![3, 4]);
        assert_eq!(until_first(&[0, 1, 3, 0, 4], &stops), &[0, 1]);
    }

    #[test]
    fn cuts_at_the_first_stop() {
        let stops = [0, 9];
        assert_eq!(until_first(&[5, 6, 9, 7, 0], &stops), &[5, 6]);
        assert_eq!(until_first(&[9, 5], &stops), &[] as &[u32]);
        assert_eq!(until_first(&[5, 6], &stops), &[5, 6]);
    }
}
