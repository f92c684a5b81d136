/* choose.c: a constraint at one position with libdllm (dllm_session_constrain, ABI version 6).
 *
 * The canvas is the prefix, one slot that may only become one of the given choices (say a
 * game's item names, or True/False), then N free tokens. A diffusion model fills every position
 * together, so the text after the slot is written knowing which choice it holds, and the
 * choice is made by the model's own distribution over the allowed tokens. Each choice must be
 * a single token (tokenized on its own, so a leading space counts).
 *
 * Build (from the repository root, after `cargo build --release`):
 *     cc -std=c99 -Iinclude ffi/examples/choose.c -Ltarget/release -ldllm \
 *        -Wl,-rpath,"$PWD/target/release" -o choose
 * Run:
 *     ./choose models/tiny-llada-code 'flag =' 8 ' True' ' False' ' None'
 *
 * Usage: choose MODEL_DIR PREFIX N CHOICE [CHOICE...]
 * Output: PREFIX[CHOICE]TEXT, the chosen token in brackets.
 * Environment: DLLM_BACKEND=cpu|cuda (default: auto). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dllm.h"

static int fail(const char *call, dllm_status st) {
    fprintf(stderr, "choose: %s: %s: %s\n", call, dllm_status_string(st), dllm_last_error());
    return 1;
}

/* The backend from $DLLM_BACKEND ("cpu", "cuda"; anything else or unset: auto). */
static int32_t backend_from_env(void) {
    const char *b = getenv("DLLM_BACKEND");
    if (b && strcmp(b, "cpu") == 0) return DLLM_BACKEND_CPU;
    if (b && strcmp(b, "cuda") == 0) return DLLM_BACKEND_CUDA;
    return DLLM_BACKEND_AUTO;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: choose MODEL_DIR PREFIX N CHOICE [CHOICE...]\n");
        return 2;
    }
    int free_tokens = atoi(argv[3]);
    if (free_tokens < 0) {
        fprintf(stderr, "choose: N must be >= 0\n");
        return 2;
    }
    if (dllm_abi_version() < 6) { /* dllm_session_constrain is new in version 6 */
        fprintf(stderr, "choose: libdllm ABI %u is older than 6\n", dllm_abi_version());
        return 1;
    }
    dllm_model_params mp;
    dllm_model_params_default(&mp);
    mp.backend = backend_from_env();
    dllm_model *model = NULL;
    dllm_status st = dllm_model_load(argv[1], &mp, &model);
    if (st != DLLM_OK) return fail("dllm_model_load", st);

    /* The choices, one token each; dllm_tokenize_literal keeps special-token text as text. */
    int n_choices = argc - 4;
    int32_t *allowed = malloc((size_t)n_choices * sizeof *allowed);
    if (!allowed) return 1;
    for (int i = 0; i < n_choices; i++) {
        const char *c = argv[4 + i];
        size_t n = 0;
        st = dllm_tokenize_literal(model, c, strlen(c), &allowed[i], 1, &n);
        if ((st != DLLM_OK && st != DLLM_ERR_BUFFER_TOO_SMALL) || n != 1) {
            fprintf(stderr, "choose: the choice \"%s\" is %zu tokens, not one\n", c, n);
            return 2;
        }
    }

    size_t cap = (size_t)dllm_model_max_length(model), n = 0;
    int32_t *canvas = malloc(cap * sizeof *canvas);
    if (!canvas) return 1;
    st = dllm_tokenize_literal(model, argv[2], strlen(argv[2]), canvas, cap, &n);
    if (st != DLLM_OK) return fail("prefix", st);
    size_t slot = n;
    if (n + 1 + (size_t)free_tokens > cap) {
        fprintf(stderr, "choose: the canvas would exceed %zu tokens\n", cap);
        return 2;
    }
    for (int i = 0; i <= free_tokens; i++) canvas[n++] = dllm_model_mask_token(model);

    dllm_sampling_params sp;
    dllm_sampling_params_default(&sp);
    sp.steps = free_tokens + 1; /* one token per step, in one block */
    sp.block_len = free_tokens + 1;
    dllm_session *session = NULL;
    st = dllm_session_new(model, canvas, n, &sp, &session);
    if (st != DLLM_OK) return fail("dllm_session_new", st);
    st = dllm_session_constrain(session, slot, allowed, (size_t)n_choices);
    if (st != DLLM_OK) return fail("dllm_session_constrain", st);
    if ((st = dllm_session_run(session)) != DLLM_OK) return fail("dllm_session_run", st);
    if ((st = dllm_session_canvas(session, canvas, cap, &n)) != DLLM_OK) return fail("canvas", st);

    /* PREFIX[CHOICE]TEXT; the text's size asked first (a NULL buffer of capacity 0). */
    char choice[256];
    size_t len = 0;
    st = dllm_detokenize(model, canvas + slot, 1, choice, sizeof choice, &len);
    if (st != DLLM_OK) return fail("dllm_detokenize", st);
    st = dllm_detokenize(model, canvas + slot + 1, n - slot - 1, NULL, 0, &len);
    if (st != DLLM_OK && st != DLLM_ERR_BUFFER_TOO_SMALL) return fail("dllm_detokenize", st);
    char *text = malloc(len + 1);
    if (!text) return 1;
    st = dllm_detokenize(model, canvas + slot + 1, n - slot - 1, text, len + 1, &len);
    if (st != DLLM_OK) return fail("dllm_detokenize", st);
    printf("%s[%s]%s\n", argv[2], choice, text);
    free(text);

    free(allowed);
    free(canvas);
    dllm_session_free(session);
    dllm_model_free(model);
    return 0;
}
