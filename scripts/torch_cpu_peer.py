"""A straightforward PyTorch (CPU, fp32) implementation of the LLaDA forward and the official
low-confidence generate() schedule, for the tiny model: the peer dllm's CPU backend is timed against,
and an independent check of its tokens.

Usage: python3 scripts/torch_cpu_peer.py MODEL_DIR PROMPT_IDS_CSV GEN_LEN STEPS BLOCK_LEN [THREADS]
Prints one JSON object: the final canvas, seconds, and the reference-logit check of the forward.
"""
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file


def load(dir_):
    cfg = json.load(open(os.path.join(dir_, "config.json")))
    idx = os.path.join(dir_, "model.safetensors.index.json")
    w = {}
    if os.path.exists(idx):
        for f in sorted(set(json.load(open(idx))["weight_map"].values())):
            w.update(load_file(os.path.join(dir_, f)))
    else:
        w.update(load_file(os.path.join(dir_, "model.safetensors")))
    return cfg, {k: v.float() for k, v in w.items()}


def rms(x, g, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def forward(cfg, w, ids):
    d, H = cfg["d_model"], cfg["n_heads"]
    hd = d // H
    kvh = cfg.get("n_kv_heads", H)
    S = ids.shape[0]
    p = "model.transformer."
    x = w[p + "wte.weight"][ids]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    f = torch.outer(torch.arange(S, dtype=torch.float32), inv)
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()

    def rope(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    eps = cfg["rms_norm_eps"]
    for i in range(cfg["n_layers"]):
        b = p + f"blocks.{i}."
        n = rms(x, w[b + "attn_norm.weight"], eps)
        q = (n @ w[b + "q_proj.weight"].T).view(S, H, hd).transpose(0, 1)
        k = (n @ w[b + "k_proj.weight"].T).view(S, kvh, hd).transpose(0, 1)
        v = (n @ w[b + "v_proj.weight"].T).view(S, kvh, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        if kvh != H:
            k = k.repeat_interleave(H // kvh, 0)
            v = v.repeat_interleave(H // kvh, 0)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)
        x = x + a.transpose(0, 1).reshape(S, d) @ w[b + "attn_out.weight"].T
        m = rms(x, w[b + "ff_norm.weight"], eps)
        g = torch.nn.functional.silu(m @ w[b + "ff_proj.weight"].T) * (m @ w[b + "up_proj.weight"].T)
        x = x + g @ w[b + "ff_out.weight"].T
    x = rms(x, w[p + "ln_f.weight"], eps)
    head = w[p + "wte.weight"] if cfg.get("weight_tying") else w[p + "ff_out.weight"]
    return x @ head.T


def generate(cfg, w, prompt, gen_len, steps, block_len):
    mask = cfg.get("mask_token_id", 126336)
    x = torch.tensor(prompt + [mask] * gen_len)
    nb = (gen_len + block_len - 1) // block_len
    spb = steps // nb
    for bi in range(nb):
        lo, hi = len(prompt) + bi * block_len, min(len(prompt) + (bi + 1) * block_len, x.shape[0])
        n = int((x[lo:hi] == mask).sum())
        counts = [n // spb + (1 if i < n % spb else 0) for i in range(spb)]
        for k in counts:
            if k == 0:
                continue
            raw = forward(cfg, w, x)
            cand = raw.clone()
            cand[:, mask] = -float("inf")
            cand[:, cfg["vocab_size"]:] = -float("inf")
            x0 = cand.argmax(-1)
            conf = torch.softmax(raw.double(), -1)
            c = conf.gather(-1, x0[:, None])[:, 0]
            c[:lo] = -float("inf")
            c[hi:] = -float("inf")
            c[x != mask] = -float("inf")
            # stable top-k: ties to the lower position
            order = sorted(range(x.shape[0]), key=lambda j: (-float(c[j]), j))[:k]
            for j in order:
                x[j] = x0[j]
    return x.tolist()


def main():
    dir_, ids, gen_len, steps, block_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    if len(sys.argv) > 6:
        torch.set_num_threads(int(sys.argv[6]))
    cfg, w = load(dir_)
    prompt = [int(t) for t in ids.split(",") if t]
    ref = json.load(open(os.path.join(dir_, "reference_logits.json")))
    parity = []
    with torch.no_grad():
        for case in ref["cases"]:
            lg = forward(cfg, w, torch.tensor(case["ids"]))
            parity.append({
                "argmax_equal": lg.argmax(-1).tolist() == case["logits_argmax"],
                "l2_rel": abs(float(lg.norm()) - case["logits_l2"]) / case["logits_l2"],
            })
        t0 = time.perf_counter()
        canvas = generate(cfg, w, prompt, gen_len, steps, block_len)
        secs = time.perf_counter() - t0
    print(json.dumps({"canvas": canvas, "seconds": secs, "threads": torch.get_num_threads(), "parity": parity}))


if __name__ == "__main__":
    main()
