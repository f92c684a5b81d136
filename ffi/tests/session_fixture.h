/* session_fixture.h: the fixture shared by the session-level C tests (test_session.c,
 * test_decoding.c): the tiny model on the CPU, the canvas "def square(x):\n" followed by GEN
 * masks, and sampling parameters of 8 steps in blocks of 8 (two blocks of 4 steps, 2 commits
 * per step by LLaDA's rule). The state is file-static: one fixture per test program. */
#ifndef DLLM_TEST_SESSION_FIXTURE_H
#define DLLM_TEST_SESSION_FIXTURE_H

#include <stddef.h>
#include <stdint.h>

#include "check.h"

#define GEN 16
#define MAXC 64

static dllm_model *model;
static int32_t mask_id;
static int32_t canvas0[MAXC]; /* prompt + GEN masks */
static size_t len0, prompt_len;

/* The defaults with steps = 8 and block_len = 8. */
static dllm_sampling_params params(void) {
    dllm_sampling_params p;
    dllm_sampling_params_default(&p);
    p.steps = 8;
    p.block_len = 8;
    return p;
}

/* Loads the model in `dir` (CPU) and builds canvas0; 0 on success. */
static int fixture_setup(const char *dir) {
    model = load_cpu_model(dir);
    if (model == NULL) return 1;
    mask_id = dllm_model_mask_token(model);
    len0 = prompt_canvas(model, "def square(x):\n", GEN, canvas0, MAXC, &prompt_len);
    return len0 > GEN ? 0 : 1;
}

#endif
