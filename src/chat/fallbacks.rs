//! The built-in chat formats, used when a model directory has no chat template.
//!
//! - LLaDA (Llama-3 headers, as LLaDA-8B-Instruct's template):
//!   `<|startoftext|>` before the first turn, each turn
//!   `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>` with CONTENT trimmed, the
//!   generation prompt `<|start_header_id|>assistant<|end_header_id|>\n\n`.
//! - Dream (ChatML, as Qwen2.5 / Dream-v0-Instruct): a system turn
//!   `You are a helpful assistant.` when the conversation does not start with one, each turn
//!   `<|im_start|>ROLE\nCONTENT<|im_end|>\n`, the generation prompt `<|im_start|>assistant\n`.
//! - LLaDA-MoE (inclusionAI's Ling format): each turn `<role>ROLE</role>CONTENT<|role_end|>`
//!   with ROLE `SYSTEM`, `HUMAN` or `ASSISTANT`, the generation prompt `<role>ASSISTANT</role>`;
//!   no default system turn.

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
    /// `<role>…</role>` tags with `<|role_end|>` (LLaDA-MoE).
    LladaMoe,
}

impl Family {
    /// The format an architecture's instruct models use.
    pub fn of(arch: Arch) -> Family {
        match arch {
            Arch::Llada => Family::Llada,
            Arch::Dream => Family::Dream,
            Arch::LladaMoe => Family::LladaMoe,
        }
    }

    /// `llada`, `dream` or `llada-moe`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llada => "llada",
            Family::Dream => "dream",
            Family::LladaMoe => "llada-moe",
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
            Family::LladaMoe => {
                for m in messages {
                    let role = match m.role {
                        Role::System => "SYSTEM",
                        Role::User => "HUMAN",
                        Role::Assistant => "ASSISTANT",
                    };
                    out.push_str(&format!("<role>{role}</role>{}<|role_end|>", m.content));
                }
                if add_generation_prompt {
                    out.push_str("<role>ASSISTANT</role>");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llada_moe_turns_use_role_tags() {
        let messages = [
            Message {
                role: Role::System,
                content: "Be brief.".into(),
            },
            Message {
                role: Role::User,
                content: "Hi".into(),
            },
        ];
        assert_eq!(Family::of(Arch::LladaMoe), Family::LladaMoe);
        assert_eq!(
            Family::LladaMoe.render(&messages, true),
            "<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>Hi<|role_end|>\
             <role>ASSISTANT</role>"
        );
        assert_eq!(
            Family::LladaMoe.render(&messages[1..], false),
            "<role>HUMAN</role>Hi<|role_end|>"
        );
    }
}
