//! The built-in chat formats, used when a model directory has no chat template.
//!
//! - LLaDA (Llama-3 headers, as LLaDA-8B-Instruct's template):
//!   `<|startoftext|>` before the first turn, each turn
//!   `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>` with CONTENT trimmed, the
//!   generation prompt `<|start_header_id|>assistant<|end_header_id|>\n\n`.
//! - Dream (ChatML, as Qwen2.5 / Dream-v0-Instruct): a system turn
//!   `You are a helpful assistant.` when the conversation does not start with one, each turn
//!   `<|im_start|>ROLE\nCONTENT<|im_end|>\n`, the generation prompt `<|im_start|>assistant\n`.

use super::template::{Message, Role};
use crate::config::Arch;

/// The system prompt of the Dream format when the conversation has none.
pub const DREAM_DEFAULT_SYSTEM: &str = "You are a helpful assistant.";
/// LLaDA's beginning-of-sequence token.
pub const LLADA_BOS: &str = "<|startoftext|>";

/// A built-in chat format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama-3 style headers with `<|eot_id|>` (LLaDA).
    Llada,
    /// ChatML with a default system prompt (Dream).
    Dream,
}

impl Family {
    /// The format an architecture's instruct models use.
    pub fn of(arch: Arch) -> Family {
        match arch {
            Arch::Llada => Family::Llada,
            Arch::Dream => Family::Dream,
        }
    }

    /// `llada` or `dream`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llada => "llada",
            Family::Dream => "dream",
        }
    }

    /// The prompt text of `messages` in this format.
    pub fn render(self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        match self {
            Family::Llada => {
                if !messages.is_empty() {
                    out.push_str(LLADA_BOS);
                }
                for m in messages {
                    llada_turn(&mut out, m.role.as_str(), m.content.trim());
                }
                if add_generation_prompt {
                    out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
            Family::Dream => {
                if messages.first().map(|m| m.role) != Some(Role::System) {
                    chatml_turn(&mut out, "system", DREAM_DEFAULT_SYSTEM);
                }
                for m in messages {
                    chatml_turn(&mut out, m.role.as_str(), &m.content);
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
            }
        }
        out
    }
}

fn llada_turn(out: &mut String, role: &str, content: &str) {
    out.push_str("<|start_header_id|>");
    out.push_str(role);
    out.push_str("<|end_header_id|>\n\n");
    out.push_str(content);
    out.push_str("<|eot_id|>");
}

fn chatml_turn(out: &mut String, role: &str, content: &str) {
    out.push_str("<|im_start|>");
    out.push_str(role);
    out.push('\n');
    out.push_str(content);
    out.push_str("<|im_end|>\n");
}
