/* test_model.c: version, status strings, last-error, NULL handling, model loading and the
 * model accessors of the dllm C ABI.
 *
 * Usage: test_model MODEL_DIR   (the embedded tiny model: models/tiny-llada-code) */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* A "newer" caller: the v1 struct followed by fields this library does not know. */
typedef struct {
    dllm_model_params v1;
    int64_t future_field;
    char future_bytes[24];
} model_params_v9;

int main(int argc, char **argv) {
    REQUIRE(argc == 2);
    const char *dir = argv[1];

    /* Version: the library and this header agree. */
    CHECK(dllm_abi_version() == DLLM_ABI_VERSION);

    /* Status strings: one per code, distinct, never NULL, unknown codes handled. */
    CHECK(strcmp(dllm_status_string(DLLM_OK), "ok") == 0);
    for (int a = DLLM_OK; a <= DLLM_ERR_INTERNAL; a++) {
        CHECK(dllm_status_string(a) != NULL && dllm_status_string(a)[0] != '\0');
        for (int b = a + 1; b <= DLLM_ERR_INTERNAL; b++) {
            CHECK(strcmp(dllm_status_string(a), dllm_status_string(b)) != 0);
        }
    }
    CHECK(strcmp(dllm_status_string(DLLM_ERR_BUFFER_TOO_SMALL), "buffer too small") == 0);
    CHECK(strcmp(dllm_status_string(-1), "unknown status") == 0);
    CHECK(strcmp(dllm_status_string(1000), "unknown status") == 0);

    /* Nothing has failed yet on this thread. */
    CHECK(dllm_last_error() != NULL && strcmp(dllm_last_error(), "") == 0);

    /* NULL is harmless wherever the header says so. */
    dllm_model_free(NULL);
    dllm_session_free(NULL);
    dllm_model_params_default(NULL);
    dllm_sampling_params_default(NULL);
    CHECK(dllm_model_mask_token(NULL) == -1);
    CHECK(dllm_model_eos_token(NULL) == -1);
    CHECK(dllm_model_vocab_size(NULL) == -1);
    CHECK(dllm_model_max_length(NULL) == -1);
    CHECK(dllm_model_backend(NULL) == NULL);
    CHECK(dllm_model_architecture(NULL) == NULL);
    CHECK(dllm_session_total_steps(NULL) == -1);

    /* Defaults, as documented in the header. */
    dllm_model_params mp;
    memset(&mp, 0xAB, sizeof mp);
    dllm_model_params_default(&mp);
    CHECK(mp.struct_size == sizeof(dllm_model_params));
    CHECK(mp.backend == DLLM_BACKEND_AUTO && mp.device == 0 && mp.threads == 0);
    CHECK(mp.cpu_bf16 == -1);

    /* Bad arguments: the status and a message naming the culprit; *out untouched. */
    dllm_model *m = (dllm_model *)&mp; /* a sentinel that must not be overwritten */
    dllm_model *const sentinel = m;
    CHECK_STATUS(dllm_model_load(NULL, NULL, &m), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("dir");
    CHECK(m == sentinel);
    CHECK_STATUS(dllm_model_load(dir, NULL, NULL), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("out");

    CHECK_STATUS(dllm_model_load("/nonexistent/dllm-model", NULL, &m), DLLM_ERR_IO);
    CHECK_ERROR_MENTIONS("/nonexistent/dllm-model");
    CHECK(m == sentinel);

    dllm_model_params bad = mp;
    bad.struct_size = 4; /* older than the first version of the struct */
    CHECK_STATUS(dllm_model_load(dir, &bad, &m), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("struct_size");
    bad = mp;
    bad.backend = 7;
    CHECK_STATUS(dllm_model_load(dir, &bad, &m), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("backend");
    bad = mp;
    bad.backend = DLLM_BACKEND_CPU;
    bad.threads = -1;
    CHECK_STATUS(dllm_model_load(dir, &bad, &m), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("threads");
    bad = mp;
    bad.backend = DLLM_BACKEND_CPU;
    bad.device = -1;
    CHECK_STATUS(dllm_model_load(dir, &bad, &m), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("device");
    bad = mp;
    bad.backend = DLLM_BACKEND_CPU;
    bad.cpu_bf16 = 2;
    CHECK_STATUS(dllm_model_load(dir, &bad, &m), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("cpu_bf16");
    CHECK(m == sentinel);

    /* cpu_bf16 on and off both load (on is f32 where the CPU lacks AVX-512 BF16); a version-1
     * caller (16 bytes, no cpu_bf16: the byte after it is garbage) gets the default. */
    for (int32_t v = -1; v <= 1; v++) {
        dllm_model_params p = mp;
        p.backend = DLLM_BACKEND_CPU;
        p.cpu_bf16 = v;
        dllm_model *bm = NULL;
        CHECK_STATUS(dllm_model_load(dir, &p, &bm), DLLM_OK);
        CHECK(bm != NULL);
        dllm_model_free(bm);
    }
    {
        dllm_model_params p = mp;
        p.struct_size = 16;
        p.backend = DLLM_BACKEND_CPU;
        p.cpu_bf16 = 77; /* beyond a version-1 struct: never read */
        dllm_model *bm = NULL;
        CHECK_STATUS(dllm_model_load(dir, &p, &bm), DLLM_OK);
        CHECK(bm != NULL);
        dllm_model_free(bm);
    }

    /* A directory that is not a model: config.json missing. */
    CHECK_STATUS(dllm_model_load("/", &(dllm_model_params){sizeof(dllm_model_params),
                                                           DLLM_BACKEND_CPU, 0, 1, -1},
                                 &m),
                 DLLM_ERR_IO);
    CHECK_ERROR_MENTIONS("config.json");

    /* A failure is remembered; a later success does not clear it. */
    CHECK_STATUS(dllm_model_load("/nonexistent/second", NULL, &m), DLLM_ERR_IO);
    CHECK_ERROR_MENTIONS("/nonexistent/second");

    /* A larger struct from a newer header is accepted; its extra fields are ignored. */
    model_params_v9 newer;
    memset(&newer, 0x5A, sizeof newer);
    dllm_model_params_default(&newer.v1);
    newer.v1.struct_size = sizeof newer;
    newer.v1.backend = DLLM_BACKEND_CPU;
    newer.v1.threads = 1;
    m = NULL;
    CHECK_STATUS(dllm_model_load(dir, &newer.v1, &m), DLLM_OK);
    REQUIRE(m != NULL);
    CHECK(strcmp(dllm_last_error(), "") != 0); /* the earlier failure is still there */
    CHECK_ERROR_MENTIONS("/nonexistent/second");

    /* The tiny model's config.json: mask 1, eos 0, vocab 8192, max_sequence_length 1024. */
    CHECK(dllm_model_mask_token(m) == 1);
    CHECK(dllm_model_eos_token(m) == 0);
    CHECK(dllm_model_vocab_size(m) == 8192);
    CHECK(dllm_model_max_length(m) == 1024);
    CHECK(dllm_model_backend(m) != NULL && strcmp(dllm_model_backend(m), "cpu") == 0);
    /* The tiny model's config.json says model_type "llada". */
    CHECK(dllm_model_architecture(m) != NULL && strcmp(dllm_model_architecture(m), "llada") == 0);
    dllm_model_free(m);

    /* Two models from one directory are independent. */
    dllm_model *a = load_cpu_model(dir);
    dllm_model *b = load_cpu_model(dir);
    REQUIRE(a != NULL && b != NULL && a != b);
    dllm_model_free(a);
    CHECK(dllm_model_vocab_size(b) == 8192);
    dllm_model_free(b);

    return check_report("test_model");
}
