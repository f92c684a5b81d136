//! The C ABI called from Rust with odd values: sampling parameters from `i32::MIN` to
//! `i32::MAX`, NaN and infinite floats, bad `struct_size`s, canvases with out-of-range ids,
//! locks, re-masks and constraints at any position, a batch naming one session twice, short
//! output buffers.
//! Odd model parameters (backend, device, thread count) too. Every call must return a status;
//! `DLLM_ERR_INTERNAL` (a caught panic), a hang or a process abort (`steps = i32::MAX` once
//! allocated a 16 GB step table, `threads = i32::MAX` spawned threads until the process
//! stalled) fails the test. Deterministic.

mod common;

use common::odd::Rng;
use dllm::ffi::*;
use std::ffi::{CStr, CString};

const INTS: [i32; 12] = [i32::MIN, -1, 0, 1, 2, 3, 4, 7, 16, 32, 1000, i32::MAX];
const FLOATS: [f32; 11] = [
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    -1.0,
    0.0,
    1e-30,
    0.5,
    1.0,
    2.0,
    1e30,
    f32::MAX,
];

/// Sampling parameters with a random subset of fields set to odd values.
fn odd_params(r: &mut Rng) -> dllm_sampling_params {
    let mut p = dllm_sampling_params::default();
    // SAFETY: a valid, writable struct.
    unsafe { dllm_sampling_params_default(&mut p) };
    for field in 0..12 {
        if !r.next().is_multiple_of(6) {
            continue;
        }
        match field {
            0 => p.steps = r.pick(&INTS),
            1 => p.block_len = r.pick(&INTS),
            2 => p.temperature = r.pick(&FLOATS),
            3 => p.remasking = r.pick(&INTS),
            4 => p.threshold = r.pick(&FLOATS),
            5 => p.factor = r.pick(&FLOATS),
            6 => p.top_k = r.pick(&INTS),
            7 => p.top_p = r.pick(&FLOATS),
            8 => p.cfg_scale = r.pick(&FLOATS),
            9 => p.stop_at_eos = r.pick(&INTS),
            10 => p.cache = r.pick(&INTS),
            _ => p.revise = r.pick(&FLOATS),
        }
    }
    p.seed = r.next() as u64;
    if r.next().is_multiple_of(10) {
        p.struct_size = r.pick(&[0u32, 1, 31, 33, 63, 65, 1000, u32::MAX]);
    }
    p
}

