/* infill.c: fill the gap between a prefix and a suffix with libdllm.
 *
 * The canvas is prefix tokens, N mask tokens, suffix tokens; only the masks are generated, so
 * the model writes code that fits both sides. The session runs to the end in one call
 * (dllm_session_run); see generate.c for a step-by-step loop.
 *
 * Build (from the repository root, after `cargo build --release`):
 *     cc -std=c99 -Iinclude ffi/examples/infill.c -Ltarget/release -ldllm \
 *        -Wl,-rpath,"$PWD/target/release" -o infill
 * Run:
 *     ./infill models/tiny-llada-code $'def area(r):\n    ' $'\n    return a\n' 16
 *
 * Usage: infill MODEL_DIR PREFIX SUFFIX [N=16 [STEPS=N]]
 * Environment: DLLM_BACKEND=cpu|cuda (default: auto). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dllm.h"

static int fail(const char *call, dllm_status st) {
    fprintf(stderr, "infill: %s: %s: %s\n", call, dllm_status_string(st), dllm_last_error());
    return 1;
}

/* Appends the tokens of `text` to canvas[*n..cap); returns the status. */
static dllm_status append_text(const dllm_model *m, const char *text, int32_t *canvas, size_t cap,
                               size_t *n) {
    size_t added = 0;
    dllm_status st = dllm_tokenize(m, text, strlen(text), canvas + *n, cap - *n, &added);
    if (st == DLLM_OK) *n += added;
    return st;
}

/* The backend from $DLLM_BACKEND ("cpu", "cuda"; anything else or unset: auto). */
static int32_t backend_from_env(void) {
    const char *b = getenv("DLLM_BACKEND");
    if (b && strcmp(b, "cpu") == 0) return DLLM_BACKEND_CPU;
    if (b && strcmp(b, "cuda") == 0) return DLLM_BACKEND_CUDA;
    return DLLM_BACKEND_AUTO;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: infill MODEL_DIR PREFIX SUFFIX [N [STEPS]]\n");
        return 2;
    }
    int gap = argc > 4 ? atoi(argv[4]) : 16;
    if (gap <= 0) {
        fprintf(stderr, "infill: N must be positive\n");
        return 2;
    }
    dllm_model_params mp;
    dllm_model_params_default(&mp);
    mp.backend = backend_from_env();
    dllm_model *model = NULL;
    dllm_status st = dllm_model_load(argv[1], &mp, &model);
    if (st != DLLM_OK) return fail("dllm_model_load", st);

    size_t cap = (size_t)dllm_model_max_length(model), n = 0;
    int32_t *canvas = malloc(cap * sizeof *canvas);
    if (!canvas) return 1;
    if ((st = append_text(model, argv[2], canvas, cap, &n)) != DLLM_OK) return fail("prefix", st);
    size_t gap_begin = n;
    for (int i = 0; i < gap && n < cap; i++) canvas[n++] = dllm_model_mask_token(model);
    size_t gap_end = n;
    if ((st = append_text(model, argv[3], canvas, cap, &n)) != DLLM_OK) return fail("suffix", st);

    dllm_sampling_params sp;
    dllm_sampling_params_default(&sp);
    sp.steps = argc > 5 ? atoi(argv[5]) : gap;
    sp.block_len = gap; /* one block: the whole gap is refined together */
    dllm_session *session = NULL;
    st = dllm_session_new(model, canvas, n, &sp, &session);
    if (st != DLLM_OK) return fail("dllm_session_new", st);
    if ((st = dllm_session_run(session)) != DLLM_OK) return fail("dllm_session_run", st);
    if ((st = dllm_session_canvas(session, canvas, cap, &n)) != DLLM_OK) return fail("canvas", st);

    /* Print prefix + [filled gap] + suffix. */
    char text[4096];
    size_t len = 0;
    st = dllm_detokenize(model, canvas + gap_begin, gap_end - gap_begin, text, sizeof text, &len);
    if (st != DLLM_OK) return fail("dllm_detokenize", st);
    printf("%s[%s]%s\n", argv[2], text, argv[3]);

    free(canvas);
    dllm_session_free(session);
    dllm_model_free(model);
    return 0;
}
