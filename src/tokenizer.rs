//! Tokenizer: `tokenizer.json` (Hugging Face format) through the `tokenizers` crate.
//!
//! Encoding adds no special tokens (the caller builds the canvas); decoding keeps them
//! optional, so a canvas can be shown with its mask tokens or as plain text. [`Tokenizer::encode`]
//! reads special-token text in its input (`<|mask|>`, a chat template's headers) as those tokens,
//! as Hugging Face tokenizers do; [`Tokenizer::encode_literal`] reads it as plain text, for text
//! that must come back byte for byte (a file being edited, the fixed text around a gap).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// How [`Tokenizer::encode_as`] reads text that spells a special token (`<|mask|>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialText {
    /// As that token, as Hugging Face tokenizers do ([`Tokenizer::encode`]).
    Token,
    /// As the plain text it is ([`Tokenizer::encode_literal`]).
    Literal,
}

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with its special tokens encoded as plain text, made on first use.
    literal: OnceLock<tokenizers::Tokenizer>,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a file.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::format(path, format!("cannot load tokenizer: {e}")))?;
        Ok(Tokenizer {
            inner,
            literal: OnceLock::new(),
            path: path.to_path_buf(),
        })
    }

    /// Loads `tokenizer.json` from a model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Tokenizer> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Text to ids, without special tokens added; special-token text in `text` (`<|mask|>`,
    /// `<|endoftext|>`) becomes that token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_as(text, SpecialText::Token)
    }

    /// Text to ids, without special tokens added, special-token text in `text` encoded as the
    /// plain text it is: decoding the ids gives `text` back, special-looking parts included.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_as(text, SpecialText::Literal)
    }

    /// Text to ids, without special tokens added, special-token text read as `special` says.
    pub fn encode_as(&self, text: &str, special: SpecialText) -> Result<Vec<u32>> {
        let t = match special {
            SpecialText::Token => &self.inner,
            SpecialText::Literal => self.literal.get_or_init(|| {
                let mut t = self.inner.clone();
                t.set_encode_special_tokens(true);
                t
            }),
        };
        let enc = t.encode(text, false).map_err(|e| {
            Error::Tokenizer(format!("{}: encode failed: {e}", self.path.display()))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids to text. With `skip_special`, special tokens (mask, eos, pad) are dropped. An id the
    /// tokenizer has no token for gives no text, as in Hugging Face `tokenizers`: models pad
    /// their vocabulary beyond the tokenizer (LLaDA-8B has 126,464 rows; its last special token
    /// is 126,348), and a canvas holding such an id must still decode. Callers check ids
    /// against the model.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("{}: decode failed: {e}", self.path.display())))
    }

    /// The text of one token id, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string (e.g. a special token), if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::from_model_dir(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/tiny-llada-code"
        )))
        .unwrap()
    }

    #[test]
    fn round_trips_python_source() {
        let t = tok();
        let text = "def add(a, b):\n    return a + b\n\n# done ✓\n";
        let ids = t.encode(text).unwrap();
        assert!(ids.len() > 5 && ids.len() < text.len());
        assert_eq!(t.decode(&ids, false).unwrap(), text);
    }

    #[test]
    fn special_tokens_are_known_and_skippable() {
        let t = tok();
        assert_eq!(t.token_to_id("<|mask|>"), Some(1));
        assert_eq!(t.token_to_id("<|endoftext|>"), Some(0));
        let mut ids = t.encode("x = 1").unwrap();
        ids.push(0);
        assert_eq!(t.decode(&ids, true).unwrap(), "x = 1");
        assert!(t.decode(&ids, false).unwrap().ends_with("<|endoftext|>"));
    }

    #[test]
    fn literal_encoding_keeps_special_token_text_as_text() {
        let t = tok();
        let text = "s = \"<|mask|>\" + \"<|endoftext|>\"\n";
        let parsed = t.encode(text).unwrap();
        assert!(parsed.contains(&1) && parsed.contains(&0), "{parsed:?}");
        let literal = t.encode_literal(text).unwrap();
        assert!(
            !literal.contains(&1) && !literal.contains(&0),
            "{literal:?}"
        );
        assert_eq!(t.decode(&literal, true).unwrap(), text);
        // Text without special tokens encodes the same either way.
        let plain = "def f(x):\n    return x\n";
        assert_eq!(t.encode_literal(plain).unwrap(), t.encode(plain).unwrap());
    }

    #[test]
    fn ids_without_a_token_decode_to_nothing() {
        // Hugging Face's reading; the model's range is checked by the callers.
        let t = tok();
        let ids = t.encode("x = 1\n").unwrap();
        let mut with_unknown = ids.clone();
        with_unknown.insert(1, u32::MAX);
        with_unknown.push(8192);
        assert_eq!(
            t.decode(&with_unknown, false).unwrap(),
            t.decode(&ids, false).unwrap()
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        let missing = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json"));
        assert!(missing
            .err()
            .unwrap()
            .to_string()
            .contains("/nonexistent/tokenizer.json"));
        let dir = std::env::temp_dir().join(format!("dllm-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), b"{not json").unwrap();
        let e = Tokenizer::from_model_dir(&dir).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
