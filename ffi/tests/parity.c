/* parity.c: denoises a prompt through the C ABI and prints every step and the final canvas,
 * for tests/c_abi.rs to compare with the Rust `Session` run on the same input.
 *
 * Usage: parity MODEL_DIR PROMPT GEN_LEN STEPS BLOCK_LEN TEMPERATURE REMASKING SEED [KEY=VALUE...]
 *        KEY: threshold, factor, top_k, top_p, cfg_scale, stop_at_eos, cache, revise,
 *        credit_alpha, credit_gamma, credit_decay, hierarchy_low, vicinity
 *        (dllm_sampling_params);
 *        lock=K:T locks generated position K (0 = the first after the prompt) to token T before
 *        the first step.
 * Output: one line "step S committed C masks_left M done D filled P:T P:T ... remasked P P ..."
 *         per step (the positions and tokens of dllm_session_last_commits, the positions of
 *         dllm_session_last_remasks), then "canvas ID ID ...".
 *         Exit status 1 (and a message on stderr) on any failure. */
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
    if (argc < 9) {
        fprintf(stderr, "usage: parity MODEL_DIR PROMPT GEN_LEN STEPS BLOCK_LEN TEMPERATURE "
                        "REMASKING SEED [KEY=VALUE...]\n");
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
    long lock_at = -1, lock_token = 0;
    for (int i = 9; i < argc; i++) {
        const char *eq = strchr(argv[i], '=');
        if (!eq) return 2;
        size_t k = (size_t)(eq - argv[i]);
        const char *v = eq + 1;
        if (k == 9 && strncmp(argv[i], "threshold", k) == 0) sp.threshold = strtof(v, NULL);
        else if (k == 6 && strncmp(argv[i], "factor", k) == 0) sp.factor = strtof(v, NULL);
        else if (k == 5 && strncmp(argv[i], "top_k", k) == 0) sp.top_k = atoi(v);
        else if (k == 5 && strncmp(argv[i], "top_p", k) == 0) sp.top_p = strtof(v, NULL);
        else if (k == 9 && strncmp(argv[i], "cfg_scale", k) == 0) sp.cfg_scale = strtof(v, NULL);
        else if (k == 11 && strncmp(argv[i], "stop_at_eos", k) == 0) sp.stop_at_eos = atoi(v);
        else if (k == 5 && strncmp(argv[i], "cache", k) == 0) sp.cache = atoi(v);
        else if (k == 6 && strncmp(argv[i], "revise", k) == 0) sp.revise = strtof(v, NULL);
        else if (k == 12 && strncmp(argv[i], "credit_alpha", k) == 0)
            sp.credit_alpha = strtof(v, NULL);
        else if (k == 12 && strncmp(argv[i], "credit_gamma", k) == 0)
            sp.credit_gamma = strtof(v, NULL);
        else if (k == 12 && strncmp(argv[i], "credit_decay", k) == 0)
            sp.credit_decay = strtof(v, NULL);
        else if (k == 13 && strncmp(argv[i], "hierarchy_low", k) == 0)
            sp.hierarchy_low = strtof(v, NULL);
        else if (k == 8 && strncmp(argv[i], "vicinity", k) == 0) sp.vicinity = atoi(v);
        else if (k == 4 && strncmp(argv[i], "lock", k) == 0) {
            if (sscanf(v, "%ld:%ld", &lock_at, &lock_token) != 2) return 2;
        } else {
            fprintf(stderr, "parity: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    dllm_session *s = NULL;
    st = dllm_session_new(m, canvas, n, &sp, &s);
    if (st != DLLM_OK) return fail("session_new", st);
    if (lock_at >= 0) {
        st = dllm_session_lock(s, n_prompt + (size_t)lock_at, (int32_t)lock_token);
        if (st != DLLM_OK) return fail("lock", st);
    }
    dllm_model_free(m); /* the session keeps it alive */

    size_t *positions = malloc(n * sizeof *positions);
    int32_t *tokens = malloc(n * sizeof *tokens);
    if (!positions || !tokens) return 1;
    dllm_step_info info = {0, 0, 0, 0};
    while (!info.done) {
        st = dllm_session_step(s, &info);
        if (st != DLLM_OK) return fail("step", st);
        printf("step %d committed %d masks_left %d done %d filled", info.step, info.committed,
               info.masks_left, info.done);
        size_t filled = 0;
        st = dllm_session_last_commits(s, positions, tokens, n, &filled);
        if (st != DLLM_OK) return fail("last_commits", st);
        for (size_t i = 0; i < filled; i++) printf(" %zu:%d", positions[i], tokens[i]);
        size_t remasked = 0;
        st = dllm_session_last_remasks(s, positions, n, &remasked);
        if (st != DLLM_OK) return fail("last_remasks", st);
        printf(" remasked");
        for (size_t i = 0; i < remasked; i++) printf(" %zu", positions[i]);
        printf("\n");
    }
    st = dllm_session_canvas(s, canvas, n, &n);
    if (st != DLLM_OK) return fail("canvas", st);
    printf("canvas");
    for (size_t i = 0; i < n; i++) printf(" %d", canvas[i]);
    printf("\n");
    dllm_session_free(s);
    free(positions);
    free(tokens);
    free(canvas);
    return 0;
}
