/* test_batch.c: dllm_sessions_step and dllm_sessions_run (ABI version 3), several sessions of
 * one model stepped together.
 *
 * Six configurations on two canvases of different lengths (the fixture's "def square(x):\n"
 * + 16 masks, and "class Point:\n" + 24 masks, so the two block schedules differ): greedy,
 * sampled at temperature 0.7, random remasking, greedy with the dual cache (on the CPU its
 * span steps are stacked with the other sessions' rows; on CUDA it steps on its own), and
 * greedy with self-correction (revise 0.7, which re-masks tokens of that canvas; it steps on its
 * own), and greedy with a constrained position in its second block (dllm_session_constrain:
 * the steps predicting it step alone, the others batch). Stepped together, each must take
 * exactly the
 * steps of the same configuration stepped alone with dllm_session_step (step info, canvas,
 * dllm_session_last_commits and dllm_session_last_remasks after every step, finished sessions
 * reporting done), and run
 * together it must end as dllm_session_run leaves it alone. Also: a finished session in the
 * batch is left as it is, and bad arguments (NULL array or entry, a session twice, two models)
 * are refused before anything runs, each error naming the entry.
 *
 * Usage: test_batch MODEL_DIR */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "session_fixture.h"

#define CONFIGS 6
#define GEN1 24

static int32_t canvas1[MAXC];
static size_t len1;

/* Configuration i: its canvas and parameters. */
static void config(int i, const int32_t **canvas, size_t *n, dllm_sampling_params *p) {
    *p = params();
    int short_canvas = i % 2 == 0 || i == 5;
    *canvas = short_canvas ? canvas0 : canvas1;
    *n = short_canvas ? len0 : len1;
    if (!short_canvas) p->steps = 12; /* 24 masks in 3 blocks of 8: 4 steps each */
    switch (i) {
    case 1:
        p->temperature = 0.7f;
        p->seed = 3;
        break;
    case 2:
        p->remasking = DLLM_REMASK_RANDOM;
        p->seed = 5;
        break;
    case 3:
        p->cache = DLLM_CACHE_DUAL;
        break;
    case 4:
        p->revise = 0.7f;
        break;
    case 5: /* plus a constraint in the second block (new_config_session) */
        break;
    default:
        break;
    }
}

static dllm_session *new_config_session(int i) {
    const int32_t *c;
    size_t n;
    dllm_sampling_params p;
    config(i, &c, &n, &p);
    dllm_session *s = NULL;
    CHECK_STATUS(dllm_session_new(model, c, n, &p, &s), DLLM_OK);
    if (s && i == 5) {
        /* canvas0: its first block's steps batch with the others; those of the second
         * (generated positions 8..15) predict the constrained position, so they step alone
         * in their rounds. */
        const int32_t allowed[3] = {100, 200, 300};
        CHECK_STATUS(dllm_session_constrain(s, prompt_len + 11, allowed, 3), DLLM_OK);
    }
    return s;
}

/* What a session holds: its canvas and its last step's commits and re-maskings. */
typedef struct {
    int32_t canvas[MAXC];
    size_t n;
    size_t positions[MAXC];
    int32_t tokens[MAXC];
    size_t n_commits;
    size_t remasked[MAXC];
    size_t n_remasked;
} outcome;

static void read_outcome(const dllm_session *s, outcome *o) {
    memset(o, 0, sizeof *o);
    CHECK_STATUS(dllm_session_canvas(s, o->canvas, MAXC, &o->n), DLLM_OK);
    CHECK_STATUS(dllm_session_last_commits(s, o->positions, o->tokens, MAXC, &o->n_commits),
                 DLLM_OK);
    CHECK_STATUS(dllm_session_last_remasks(s, o->remasked, MAXC, &o->n_remasked), DLLM_OK);
}

static int same_outcome(const outcome *a, const outcome *b) {
    return a->n == b->n && memcmp(a->canvas, b->canvas, a->n * sizeof a->canvas[0]) == 0 &&
           a->n_commits == b->n_commits &&
           memcmp(a->positions, b->positions, a->n_commits * sizeof a->positions[0]) == 0 &&
           memcmp(a->tokens, b->tokens, a->n_commits * sizeof a->tokens[0]) == 0 &&
           a->n_remasked == b->n_remasked &&
           memcmp(a->remasked, b->remasked, a->n_remasked * sizeof a->remasked[0]) == 0;
}

static int count_masks(const outcome *o) {
    int k = 0;
    for (size_t i = 0; i < o->n; i++) k += o->canvas[i] == mask_id;
    return k;
}

static void test_batch_equals_single_runs(void) {
    outcome alone[CONFIGS], together[CONFIGS];
    for (int i = 0; i < CONFIGS; i++) {
        dllm_session *s = new_config_session(i);
        if (!s) return;
        CHECK_STATUS(dllm_session_run(s), DLLM_OK);
        read_outcome(s, &alone[i]);
        CHECK(count_masks(&alone[i]) == 0 && alone[i].n_commits > 0);
        if (i == 5) { /* the constraint held */
            int32_t t = alone[i].canvas[prompt_len + 11];
            CHECK(t == 100 || t == 200 || t == 300);
        }
        dllm_session_free(s);
    }
    dllm_session *batch[CONFIGS + 1];
    for (int i = 0; i < CONFIGS; i++) {
        batch[i] = new_config_session(i);
        if (!batch[i]) return;
    }
    /* A fifth, already finished session: the batch must leave it (and its commits) alone. */
    batch[CONFIGS] = new_config_session(0);
    if (!batch[CONFIGS]) return;
    CHECK_STATUS(dllm_session_run(batch[CONFIGS]), DLLM_OK);
    outcome finished_before, finished_after;
    read_outcome(batch[CONFIGS], &finished_before);

    CHECK_STATUS(dllm_sessions_run(batch, CONFIGS + 1), DLLM_OK);
    for (int i = 0; i < CONFIGS; i++) {
        read_outcome(batch[i], &together[i]);
        CHECK(same_outcome(&together[i], &alone[i]));
    }
    read_outcome(batch[CONFIGS], &finished_after);
    CHECK(same_outcome(&finished_after, &finished_before));
    /* Running finished sessions again changes nothing and succeeds. */
    CHECK_STATUS(dllm_sessions_run(batch, CONFIGS + 1), DLLM_OK);
    read_outcome(batch[0], &together[0]);
    CHECK(same_outcome(&together[0], &alone[0]));
    for (int i = 0; i <= CONFIGS; i++) dllm_session_free(batch[i]);
}

