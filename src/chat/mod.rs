//! Chat: conversations rendered into a prompt with the model's chat template, and answers
//! cleaned of the end-of-turn / padding tokens that follow them.
//!
//! [`ChatTemplate::for_model`] finds the template of a model directory (`chat_template.jinja`,
//! else `chat_template` in `tokenizer_config.json`, else a built-in fallback for the
//! architecture, see [`fallbacks`]); [`ChatTemplate::render`] turns [`Message`]s into the prompt
//! text; [`answer`] strips what the model writes after its answer.

pub mod answer;
pub mod fallbacks;
pub mod template;

pub use answer::{answer_ids, stop_ids, strip_trailing, until_first};
pub use template::{ChatTemplate, Message, Role};
