/*
 * dllm.h: the C ABI of dllm, an inference engine for masked-diffusion language models
 * (LLaDA).
 *
 * This header is the contract of libdllm (libdllm.so / libdllm.a). It is hand-written, and a
 * test checks every declaration below against the Rust side on every CI run (tests/c_abi.rs).
 *
 * A diffusion LM fills a *canvas*: a sequence of token ids in which every position holding the
 * model's mask token is to be generated and every other position stays as given. The library
 * denoises it step by step; the step loop belongs to the caller, who may inspect the canvas
 * after each step, fix positions (dllm_session_lock) or send them back to the model
 * (dllm_session_remask), and stop whenever it likes.
 *
 * Usage:
 *
 *     dllm_model *model = NULL;
 *     dllm_model_params mp;
 *     dllm_model_params_default(&mp);
 *     if (dllm_model_load("models/tiny-llada-code", &mp, &model) != DLLM_OK) {
 *         fprintf(stderr, "%s\n", dllm_last_error());
 *         return 1;
 *     }
 *     int32_t canvas[64];
 *     size_t n = 0;
 *     dllm_tokenize(model, "def f(x):", 9, canvas, 32, &n);     // prompt
 *     for (size_t i = n; i < n + 32; i++) canvas[i] = dllm_model_mask_token(model);
 *     dllm_sampling_params sp;
 *     dllm_sampling_params_default(&sp);
 *     sp.steps = 32;
 *     dllm_session *s = NULL;
 *     dllm_session_new(model, canvas, n + 32, &sp, &s);
 *     dllm_step_info info = {0};
 *     while (!info.done) dllm_session_step(s, &info);            // one refinement per call
 *     dllm_session_canvas(s, canvas, 64, &n);                    // the filled canvas
 *     dllm_session_free(s);
 *     dllm_model_free(model);
 *
 * Conventions:
 *  - Every fallible function returns a dllm_status; DLLM_OK is 0. On failure nothing has been
 *    written to the out-parameters (except the needed size, see "Buffers"), the objects involved
 *    are unchanged, and dllm_last_error() describes the failure.
 *  - Buffers: a function that fills a caller's buffer takes its capacity `cap` (in elements) and
 *    writes the number of elements the full result needs to its `n_*` out-parameter, on success
 *    and on DLLM_ERR_BUFFER_TOO_SMALL alike. Call it with cap = 0 (the buffer may then be NULL)
 *    to learn the size. Nothing is written past `cap`.
 *  - Token ids are int32_t; valid ids are 0 <= id < dllm_model_vocab_size(model). Token ids and
 *    lengths are checked on every call: a bad one is DLLM_ERR_INVALID_ARGUMENT, never a crash.
 *  - Parameter structs start with `struct_size`, which the *_default() functions set to
 *    sizeof(struct). New fields are only ever appended, so a program compiled against an older
 *    header keeps working: struct_size must be the size of one version of the struct (listed
 *    with each struct) or larger than the newest; the fields a caller's version lacks take
 *    their defaults, fields this library does not know (a newer header) are ignored. Any other
 *    size (smaller than the first version, or between two versions) is rejected with
 *    DLLM_ERR_INVALID_ARGUMENT. Always start from the *_default() function.
 *  - Threads: a dllm_model may be used by any number of threads at once (sessions on different
 *    threads may share one model). A dllm_session must be used by one thread at a time (it may
 *    move between threads). dllm_last_error() is per thread.
 *  - Numbering: status codes and enum values are never renumbered; retired values stay reserved.
 *    New behaviour gets a new function name rather than a changed meaning.
 *  - Versions: DLLM_ABI_VERSION counts the additions to this header (appended struct fields,
 *    new functions, new enum values, a reserved value made to work); it never marks an
 *    incompatible change, because there are none: existing functions, field offsets, codes and
 *    values keep their meaning. So a library of version L runs every program built against a
 *    header of version H <= L unchanged, with one exception that predates version 7: a
 *    program built against version 1 must not call dllm_sampling_params_default, nor one
 *    built against versions 1-3 dllm_model_params_default (the library's functions write the
 *    larger structs of version 6; since version 7 the _default names are macros over the
 *    _init functions, which write only the caller's sizeof). A program built against version H that runs on an
 *    older library (L < H) gets its new struct fields silently ignored (they lie beyond what
 *    that library knows): check dllm_abi_version() >= DLLM_ABI_VERSION at start-up.
 *      1: the first version.
 *      2: dllm_sampling_params gained threshold, factor, top_k, top_p, cfg_scale, stop_at_eos,
 *         cache and revise; DLLM_REMASK_MARGIN and DLLM_REMASK_ENTROPY work (version 1
 *         answered DLLM_ERR_UNSUPPORTED); dllm_session_last_commits; dllm_step_info.committed
 *         counts the positions a stop_at_eos stop fills too.
 *      3: dllm_sessions_step and dllm_sessions_run (several sessions of one model stepped
 *         together, with batched forwards).
 *      4: dllm_model_params gained cpu_bf16 (bf16 activations on the CPU backend).
 *      5: dllm_tokenize_literal (special-token text kept as text).
 *      6: dllm_session_last_remasks (the positions a step re-masked, revise > 0);
 *         dllm_session_constrain (the tokens a position may be generated as).
 *      7: dllm_sampling_params gained credit_alpha, credit_gamma and credit_decay (trace
 *         credit) and hierarchy_low (dInfer's hierarchical commit rule; it takes the 4 bytes
 *         that were tail padding, so the struct stays 80 bytes); dllm_sampling_params_init and dllm_model_params_init, which the _default
 *         names are now macros over (older programs keep calling the functions, which write
 *         the structs of version 6: 64 and 20 bytes).
 *      8: dllm_model_architecture ("llada", "dream" or "llada-moe": which prompt format the
 *         model expects); dllm_sampling_params gained vicinity (dInfer's vicinity cache
 *         update; the struct grows from 80 to 88 bytes).
 */