static int same_info(const dllm_step_info *a, const dllm_step_info *b) {
    return a->step == b->step && a->committed == b->committed && a->masks_left == b->masks_left &&
           a->done == b->done;
}

static void test_steps_equal_single_steps(void) {
    dllm_session *alone[CONFIGS], *together[CONFIGS];
    for (int i = 0; i < CONFIGS; i++) {
        alone[i] = new_config_session(i);
        together[i] = new_config_session(i);
        if (!alone[i] || !together[i]) return;
    }
    int rounds = 0, all_done = 0;
    size_t remasks_seen = 0;
    while (!all_done && rounds < 64) {
        dllm_step_info want[CONFIGS], got[CONFIGS];
        memset(got, 0xFF, sizeof got);
        CHECK_STATUS(dllm_sessions_step(together, CONFIGS, got), DLLM_OK);
        all_done = 1;
        for (int i = 0; i < CONFIGS; i++) {
            CHECK_STATUS(dllm_session_step(alone[i], &want[i]), DLLM_OK);
            CHECK(same_info(&got[i], &want[i]));
            outcome a, b;
            read_outcome(alone[i], &a);
            read_outcome(together[i], &b);
            CHECK(same_outcome(&a, &b));
            remasks_seen += b.n_remasked;
            all_done &= got[i].done;
        }
        rounds++;
    }
    /* 8 steps for the short canvas, 12 for the long one; one more round reports done only. */
    CHECK(all_done && rounds == 12);
    CHECK(remasks_seen > 0); /* the revise configuration re-masked, so its lists were compared */
    /* infos may be NULL; stepping finished sessions changes nothing and succeeds. */
    CHECK_STATUS(dllm_sessions_step(together, CONFIGS, NULL), DLLM_OK);
    for (int i = 0; i < CONFIGS; i++) {
        dllm_session_free(alone[i]);
        dllm_session_free(together[i]);
    }
}

static void test_bad_arguments(const char *dir) {
    CHECK(dllm_abi_version() >= 3 && DLLM_ABI_VERSION >= 3); /* the batch functions exist */
    CHECK_STATUS(dllm_sessions_run(NULL, 0), DLLM_OK);
    CHECK_STATUS(dllm_sessions_step(NULL, 0, NULL), DLLM_OK);
    CHECK_STATUS(dllm_sessions_run(NULL, 2), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("sessions");
    CHECK_STATUS(dllm_sessions_step(NULL, 2, NULL), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("sessions");

    dllm_session *a = new_config_session(0);
    dllm_session *b = new_config_session(1);
    if (!a || !b) return;
    dllm_session *with_null[2] = {a, NULL};
    CHECK_STATUS(dllm_sessions_run(with_null, 2), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("sessions[1] is NULL");
    dllm_session *twice[3] = {a, b, a};
    CHECK_STATUS(dllm_sessions_run(twice, 3), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("sessions[2] is the same session as sessions[0]");
    dllm_step_info infos[3];
    memset(infos, 0x5A, sizeof infos);
    CHECK_STATUS(dllm_sessions_step(twice, 3, infos), DLLM_ERR_INVALID_ARGUMENT);
    CHECK(infos[0].step == 0x5A5A5A5A); /* nothing written on failure */

    dllm_model *other = load_cpu_model(dir);
    CHECK(other != NULL);
    if (other) {
        dllm_sampling_params p = params();
        dllm_session *c = NULL;
        CHECK_STATUS(dllm_session_new(other, canvas0, len0, &p, &c), DLLM_OK);
        dllm_session *mixed[2] = {a, c};
        CHECK_STATUS(dllm_sessions_run(mixed, 2), DLLM_ERR_INVALID_ARGUMENT);
        CHECK_ERROR_MENTIONS("sessions[1]");
        CHECK_ERROR_MENTIONS("another model");
        dllm_session_free(c);
        dllm_model_free(other);
    }
    /* Refused calls ran nothing: every mask is still there and nothing was committed. */
    outcome o;
    read_outcome(a, &o);
    CHECK(count_masks(&o) == GEN && o.n_commits == 0);
    dllm_session_free(a);
    dllm_session_free(b);
}

int main(int argc, char **argv) {
    REQUIRE(argc == 2);
    REQUIRE(fixture_setup(argv[1]) == 0);
    size_t prompt1 = 0;
    len1 = prompt_canvas(model, "class Point:\n", GEN1, canvas1, MAXC, &prompt1);
    REQUIRE(len1 > GEN1);

    test_bad_arguments(argv[1]);
    test_steps_equal_single_steps();
    test_batch_equals_single_runs();
    dllm_model_free(model);
    return check_report("test_batch");
}
