/* test_decoding.c: the version-2 fields of dllm_sampling_params (decoding strategies) and
 * dllm_session_last_commits, through the C ABI: defaults and layout, validation (each bad
 * value names its field), a version-1 caller, margin and entropy remasking, the threshold rule
 * step by step, stop_at_eos, and the positions a step filled (dllm_session_last_commits) and
 * re-masked (dllm_session_last_remasks, ABI version 6) against the canvas diff, and position
 * constraints (dllm_session_constrain, ABI version 6).
 *
 * The canvas is a short prompt followed by 16 masks; with steps = 8 and block_len = 8 the
 * schedule is two blocks of 4 steps, 2 commits per step. Expected counts follow by hand from
 * the rules in dllm.h. (Parity of these options with the Rust Session: tests/c_abi.rs.)
 *
 * Usage: test_decoding MODEL_DIR */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "session_fixture.h"

/* A new session on canvas0 with `p`, or NULL (a failed CHECK) when creation fails. */
static dllm_session *new_session(const dllm_sampling_params *p) {
    dllm_session *s = NULL;
    CHECK_STATUS(dllm_session_new(model, canvas0, len0, p, &s), DLLM_OK);
    return s;
}

static int get_canvas(const dllm_session *s, int32_t *out) {
    size_t n = 0;
    return dllm_session_canvas(s, out, MAXC, &n) == DLLM_OK && n == len0;
}

/* Runs a session with `p` to the end; its canvas goes to `out`. Returns 1 on success. */
static int run_to_end(const dllm_sampling_params *p, int32_t *out) {
    dllm_session *s = new_session(p);
    if (!s) return 0;
    int ok = dllm_session_run(s) == DLLM_OK && get_canvas(s, out);
    dllm_session_free(s);
    return ok;
}

static int count_masks(const int32_t *c) {
    int k = 0;
    for (size_t i = 0; i < len0; i++) k += c[i] == mask_id;
    return k;
}

static void test_defaults_and_layout(void) {
    CHECK(sizeof(dllm_sampling_params) == 88);
    CHECK(offsetof(dllm_sampling_params, seed) == 24);
    CHECK(offsetof(dllm_sampling_params, threshold) == 32); /* version 1 ended at 32 bytes */
    CHECK(offsetof(dllm_sampling_params, revise) == 60);
    CHECK(offsetof(dllm_sampling_params, credit_alpha) == 64); /* version 2 ended at 64 bytes */
    CHECK(offsetof(dllm_sampling_params, credit_decay) == 72);
    CHECK(dllm_abi_version() >= 7 && DLLM_ABI_VERSION >= 7); /* the version-3 fields exist */
    dllm_sampling_params p;
    memset(&p, 0xAB, sizeof p);
    dllm_sampling_params_default(&p);
    CHECK(p.struct_size == 88);
    CHECK(p.threshold == 0.0f && p.factor == 0.0f && p.top_k == 0 && p.top_p == 1.0f);
    CHECK(p.cfg_scale == 0.0f && p.stop_at_eos == 0 && p.cache == DLLM_CACHE_NONE);
    CHECK(p.revise == 0.0f);
    CHECK(p.credit_alpha == 0.0f && p.credit_gamma == 0.2f && p.credit_decay == 0.8f);
    CHECK(p.hierarchy_low == 0.0f && offsetof(dllm_sampling_params, hierarchy_low) == 76);
    CHECK(dllm_abi_version() >= 8 && DLLM_ABI_VERSION >= 8); /* the version-4 field exists */
    CHECK(p.vicinity == 0 && offsetof(dllm_sampling_params, vicinity) == 80);
    /* The library function behind the macro, which programs built against ABI 2-6 headers
     * call: it writes their 64-byte struct and nothing after it. */
    union { dllm_sampling_params p; unsigned char bytes[sizeof(dllm_sampling_params)]; } u;
    memset(u.bytes, 0xAB, sizeof u.bytes);
    (dllm_sampling_params_default)(&u.p);
    CHECK(u.p.struct_size == 64 && u.p.revise == 0.0f && u.p.top_p == 1.0f);
    for (size_t i = 64; i < sizeof u.bytes; i++) CHECK(u.bytes[i] == 0xAB);
}