#ifndef DLLM_H
#define DLLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version this header describes (see "Versions" above): a program built with this
 * header needs dllm_abi_version() >= DLLM_ABI_VERSION. */
#define DLLM_ABI_VERSION 8

/* ---------------------------------------------------------------------------------------------
 * Status codes
 * ------------------------------------------------------------------------------------------- */

/* The result of every fallible call. New codes may be added; existing ones never change. */
typedef int32_t dllm_status;

enum dllm_status_code {
    DLLM_OK = 0,                  /* success */
    DLLM_ERR_INVALID_ARGUMENT = 1,/* NULL pointer, bad length, bad token id, bad parameter value */
    DLLM_ERR_IO = 2,              /* a file could not be read (missing, permissions) */
    DLLM_ERR_FORMAT = 3,          /* a file is malformed (config.json, safetensors, tokenizer.json) */
    DLLM_ERR_UNSUPPORTED = 4,     /* valid but not supported by this build (architecture, option) */
    DLLM_ERR_OUT_OF_MEMORY = 5,   /* the model, a batch or its K/V cache does not fit in the free
                                     device memory, or a batch's activations or K/V cache in
                                     the host's
                                     (checked before allocating; dllm_last_error() says what
                                     needed how much and what was free) */
    DLLM_ERR_BACKEND = 6,         /* the compute backend failed (CUDA unavailable or failing) */
    DLLM_ERR_BUFFER_TOO_SMALL = 7,/* the caller's buffer is too small; the needed size was written */
    DLLM_ERR_STATE = 8,           /* the call is not allowed in the object's current state */
    DLLM_ERR_INTERNAL = 9         /* a bug in dllm (the message says where); please report it */
};

/* ---------------------------------------------------------------------------------------------
 * Version and errors
 * ------------------------------------------------------------------------------------------- */

/* The ABI version of the library that is linked: equal to DLLM_ABI_VERSION of the header it was
 * built with. It serves programs built against any header version up to its own. */
uint32_t dllm_abi_version(void);

/* A short static English description of a status code ("invalid argument"), for any value
 * (unknown codes give "unknown status"). Needs no handle; the string is owned by the library and
 * valid forever. */
const char *dllm_status_string(dllm_status status);

/* A description of the last failure on the calling thread: what went wrong and which argument,
 * file, tensor or field was at fault, as "FUNCTION: DETAIL", the function that failed first
 * (e.g. "dllm_session_new: invalid argument: canvas of 2000 tokens exceeds the model's
 * max_seq_len 1024"; every invalid argument reads "invalid argument: …", a file, tensor or
 * config error starts with the file, tensor or field, a short buffer with the buffer's name).
 * Each failing call replaces it; successful calls leave it
 * as it was. Empty ("") when nothing has failed on this thread. The string is owned by the
 * library and valid until the next dllm_* call on this thread; copy it to keep it. Never NULL. */
const char *dllm_last_error(void);

/* ---------------------------------------------------------------------------------------------
 * Models
 * ------------------------------------------------------------------------------------------- */

/* An opaque loaded model: weights, configuration, tokenizer. Created by dllm_model_load,
 * destroyed by dllm_model_free. Thread-safe (see Conventions). */
typedef struct dllm_model dllm_model;

