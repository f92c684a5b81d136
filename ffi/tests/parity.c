/* parity.c: denoises a prompt through the C ABI and prints every step and the final canvas,
 * for tests/c_abi.rs to compare with the Rust `Session` run on the same input.
 *
 * Usage: parity MODEL_DIR PROMPT GEN_LEN STEPS BLOCK_LEN TEMPERATURE REMASKING SEED
 * Output: one line "step S committed C masks_left M done D" per step, then
 *         "canvas ID ID ...". Exit status 1 (and a message on stderr) on any failure. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dllm.h"

static int fail(const char *what, dllm_status st) {
    fprintf(stderr, "parity: %s: %s: %s\n", what, dllm_status_string(st), dllm_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: parity MODEL_DIR PROMPT GEN_LEN STEPS BLOCK_LEN TEMPERATURE "
                        "REMASKING SEED\n");
        return 2;
    }
    size_t gen_len = strtoul(argv[3], NULL, 10);
    dllm_model_params mp;
    dllm_model_params_default(&mp);
    mp.backend = DLLM_BACKEND_CPU;
    dllm_model *m = NULL;
    dllm_status st = dllm_model_load(argv[1], &mp, &m);
    if (st != DLLM_OK) return fail("load", st);

    size_t n_prompt = 0;
    const char *prompt = argv[2];
    st = dllm_tokenize(m, prompt, strlen(prompt), NULL, 0, &n_prompt);
    if (st != DLLM_OK && st != DLLM_ERR_BUFFER_TOO_SMALL) return fail("tokenize", st);
    size_t n = n_prompt + gen_len;
    int32_t *canvas = malloc((n ? n : 1) * sizeof *canvas);
    if (!canvas) return 1;
    st = dllm_tokenize(m, prompt, strlen(prompt), canvas, n_prompt, &n_prompt);
    if (st != DLLM_OK) return fail("tokenize", st);
    for (size_t i = n_prompt; i < n; i++) canvas[i] = dllm_model_mask_token(m);

    dllm_sampling_params sp;
    dllm_sampling_params_default(&sp);
    sp.steps = atoi(argv[4]);
    sp.block_len = atoi(argv[5]);
    sp.temperature = strtof(argv[6], NULL);
    sp.remasking = atoi(argv[7]);
    sp.seed = strtoull(argv[8], NULL, 10);
    dllm_session *s = NULL;
    st = dllm_session_new(m, canvas, n, &sp, &s);
    if (st != DLLM_OK) return fail("session_new", st);
    dllm_model_free(m); /* the session keeps it alive */

    dllm_step_info info = {0, 0, 0, 0};
    while (!info.done) {
        st = dllm_session_step(s, &info);
        if (st != DLLM_OK) return fail("step", st);
        printf("step %d committed %d masks_left %d done %d\n", info.step, info.committed,
               info.masks_left, info.done);
    }
    st = dllm_session_canvas(s, canvas, n, &n);
    if (st != DLLM_OK) return fail("canvas", st);
    printf("canvas");
    for (size_t i = 0; i < n; i++) printf(" %d", canvas[i]);
    printf("\n");
    dllm_session_free(s);
    free(canvas);
    return 0;
}