/* Each field with a valid non-default value gives a session that runs to the end (one step
 * per block, to keep the valgrind run short). */
static void test_fields_accepted(void) {
    for (int field = 0; field < 13; field++) {
        dllm_sampling_params p = params();
        p.steps = 2;
        switch (field) {
        case 0: p.threshold = 0.9f; break;
        case 1: p.factor = 1.0f; break;
        case 2: p.top_k = 3; p.temperature = 0.7f; break;
        case 3: p.top_p = 0.9f; p.temperature = 0.7f; break;
        case 4: p.cfg_scale = 1.0f; break;
        case 5: p.stop_at_eos = 1; break;
        case 6: p.remasking = DLLM_REMASK_MARGIN; break;
        case 7: p.remasking = DLLM_REMASK_ENTROPY; break;
        case 8: p.revise = 0.2f; p.steps = 8; break;
        case 9: p.cache = DLLM_CACHE_DUAL; p.steps = 8; break;
        case 10: p.credit_alpha = 0.7f; p.threshold = 0.9f; p.steps = 8; break;
        case 11: p.hierarchy_low = 0.4f; p.threshold = 0.9f; p.steps = 8; break;
        case 12: p.vicinity = 4; p.cache = DLLM_CACHE_DUAL; p.steps = 8; break;
        }
        int32_t c[MAXC];
        CHECK(run_to_end(&p, c));
        CHECK(count_masks(c) == 0);
        CHECK(memcmp(c, canvas0, prompt_len * sizeof c[0]) == 0);
    }
}

static void test_validation(void) {
    dllm_session *const sentinel = (dllm_session *)&model;
    dllm_session *s = sentinel;
    struct { int kind; float f; int32_t i; const char *field; } bad[] = {
        {0, -0.5f, 0, "threshold"}, {0, NAN, 0, "threshold"}, {0, INFINITY, 0, "threshold"},
        {1, -1.0f, 0, "factor"},    {1, NAN, 0, "factor"},
        {2, 0, -1, "top_k"},
        {3, 0.0f, 0, "top_p"},      {3, 1.5f, 0, "top_p"},    {3, NAN, 0, "top_p"},
        {4, -2.0f, 0, "cfg_scale"}, {4, INFINITY, 0, "cfg_scale"},
        {5, 0, 2, "stop_at_eos"},   {5, 0, -1, "stop_at_eos"},
        {6, 0, 3, "cache"},         {6, 0, -1, "cache"},
        {7, 1.0f, 0, "revise"},     {7, -0.1f, 0, "revise"},  {7, NAN, 0, "revise"},
        {8, 0.9f, 0, "threshold"}, /* threshold and factor together */
        {9, 0.5f, DLLM_CACHE_DUAL, "revise"},   /* revise with a cache */
        {9, 0.5f, DLLM_CACHE_PREFIX, "revise"},
        {10, -0.5f, 0, "credit_alpha"}, {10, NAN, 0, "credit_alpha"},
        {10, INFINITY, 0, "credit_alpha"},
        {11, -1.0f, 0, "credit_gamma"}, {11, NAN, 0, "credit_gamma"},
        {12, 1.5f, 0, "credit_decay"},  {12, -0.1f, 0, "credit_decay"},
        {12, NAN, 0, "credit_decay"},
        {13, -0.4f, 0, "hierarchy_low"}, {13, NAN, 0, "hierarchy_low"},
        {14, 0.4f, 0, "hierarchy_low"}, /* hierarchy_low and factor together */
        {15, 0, -1, "vicinity"},
        {16, 0, 4, "vicinity"}, /* a vicinity without a cache */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        dllm_sampling_params p = params();
        switch (bad[i].kind) {
        case 0: p.threshold = bad[i].f; break;
        case 1: p.factor = bad[i].f; break;
        case 2: p.top_k = bad[i].i; break;
        case 3: p.top_p = bad[i].f; break;
        case 4: p.cfg_scale = bad[i].f; break;
        case 5: p.stop_at_eos = bad[i].i; break;
        case 6: p.cache = bad[i].i; break;
        case 7: p.revise = bad[i].f; break;
        case 8: p.threshold = bad[i].f; p.factor = 1.0f; break;
        case 9: p.revise = bad[i].f; p.cache = bad[i].i; break;
        case 10: p.credit_alpha = bad[i].f; break;
        case 11: p.credit_alpha = 0.7f; p.credit_gamma = bad[i].f; break;
        case 12: p.credit_alpha = 0.7f; p.credit_decay = bad[i].f; break;
        case 13: p.hierarchy_low = bad[i].f; break;
        case 14: p.hierarchy_low = bad[i].f; p.factor = 1.0f; break;
        case 15: p.vicinity = bad[i].i; p.cache = DLLM_CACHE_DUAL; break;
        case 16: p.vicinity = bad[i].i; break;
        }
        CHECK_STATUS(dllm_session_new(model, canvas0, len0, &p, &s), DLLM_ERR_INVALID_ARGUMENT);
        CHECK_ERROR_MENTIONS(bad[i].field);
    }
    CHECK(s == sentinel); /* no failure wrote *out */
}