/* Values of dllm_model_params.backend. */
enum dllm_backend {
    DLLM_BACKEND_AUTO = 0, /* CUDA when a usable GPU and compiled kernels exist, else the CPU */
    DLLM_BACKEND_CPU = 1,  /* the multi-threaded CPU backend (the reference); never loads CUDA */
    DLLM_BACKEND_CUDA = 2  /* CUDA, or fail with DLLM_ERR_BACKEND */
};

/* How a model is loaded. Initialise with dllm_model_params_default, then change fields. */
typedef struct dllm_model_params {
    uint32_t struct_size; /* sizeof(dllm_model_params); set by dllm_model_params_default */
    int32_t backend;      /* a dllm_backend value. Default DLLM_BACKEND_AUTO */
    int32_t device;       /* GPU index for CUDA; must be 0 for now (ignored by the CPU). Default 0 */
    int32_t threads;      /* CPU worker threads owned by this model (joined when it is freed),
                           * at most 1024; 0 = the process-wide pool, one thread per core.
                           * Default 0 */
    /* Version 4 (the version-1 struct ends here, at 16 bytes). */
    int32_t cpu_bf16;     /* On the CPU backend, round activations to bf16 for the AVX-512 BF16
                           * dot product (faster products, the CUDA backend's precision): 1 = on
                           * where the CPU has AVX-512 BF16 (f32 elsewhere), 0 = off (f32, the
                           * reference), -1 = as the environment variable DLLM_CPU_BF16 says
                           * (on when it is 1). Ignored by CUDA. Default -1 */
} dllm_model_params;

/* Fills the caller's struct of `size` bytes (its sizeof) with the defaults listed above of the
 * fields that fit, and struct_size = size; writes nothing past `size` bytes, nor when p is NULL
 * or size < 4 (ABI version 7). Bindings from other languages (ctypes, cgo, bindgen: they cannot
 * expand the macros below) and calls through a function pointer should call the _init
 * functions with their struct's size: the functions named _default write the version-6 structs
 * (struct_size 64 and 20), so fields of later versions set afterwards would be ignored. Define
 * DLLM_NO_DEFAULT_MACROS before including this header to keep the _default names plain
 * functions (for example to name them in a C++ namespace). */
void dllm_model_params_init(dllm_model_params *p, size_t size);

/* Fills *p with the defaults listed above, struct_size included. NULL is a no-op. A macro over
 * dllm_model_params_init with this header's sizeof: the library's function of this name, which
 * programs built with older headers call, writes the 20-byte version-4 struct only. (A program
 * built against ABI versions 1-3, 16 bytes, must not call it on a library of ABI >= 4.) */
void dllm_model_params_default(dllm_model_params *p);
#ifndef DLLM_NO_DEFAULT_MACROS
#define dllm_model_params_default(p) dllm_model_params_init((p), sizeof(dllm_model_params))
#endif

/* Loads the model in directory `dir` (config.json, tokenizer.json, model.safetensors or sharded
 * model-*.safetensors with model.safetensors.index.json; a NUL-terminated path, taken as raw
 * bytes). `p` may be NULL for the defaults.
 * On success *out receives a new model, which the caller owns and releases with dllm_model_free.
 * Weights are memory-mapped: the files must stay in place while the model lives.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL dir/out, struct_size too small, a backend, device,
 * threads or cpu_bf16 value out of range), DLLM_ERR_IO (a file missing or unreadable: the message names it),
 * DLLM_ERR_FORMAT, DLLM_ERR_UNSUPPORTED (architecture, dtype, device > 0), DLLM_ERR_BACKEND
 * (DLLM_BACKEND_CUDA without a usable GPU), DLLM_ERR_OUT_OF_MEMORY (DLLM_BACKEND_CUDA and the
 * weights do not fit in the device's free memory; DLLM_BACKEND_AUTO then loads on the CPU). */
dllm_status dllm_model_load(const char *dir, const dllm_model_params *p, dllm_model **out);

/* Releases the caller's reference to a model. Sessions created from it hold their own reference,
 * so freeing a model while sessions exist is safe: the memory goes when the last session is
 * freed. NULL is a no-op. */
void dllm_model_free(dllm_model *m);

/* The model's mask token id (canvas positions holding it are generated). -1 if m is NULL. */
int32_t dllm_model_mask_token(const dllm_model *m);

/* The model's end-of-text token id. -1 if m is NULL. */
int32_t dllm_model_eos_token(const dllm_model *m);

/* The number of real tokens: ids 0 .. vocab_size-1 are valid. -1 if m is NULL. */
int32_t dllm_model_vocab_size(const dllm_model *m);

/* The longest canvas the model accepts, in tokens. -1 if m is NULL. */
int32_t dllm_model_max_length(const dllm_model *m);