#[test]
fn odd_calls_return_a_status_and_never_an_internal_error() {
    let dir = CString::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/tiny-llada-code"
    ))
    .unwrap();
    let last_error = || {
        // SAFETY: dllm_last_error returns a NUL-terminated string owned by the thread.
        unsafe { CStr::from_ptr(dllm_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    let mut internal = Vec::new();
    let mut check = |what: String, st: dllm_status| {
        if st == DLLM_ERR_INTERNAL {
            internal.push(format!("{what}: {}", last_error()));
        }
        st
    };
    // SAFETY: every pointer passed below is valid for what the header says the call accesses
    // (buffers of the stated lengths, live handles until freed).
    unsafe {
        let mut mp = dllm_model_params::default();
        dllm_model_params_default(&mut mp);
        mp.backend = 1; // DLLM_BACKEND_CPU
                        // Odd model parameters are refused at once (i32::MAX threads once spawned threads
                        // until the process stalled).
        for (backend, device, threads) in [
            (-1, 0, 0),
            (3, 0, 0),
            (1, -1, 0),
            (1, 0, -1),
            (1, 0, 1025),
            (1, 0, i32::MAX),
        ] {
            let odd = dllm_model_params {
                backend,
                device,
                threads,
                ..mp
            };
            let mut m = std::ptr::null_mut();
            let st = dllm_model_load(dir.as_ptr(), &odd, &mut m);
            assert!(
                st != DLLM_OK && m.is_null() && check(format!("load {odd:?}"), st) != 0,
                "{odd:?}: {st}"
            );
        }
        let mut m = std::ptr::null_mut();
        assert_eq!(
            dllm_model_load(dir.as_ptr(), &mp, &mut m),
            DLLM_OK,
            "{}",
            last_error()
        );
        let mask = dllm_model_mask_token(m);
        let mut r = Rng(7);
        let mut ran = 0;
        for it in 0..300 {
            let p = odd_params(&mut r);
            let n = 1 + r.next() % 40;
            let canvas: Vec<i32> = (0..n)
                .map(|_| match r.next() % 6 {
                    0 => r.pick(&INTS),
                    1 => (r.next() % 8192) as i32,
                    _ => mask,
                })
                .collect();
            let mut s = std::ptr::null_mut();
            let st = dllm_session_new(m, canvas.as_ptr(), n, &p, &mut s);
            if check(format!("session_new {it} {p:?}"), st) != DLLM_OK {
                continue;
            }
            ran += 1;
            for _ in 0..40 {
                match r.next() % 8 {
                    0 => {
                        let st = dllm_session_lock(s, r.next() % (n + 3), r.pick(&INTS));
                        check(format!("lock {it}"), st);
                    }
                    1 => {
                        let (a, b) = (r.next() % (n + 3), r.next() % (n + 3));
                        check(format!("remask {it}"), dllm_session_remask(s, a, b));
                    }
                    2 => {
                        let mut buf = vec![0i32; r.next() % (n + 2)];
                        let mut got = 0usize;
                        let st = dllm_session_canvas(s, buf.as_mut_ptr(), buf.len(), &mut got);
                        check(format!("canvas {it}"), st);
                        let (mut pos, mut tok) = ([0usize; 4], [0i32; 4]);
                        let cap = r.next() % 5;
                        let st = dllm_session_last_commits(
                            s,
                            pos.as_mut_ptr(),
                            tok.as_mut_ptr(),
                            cap,
                            &mut got,
                        );
                        check(format!("last_commits {it}"), st);
                        let st = dllm_session_last_remasks(s, pos.as_mut_ptr(), cap, &mut got);
                        check(format!("last_remasks {it}"), st);
                    }
                    3 if r.next().is_multiple_of(2) => {
                        // Odd allowed sets: odd ids, the mask, repeats, empty (lifts).
                        let allowed: Vec<i32> = (0..r.next() % 4)
                            .map(|_| match r.next() % 3 {
                                0 => r.pick(&INTS),
                                1 => mask,
                                _ => (r.next() % 8192) as i32,
                            })
                            .collect();
                        let st = dllm_session_constrain(
                            s,
                            r.next() % (n + 3),
                            allowed.as_ptr(),
                            allowed.len(),
                        );
                        check(format!("constrain {it} {allowed:?}"), st);
                    }
                    3 => {
                        // One session named twice: refused, not stepped twice.
                        let both = [s, s];
                        let st = dllm_sessions_step(both.as_ptr(), 2, std::ptr::null_mut());
                        check(format!("sessions_step {it}"), st);
                    }
                    _ => {
                        let mut info = dllm_step_info::default();
                        let st = dllm_session_step(s, &mut info);
                        if check(format!("step {it} {p:?}"), st) != DLLM_OK || info.done != 0 {
                            break;
                        }
                    }
                }
            }
            dllm_session_free(s);
        }
        // Text that is not UTF-8, ids outside the vocabulary, a short output buffer.
        let text = b"\xff\xfe hello \x00 world";
        let (mut toks, mut count) = ([0i32; 4], 0usize);
        let st = dllm_tokenize(
            m,
            text.as_ptr().cast(),
            text.len(),
            toks.as_mut_ptr(),
            toks.len(),
            &mut count,
        );
        assert_ne!(check("tokenize".into(), st), DLLM_OK);
        let ids = [-5i32, i32::MAX, 0, 8191, 8192];
        let mut out = [0u8; 3];
        let st = dllm_detokenize(
            m,
            ids.as_ptr(),
            ids.len(),
            out.as_mut_ptr().cast(),
            out.len(),
            &mut count,
        );
        assert_eq!(check("detokenize".into(), st), DLLM_ERR_INVALID_ARGUMENT);
        dllm_model_free(m);
        assert!(ran > 20, "only {ran} sessions were accepted");
    }
    assert!(internal.is_empty(), "{}", internal.join("\n"));
}