/* The version-1 struct, as a program built against the first header declares it. */
typedef struct {
    uint32_t struct_size;
    int32_t steps;
    int32_t block_len;
    float temperature;
    int32_t remasking;
    uint64_t seed;
} sampling_params_v1;

/* A version-1 program (struct_size 32) works and gets the defaults of the version-2 fields,
 * whatever lies after its struct: the same canvas as a version-2 caller with the same values. */
/* The block K/V caches. With one step per block every step refreshes the cache (a full
 * forward), so the canvas equals the uncached one exactly; with several steps per block the
 * later steps run on the cache and must still fill every mask, the same way on every run. */
static void test_caches(void) {
    int32_t caches[] = {DLLM_CACHE_PREFIX, DLLM_CACHE_DUAL};
    int32_t none[MAXC], got[MAXC], again[MAXC];
    dllm_sampling_params p = params();
    p.steps = 2; /* two blocks of 8: one step each */
    CHECK(run_to_end(&p, none));
    for (int i = 0; i < 2; i++) {
        p = params();
        p.steps = 2;
        p.cache = caches[i];
        CHECK(run_to_end(&p, got));
        CHECK(memcmp(none, got, len0 * sizeof(int32_t)) == 0);
        p.steps = 8; /* 4 steps per block: 3 of them on the cache */
        CHECK(run_to_end(&p, got) && run_to_end(&p, again));
        CHECK(count_masks(got) == 0);
        CHECK(memcmp(got, again, len0 * sizeof(int32_t)) == 0);
    }
}

/* Whether the first n bytes of an older program's struct at `prefix` (its struct_size n),
 * followed by 0xFF bytes up to this header's size, run to the canvas `want`. */
static int older_caller_gets(const void *prefix, size_t n, const int32_t *want) {
    union { dllm_sampling_params p; unsigned char bytes[sizeof(dllm_sampling_params)]; } buf;
    memset(buf.bytes, 0xFF, sizeof buf.bytes);
    memcpy(buf.bytes, prefix, n);
    dllm_session *s = NULL;
    int32_t got[MAXC];
    int ok = dllm_session_new(model, canvas0, len0, &buf.p, &s) == DLLM_OK && s != NULL;
    ok = ok && dllm_session_run(s) == DLLM_OK && get_canvas(s, got) &&
         memcmp(got, want, len0 * sizeof got[0]) == 0;
    dllm_session_free(s);
    return ok;
}