/* The backend the model runs on: "cpu" or "cuda" (with DLLM_BACKEND_AUTO, the one chosen).
 * Static string; NULL if m is NULL. */
const char *dllm_model_backend(const dllm_model *m);

/* The model's architecture: "llada", "dream" or "llada-moe" (config.json's model_type; it
 * decides the prompt and chat format the model expects). Static string; NULL if m is NULL. */
const char *dllm_model_architecture(const dllm_model *m);

/* ---------------------------------------------------------------------------------------------
 * Tokenizer
 * ------------------------------------------------------------------------------------------- */

/* Converts `text_len` bytes of UTF-8 `text` (no NUL needed; NULL allowed when text_len is 0) to
 * token ids, adding no special tokens. Text spelling a special token ("<|mask|>",
 * "<|endoftext|>", a chat template's headers) becomes that token, as Hugging Face tokenizers do:
 * use it for prompts built from a chat template. Writes up to `cap` ids to `tokens` and the
 * number of ids of the full result to *n_tokens (see "Buffers").
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL m/n_tokens, NULL text or tokens with a non-zero
 * length, text not UTF-8), DLLM_ERR_BUFFER_TOO_SMALL, DLLM_ERR_FORMAT (tokenizer failure). */
dllm_status dllm_tokenize(const dllm_model *m, const char *text, size_t text_len,
                          int32_t *tokens, size_t cap, size_t *n_tokens);

/* As dllm_tokenize, but text spelling a special token stays plain text (its characters'
 * ordinary tokens), so no special token comes out: for text from users or files (a player's
 * message, code being edited) that must not end a turn, open a gap or inject a template
 * header. dllm_detokenize of the result gives the text back. Errors as dllm_tokenize.
 * Since ABI version 5. */
dllm_status dllm_tokenize_literal(const dllm_model *m, const char *text, size_t text_len,
                                  int32_t *tokens, size_t cap, size_t *n_tokens);

/* Converts `n` token ids to UTF-8 text. Special tokens (mask, end-of-text) are rendered as their
 * text, e.g. "<|mask|>", so a half-denoised canvas can be shown; cut at the end-of-text token
 * first if it should not appear. An id of the model that its tokenizer has no token for (models
 * pad their vocabulary beyond the tokenizer's last id) gives no text, as in Hugging Face
 * tokenizers, so every canvas a session produces converts. Writes the length of the text in bytes, without a terminating
 * NUL, to *n_bytes; succeeds when *n_bytes <= cap and then also writes a NUL after the text if
 * *n_bytes < cap. So allocate *n_bytes + 1 bytes for a C string.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL m/n_bytes, NULL tokens with n > 0, NULL buf with
 * cap > 0, an id outside 0 .. dllm_model_vocab_size - 1: the message names its index and value),
 * DLLM_ERR_BUFFER_TOO_SMALL, DLLM_ERR_FORMAT. */
dllm_status dllm_detokenize(const dllm_model *m, const int32_t *tokens, size_t n,
                            char *buf, size_t cap, size_t *n_bytes);

/* ---------------------------------------------------------------------------------------------
 * Sessions: one canvas being denoised
 *
 * The schedule follows LLaDA's reference generate(): the positions that hold the mask token when
 * the session is created are grouped, in position order, into blocks of `block_len` (the last one
 * may be shorter); blocks are denoised one after the other, `steps / number_of_blocks` steps each
 * (`steps` must be a multiple of the number of blocks; the error message lists valid values). A
 * block holding k masks when its first step starts commits k / s tokens per step, plus one on
 * its first k % s steps. Each step runs one forward pass over the whole canvas; every masked
 * position of the current block predicts a token (argmax, or Gumbel-max sampling when
 * temperature > 0; the mask token is never predicted), and the most confident predictions are
 * committed. Positions that were not masks at creation never change unless the caller locks
 * or remasks them.
 *
 * Decoding strategies beyond that loop (the version-2 fields of dllm_sampling_params, all off
 * by default): the Fast-dLLM parallel commit rules `threshold` and `factor` (a step commits
 * every prediction the rule accepts, and at least enough to finish the block within its
 * remaining steps; a block ends as soon as it
 * has no masks left, so `steps` becomes an upper bound and the later steps of a finished block
 * are skipped: dllm_step_info.step jumps ahead), top-k / top-p sampling, classifier-free
 * guidance and stopping at the end-of-text token; and (version 3 of the struct) trace credit,
 * which lets a dynamic rule commit steadily predicted tokens sooner, and dInfer's hierarchical
 * rule, which commits at most one position per run of adjacent masks unless one is very sure.
 * ------------------------------------------------------------------------------------------- */

