"""PyTorch eager peer for dllm's LLaDA-MoE path: a LLaDA-MoE-7B-A1B-shaped masked-diffusion LM
(hidden 2048, 16 layers of 16 heads with per-head q/k RMSNorms, 64 SwiGLU experts of 1024 per
layer, 8 per token, vocabulary 157184) with random weights, run with the same fixed schedule as
the LLaDA peer (/work/shared/bench/peer_llada_torch.py): prompt 128, 256 generated in blocks of
32, low-confidence remasking (greedy), no cache (a full forward per step) or a Fast-dLLM-style
dual cache (a full forward refreshes the K/V at each block, then only the block is recomputed).

The mixture is computed as the reference `LLaDAMoESparseMoeBlock` does in eager mode: softmax
over the router logits in fp32, the top-8 probabilities as weights (not renormalised), then a
Python loop over the experts, each running on the rows routed to it (gathered), its weighted
output added back with index_add_. The schedule commits a fixed number of tokens per step, so
the work per step does not depend on the weights: tokens/s is comparable with `dllm bench` on
`dllm synth --arch llada-moe --preset 7b` (scripts/gpu-check.sh, stage moe7b).

Usage: python3 peer_lladamoe_torch.py [tiny]   (tiny: small shapes on any device, a smoke test)
Writes JSON to $OUT/peer_moe.json (peer_moe_tiny.json) when OUT is set.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TINY = len(sys.argv) > 1 and sys.argv[1] == "tiny"
if TINY:
    SHAPE = dict(d=128, layers=2, heads=4, experts=8, per_token=2, hidden=64, vocab=512,
                 theta=50000.0, eps=1e-5, mask=511)
else:
    SHAPE = dict(d=2048, layers=16, heads=16, experts=64, per_token=8, hidden=1024,
                 vocab=157184, theta=50000.0, eps=1e-5, mask=156895)
MASK = SHAPE["mask"]


def synchronize():
    if DEV == "cuda":
        torch.cuda.synchronize()


def rms_norm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class LladaMoe:
    """Random weights of the shape above (bf16), and the forward."""

    def __init__(self, c, dtype=torch.bfloat16):
        self.c = c
        gen = torch.Generator(device=DEV).manual_seed(1)
        d, h, e, v = c["d"], c["hidden"], c["experts"], c["vocab"]
        hd = d // c["heads"]

        def rand(*shape, scale=0.02):
            return (torch.randn(*shape, device=DEV, generator=gen) * scale).to(dtype)

        def ones(n):
            return torch.ones(n, device=DEV, dtype=dtype)

        self.embed = rand(v, d)
        self.blocks = []
        for _ in range(c["layers"]):
            self.blocks.append(dict(
                wq=rand(d, d), wk=rand(d, d), wv=rand(d, d), wo=rand(d, d),
                q_norm=ones(hd), k_norm=ones(hd), attn_norm=ones(d), mlp_norm=ones(d),
                router=rand(e, d, scale=0.2),
                gate=[rand(h, d) for _ in range(e)],
                up=[rand(h, d) for _ in range(e)],
                down=[rand(d, h) for _ in range(e)],
            ))
        self.final_norm = ones(d)
        self.lm_head = rand(v, d)
        inv_freq = 1.0 / (c["theta"] ** (torch.arange(0, hd, 2, device=DEV).float() / hd))
        angles = torch.outer(torch.arange(8192, device=DEV).float(), inv_freq)
        self.cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
        self.sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)

    def parameters(self):
        n = self.embed.numel() + self.lm_head.numel() + self.final_norm.numel()
        for b in self.blocks:
            for t in b.values():
                n += sum(x.numel() for x in t) if isinstance(t, list) else t.numel()
        return n

    def rotate(self, x, pos):  # x: batch, heads, rows, head_dim (half-split RoPE)
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * self.cos[pos][None, None] + turned * self.sin[pos][None, None]

    def mixture(self, x, b):
        """x: rows, d. The reference's eager loop over the experts."""
        c = self.c
        probs = F.softmax((x @ b["router"].T).float(), dim=-1)
        weights, chosen = probs.topk(c["per_token"], dim=-1)
        out = torch.zeros_like(x)
        for e in range(c["experts"]):
            rows, slot = torch.where(chosen == e)
            if rows.numel() == 0:
                continue
            xe = x[rows]
            ye = (F.silu(xe @ b["gate"][e].T) * (xe @ b["up"][e].T)) @ b["down"][e].T
            out.index_add_(0, rows, ye * weights[rows, slot, None].to(x.dtype))
        return out

    def forward(self, ids, pos, cache=None, cache_at=None, keep_cache=False):
        """ids: batch, rows. pos: the rows' positions. cache: per layer (K, V) over the whole
        canvas, the rows' fresh K/V written at cache_at before attending to all of it."""
        c = self.c
        batch, rows = ids.shape
        heads, hd = c["heads"], c["d"] // c["heads"]
        h = self.embed[ids]
        kept = []
        for li, b in enumerate(self.blocks):
            x = rms_norm(h, b["attn_norm"], c["eps"])

            def split(w):
                return (x @ w.T).view(batch, rows, heads, hd).transpose(1, 2)

            q = rms_norm(split(b["wq"]), b["q_norm"], c["eps"])
            k = rms_norm(split(b["wk"]), b["k_norm"], c["eps"])
            v = split(b["wv"])
            q, k = self.rotate(q, pos), self.rotate(k, pos)
            if cache is not None:
                kc, vc = cache[li]
                kc[:, :, cache_at:cache_at + rows] = k
                vc[:, :, cache_at:cache_at + rows] = v
                k, v = kc, vc
            if keep_cache:
                kept.append((k.clone(), v.clone()))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=False)
            h = h + a.transpose(1, 2).reshape(batch, rows, -1) @ b["wo"].T
            x = rms_norm(h, b["mlp_norm"], c["eps"])
            h = h + self.mixture(x.reshape(batch * rows, -1), b).view(batch, rows, -1)
        return rms_norm(h, self.final_norm, c["eps"]), kept

    def logits(self, h):
        return h @ self.lm_head.T