static void test_old_caller(void) {
    dllm_sampling_params p = params();
    p.temperature = 0.6f;
    p.remasking = DLLM_REMASK_RANDOM;
    p.seed = 99;
    int32_t want[MAXC];
    CHECK(run_to_end(&p, want));

    sampling_params_v1 v1 = {sizeof(sampling_params_v1), 8, 8, 0.6f, DLLM_REMASK_RANDOM, 99};
    CHECK(sizeof v1 == 32);
    /* Followed by bytes that are invalid as version-2 fields (0xFF..: NaN threshold). */
    CHECK(older_caller_gets(&v1, sizeof v1, want));
    /* A version-2 program (struct_size 64): the credit fields it lacks stay off, whatever
     * follows its struct (0xFF..: a NaN credit_alpha would be refused). */
    dllm_sampling_params v2 = p;
    v2.struct_size = 64;
    CHECK(older_caller_gets(&v2, 64, want));
    /* A version-3 program (struct_size 80) with a dual cache: the vicinity it lacks stays off,
     * whatever follows its struct (0xFF..: a vicinity of -1 would be refused). */
    dllm_sampling_params v3 = params();
    v3.cache = DLLM_CACHE_DUAL;
    int32_t want_cached[MAXC];
    CHECK(run_to_end(&v3, want_cached));
    v3.struct_size = 80;
    CHECK(older_caller_gets(&v3, 80, want_cached));
    dllm_session *s = NULL;
    /* Exactly 32 bytes of heap: under valgrind a read past them is an error. */
    dllm_sampling_params *exact = malloc(sizeof v1);
    if (exact) {
        memcpy(exact, &v1, sizeof v1);
        s = NULL;
        CHECK_STATUS(dllm_session_new(model, canvas0, len0, exact, &s), DLLM_OK);
        if (s) {
            CHECK(dllm_session_total_steps(s) == 8);
            dllm_session_free(s);
        }
        free(exact);
    }
}

/* Margin and entropy follow the same schedule (2 commits per step) and are deterministic
 * (sampled, so that the seed matters). */
static void test_margin_entropy(void) {
    int32_t rules[] = {DLLM_REMASK_MARGIN, DLLM_REMASK_ENTROPY};
    for (int r = 0; r < 2; r++) {
        dllm_sampling_params p = params();
        p.remasking = rules[r];
        p.temperature = 0.9f;
        p.seed = 5;
        dllm_session *s = new_session(&p);
        if (!s) continue;
        dllm_step_info info = {0, 0, 0, 0};
        for (int i = 0; i < 8; i++) {
            CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
            CHECK(info.step == i && info.committed == 2 && info.masks_left == GEN - 2 * (i + 1));
        }
        CHECK(info.done == 1);
        int32_t a[MAXC], b[MAXC];
        CHECK(get_canvas(s, a));
        dllm_session_free(s);
        CHECK(run_to_end(&p, b));
        CHECK(memcmp(a, b, len0 * sizeof a[0]) == 0);
    }
}

/* Steps `s` once and checks dllm_session_last_commits and dllm_session_last_remasks against the
 * canvas diff of the step: a position that holds the mask after it was re-masked, any other
 * changed position was filled. Returns the number of re-masked positions. */
static size_t step_and_check_commits(dllm_session *s, dllm_step_info *info) {
    int32_t before[MAXC], after[MAXC], tokens[MAXC];
    size_t positions[MAXC], remasked[MAXC], n = 999, n_remasked = 999;
    CHECK(get_canvas(s, before));
    CHECK_STATUS(dllm_session_step(s, info), DLLM_OK);
    CHECK(get_canvas(s, after));
    CHECK_STATUS(dllm_session_last_commits(s, positions, tokens, MAXC, &n), DLLM_OK);
    CHECK_STATUS(dllm_session_last_remasks(s, remasked, MAXC, &n_remasked), DLLM_OK);
    CHECK(n == (size_t)info->committed);
    size_t k = 0, r = 0;
    for (size_t i = 0; i < len0; i++) {
        if (before[i] == after[i]) continue;
        if (after[i] == mask_id) {
            CHECK(r < n_remasked && remasked[r] == i);
            r++;
        } else {
            CHECK(before[i] == mask_id); /* a step only fills masks */
            CHECK(k < n && positions[k] == i && tokens[k] == after[i]);
            k++;
        }
    }
    CHECK(k == n && r == n_remasked);
    return n_remasked;
}