/* An opaque denoising session. Created by dllm_session_new, destroyed by dllm_session_free.
 * Use from one thread at a time. */
typedef struct dllm_session dllm_session;

/* Values of dllm_sampling_params.remasking: how confidence is scored when choosing which
 * predictions to commit. */
enum dllm_remasking {
    DLLM_REMASK_LOW_CONFIDENCE = 0, /* the softmax probability of the predicted token */
    DLLM_REMASK_RANDOM = 1,         /* a seeded uniform random number per position and step */
    DLLM_REMASK_MARGIN = 2,         /* top-1 minus top-2 probability of the row (Dream topk_margin) */
    DLLM_REMASK_ENTROPY = 3         /* sum p ln p over the row (Dream entropy): <= 0, higher = surer */
};

/* Values of dllm_sampling_params.cache: reuse of attention keys/values across steps. */
enum dllm_cache {
    DLLM_CACHE_NONE = 0,   /* a full forward pass every step (exact) */
    DLLM_CACHE_PREFIX = 1, /* Fast-dLLM prefix cache: the first step of each block is a full
                            * forward that stores every layer's K/V; later steps compute only the
                            * positions from the block start to the end (an approximation) */
    DLLM_CACHE_DUAL = 2    /* Fast-dLLM dual cache: later steps compute only the block's positions
                            * against the cached prefix and suffix (faster, approximate) */
};
/* On the CUDA backend each session's cache keeps its own device K/V (a slot; a guided session
 * uses two), up to 4 per model: sessions that alternate their steps (dllm_session_step on each in
 * turn, or dllm_sessions_step) keep their caches. With more alternating caches than that, the
 * least recently used slot is reassigned, and its session's next step runs as a refresh (a full
 * forward: slower, and the exact logits instead of the cached approximation). */

/* How a canvas is denoised. Initialise with dllm_sampling_params_default, then change fields.
 * Versions (struct_size on 64-bit Linux): 1 = up to `seed` (32 bytes), 2 = up to `revise`
 * (64 bytes), 3 = up to `hierarchy_low` (80 bytes), 4 = up to `vicinity` (88 bytes, 4 of them
 * tail padding). A caller of an older version gets the defaults for every field its version
 * lacks. */
