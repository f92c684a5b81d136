/* generate.c: text generation with libdllm, driving the denoising loop from C.
 *
 * Loads a model, tokenizes a prompt, appends GEN_LEN mask tokens, then steps the session one
 * refinement at a time, printing the progress (and the half-denoised text) to stderr after each
 * step. The generated text, up to the first end-of-text token, goes to stdout.
 *
 * Build (from the repository root, after `cargo build --release`):
 *     cc -std=c99 -Iinclude ffi/examples/generate.c -Ltarget/release -ldllm \
 *        -Wl,-rpath,"$PWD/target/release" -o generate
 * Run:
 *     ./generate models/tiny-llada-code "def fibonacci(n):" 64 64
 *
 * Usage: generate MODEL_DIR PROMPT [GEN_LEN=64 [STEPS=GEN_LEN [BLOCK_LEN=32]]]
 * Environment: DLLM_BACKEND=cpu|cuda (default: auto). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dllm.h"

/* Prints the failed call, its status and the library's message; returns 1 for main. */
static int fail(const char *call, dllm_status st) {
    fprintf(stderr, "generate: %s: %s: %s\n", call, dllm_status_string(st), dllm_last_error());
    return 1;
}

/* Detokenizes ids[0..n) into a fresh NUL-terminated string (caller frees), or NULL. */
static char *detokenize(const dllm_model *m, const int32_t *ids, size_t n) {
    size_t len = 0;
    dllm_status st = dllm_detokenize(m, ids, n, NULL, 0, &len); /* size query */
    if (st != DLLM_OK && st != DLLM_ERR_BUFFER_TOO_SMALL) return NULL;
    char *text = malloc(len + 1);
    if (text && dllm_detokenize(m, ids, n, text, len + 1, &len) != DLLM_OK) {
        free(text);
        return NULL;
    }
    return text;
}

/* The backend from $DLLM_BACKEND ("cpu", "cuda"; anything else or unset: auto). */
static int32_t backend_from_env(void) {
    const char *b = getenv("DLLM_BACKEND");
    if (b && strcmp(b, "cpu") == 0) return DLLM_BACKEND_CPU;
    if (b && strcmp(b, "cuda") == 0) return DLLM_BACKEND_CUDA;
    return DLLM_BACKEND_AUTO;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: generate MODEL_DIR PROMPT [GEN_LEN [STEPS [BLOCK_LEN]]]\n");
        return 2;
    }
    const char *prompt = argv[2];
    int gen_len = argc > 3 ? atoi(argv[3]) : 64;
    dllm_sampling_params sp;
    dllm_sampling_params_default(&sp);
    sp.steps = argc > 4 ? atoi(argv[4]) : gen_len;
    sp.block_len = argc > 5 ? atoi(argv[5]) : 32;
    if (gen_len <= 0) {
        fprintf(stderr, "generate: GEN_LEN must be positive\n");
        return 2;
    }

    if (dllm_abi_version() < DLLM_ABI_VERSION) { /* an older library than the header */
        fprintf(stderr, "generate: libdllm ABI %u is older than the header's %u\n",
                dllm_abi_version(), DLLM_ABI_VERSION);
        return 1;
    }
    dllm_model_params mp;
    dllm_model_params_default(&mp);
    mp.backend = backend_from_env(); /* auto by default: CUDA if available, else the CPU */
    dllm_model *model = NULL;
    dllm_status st = dllm_model_load(argv[1], &mp, &model);
    if (st != DLLM_OK) return fail("dllm_model_load", st);
    fprintf(stderr, "model loaded on %s\n", dllm_model_backend(model));

    /* The canvas: prompt tokens, then gen_len masks. */
    size_t n_prompt = 0;
    st = dllm_tokenize(model, prompt, strlen(prompt), NULL, 0, &n_prompt); /* size query */
    if (st != DLLM_OK && st != DLLM_ERR_BUFFER_TOO_SMALL) return fail("dllm_tokenize", st);
    size_t n = n_prompt + (size_t)gen_len;
    int32_t *canvas = malloc(n * sizeof *canvas);
    if (!canvas) return 1;
    st = dllm_tokenize(model, prompt, strlen(prompt), canvas, n_prompt, &n_prompt);
    if (st != DLLM_OK) return fail("dllm_tokenize", st);
    for (size_t i = n_prompt; i < n; i++) canvas[i] = dllm_model_mask_token(model);

    dllm_session *session = NULL;
    st = dllm_session_new(model, canvas, n, &sp, &session);
    if (st != DLLM_OK) return fail("dllm_session_new", st);

    /* The refinement loop belongs to us: one step per call, progress after each. */
    int total = dllm_session_total_steps(session);
    dllm_step_info info = {0, 0, 0, 0};
    while (!info.done) {
        st = dllm_session_step(session, &info);
        if (st != DLLM_OK) return fail("dllm_session_step", st);
        size_t len = 0;
        dllm_session_canvas(session, canvas, n, &len);
        char *partial = detokenize(model, canvas + n_prompt, n - n_prompt);
        fprintf(stderr, "step %3d/%d  +%d  %3d masks left  %.60s\n", info.step + 1, total,
                info.committed, info.masks_left, partial ? partial : "");
        free(partial);
    }

    /* The answer: generated positions up to the first end-of-text token. */
    size_t end = n_prompt;
    while (end < n && canvas[end] != dllm_model_eos_token(model)) end++;
    char *text = detokenize(model, canvas + n_prompt, end - n_prompt);
    if (!text) return fail("dllm_detokenize", DLLM_ERR_INTERNAL);
    printf("%s%s\n", prompt, text);

    free(text);
    free(canvas);
    dllm_session_free(session);
    dllm_model_free(model);
    return 0;
}