static void test_last_commits(void) {
    dllm_sampling_params p = params();
    dllm_session *s = new_session(&p);
    if (!s) return;
    size_t positions[MAXC], n = 999;
    int32_t tokens[MAXC];
    CHECK_STATUS(dllm_session_last_commits(s, positions, tokens, MAXC, &n), DLLM_OK);
    CHECK(n == 0); /* no step yet */
    CHECK_STATUS(dllm_session_last_commits(NULL, positions, tokens, MAXC, &n),
                 DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_last_commits(s, positions, tokens, MAXC, NULL),
                 DLLM_ERR_INVALID_ARGUMENT);

    dllm_step_info info;
    step_and_check_commits(s, &info);
    CHECK(info.committed == 2);
    /* Buffers: a size query, a short buffer (nothing written), NULL arrays with cap > 0. */
    n = 0;
    CHECK_STATUS(dllm_session_last_commits(s, NULL, NULL, 0, &n), DLLM_ERR_BUFFER_TOO_SMALL);
    CHECK(n == 2);
    positions[0] = 777;
    tokens[0] = 777;
    CHECK_STATUS(dllm_session_last_commits(s, positions, tokens, 1, &n),
                 DLLM_ERR_BUFFER_TOO_SMALL);
    CHECK(n == 2 && positions[0] == 777 && tokens[0] == 777);
    CHECK_STATUS(dllm_session_last_commits(s, NULL, tokens, 2, &n), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("positions");
    CHECK_STATUS(dllm_session_last_commits(s, positions, NULL, 2, &n), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("tokens");
    /* Lock and remask do not change it. */
    size_t first = 0;
    int32_t first_token = 0;
    CHECK_STATUS(dllm_session_last_commits(s, positions, tokens, 2, &n), DLLM_OK);
    first = positions[0];
    first_token = tokens[0];
    CHECK_STATUS(dllm_session_lock(s, first, first_token == 100 ? 101 : 100), DLLM_OK);
    CHECK_STATUS(dllm_session_last_commits(s, positions, tokens, 2, &n), DLLM_OK);
    CHECK(n == 2 && positions[0] == first && tokens[0] == first_token);

    for (int i = 1; i < 7; i++) step_and_check_commits(s, &info);
    /* The last step through dllm_session_run. */
    int32_t before[MAXC], after[MAXC];
    CHECK(get_canvas(s, before));
    CHECK_STATUS(dllm_session_run(s), DLLM_OK);
    CHECK(get_canvas(s, after));
    CHECK_STATUS(dllm_session_last_commits(s, positions, tokens, MAXC, &n), DLLM_OK);
    size_t k = 0;
    for (size_t i = 0; i < len0; i++) {
        if (before[i] != after[i]) {
            CHECK(k < n && positions[k] == i && tokens[k] == after[i]);
            k++;
        }
    }
    CHECK(k == n && n == 2 && count_masks(after) == 0);
    /* A step of the finished session filled nothing. */
    CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
    CHECK(info.done == 1);
    CHECK_STATUS(dllm_session_last_commits(s, positions, tokens, MAXC, &n), DLLM_OK);
    CHECK(n == 0);
    dllm_session_free(s);
}

/* Self-correction through the C ABI: at revise 0.7 the tiny model re-masks tokens of this
 * canvas, and each step's dllm_session_last_remasks lists exactly the positions it turned back
 * into masks (dllm_session_last_commits the ones it filled); the run still ends with no mask.
 * Without revise the list stays empty. */
static void test_last_remasks(void) {
    CHECK(dllm_abi_version() >= 6 && DLLM_ABI_VERSION >= 6); /* the function exists */
    dllm_sampling_params p = params();
    p.revise = 0.7f;
    dllm_session *s = new_session(&p);
    if (!s) return;
    size_t positions[MAXC], n = 999;
    CHECK_STATUS(dllm_session_last_remasks(s, positions, MAXC, &n), DLLM_OK);
    CHECK(n == 0); /* no step yet */
    CHECK_STATUS(dllm_session_last_remasks(NULL, positions, MAXC, &n), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_last_remasks(s, positions, MAXC, NULL), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_last_remasks(s, NULL, 2, &n), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("positions");
    dllm_step_info info = {0, 0, 0, 0};
    size_t total = 0, steps = 0;
    int buffer_checked = 0;
    while (!info.done && steps < 16) {
        size_t r = step_and_check_commits(s, &info);
        total += r;
        steps++;
        if (r > 0 && !buffer_checked) {
            /* A size query and a short buffer: *n is the count, nothing is written. */
            CHECK_STATUS(dllm_session_last_remasks(s, NULL, 0, &n), DLLM_ERR_BUFFER_TOO_SMALL);
            CHECK(n == r);
            positions[0] = 777;
            CHECK_STATUS(dllm_session_last_remasks(s, positions, r - 1, &n),
                         DLLM_ERR_BUFFER_TOO_SMALL);
            CHECK(n == r && (r == 1 || positions[0] == 777));
            buffer_checked = 1;
        }
    }
    CHECK(info.done && steps == 8); /* re-maskings add no steps */
    CHECK(total > 0);
    int32_t c[MAXC];
    CHECK(get_canvas(s, c) && count_masks(c) == 0);
    /* A step of the finished session re-masks nothing. */
    CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
    CHECK_STATUS(dllm_session_last_remasks(s, positions, MAXC, &n), DLLM_OK);
    CHECK(n == 0);
    dllm_session_free(s);

    /* Without revise: never any. */
    p = params();
    s = new_session(&p);
    if (!s) return;
    for (int i = 0; i < 8; i++) CHECK(step_and_check_commits(s, &info) == 0);
    dllm_session_free(s);
}

/* dllm_session_constrain (ABI version 6): a position allowed one id is certain, so it is among
 * the first step's commits and holds that id; a position allowed three ids ends as one of them
 * (greedy and sampled); a lifted constraint (n == 0) leaves the reference run; bad calls are
 * refused and name the problem (tests/constraints.rs checks that they change nothing). */
static void test_constrain(void) {
    dllm_sampling_params p = params();
    int32_t reference[MAXC], got[MAXC];
    CHECK(run_to_end(&p, reference));
    size_t single = prompt_len + 7, three = prompt_len + 12; /* block 0's last, block 1 */
    int32_t one_id[1] = {reference[single] == 300 ? 301 : 300};
    int32_t three_ids[3] = {0, 0, 0};
    for (int32_t id = 40, k = 0; k < 3; id += 7) {
        if (id != reference[three] && id != mask_id) three_ids[k++] = id;
    }
    for (int sampled = 0; sampled < 2; sampled++) {
        dllm_sampling_params q = params();
        if (sampled) {
            q.temperature = 0.8f;
            q.seed = 9;
        }
        dllm_session *s = new_session(&q);
        if (!s) return;
        CHECK_STATUS(dllm_session_constrain(s, single, one_id, 1), DLLM_OK);
        CHECK_STATUS(dllm_session_constrain(s, three, three_ids, 3), DLLM_OK);
        dllm_step_info info;
        CHECK_STATUS(dllm_session_step(s, &info), DLLM_OK);
        CHECK(get_canvas(s, got) && got[single] == one_id[0]);
        CHECK_STATUS(dllm_session_run(s), DLLM_OK);
        CHECK(get_canvas(s, got) && count_masks(got) == 0);
        CHECK(got[three] == three_ids[0] || got[three] == three_ids[1] ||
              got[three] == three_ids[2]);
        dllm_session_free(s);
    }
    /* Refused calls change nothing, and n == 0 lifts a constraint: the reference run. */
    dllm_session *s = new_session(&p);
    if (!s) return;
    CHECK_STATUS(dllm_session_constrain(s, three, three_ids, 3), DLLM_OK);
    int32_t bad[2] = {50, mask_id};
    CHECK_STATUS(dllm_session_constrain(s, three, bad, 2), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("mask");
    bad[1] = dllm_model_vocab_size(model);
    CHECK_STATUS(dllm_session_constrain(s, three, bad, 2), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("allowed[1]");
    bad[1] = -1;
    CHECK_STATUS(dllm_session_constrain(s, three, bad, 2), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("allowed[1]");
    CHECK_STATUS(dllm_session_constrain(s, len0, three_ids, 3), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("position");
    CHECK_STATUS(dllm_session_constrain(s, three, NULL, 3), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("allowed");
    CHECK_STATUS(dllm_session_constrain(NULL, three, three_ids, 3), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_session_constrain(s, three, NULL, 0), DLLM_OK);
    CHECK_STATUS(dllm_session_run(s), DLLM_OK);
    CHECK(get_canvas(s, got) && memcmp(got, reference, len0 * sizeof got[0]) == 0);
    dllm_session_free(s);
}

/* The threshold rule by hand: a threshold above every confidence (> 1) commits the least count
 * each step, which here is the schedule's 2, so the result is the reference canvas; a threshold
 * below every confidence commits a whole block per step, and the block's later steps are
 * skipped (step 0, then step 4). */
static void test_threshold(void) {
    dllm_sampling_params p = params();
    int32_t reference[MAXC], got[MAXC];
    CHECK(run_to_end(&p, reference));

    p.threshold = 2.0f;
    dllm_session *s = new_session(&p);
    if (!s) return;
    dllm_step_info info = {0, 0, 0, 0};
    for (int i = 0; i < 8; i++) {
        step_and_check_commits(s, &info);
        CHECK(info.step == i && info.committed == 2);
    }
    CHECK(info.done == 1);
    CHECK(get_canvas(s, got) && memcmp(got, reference, len0 * sizeof got[0]) == 0);
    dllm_session_free(s);

    /* Random confidences lie in [0, 1), almost surely above 1e-30. */
    p = params();
    p.remasking = DLLM_REMASK_RANDOM;
    p.threshold = 1e-30f;
    s = new_session(&p);
    if (!s) return;
    step_and_check_commits(s, &info);
    CHECK(info.step == 0 && info.committed == 8 && info.masks_left == 8 && info.done == 0);
    step_and_check_commits(s, &info);
    CHECK(info.step == 4 && info.committed == 8 && info.masks_left == 0 && info.done == 1);
    dllm_session_free(s);
}

/* stop_at_eos: with the first generated position locked to end-of-text, the next step commits
 * its share and then fills every remaining mask with end-of-text, and the session is done; the
 * step's count and dllm_session_last_commits include those fills. */
static void test_stop_at_eos(void) {
    int32_t eos = dllm_model_eos_token(model);
    for (int stop = 0; stop < 2; stop++) {
        dllm_sampling_params p = params();
        p.stop_at_eos = stop;
        dllm_session *s = new_session(&p);
        if (!s) return;
        CHECK_STATUS(dllm_session_lock(s, prompt_len, eos), DLLM_OK);
        dllm_step_info info;
        step_and_check_commits(s, &info);
        if (stop) {
            CHECK(info.committed == GEN - 1 && info.masks_left == 0 && info.done == 1);
            int32_t c[MAXC];
            CHECK(get_canvas(s, c));
            size_t eos_count = 0;
            for (size_t i = prompt_len; i < len0; i++) eos_count += c[i] == eos;
            CHECK(eos_count >= GEN - 2); /* all but (at most) the two committed predictions */
        } else {
            CHECK(info.committed == 2 && info.masks_left == GEN - 3 && info.done == 0);
        }
        dllm_session_free(s);
    }
}

int main(int argc, char **argv) {
    REQUIRE(argc == 2);
    REQUIRE(fixture_setup(argv[1]) == 0);

    test_defaults_and_layout();
    test_fields_accepted();
    test_validation();
    test_caches();
    test_old_caller();
    test_margin_entropy();
    test_last_commits();
    test_last_remasks();
    test_constrain();
    test_threshold();
    test_stop_at_eos();
    dllm_model_free(model);
    return check_report("test_decoding");
}