typedef struct dllm_sampling_params {
    uint32_t struct_size; /* sizeof(dllm_sampling_params); set by dllm_sampling_params_default */
    int32_t steps;        /* total refinement steps, 1 .. 1048576, a multiple of the block count;
                           * with threshold, factor or hierarchy_low an upper bound. Default
                           * 128 */
    int32_t block_len;    /* masked positions per block, >= 1. Default 32 */
    float temperature;    /* 0 = greedy (argmax); > 0 = Gumbel-max sampling. Default 0 */
    int32_t remasking;    /* a dllm_remasking value. Default DLLM_REMASK_LOW_CONFIDENCE */
    /* (4 bytes of padding here: seed is 8-byte aligned) */
    uint64_t seed;        /* keys every random draw: same seed, same result. Default 0 */
    /* ---- version 2 (offset 32) ---- */
    float threshold;      /* 0 = off. > 0: Fast-dLLM threshold rule, commit every masked position
                           * of the block whose confidence (per `remasking`) is >= threshold, and
                           * at least enough to finish the block in its remaining steps (at least
                           * one). Confidences of LOW_CONFIDENCE, RANDOM and MARGIN lie in [0, 1];
                           * ENTROPY's are <= 0, so any threshold > 0 then commits just that
                           * least count. Finite, >= 0. Default 0 */
    float factor;         /* 0 = off. > 0: Fast-dLLM factor rule, commit the n most confident
                           * with c_i >= 1 - factor / (i + 1), i = 1..n. Finite, >= 0; not
                           * together with threshold. Default 0 */
    int32_t top_k;        /* sample among the top_k most likely tokens only; 0 = off, >= 0.
                           * No effect at temperature 0. Default 0 */
    float top_p;          /* sample among the most likely tokens of total probability >= top_p
                           * (applied before top_k); in (0, 1], 1 = off. No effect at
                           * temperature 0. Default 1 */
    float cfg_scale;      /* classifier-free guidance scale s: logits = u + (s + 1)(c - u), u from
                           * the canvas with every position that was not a mask at creation
                           * masked; two forward passes per step. 0 = off, finite, >= 0. Default 0 */
    int32_t stop_at_eos;  /* 1: once an end-of-text token is committed with every position of its
                           * gap (a run of consecutive masks of the initial canvas) before it
                           * filled, fill the rest of that gap with end-of-text; finish when no
                           * mask is left. 0 or 1. Default 0 */
    int32_t cache;        /* a dllm_cache value. Default DLLM_CACHE_NONE */
    float revise;         /* self-correction threshold R: after each step, tokens committed
                           * earlier in the current block whose probability fell below R are
                           * re-masked (each position at most twice; never prompt, fixed or
                           * locked positions; steps stays the bound). 0 = off, else 0 < R < 1;
                           * needs cache DLLM_CACHE_NONE. Default 0 */
    /* ---- version 3 (offset 64; ABI version 7) ---- */
    float credit_alpha;   /* trace credit (CreditDecoding, as dInfer): at every step with a
                           * forward pass, each masked position of the block adds p^credit_gamma
                           * to the credit C of its most likely token (p its probability), after
                           * multiplying all of its credit by credit_decay; its prediction and
                           * confidence then come from logits + credit_alpha * ln(1 + C). Tokens
                           * a position keeps predicting pass threshold / factor / hierarchy_low
                           * sooner: fewer steps. Credit starts empty at each block; every step
                           * reads its block's logits on the host. 0 = off, else finite, > 0
                           * (dInfer: 0.7). Default 0 */
    float credit_gamma;   /* exponent on p, finite, >= 0; used when credit_alpha > 0. Default 0.2 */
    float credit_decay;   /* factor on the credit before each step's deposit, in [0, 1]; used when
                           * credit_alpha > 0. Default 0.8 */
    float hierarchy_low;  /* 0 = off. > 0: dInfer's hierarchical rule, a commit rule instead of
                           * factor: each run of adjacent masked positions of the block commits
                           * its most confident position when its confidence is > hierarchy_low,
                           * every position with confidence > threshold commits too (when
                           * threshold > 0), and at least enough to finish the block in its
                           * remaining steps (at least one). Both comparisons are strict (">",
                           * where the threshold rule alone takes ">="). With ENTROPY remasking
                           * (confidences <= 0) only that least count commits. Finite, >= 0;
                           * not together with factor. Default 0 */
    /* ---- version 4 (offset 80; ABI version 8) ---- */
    int32_t vicinity;     /* dInfer's vicinity cache update: with cache PREFIX or DUAL, each
                           * cached step also recomputes the `vicinity` positions before its
                           * block (and, with DUAL, the `vicinity` after it), refreshing their
                           * K/V every step: closer to the uncached result for a few more rows
                           * per step. 0 = off, >= 0; > 0 needs a cache. Default 0 */
    /* (4 bytes of tail padding: the struct is 8-byte aligned) */
    /* Fields added in later versions go here. */
} dllm_sampling_params;

/* What one dllm_session_step did. */
typedef struct dllm_step_info {
    int32_t step;       /* index of the step taken (0-based); on a finished session, the step count */
    int32_t committed;  /* positions this step filled (0 on a step with nothing to commit): the
                         * committed predictions plus, with stop_at_eos, the positions it filled
                         * with end-of-text (dllm_session_last_commits lists them) */
    int32_t masks_left; /* positions of the canvas still holding the mask token */
    int32_t done;       /* 1 when every scheduled step has been taken, else 0 */
} dllm_step_info;

/* Fills the caller's struct of `size` bytes (its sizeof) with the defaults listed above of the
 * fields that fit, and struct_size = size; writes nothing past `size` bytes, nor when p is NULL
 * or size < 4 (ABI version 7). */
void dllm_sampling_params_init(dllm_sampling_params *p, size_t size);

/* Fills *p with the defaults listed above, struct_size included. NULL is a no-op. A macro over
 * dllm_sampling_params_init with this header's sizeof: a program built with an older header
 * has a smaller struct, and the library's function of this name, which such a program calls,
 * writes the 64-byte version-2 struct only. (A version-1 program, 32 bytes, must not call it
 * on a library of ABI version >= 2.) */
void dllm_sampling_params_default(dllm_sampling_params *p);
#ifndef DLLM_NO_DEFAULT_MACROS
#define dllm_sampling_params_default(p) \
    dllm_sampling_params_init((p), sizeof(dllm_sampling_params))
#endif

/* Starts denoising a copy of `canvas` (n token ids): every position holding the model's mask
 * token is generated, every other position stays fixed. `p` may be NULL for the defaults.
 * On success *out receives a new session, owned by the caller (dllm_session_free); it holds a
 * reference to the model, which may therefore be freed first.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL m/canvas/out, n == 0, n > dllm_model_max_length, an id
 * outside 0 .. dllm_model_vocab_size - 1 (the message names its position), steps/block_len out
 * of range or steps not a multiple of the block count, temperature negative or not finite, a
 * bad struct_size, an unknown remasking or cache value, a version-2 or -3 field out of its range,
 * threshold and factor both > 0, factor and hierarchy_low both > 0, revise > 0 together with a
 * cache, credit_alpha > 0 with credit_gamma or credit_decay out of range: the message names
 * the field). */
