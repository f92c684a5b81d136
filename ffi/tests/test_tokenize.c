/* test_tokenize.c: dllm_tokenize(_literal) / dllm_detokenize through the C ABI: size queries, exact and
 * too-small buffers (nothing written past `cap`), NUL termination, round trips, bad input.
 *
 * Usage: test_tokenize MODEL_DIR */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define CANARY 0x7EADBEEF

int main(int argc, char **argv) {
    REQUIRE(argc == 2);
    dllm_model *m = load_cpu_model(argv[1]);
    REQUIRE(m != NULL);

    const char *text = "def add(a, b):\n    return a + b\n";
    size_t len = strlen(text);

    /* Size query: cap = 0, tokens may be NULL. */
    size_t n = 0;
    CHECK_STATUS(dllm_tokenize(m, text, len, NULL, 0, &n), DLLM_ERR_BUFFER_TOO_SMALL);
    CHECK(n > 4 && n < len); /* a BPE tokenizer merges characters */
    size_t need = n;

    /* Exact capacity: success, same count; the slot after it is untouched. */
    int32_t *ids = malloc((need + 1) * sizeof *ids);
    REQUIRE(ids != NULL);
    for (size_t i = 0; i <= need; i++) ids[i] = CANARY;
    n = 0;
    CHECK_STATUS(dllm_tokenize(m, text, len, ids, need, &n), DLLM_OK);
    CHECK(n == need);
    CHECK(ids[need] == CANARY);
    for (size_t i = 0; i < need; i++) CHECK(ids[i] >= 0 && ids[i] < dllm_model_vocab_size(m));

    /* One too few: the needed size comes back and the buffer is not written. */
    int32_t *small = malloc(need * sizeof *small);
    REQUIRE(small != NULL);
    for (size_t i = 0; i < need; i++) small[i] = CANARY;
    n = 0;
    CHECK_STATUS(dllm_tokenize(m, text, len, small, need - 1, &n), DLLM_ERR_BUFFER_TOO_SMALL);
    CHECK(n == need);
    CHECK(small[need - 1] == CANARY);
    CHECK_ERROR_MENTIONS("buffer");

    /* Round trip: ids back to the same text. Size query first. */
    size_t nb = 0;
    CHECK_STATUS(dllm_detokenize(m, ids, need, NULL, 0, &nb), DLLM_ERR_BUFFER_TOO_SMALL);
    CHECK(nb == len);
    char *buf = malloc(nb + 2);
    REQUIRE(buf != NULL);
    memset(buf, '#', nb + 2);
    CHECK_STATUS(dllm_detokenize(m, ids, need, buf, nb + 1, &nb), DLLM_OK);
    CHECK(nb == len);
    CHECK(strcmp(buf, text) == 0); /* NUL-terminated: there was room */
    CHECK(buf[nb + 1] == '#');
    /* Exactly the text length: success, no room for (and no write of) the NUL. */
    memset(buf, '#', nb + 2);
    CHECK_STATUS(dllm_detokenize(m, ids, need, buf, nb, &nb), DLLM_OK);
    CHECK(memcmp(buf, text, len) == 0 && buf[len] == '#');
    /* One short: nothing written. */
    memset(buf, '#', nb + 2);
    CHECK_STATUS(dllm_detokenize(m, ids, need, buf, nb - 1, &nb), DLLM_ERR_BUFFER_TOO_SMALL);
    CHECK(nb == len && buf[0] == '#');

    /* Tokenizing is a function of the bytes, not of NUL termination: a prefix by length. */
    size_t n_prefix = 0;
    CHECK_STATUS(dllm_tokenize(m, "def add(a, b):XYZ", 14, NULL, 0, &n_prefix),
                 DLLM_ERR_BUFFER_TOO_SMALL);
    size_t n_full = 0;
    CHECK_STATUS(dllm_tokenize(m, "def add(a, b):", 14, NULL, 0, &n_full),
                 DLLM_ERR_BUFFER_TOO_SMALL);
    CHECK(n_prefix == n_full);

    /* Empty text: zero tokens, text may be NULL. Empty id list: empty string. */
    n = 99;
    CHECK_STATUS(dllm_tokenize(m, NULL, 0, NULL, 0, &n), DLLM_OK);
    CHECK(n == 0);
    nb = 99;
    buf[0] = '#';
    CHECK_STATUS(dllm_detokenize(m, NULL, 0, buf, 1, &nb), DLLM_OK);
    CHECK(nb == 0 && buf[0] == '\0');

    /* Special tokens are rendered as text. */
    int32_t mask = dllm_model_mask_token(m);
    char special[64];
    CHECK_STATUS(dllm_detokenize(m, &mask, 1, special, sizeof special, &nb), DLLM_OK);
    CHECK(strcmp(special, "<|mask|>") == 0);

    /* Special-token text: dllm_tokenize reads it as the tokens, dllm_tokenize_literal keeps it
     * text that comes back byte for byte. */
    {
        const char *quoted = "s = \"<|mask|>\" + \"<|endoftext|>\"";
        size_t qlen = strlen(quoted);
        int32_t eos = dllm_model_eos_token(m);
        int32_t parsed[64], literal[64];
        size_t np = 0, nl = 0;
        CHECK_STATUS(dllm_tokenize(m, quoted, qlen, parsed, 64, &np), DLLM_OK);
        CHECK_STATUS(dllm_tokenize_literal(m, quoted, qlen, literal, 64, &nl), DLLM_OK);
        int parsed_mask = 0, parsed_eos = 0, literal_special = 0;
        for (size_t i = 0; i < np; i++) {
            parsed_mask += parsed[i] == mask;
            parsed_eos += parsed[i] == eos;
        }
        for (size_t i = 0; i < nl; i++) literal_special += literal[i] == mask || literal[i] == eos;
        CHECK(parsed_mask == 1 && parsed_eos == 1);
        CHECK(literal_special == 0 && nl > np);
        char back[128];
        size_t nback = 0;
        CHECK_STATUS(dllm_detokenize(m, literal, nl, back, sizeof back, &nback), DLLM_OK);
        CHECK(nback == qlen && strcmp(back, quoted) == 0);
        /* Plain text: both give the same ids; the size protocol and errors are shared. */
        size_t nt = 0;
        CHECK_STATUS(dllm_tokenize_literal(m, text, len, NULL, 0, &nt), DLLM_ERR_BUFFER_TOO_SMALL);
        CHECK(nt == need);
        CHECK_STATUS(dllm_tokenize_literal(m, text, len, NULL, 0, NULL), DLLM_ERR_INVALID_ARGUMENT);
        CHECK_ERROR_MENTIONS("dllm_tokenize_literal");
    }

    /* Bad input. */
    CHECK_STATUS(dllm_tokenize(NULL, text, len, ids, need, &n), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_tokenize(m, text, len, ids, need, NULL), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("n_tokens");
    CHECK_STATUS(dllm_tokenize(m, NULL, 5, ids, need, &n), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("text");
    CHECK_STATUS(dllm_tokenize(m, text, len, NULL, 5, &n), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("tokens");
    const char bad_utf8[] = {'a', (char)0xC3, '(', 'b'};
    CHECK_STATUS(dllm_tokenize(m, bad_utf8, sizeof bad_utf8, ids, need, &n),
                 DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("UTF-8");

    int32_t bad_ids[3] = {5, -1, 7};
    CHECK_STATUS(dllm_detokenize(m, bad_ids, 3, buf, nb + 1, &nb), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("-1");
    bad_ids[1] = dllm_model_vocab_size(m); /* one past the last id */
    CHECK_STATUS(dllm_detokenize(m, bad_ids, 3, buf, nb + 1, &nb), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_ERROR_MENTIONS("8192");
    bad_ids[1] = INT32_MAX;
    CHECK_STATUS(dllm_detokenize(m, bad_ids, 3, buf, nb + 1, &nb), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_detokenize(m, NULL, 3, buf, 10, &nb), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_detokenize(m, ids, need, NULL, 10, &nb), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_detokenize(m, ids, need, buf, 10, NULL), DLLM_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(dllm_detokenize(NULL, ids, need, buf, 10, &nb), DLLM_ERR_INVALID_ARGUMENT);

    free(buf);
    free(small);
    free(ids);
    dllm_model_free(m);
    return check_report("test_tokenize");
}
