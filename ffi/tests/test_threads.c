/* test_threads.c: one model shared by sessions on several threads (each session used by one
 * thread), and the per-thread last error.
 *
 * Usage: test_threads MODEL_DIR */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "check.h"

#define NTHREADS 3
#define GEN 8
#define MAXC 48

static dllm_model *model;
static int32_t canvas0[MAXC];
static size_t len0;

typedef struct {
    uint64_t seed;
    int32_t out[MAXC];
    dllm_status status;
    int fresh_error_was_empty;
    int own_error_seen;
} job;

static dllm_status generate(uint64_t seed, int32_t *out) {
    dllm_sampling_params p;
    dllm_sampling_params_default(&p);
    p.steps = 4;
    p.block_len = GEN;
    p.temperature = 0.7f;
    p.seed = seed;
    dllm_session *s = NULL;
    dllm_status st = dllm_session_new(model, canvas0, len0, &p, &s);
    if (st != DLLM_OK) return st;
    st = dllm_session_run(s);
    size_t n = 0;
    if (st == DLLM_OK) st = dllm_session_canvas(s, out, MAXC, &n);
    dllm_session_free(s);
    return st;
}

static void *worker(void *arg) {
    job *j = arg;
    j->fresh_error_was_empty = strcmp(dllm_last_error(), "") == 0;
    j->status = generate(j->seed, j->out);
    /* An error on this thread is seen here only. */
    dllm_session_lock(NULL, 0, 0);
    j->own_error_seen = strstr(dllm_last_error(), "dllm_session_lock") != NULL;
    return NULL;
}

int main(int argc, char **argv) {
    REQUIRE(argc == 2);
    model = load_cpu_model(argv[1]);
    REQUIRE(model != NULL);
    size_t n = 0;
    CHECK_STATUS(dllm_tokenize(model, "import os\n", 10, canvas0, MAXC - GEN, &n), DLLM_OK);
    for (size_t i = 0; i < GEN; i++) canvas0[n + i] = dllm_model_mask_token(model);
    len0 = n + GEN;

    /* References, computed on this thread one after the other. */
    int32_t want[NTHREADS][MAXC];
    for (int t = 0; t < NTHREADS; t++) CHECK_STATUS(generate(100 + t, want[t]), DLLM_OK);
    CHECK(memcmp(want[0], want[1], len0 * sizeof want[0][0]) != 0 ||
          memcmp(want[1], want[2], len0 * sizeof want[0][0]) != 0); /* seeds matter */

    /* An error on the main thread before the workers start. */
    CHECK_STATUS(dllm_model_load(NULL, NULL, NULL), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("dllm_model_load");

    job jobs[NTHREADS];
    pthread_t tid[NTHREADS];
    memset(jobs, 0, sizeof jobs);
    for (int t = 0; t < NTHREADS; t++) {
        jobs[t].seed = 100 + t;
        REQUIRE(pthread_create(&tid[t], NULL, worker, &jobs[t]) == 0);
    }
    for (int t = 0; t < NTHREADS; t++) pthread_join(tid[t], NULL);
    for (int t = 0; t < NTHREADS; t++) {
        CHECK(jobs[t].status == DLLM_OK);
        CHECK(jobs[t].fresh_error_was_empty);
        CHECK(jobs[t].own_error_seen);
        CHECK(memcmp(jobs[t].out, want[t], len0 * sizeof want[0][0]) == 0);
    }
    /* The workers' errors did not replace this thread's. */
    CHECK_ERROR_MENTIONS("dllm_model_load");

    dllm_model_free(model);
    return check_report("test_threads");
}