dllm_status dllm_session_new(dllm_model *m, const int32_t *canvas, size_t n,
                             const dllm_sampling_params *p, dllm_session **out);

/* Takes one refinement step: one forward pass (two with cfg_scale > 0), then commits this
 * step's share of the current block, or what the threshold / factor / hierarchy rule accepts
 * (a step with nothing to commit runs no forward pass). Writes what happened to *info unless
 * info is NULL. Stepping a finished session returns DLLM_OK with done = 1 and changes
 * nothing. On failure the session is unchanged.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL s), DLLM_ERR_BACKEND, DLLM_ERR_OUT_OF_MEMORY (the
 * canvas's buffers or K/V cache do not fit in the free memory). */
dllm_status dllm_session_step(dllm_session *s, dllm_step_info *info);

/* Steps until the session is done. Errors: as dllm_session_step; the steps taken before a
 * failure remain. */
dllm_status dllm_session_run(dllm_session *s);

/* Copies the canvas as it stands (n ids, the length given to dllm_session_new) to `tokens`; see
 * "Buffers". Unfilled positions hold the mask token.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL s/n, NULL tokens with cap > 0),
 * DLLM_ERR_BUFFER_TOO_SMALL. */
dllm_status dllm_session_canvas(const dllm_session *s, int32_t *tokens, size_t cap, size_t *n);

/* The positions the most recent step filled (dllm_session_step, or the last step taken by
 * dllm_session_run), in increasing order, and the tokens it wrote there: every position whose
 * content the step changed to a token (the positions that held the mask token before it and do
 * not after it; and, in a step where self-correction re-masks a token that a stop_at_eos stop
 * then fills with end-of-text, that position too). With revise > 0 a step may
 * also turn committed tokens back into masks: dllm_session_last_remasks lists those, and the
 * two lists together are every position the step changed, so a UI can redraw only those.
 * Writes up to `cap` entries to each of `positions` and `tokens` (entry i of one
 * matches entry i of the other) and the number of entries to *n (see "Buffers"; the count
 * equals that step's dllm_step_info.committed). Empty before the first step and after a step
 * that filled nothing (such as a step of a finished session); a failed step leaves it as it
 * was; lock and remask do not change it.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL s/n, NULL positions or tokens with cap > 0),
 * DLLM_ERR_BUFFER_TOO_SMALL. */
dllm_status dllm_session_last_commits(const dllm_session *s, size_t *positions, int32_t *tokens,
                                      size_t cap, size_t *n);

/* The positions the most recent step turned back into masks (self-correction, revise > 0), in
 * increasing order: exactly the positions that held a token before that step and hold the
 * mask token after it. They are disjoint from dllm_session_last_commits's, and are filled again
 * by later steps of their block. Writes up to `cap` entries to `positions` and the number of
 * entries to *n (see "Buffers"). Empty whenever revise is 0, before the first step and after
 * a step that re-masked nothing; recorded, kept and cleared with dllm_session_last_commits.
 * Since ABI version 6.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL s/n, NULL positions with cap > 0),
 * DLLM_ERR_BUFFER_TOO_SMALL. */
dllm_status dllm_session_last_remasks(const dllm_session *s, size_t *positions, size_t cap,
                                      size_t *n);

/* Fixes position `pos` to `token`, now and for the rest of the session: the denoiser never
 * changes it again (unless it is remasked). Any position may be locked. A masked one leaves the
 * schedule of its block: if the block has not started, its per-step counts are computed without
 * it; if it has, its remaining steps commit at most its remaining masks, so it may run out
 * early and its last steps commit nothing. A prompt or already generated position is
 * overwritten. Allowed on a finished session. The number of steps does not change.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL s, pos >= canvas length, token negative, >= vocab size
 * or the mask token: use dllm_session_remask to mask a position). */
dllm_status dllm_session_lock(dllm_session *s, size_t pos, int32_t token);

