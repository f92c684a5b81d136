/* test_session.c: sessions through the C ABI: parameter validation, the block schedule seen
 * step by step, finished sessions, determinism, lock and remask semantics, freeing the model
 * while a session lives.
 *
 * The canvas is a short prompt followed by 16 masks; with steps = 8 and block_len = 8 the
 * schedule is two blocks of 4 steps, each step committing 2 tokens (LLaDA's rule: 8 masks over
 * 4 steps). Expected counts below follow from that rule by hand.
 *
 * Usage: test_session MODEL_DIR */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "session_fixture.h"

static dllm_session *new_session(void) {
    dllm_sampling_params p = params();
    dllm_session *s = NULL;
    if (dllm_session_new(model, canvas0, len0, &p, &s) != DLLM_OK) {
        fprintf(stderr, "dllm_session_new: %s\n", dllm_last_error());
        return NULL;
    }
    return s;
}

/* The session's canvas into `out` (len0 ids). */
static int get_canvas(const dllm_session *s, int32_t *out) {
    size_t n = 0;
    dllm_status st = dllm_session_canvas(s, out, MAXC, &n);
    return st == DLLM_OK && n == len0;
}

static int count_masks(const int32_t *c, size_t from, size_t to) {
    int k = 0;
    for (size_t i = from; i < to; i++) k += c[i] == mask_id;
    return k;
}