def transfer_counts(masked, steps):
    base, extra = divmod(masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def commit(canvas, s0, s1, logits, count):
    """Low-confidence remasking, greedy: the `count` most confident masked positions."""
    block = canvas[:, s0:s1]
    x0 = logits.argmax(-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    conf = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    conf = torch.where(block == MASK, conf, torch.full_like(conf, -math.inf))
    top = conf.topk(count, dim=-1).indices
    block.scatter_(1, top, torch.gather(x0, 1, top))


@torch.no_grad()
def generate(model, prompt, gen, block, steps, mode):
    batch, plen = prompt.shape
    canvas = torch.full((batch, plen + gen), MASK, dtype=torch.long, device=DEV)
    canvas[:, :plen] = prompt
    blocks = gen // block
    per_block = steps // blocks
    everywhere = torch.arange(plen + gen, device=DEV)
    for bi in range(blocks):
        s0, s1 = plen + bi * block, plen + (bi + 1) * block
        counts = transfer_counts(block, per_block)
        cache = None
        for i in range(per_block):
            if mode == "none":
                h, _ = model.forward(canvas, everywhere)
                logits = model.logits(h)[:, s0:s1]
            elif i == 0:
                h, cache = model.forward(canvas, everywhere, keep_cache=True)
                logits = model.logits(h[:, s0:s1])
            else:
                h, _ = model.forward(canvas[:, s0:s1], everywhere[s0:s1], cache=cache, cache_at=s0)
                logits = model.logits(h)
            commit(canvas, s0, s1, logits, counts[i])
    return canvas


def main():
    res = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu",
           "model": "LLaDA-MoE-7B-A1B shape" if not TINY else "tiny LLaDA-MoE shape"}
    t0 = time.perf_counter()
    model = LladaMoe(SHAPE)
    synchronize()
    res["init_s"] = round(time.perf_counter() - t0, 1)
    res["params_B"] = round(model.parameters() / 1e9, 3)
    plen, gen, block = 128, 256, 32
    runs = [(1, 64, "dual"), (1, 256, "none"), (8, 64, "dual")]
    if TINY:
        plen, gen, block = 16, 32, 16
        runs = [(1, 8, "dual"), (1, 32, "none"), (2, 8, "dual")]
    for batch, steps, mode in runs:
        prompt = torch.randint(0, SHAPE["vocab"] - 8, (batch, plen), device=DEV)
        generate(model, prompt, block, block, max(1, steps * block // gen), mode)  # warm-up
        synchronize()
        t0 = time.perf_counter()
        canvas = generate(model, prompt, gen, block, steps, mode)
        synchronize()
        dt = time.perf_counter() - t0
        assert not (canvas == MASK).any(), "a position was left masked"
        key = f"B{batch}_P{plen}_G{gen}_blk{block}_steps{steps}_{mode}"
        res[key] = dict(s=round(dt, 3), tok_s=round(batch * gen / dt, 1),
                        step_ms=round(dt / steps * 1e3, 2))
        print(key, res[key], flush=True)
    if DEV == "cuda":
        res["max_mem_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
    print(json.dumps(res, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "peer_moe_tiny.json" if TINY else "peer_moe.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
