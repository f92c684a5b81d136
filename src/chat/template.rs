//! Chat templates: a model's Jinja `chat_template`, rendered the way transformers'
//! `apply_chat_template` renders it, or a built-in fallback when the model has none.
//!
//! Where the template comes from ([`ChatTemplate::for_model`]), first found wins:
//! `chat_template.jinja` in the model directory (newer transformers), the `chat_template` field
//! of `tokenizer_config.json` (a string, or a list of `{name, template}` of which `"default"` is
//! used), else [`fallbacks`](super::fallbacks) chosen by the architecture.
//!
//! Rendering follows transformers: `trim_blocks` and `lstrip_blocks` on; the context holds
//! `messages` (`role`, `content`), `add_generation_prompt`, `tools` (none) and the special
//! tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `unk_token`);
//! `raise_exception(msg)` aborts with `msg`.

use super::fallbacks::Family;
use crate::config::Arch;
use crate::error::{Error, Result};
use minijinja::value::Value;
use minijinja::Environment;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name in templates (`system`, `user`, `assistant`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Role> {
        match s {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            other => Err(Error::invalid(format!(
                "unknown chat role {other:?} (expected system, user or assistant)"
            ))),
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Message {
        Message::new(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Message {
        Message::new(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Message {
        Message::new(Role::Assistant, content)
    }
}

/// The special tokens a template may name, as strings (from `tokenizer_config.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

/// A chat template: Jinja source with its origin, or a built-in fallback.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Jinja {
        source: String,
        origin: PathBuf,
        tokens: SpecialTokens,
    },
    Builtin(Family),
}

/// What `tokenizer_config.json` holds for chat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    /// The `chat_template` (the `"default"` one of a list), if any.
    pub chat_template: Option<String>,
    pub tokens: SpecialTokens,
}

impl TokenizerConfig {
    /// Reads `path`; `Ok(None)` when the file does not exist.
    ///
    /// Errors ([`Error::Format`] naming `path`): invalid JSON, a root that is not an object, a
    /// `chat_template` that is neither a string nor a list of `{name, template}` objects, a list
    /// without a `"default"` entry, a special token that is neither a string nor
    /// `{"content": string}`.
    pub fn from_file(path: &Path) -> Result<Option<TokenizerConfig>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let v: Json = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        Self::from_json(&v)
            .map(Some)
            .map_err(|msg| Error::format(path, msg))
    }

    /// Parses the JSON of a `tokenizer_config.json`; errors are messages without the path.
    fn from_json(v: &Json) -> std::result::Result<TokenizerConfig, String> {
        let obj = v
            .as_object()
            .ok_or("the root must be a JSON object".to_string())?;
        let chat_template = match obj.get("chat_template") {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(list)) => Some(default_template(list)?),
            Some(other) => {
                return Err(format!(
                    "`chat_template` must be a string or a list of {{name, template}}, found {}",
                    json_kind(other)
                ))
            }
        };
        let token = |field: &str| -> std::result::Result<Option<String>, String> {
            match obj.get(field) {
                None | Some(Json::Null) => Ok(None),
                Some(Json::String(s)) => Ok(Some(s.clone())),
                Some(Json::Object(o)) => match o.get("content") {
                    Some(Json::String(s)) => Ok(Some(s.clone())),
                    _ => Err(format!("`{field}` object has no string `content`")),
                },
                Some(other) => Err(format!(
                    "`{field}` must be a string or {{\"content\": …}}, found {}",
                    json_kind(other)
                )),
            }
        };
        Ok(TokenizerConfig {
            chat_template,
            tokens: SpecialTokens {
                bos: token("bos_token")?,
                eos: token("eos_token")?,
                pad: token("pad_token")?,
                unk: token("unk_token")?,
            },
        })
    }
}

/// The `"default"` template of a `chat_template` list.
fn default_template(list: &[Json]) -> std::result::Result<String, String> {
    let mut names = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let name = entry.get("name").and_then(Json::as_str);
        let template = entry.get("template").and_then(Json::as_str);
        let (Some(name), Some(template)) = (name, template) else {
            return Err(format!(
                "`chat_template` entry {i} must be an object with string `name` and `template`"
            ));
        };
        if name == "default" {
            return Ok(template.to_string());
        }
        names.push(name);
    }
    Err(format!(
        "`chat_template` lists templates {names:?} but none named \"default\""
    ))
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// The Jinja environment transformers renders chat templates with.
fn environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::Unsupported(format!("chat template syntax: {e}")))?;
    env.set_syntax(syntax);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    Ok(env)
}