static void test_defaults_and_validation(void) {
    dllm_sampling_params p;
    memset(&p, 0xAB, sizeof p);
    dllm_sampling_params_default(&p);
    CHECK(p.struct_size == sizeof(dllm_sampling_params));
    CHECK(p.steps == 128 && p.block_len == 32 && p.temperature == 0.0f);
    CHECK(p.remasking == DLLM_REMASK_LOW_CONFIDENCE && p.seed == 0);

    dllm_session *const sentinel = (dllm_session *)&p;
    dllm_session *s = sentinel;
    dllm_sampling_params q = params();
    CHECK_STATUS(dllm_session_new(NULL, canvas0, len0, &q, &s), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_new(model, NULL, len0, &q, &s), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("canvas");
    CHECK_STATUS(dllm_session_new(model, canvas0, len0, &q, NULL), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_new(model, canvas0, 0, &q, &s), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("empty");

    int32_t c[MAXC];
    memcpy(c, canvas0, sizeof c);
    c[3] = -5;
    CHECK_STATUS(dllm_session_new(model, c, len0, &q, &s), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("position 3");
    c[3] = 9000; /* beyond the vocabulary (8192 ids) */
    CHECK_STATUS(dllm_session_new(model, c, len0, &q, &s), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("position 3");
    c[3] = dllm_model_vocab_size(model); /* one past the last id */
    CHECK_STATUS(dllm_session_new(model, c, len0, &q, &s), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("position 3");
    c[3] = dllm_model_vocab_size(model) - 1; /* the last id */
    dllm_session *last_id = NULL;
    CHECK_STATUS(dllm_session_new(model, c, len0, &q, &last_id), DLLM_OK);
    dllm_session_free(last_id);

    size_t too_long = (size_t)dllm_model_max_length(model) + 1;
    int32_t *big = malloc(too_long * sizeof *big);
    if (big) {
        for (size_t i = 0; i < too_long; i++) big[i] = mask_id;
        CHECK_STATUS(dllm_session_new(model, big, too_long, &q, &s), DLLM_ERR_INVALID_ARGUMENT);
        CHECK_ERROR_MENTIONS("1024");
        free(big);
    }

    struct { int32_t *field; int32_t value; const char *name; } ints[] = {
        {&q.steps, 0, "steps"},       {&q.steps, -3, "steps"},
        {&q.block_len, 0, "block_len"}, {&q.block_len, -1, "block_len"},
        {&q.steps, 3, "multiple"}, /* 2 blocks: steps must be even */
        {&q.remasking, 4, "remasking"}, {&q.remasking, -1, "remasking"},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        q = params();
        *ints[i].field = ints[i].value;
        CHECK_STATUS(dllm_session_new(model, canvas0, len0, &q, &s), DLLM_ERR_INVALID_ARGUMENT);
        CHECK_ERROR_MENTIONS(ints[i].name);
        /* One form whichever layer found it ("multiple" comes from the schedule, the others
         * from the C layer): the function, the kind, the detail. */
        const char *prefix = "dllm_session_new: invalid argument: ";
        CHECK(strncmp(dllm_last_error(), prefix, strlen(prefix)) == 0);
    }
    float temps[] = {-1.0f, NAN, INFINITY};
    for (size_t i = 0; i < 3; i++) {
        q = params();
        q.temperature = temps[i];
        CHECK_STATUS(dllm_session_new(model, canvas0, len0, &q, &s), DLLM_ERR_INVALID_ARGUMENT);
        CHECK_ERROR_MENTIONS("temperature");
    }
    /* Sizes that are no version of the struct (the version-2 fields are tested in
     * test_decoding.c, with margin and entropy). */
    uint32_t sizes[] = {0, 8, 31, 33, 40, 63};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        q = params();
        q.struct_size = sizes[i];
        CHECK_STATUS(dllm_session_new(model, canvas0, len0, &q, &s), DLLM_ERR_INVALID_ARGUMENT);
        CHECK_ERROR_MENTIONS("struct_size");
    }
    CHECK(s == sentinel);

    /* A newer, larger struct is accepted; NULL params mean the defaults. */
    struct { dllm_sampling_params v1; double future[4]; } newer;
    memset(&newer, 0x7F, sizeof newer);
    newer.v1 = params();
    newer.v1.struct_size = sizeof newer;
    s = NULL;
    CHECK_STATUS(dllm_session_new(model, canvas0, len0, &newer.v1, &s), DLLM_OK);
    CHECK(dllm_session_total_steps(s) == 8);
    dllm_session_free(s);
    s = NULL;
    /* Defaults: 16 masks are one block of 32; 128 steps. */
    CHECK_STATUS(dllm_session_new(model, canvas0, len0, NULL, &s), DLLM_OK);
    CHECK(dllm_session_total_steps(s) == 128);
    dllm_session_free(s);

    /* NULL sessions. */
    dllm_step_info info;
    size_t n;
    CHECK_STATUS(dllm_session_step(NULL, &info), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_run(NULL), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_canvas(NULL, c, MAXC, &n), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_lock(NULL, 0, 5), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_remask(NULL, 0, 1), DLLM_ERR_INVALID_ARGUMENT);
}

static void test_canvas_buffers(void) {
    dllm_session *s = new_session();
    if (!s) { CHECK(0); return; }
    size_t n = 0;
    CHECK_STATUS(dllm_session_canvas(s, NULL, 0, &n), DLLM_ERR_BUFFER_TOO_SMALL);
    CHECK(n == len0);
    int32_t c[MAXC];
    for (size_t i = 0; i < MAXC; i++) c[i] = 0x55;
    CHECK_STATUS(dllm_session_canvas(s, c, len0 - 1, &n), DLLM_ERR_BUFFER_TOO_SMALL);
    CHECK(n == len0 && c[0] == 0x55 && c[len0 - 2] == 0x55);
    CHECK_STATUS(dllm_session_canvas(s, c, len0, &n), DLLM_OK);
    CHECK(n == len0 && memcmp(c, canvas0, len0 * sizeof c[0]) == 0);
    CHECK(c[len0] == 0x55);
    CHECK_STATUS(dllm_session_canvas(s, NULL, 4, &n), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_canvas(s, c, MAXC, NULL), DLLM_ERR_INVALID_ARGUMENT);
    dllm_session_free(s);
}

/* Steps one at a time and checks the schedule; returns the final canvas in `out`. */
static void test_stepping(int32_t *out) {
    dllm_session *s = new_session();
    if (!s) { CHECK(0); return; }
    CHECK(dllm_session_total_steps(s) == 8);
    int32_t c[MAXC];
    size_t b0 = prompt_len, b1 = prompt_len + 8, end = prompt_len + GEN;
    for (int i = 0; i < 8; i++) {
        dllm_step_info info;
        memset(&info, 0xFF, sizeof info);
        CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
        CHECK(info.step == i);
        CHECK(info.committed == 2);
        CHECK(info.masks_left == GEN - 2 * (i + 1));
        CHECK(info.done == (i == 7));
        CHECK(get_canvas(s, c));
        CHECK(memcmp(c, canvas0, prompt_len * sizeof c[0]) == 0); /* prompt fixed */
        if (i < 4) { /* block 0 first, block 1 untouched */
            CHECK(count_masks(c, b0, b1) == 8 - 2 * (i + 1));
            CHECK(count_masks(c, b1, end) == 8);
        } else {
            CHECK(count_masks(c, b0, b1) == 0);
            CHECK(count_masks(c, b1, end) == 8 - 2 * (i - 3));
        }
    }
    /* A finished session: OK, done, nothing changes; info may be NULL. */
    dllm_step_info info;
    CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
    CHECK(info.done == 1 && info.step == 8 && info.committed == 0 && info.masks_left == 0);
    CHECK_STATUS(dllm_session_step(s, NULL), DLLM_OK);
    CHECK_STATUS(dllm_session_run(s), DLLM_OK);
    int32_t again[MAXC];
    CHECK(get_canvas(s, again));
    CHECK(memcmp(c, again, len0 * sizeof c[0]) == 0);
    for (size_t i = prompt_len; i < len0; i++) {
        CHECK(c[i] >= 0 && c[i] < dllm_model_vocab_size(model) && c[i] != mask_id);
    }
    memcpy(out, c, len0 * sizeof c[0]);
    dllm_session_free(s);

    /* run() reaches the same canvas (greedy, same params: deterministic). */
    s = new_session();
    if (!s) { CHECK(0); return; }
    CHECK_STATUS(dllm_session_run(s), DLLM_OK);
    CHECK(get_canvas(s, again));
    CHECK(memcmp(c, again, len0 * sizeof c[0]) == 0);
    dllm_session_free(s);
}

static void test_lock(const int32_t *greedy) {
    dllm_session *s = new_session();
    if (!s) { CHECK(0); return; }
    size_t p = prompt_len;
    /* Bad locks change nothing. */
    CHECK_STATUS(dllm_session_lock(s, len0, 42), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("position");
    CHECK_STATUS(dllm_session_lock(s, p, -1), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_lock(s, p, mask_id), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("remask");
    CHECK_STATUS(dllm_session_lock(s, p, dllm_model_vocab_size(model)), DLLM_ERR_INVALID_ARGUMENT);

    /* A prompt position, and a mask of block 1 before that block starts: block 1 will count 7
     * masks, so its 4 steps commit 2, 2, 2, 1. */
    CHECK_STATUS(dllm_session_lock(s, 0, 7), DLLM_OK);
    CHECK_STATUS(dllm_session_lock(s, p + 9, 55), DLLM_OK);
    dllm_step_info info;
    CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
    CHECK(info.committed == 2 && info.masks_left == GEN - 1 - 2);

    /* Three of block 0's six remaining masks, after its counts (2 per step) were fixed: its
     * three remaining steps commit 2, 1, 0. */
    int32_t c[MAXC];
    CHECK(get_canvas(s, c));
    size_t locked[3];
    int n_locked = 0;
    for (size_t i = p; i < p + 8 && n_locked < 3; i++) {
        if (c[i] == mask_id) locked[n_locked++] = i;
    }
    if (n_locked != 3) { CHECK(0); dllm_session_free(s); return; }
    for (int k = 0; k < 3; k++) CHECK_STATUS(dllm_session_lock(s, locked[k], 42 + k), DLLM_OK);
    int want[7] = {2, 1, 0, 2, 2, 2, 1};
    int left = GEN - 1 - 2 - 3;
    for (int i = 0; i < 7; i++) {
        CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
        left -= want[i];
        CHECK(info.step == i + 1);
        CHECK(info.committed == want[i]);
        CHECK(info.masks_left == left);
    }
    CHECK(info.done == 1 && left == 0);
    CHECK(get_canvas(s, c));
    CHECK(c[0] == 7 && c[p + 9] == 55);
    for (int k = 0; k < 3; k++) CHECK(c[locked[k]] == 42 + k);
    CHECK(count_masks(c, 0, len0) == 0);
    /* Locking works on a finished session too, and overrides a generated token. */
    int32_t other = greedy[p + 2] == 100 ? 101 : 100;
    CHECK_STATUS(dllm_session_lock(s, p + 2, other), DLLM_OK);
    CHECK(get_canvas(s, c));
    CHECK(c[p + 2] == other);
    dllm_session_free(s);
}

static void test_remask_after_done(const int32_t *greedy) {
    dllm_session *s = new_session();
    if (!s) { CHECK(0); return; }
    CHECK_STATUS(dllm_session_run(s), DLLM_OK);
    size_t p = prompt_len;
    CHECK_STATUS(dllm_session_remask(s, p + 5, p + 3), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_remask(s, p, len0 + 1), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("canvas");
    CHECK_STATUS(dllm_session_remask(s, 3, 3), DLLM_OK); /* empty: nothing happens */
    CHECK(dllm_session_total_steps(s) == 8);

    /* Four generated positions back to masks: a new block of 4 steps committing 1 each. */
    CHECK_STATUS(dllm_session_remask(s, p + 2, p + 6), DLLM_OK);
    CHECK(dllm_session_total_steps(s) == 12);
    int32_t c[MAXC];
    CHECK(get_canvas(s, c));
    CHECK(count_masks(c, 0, len0) == 4 && count_masks(c, p + 2, p + 6) == 4);
    for (int i = 0; i < 4; i++) {
        dllm_step_info info;
        CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
        CHECK(info.step == 8 + i && info.committed == 1 && info.masks_left == 3 - i);
        CHECK(info.done == (i == 3));
    }
    CHECK(get_canvas(s, c));
    CHECK(count_masks(c, 0, len0) == 0);
    for (size_t i = 0; i < len0; i++) {
        if (i < p + 2 || i >= p + 6) CHECK(c[i] == greedy[i]); /* outside the range: kept */
    }

    /* A prompt position can be remasked too; the model fills it in a block of its own. */
    CHECK_STATUS(dllm_session_remask(s, 0, 1), DLLM_OK);
    CHECK(dllm_session_total_steps(s) == 16);
    CHECK_STATUS(dllm_session_run(s), DLLM_OK);
    CHECK(get_canvas(s, c));
    CHECK(c[0] != mask_id && count_masks(c, 0, len0) == 0);
    dllm_session_free(s);
}

static void test_remask_during_block(void) {
    dllm_session *s = new_session();
    if (!s) { CHECK(0); return; }
    size_t p = prompt_len;
    dllm_step_info info;
    CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
    int32_t c[MAXC];
    CHECK(get_canvas(s, c));
    size_t a = p;
    while (a < p + 8 && c[a] == mask_id) a++; /* a position step 0 committed */
    if (a == p + 8) { CHECK(0); dllm_session_free(s); return; }

    /* Remasking block 1 (all masks, not started) changes nothing. */
    CHECK_STATUS(dllm_session_remask(s, p + 8, p + 16), DLLM_OK);
    CHECK(dllm_session_total_steps(s) == 8);

    /* `a` goes back to the model, but only in a new block after blocks 0 and 1. */
    CHECK_STATUS(dllm_session_remask(s, a, a + 1), DLLM_OK);
    CHECK(dllm_session_total_steps(s) == 12);
    int want[11] = {2, 2, 2, 2, 2, 2, 2, 1, 0, 0, 0};
    for (int i = 0; i < 11; i++) {
        CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
        CHECK(info.step == i + 1 && info.committed == want[i]);
        CHECK(get_canvas(s, c));
        if (i < 7) CHECK(c[a] == mask_id); /* blocks 0 and 1 leave it alone */
        CHECK(info.done == (i == 10));
    }
    CHECK(info.masks_left == 0 && c[a] != mask_id);
    dllm_session_free(s);
}

static void test_model_freed_first(const int32_t *greedy) {
    dllm_session *s = new_session();
    if (!s) { CHECK(0); return; }
    dllm_model_free(model); /* the session keeps the model alive */
    model = NULL;
    CHECK_STATUS(dllm_session_run(s), DLLM_OK);
    int32_t c[MAXC];
    CHECK(get_canvas(s, c));
    CHECK(memcmp(c, greedy, len0 * sizeof c[0]) == 0);
    dllm_session_free(s);
}

int main(int argc, char **argv) {
    REQUIRE(argc == 2);
    REQUIRE(fixture_setup(argv[1]) == 0);

    int32_t greedy[MAXC];
    test_defaults_and_validation();
    test_canvas_buffers();
    test_stepping(greedy);
    test_lock(greedy);
    test_remask_after_done(greedy);
    test_remask_during_block();
    test_model_freed_first(greedy);
    return check_report("test_session");
}
