//! A model whose vocabulary is larger than its tokenizer's, as real checkpoints pad it (LLaDA-8B
//! has 126,464 rows; its tokenizer ends at 126,348). The fixture is the tiny model with the last
//! two tokens (ids 8190 and 8191, the products of the last two BPE merges) taken out of its
//! tokenizer, so the model keeps 8192 ids of which the tokenizer knows 8190. Ids of the padding
//! are ids of the model: a canvas may hold them, a lock may write them, and they detokenize to
//! no text (Hugging Face's reading), so a canvas the model produced never fails to convert. Ids
//! past the model's vocabulary are still refused, naming the id.

use dllm::ffi::*;
use dllm::tokenizer::Tokenizer;
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-llada-code");

/// Ids the fixture's tokenizer no longer has (the model still does).
const PADDING: [u32; 2] = [8190, 8191];

/// The tiny model's files (weights linked, not copied) with a tokenizer lacking [`PADDING`].
fn padded_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("padded-vocabulary");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(MODEL).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap();
            if name != "tokenizer.json" {
                std::os::unix::fs::symlink(&path, dir.join(name)).unwrap();
            }
        }
        let text = std::fs::read_to_string(Path::new(MODEL).join("tokenizer.json")).unwrap();
        let mut tok: serde_json::Value = serde_json::from_str(&text).unwrap();
        let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
        let removed: Vec<String> = vocab
            .iter()
            .filter(|(_, id)| PADDING.contains(&(id.as_u64().unwrap() as u32)))
            .map(|(t, _)| t.clone())
            .collect();
        assert_eq!(removed.len(), PADDING.len());
        vocab.retain(|t, _| !removed.contains(t));
        // The last two merges make exactly the two removed tokens.
        let merges = tok["model"]["merges"].as_array_mut().unwrap();
        for _ in PADDING {
            let merge = merges.pop().unwrap();
            let joined: String = merge
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap())
                .collect();
            assert!(
                removed.contains(&joined),
                "merge {merge} makes a kept token"
            );
        }
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        dir
    })
}

fn last_error() -> String {
    // SAFETY: dllm_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(dllm_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn the_fixture_tokenizer_lacks_the_padding() {
    let tok = Tokenizer::from_model_dir(padded_model()).unwrap();
    assert_eq!(tok.vocab_size(), 8190);
    for id in PADDING {
        assert_eq!(tok.id_to_token(id), None);
    }
}

#[test]
fn padding_ids_decode_to_no_text() {
    let tok = Tokenizer::from_model_dir(padded_model()).unwrap();
    let ids = tok.encode("def square(x):\n    return x * x\n").unwrap();
    let want = tok.decode(&ids, false).unwrap();
    let mut padded = vec![PADDING[0]];
    padded.extend_from_slice(&ids[..3]);
    padded.push(PADDING[1]);
    padded.extend_from_slice(&ids[3..]);
    padded.push(PADDING[0]);
    assert_eq!(tok.decode(&padded, false).unwrap(), want);
    assert_eq!(
        tok.decode(&padded, true).unwrap(),
        tok.decode(&ids, true).unwrap()
    );
}

/// Detokenizes `ids` through the C ABI: the status and the text.
///
/// # Safety
/// `m` is a live model handle.
unsafe fn detokenize(m: *mut dllm_model, ids: &[i32]) -> (dllm_status, String) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0usize;
    // SAFETY: valid buffers of the given lengths.
    let st = unsafe {
        dllm_detokenize(
            m,
            ids.as_ptr(),
            ids.len(),
            buf.as_mut_ptr().cast::<c_char>(),
            buf.len(),
            &mut n,
        )
    };
    let text = if st == DLLM_OK {
        String::from_utf8(buf[..n].to_vec()).unwrap()
    } else {
        String::new()
    };
    (st, text)
}

#[test]
fn the_c_abi_takes_padding_ids_as_model_ids() {
    let dir = CString::new(padded_model().to_str().unwrap()).unwrap();
    let mut m: *mut dllm_model = std::ptr::null_mut();
    // SAFETY: a valid path, NULL params (defaults: CPU when no GPU), a writable handle slot;
    // every later call gets this live handle and valid buffers.
    unsafe {
        assert_eq!(
            dllm_model_load(dir.as_ptr(), std::ptr::null(), &mut m),
            DLLM_OK,
            "{}",
            last_error()
        );
        assert_eq!(dllm_model_vocab_size(m), 8192);
        let tok = Tokenizer::from_model_dir(padded_model()).unwrap();
        let ids: Vec<i32> = tok
            .encode("def f():\n")
            .unwrap()
            .iter()
            .map(|&i| i as i32)
            .collect();
        let (st, want) = detokenize(m, &ids);
        assert_eq!(st, DLLM_OK, "{}", last_error());
        let mut with_padding = ids.clone();
        with_padding.insert(1, PADDING[1] as i32);
        assert_eq!(detokenize(m, &with_padding), (DLLM_OK, want));
        // One past the model's last id is not an id of the model.
        with_padding[1] = 8192;
        assert_eq!(detokenize(m, &with_padding).0, DLLM_ERR_INVALID_ARGUMENT);
        let e = last_error();
        assert!(e.contains("tokens[1]") && e.contains("8191"), "{e}");

        // A canvas may hold a padding id, and a lock may write one.
        let mask = dllm_model_mask_token(m);
        let mut canvas = with_padding.clone();
        canvas[1] = PADDING[0] as i32;
        canvas.extend([mask; 8]);
        let mut p = dllm_sampling_params::default();
        dllm_sampling_params_default(&mut p);
        p.steps = 2;
        p.block_len = 8;
        let mut s: *mut dllm_session = std::ptr::null_mut();
        assert_eq!(
            dllm_session_new(m, canvas.as_ptr(), canvas.len(), &p, &mut s),
            DLLM_OK,
            "{}",
            last_error()
        );
        let last = canvas.len() - 1;
        assert_eq!(
            dllm_session_lock(s, last, PADDING[1] as i32),
            DLLM_OK,
            "{}",
            last_error()
        );
        assert_eq!(dllm_session_run(s), DLLM_OK, "{}", last_error());
        let mut out = vec![0i32; canvas.len()];
        let mut n = 0usize;
        assert_eq!(
            dllm_session_canvas(s, out.as_mut_ptr(), out.len(), &mut n),
            DLLM_OK
        );
        assert_eq!((out[1], out[last]), (PADDING[0] as i32, PADDING[1] as i32));
        assert_eq!(detokenize(m, &out).0, DLLM_OK, "{}", last_error());
        assert_eq!(dllm_session_lock(s, last, 8192), DLLM_ERR_INVALID_ARGUMENT);
        dllm_session_free(s);
        canvas[1] = 8192;
        let mut refused: *mut dllm_session = std::ptr::null_mut();
        assert_eq!(
            dllm_session_new(m, canvas.as_ptr(), canvas.len(), &p, &mut refused),
            DLLM_ERR_INVALID_ARGUMENT
        );
        let e = last_error();
        assert!(e.contains("position 1") && e.contains("8192"), "{e}");
        assert!(refused.is_null());
        dllm_model_free(m);
    }
}
