/* check.h: the assertion helpers shared by the C tests of the dllm C ABI.
 *
 * CHECK(cond) records a failure (file, line, expression) and carries on, so one run reports
 * every broken expectation; CHECK_STATUS(call, expected) also prints both status names and
 * dllm_last_error(). A test's main() ends with `return check_report(argv[0]);`, which prints a
 * summary and returns the exit status (0 = every check passed). */
#ifndef DLLM_TEST_CHECK_H
#define DLLM_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

#include "dllm.h"

static int check_failures = 0;
static int check_count = 0;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        check_count++;                                                                   \
        if (!(cond)) {                                                                   \
            check_failures++;                                                            \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);     \
        }                                                                                \
    } while (0)

#define CHECK_STATUS(call, expected)                                                     \
    do {                                                                                 \
        dllm_status check_got_ = (call);                                                 \
        dllm_status check_want_ = (expected);                                            \
        check_count++;                                                                   \
        if (check_got_ != check_want_) {                                                 \
            check_failures++;                                                            \
            fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d (%s); last error: %s\n", \
                    __FILE__, __LINE__, #call, (int)check_got_,                          \
                    dllm_status_string(check_got_), (int)check_want_,                    \
                    dllm_status_string(check_want_), dllm_last_error());                 \
        }                                                                                \
    } while (0)

/* Checks that the thread's last error mentions `needle`. */
#define CHECK_ERROR_MENTIONS(needle)                                                     \
    do {                                                                                 \
        check_count++;                                                                   \
        if (strstr(dllm_last_error(), (needle)) == NULL) {                               \
            check_failures++;                                                            \
            fprintf(stderr, "%s:%d: last error \"%s\" does not mention \"%s\"\n",        \
                    __FILE__, __LINE__, dllm_last_error(), (needle));                    \
        }                                                                                \
    } while (0)

/* Stops the test at once when a prerequisite fails (e.g. the model does not load). */
#define REQUIRE(cond)                                                                    \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: REQUIRE failed: %s; last error: %s\n", __FILE__,     \
                    __LINE__, #cond, dllm_last_error());                                 \
            return 1;                                                                    \
        }                                                                                \
    } while (0)

static int check_report(const char *name) {
    if (check_failures) {
        fprintf(stderr, "%s: %d of %d checks FAILED\n", name, check_failures, check_count);
        return 1;
    }
    printf("%s: all %d checks passed\n", name, check_count);
    return 0;
}

/* Loads the model in `dir` on the CPU backend (the tests never touch CUDA) with 2 threads. */
static dllm_model *load_cpu_model(const char *dir) {
    dllm_model_params mp;
    dllm_model_params_default(&mp);
    mp.backend = DLLM_BACKEND_CPU;
    mp.threads = 2;
    dllm_model *m = NULL;
    if (dllm_model_load(dir, &mp, &m) != DLLM_OK) {
        fprintf(stderr, "cannot load %s: %s\n", dir, dllm_last_error());
        return NULL;
    }
    return m;
}

/* Builds the canvas "tokens of `prompt`, then `gen` masks" in out[0..cap); returns its length
 * and the prompt's length in *prompt_len, or 0 on failure. */
static inline size_t prompt_canvas(const dllm_model *m, const char *prompt, size_t gen,
                                   int32_t *out, size_t cap, size_t *prompt_len) {
    if (gen > cap) return 0;
    if (dllm_tokenize(m, prompt, strlen(prompt), out, cap - gen, prompt_len) != DLLM_OK) {
        fprintf(stderr, "cannot tokenize \"%s\": %s\n", prompt, dllm_last_error());
        return 0;
    }
    for (size_t i = 0; i < gen; i++) out[*prompt_len + i] = dllm_model_mask_token(m);
    return *prompt_len + gen;
}

#endif