/* Restricts the tokens position `pos` may be generated as to the `n` ids of `allowed` (any
 * order, repeats allowed), replacing an earlier constraint of `pos`; n == 0 lifts it. From the
 * next step on, the position's prediction comes from the model's distribution over the allowed
 * ids alone (every other logit is treated as -inf before argmax, sampling, top-k/top-p, the
 * confidence and revise's probability), so a position allowed a single id has confidence 1
 * (with remasking LOW_CONFIDENCE, MARGIN or ENTROPY: it is among the next step's commits of its
 * block) and is never revised. A position that holds a token keeps it; the constraint applies
 * whenever it is generated (also after dllm_session_remask or a self-correction). With
 * stop_at_eos, an end-of-text stop does not fill a position whose allowed ids exclude
 * end-of-text: it is generated. A step that predicts a constrained position computes its
 * logits on the host (as with top_k; a K/V cache still serves the forward) and, in
 * dllm_sessions_step, runs alone; the session's other steps are as without constraints.
 * Since ABI version 6.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL s, NULL allowed with n > 0, pos >= canvas length, an
 * id outside 0 .. dllm_model_vocab_size - 1 or the mask token: the message names it); on error
 * nothing changes. */
dllm_status dllm_session_constrain(dllm_session *s, size_t pos, const int32_t *allowed, size_t n);

/* Sends positions begin .. end-1 back to the model: every one not already holding the mask token
 * becomes a mask again (prompt positions included), and these positions form one new block,
 * scheduled after all existing blocks, with as many steps as every other block (steps / blocks
 * of the original schedule, or `steps` if the canvas had no mask at creation); the total step
 * count grows by that much. They are filled only in that new block, never by the block that
 * is running now. Positions of the range that already hold the mask keep their place in the
 * schedule. A finished session becomes unfinished and can be stepped again. If no position
 * changes (begin == end, or all are masks), nothing happens.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL s, begin > end, end > canvas length). */
dllm_status dllm_session_remask(dllm_session *s, size_t begin, size_t end);

/* The total number of steps the session's schedule holds now (remasking adds steps); -1 if s is
 * NULL. */
int32_t dllm_session_total_steps(const dllm_session *s);

/* Destroys a session and releases its reference to the model. NULL is a no-op. */
void dllm_session_free(dllm_session *s);

/* ---------------------------------------------------------------------------------------------
 * Batches: several sessions of one model together (ABI version 3)
 * ------------------------------------------------------------------------------------------- */

/* Takes one step of each of the `n` sessions in `sessions` together, on the calling thread:
 * the steps of the sessions that can share a forward pass (no cfg_scale, top_k, top_p,
 * revise, no step predicting a constrained position, and no cache on the CUDA backend unless
 * DLLM_PACKED_SESSIONS=1) run as ONE batched
 * forward over all their canvases, which may differ in length (the CUDA backend pads them and
 * masks the padding, the CPU backend stacks them; cached sessions' span steps are stacked into
 * one forward too, each attending to its own cache: on the CPU always, on CUDA with
 * DLLM_PACKED_SESSIONS=1, opt-in until verified on a GPU), so the weights are read once for the
 * whole batch; the other sessions step on their own. Each session takes
 * exactly the step dllm_session_step would take (the same canvas afterwards, the same
 * dllm_session_last_commits), and infos[i] receives what session i's step did, as
 * dllm_session_step reports it (a finished session: done = 1, nothing changes). `infos` may be
 * NULL, else it holds n entries. n == 0 does nothing.
 * All sessions must come from the same dllm_model handle, and each may appear only once; they
 * are all used by the calling thread for the duration of the call.
 * Errors: DLLM_ERR_INVALID_ARGUMENT (NULL sessions with n > 0, a NULL entry, a session listed
 * twice, sessions of different models: the message names the entries; nothing runs),
 * DLLM_ERR_BACKEND or DLLM_ERR_OUT_OF_MEMORY (the batch's buffers do not fit in the free
 * memory; infos is then not written; the sessions that stepped on their own before the failure
 * keep their step, and their dllm_session_last_commits describes it; the batched ones are
 * unchanged). */
dllm_status dllm_sessions_step(dllm_session *const *sessions, size_t n, dllm_step_info *infos);

/* Steps the `n` sessions together, as dllm_sessions_step, until every one is done: each ends as
 * dllm_session_run would leave it run alone (dllm_session_last_commits describes its last step),
 * and sessions already finished are left as they are. The sessions that step on their own
 * (guidance, top-k/top-p, self-correction, and on the CUDA backend a K/V cache unless
 * DLLM_PACKED_SESSIONS=1) run first, one after another, each to completion (so any number of
 * cached sessions fits the CUDA backend's cache slots, see dllm_cache); the others then in
 * batched rounds (cached sessions too where they pack: their span steps stacked into one
 * forward, each against its own cache; packed on CUDA, the batch keeps one cache slot per
 * cached canvas). Same requirements and errors as dllm_sessions_step; the steps taken before a
 * failure remain, and dllm_session_last_commits describes each session's last step taken. */
dllm_status dllm_sessions_run(dllm_session *const *sessions, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* DLLM_H */