impl ChatTemplate {
    /// The template of the model directory `dir` (see the module doc for the search order).
    ///
    /// Errors: a malformed `tokenizer_config.json` or template ([`Error::Format`] naming the
    /// file), an unreadable file ([`Error::Io`]).
    pub fn for_model(dir: &Path, arch: Arch) -> Result<ChatTemplate> {
        let config_path = dir.join("tokenizer_config.json");
        let config = TokenizerConfig::from_file(&config_path)?.unwrap_or_default();
        let jinja_path = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja_path) {
            Ok(source) => return ChatTemplate::from_jinja(source, jinja_path, config.tokens),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&jinja_path, e)),
        }
        match config.chat_template {
            Some(source) => ChatTemplate::from_jinja(source, config_path, config.tokens),
            None => Ok(ChatTemplate::builtin(arch)),
        }
    }

    /// The built-in template of an architecture.
    pub fn builtin(arch: Arch) -> ChatTemplate {
        ChatTemplate {
            kind: Kind::Builtin(Family::of(arch)),
        }
    }

    /// A Jinja template; `origin` names the file it came from in error messages.
    ///
    /// Errors ([`Error::Format`] naming `origin`): the template does not compile.
    pub fn from_jinja(
        source: impl Into<String>,
        origin: impl Into<PathBuf>,
        tokens: SpecialTokens,
    ) -> Result<ChatTemplate> {
        let (source, origin) = (source.into(), origin.into());
        let env = environment()?;
        env.template_from_str(&source)
            .map_err(|e| Error::format(&origin, format!("chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            kind: Kind::Jinja {
                source,
                origin,
                tokens,
            },
        })
    }

    /// Where the template came from: the file, or `built-in <family>`.
    pub fn origin(&self) -> String {
        match &self.kind {
            Kind::Jinja { origin, .. } => origin.display().to_string(),
            Kind::Builtin(f) => format!("built-in {}", f.name()),
        }
    }

    /// The prompt text of `messages`; with `add_generation_prompt`, followed by the header of
    /// an assistant turn (for templates that honour the flag).
    ///
    /// Errors ([`Error::Format`] naming the template's file): the template fails (e.g. it calls
    /// `raise_exception`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match &self.kind {
            Kind::Builtin(f) => Ok(f.render(messages, add_generation_prompt)),
            Kind::Jinja {
                source,
                origin,
                tokens,
            } => {
                let fail = |e: minijinja::Error| {
                    Error::format(origin, format!("chat template failed: {e}"))
                };
                let env = environment()?;
                let template = env.template_from_str(source).map_err(fail)?;
                let messages: Value = messages
                    .iter()
                    .map(|m| {
                        Value::from_pairs([
                            ("role", Value::from(m.role.as_str())),
                            ("content", Value::from(m.content.as_str())),
                        ])
                    })
                    .collect();
                let mut ctx = vec![
                    ("messages", messages),
                    ("add_generation_prompt", Value::from(add_generation_prompt)),
                    ("tools", Value::from(())),
                ];
                for (name, value) in [
                    ("bos_token", &tokens.bos),
                    ("eos_token", &tokens.eos),
                    ("pad_token", &tokens.pad),
                    ("unk_token", &tokens.unk),
                ] {
                    if let Some(v) = value {
                        ctx.push((name, Value::from(v.as_str())));
                    }
                }
                template.render(Value::from_pairs(ctx)).map_err(fail)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roles_parse_and_print() {
        for r in [Role::System, Role::User, Role::Assistant] {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        let e = "tool".parse::<Role>().unwrap_err().to_string();
        assert!(e.contains("\"tool\""), "{e}");
    }

    #[test]
    fn template_list_picks_default() {
        let v = json!({"chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"}
        ]});
        let c = TokenizerConfig::from_json(&v).unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("D"));
        let v = json!({"chat_template": [{"name": "tool_use", "template": "T"}]});
        let e = TokenizerConfig::from_json(&v).unwrap_err();
        assert!(e.contains("tool_use") && e.contains("default"), "{e}");
        let v = json!({"chat_template": [{"name": "default"}]});
        assert!(TokenizerConfig::from_json(&v)
            .unwrap_err()
            .contains("entry 0"));
    }

    #[test]
    fn special_tokens_as_strings_or_objects() {
        let v = json!({"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false},
                       "pad_token": null});
        let c = TokenizerConfig::from_json(&v).unwrap();
        assert_eq!(c.tokens.bos.as_deref(), Some("<s>"));
        assert_eq!(c.tokens.eos.as_deref(), Some("</s>"));
        assert_eq!((c.tokens.pad, c.tokens.unk), (None, None));
        assert_eq!(c.chat_template, None);
        let e = TokenizerConfig::from_json(&json!({"bos_token": 3})).unwrap_err();
        assert!(e.contains("bos_token") && e.contains("number"), "{e}");
        let e = TokenizerConfig::from_json(&json!({"chat_template": 3})).unwrap_err();
        assert!(e.contains("chat_template"), "{e}");
        assert!(TokenizerConfig::from_json(&json!([1])).is_err());
    }

    #[test]
    fn raise_exception_and_blocks_trimming() {
        let t = ChatTemplate::from_jinja(
            "{% for m in messages %}\n  {% if m.role == 'system' %}\n{{ raise_exception('no system: ' ~ m.content) }}\n  {% endif %}\n[{{ m.content }}]\n{% endfor %}",
            "t.jinja",
            SpecialTokens::default(),
        )
        .unwrap();
        // trim_blocks + lstrip_blocks: the block tags leave no whitespace behind.
        assert_eq!(
            t.render(&[Message::user("a"), Message::assistant("b")], false)
                .unwrap(),
            "[a]\n[b]\n"
        );
        let e = t
            .render(&[Message::system("x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.jinja") && e.contains("no system: x"), "{e}");
        let e = ChatTemplate::from_jinja("{% for %}", "bad.jinja", SpecialTokens::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.jinja") && e.contains("compile"), "{e}");
    }
}
