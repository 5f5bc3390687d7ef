"""
Depth-wise signatures of iterative computation (PAPER §2.8, §6.6; the checks of §7.2 rows 4-10).

Every probe works per *plan step*, so a looped or repeated plan is probed like unrolled depth. Notation (Csordás
et al. 2025): h_i is the residual entering plan step i, a_i and m_i the attention and MLP outputs of that step,
h_{i+1} = h_i + a_i + m_i; h_S (S = len(plan)) is the final residual before the final norm. Steps are 0-indexed.

    depth_score       remove step l's contribution at tokens <= t, propagate; max L2 change of softmax at > t §2.8 (1)
    early_exit        logit lens and tuned lens: KL to final, top-5 overlap, candidate accuracy per step      §2.8 (2)
    resid_norm        mean ||h_i||                                                                            §2.8 (3)
    contributions     ||a||/||h||, ||a+m||/||h||, cos(a, h) per step and their periodicity at lag b           §2.8 (4)
    local_effects     source x target matrix of relative update changes, direct and propagated                §2.8 (5)
    interventions     skip a step, swap 1/2/4-step sub-blocks, reverse 4-step windows: accuracy and NLL       §2.8 (6)
    block_similarity  cosine between the concatenated MLP weights of b-step blocks of the plan                §2.8 (7)

Prompt sets are fixed and seeded: 5-shot primitive prompts from data.primitives.make_task (default a VA task and
copying; a prompt longer than the context keeps its end) and windows of held-out text from
data/prepared/<tokenizer>/<source>/val.bin (first half trains the tuned lens, second half is evaluated). Activation
probes run on every set; the summary table reads the first task's set. Everything runs in fp32 (no autocast): the
probes measure small differences.

    python probe.py --ckpt out/base/ckpt.pt --ckpt out/lidas/ckpt.pt --probes all --out out/probe
writes out/probe/probe.json (resumable: one unit per (checkpoint, probe), rerun skips done units unless --force),
PNG figures and summary.md (both cover every model in probe.json). Cost: forward passes only; local_effects and
interventions dominate. A 12-step d=128 byte model with --n_prompts 8 takes ~3 min on one CPU thread.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import loop
from model import KVCache, Trace, load_checkpoint

PROBES = ("depth_score", "early_exit", "resid_norm", "contributions", "local_effects", "interventions",
          "block_similarity")
BOUNDARIES = (0.25, 0.5, 0.75)  # boundaries t as fractions of the sequence ("future" setting, PAPER §2.8 (1), (5))


# ---- running a plan step by step ----

def _stack(tr):
    """The residuals of a Trace: h_0..h_{S-1} and the final h_S = h_{S-1} + a + m (Block.forward's order)."""
    return torch.stack(tr.h + [tr.h[-1] + tr.a[-1] + tr.m[-1]]).float()


@torch.no_grad()
def record(model, plan, x):
    """One traced forward -> h (S+1, B, T, d), a, m (S, B, T, d); h[S] is the final residual (before the norm)."""
    tr = Trace()
    model(x, plan=plan, trace=tr)
    return _stack(tr), torch.stack(tr.a).float(), torch.stack(tr.m).float()


def run_steps(model, plan, x, start, trace=None):
    """Run plan steps start..S-1 on the residual x (B, T, d); returns the final residual."""
    T = x.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    for step in range(start, len(plan)):
        x = model.layers[plan[step]](x, cos, sin, None, trace, step)
    return x


def logits_of(model, resid):
    """The model's head on a residual: final RMSNorm + tied unembedding (the logit lens, PAPER §6.6)."""
    return model.lm_head(model.norm(resid)).float()


def _bounds(T, boundaries):
    if T < 2:
        raise ValueError(f"sequences of {T} token(s) are too short for boundary probes; need at least 2")
    return sorted({min(T - 2, int(f * (T - 1))) for f in boundaries})


def _pbar(total, desc, progress):
    return tqdm(total=total, desc=desc, leave=False, disable=not progress)


# ---- (1) depth score ----

@torch.no_grad()
def depth_score(model, plan, x, boundaries=BOUNDARIES, batch_size=16, progress=True):
    """d_l = mean over examples and boundaries t of max_{pos > t} ||softmax(z') - softmax(z)||_2, where z' is the
    output with step l's contribution a_l + m_l removed at tokens <= t and propagated; p = d / sum(d);
    score = sum_l l * p_l with 0-indexed steps; score_over_depth = score / S (PAPER §2.8 (1), §7.2 row 4)."""
    S, T = len(plan), x.shape[1]
    ts = _bounds(T, boundaries)
    d = torch.zeros(S, dtype=torch.float64)
    chunks = x.split(batch_size)
    bar = _pbar(len(chunks) * S, "depth score", progress)
    for xb in chunks:
        h, _, _ = record(model, plan, xb)
        p0 = {t: F.softmax(logits_of(model, h[S][:, t + 1:]), -1) for t in ts}
        for l in range(S):
            for t in ts:
                hm = h[l + 1].clone()
                hm[:, :t + 1] = h[l][:, :t + 1]  # h_{l+1} - (a_l + m_l) = h_l at the removed tokens
                p1 = F.softmax(logits_of(model, run_steps(model, plan, hm, l + 1)[:, t + 1:]), -1)
                d[l] += float((p1 - p0[t]).norm(dim=-1).amax(dim=1).double().sum())
            bar.update()
    bar.close()
    d /= len(x) * len(ts)
    p = d / d.sum() if d.sum() > 0 else torch.zeros_like(d)
    score = float((torch.arange(S, dtype=torch.float64) * p).sum())
    return {"d": d.tolist(), "p": p.tolist(), "score": score, "score_over_depth": score / S, "depth": S,
            "boundaries": ts, "indexing": "0-based plan steps; score/depth divides by the number of steps S"}


# ---- (2) early exit: logit lens and tuned lens ----

class TunedLens(nn.Module):
    """One affine translator per plan step, applied residually: h -> h + A h + b, zero-initialised so that it
    starts as the logit lens (Belrose et al. 2023; PAPER §2.8 (2)). The last step keeps A = b = 0: its lens is the
    model's own output."""

    def __init__(self, n_steps, d):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(n_steps, d, d))
        self.b = nn.Parameter(torch.zeros(n_steps, d))

    def forward(self, h, step):
        return h + h @ self.A[step].T + self.b[step]


def lens_logits(model, h, step, lens=None):
    """Early-exit logits of plan step `step` from its output residual h_{step+1}; lens None = logit lens."""
    return logits_of(model, h if lens is None else lens(h, step))


def train_tuned_lens(model, plan, x, steps=300, lr=1e-3, tokens=512, batch_size=16, seed=0, progress=True):
    """Fit the translators by KL(final || lens) on the tokens of x (held-out text), all steps jointly, Adam."""
    S = len(plan)
    with torch.no_grad():
        hs = torch.cat([record(model, plan, xb)[0][1:] for xb in x.split(batch_size)], dim=1).flatten(1, 2)
    lens = TunedLens(S, hs.shape[-1]).to(hs.device)
    if S < 2 or steps == 0:
        return lens
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    req = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # gradients go to the lens only
    try:
        for _ in tqdm(range(steps), desc="tuned lens", leave=False, disable=not progress):
            idx = torch.randint(hs.shape[1], (min(tokens, hs.shape[1]),), generator=g).to(hs.device)
            target = F.log_softmax(logits_of(model, hs[S - 1, idx]), -1)
            h = hs[:S - 1, idx]  # (S-1, K, d)
            h = h + torch.einsum("skd,sed->ske", h, lens.A[:S - 1]) + lens.b[:S - 1, None]
            logp = F.log_softmax(logits_of(model, h), -1)
            loss = (target.exp() * (target - logp)).sum(-1).mean() * (S - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return lens


@torch.no_grad()
def candidate_logprobs(model, plan, enc, examples, lenses=None):
    """Full-candidate scoring: the sum of the log-probs of every candidate token (first-token scoring is useless
    with the byte tokenizer: every candidate starts with ' '). The prompt runs once into a KV cache that all
    candidates share; a prompt too long for the context keeps its end. lenses None -> (N, C) from the model's
    output; else a dict name -> lens (None = logit lens) -> {name: (S, N, C)}, read at every step through the lens."""
    dev, S, bs = model.embed_tokens.weight.device, len(plan), model.config.block_size
    C = len(examples[0]["candidates"])
    out = torch.zeros(len(examples), C) if lenses is None else {k: torch.zeros(S, len(examples), C) for k in lenses}
    for n, ex in enumerate(examples):
        cands = [enc.encode_ordinary(c) for c in ex["candidates"]]
        cmax = max(map(len, cands))
        if cmax >= bs or len(cands) != C:
            raise ValueError(f"example {n}: {len(cands)} candidates (expected {C}), longest {cmax} tokens "
                             f"(must be < block_size={bs})")
        prompt = torch.tensor([enc.encode_ordinary(ex["prompt"])[-(bs - cmax):]], device=dev)
        cont = torch.zeros(C, max(cmax - 1, 1), dtype=torch.long, device=dev)  # candidate tokens but the last
        for j, c in enumerate(cands):
            cont[j, :len(c) - 1] = torch.tensor(c[:-1])  # right padding never reaches a scored position
        first_tok = torch.tensor([c[0] for c in cands], device=dev)
        idx = [(j, i - 1, c[i]) for j, c in enumerate(cands) for i in range(1, len(c))]  # row, position, token
        rj, ri, rt = torch.tensor(idx, dtype=torch.long, device=dev).view(-1, 3).T

        def score(first, rest):  # log-probs after the prompt (V,) and after each candidate prefix (C, T, V)
            s = first[first_tok]
            return (s if rest is None else s.index_add(0, rj, rest[rj, ri, rt])).cpu()

        cache = [KVCache() for _ in plan]
        tp, tc = (None, None) if lenses is None else (Trace(), Trace())
        lp = model(prompt, plan=plan, cache=cache, trace=tp)[0][0, -1]
        for kv in cache:  # every candidate continues the same prompt
            kv.k, kv.v = kv.k.expand(C, -1, -1, -1), kv.v.expand(C, -1, -1, -1)
        lc = model(cont, plan=plan, cache=cache, trace=tc)[0] if cmax > 1 else None
        if lenses is None:
            out[n] = score(F.log_softmax(lp.float(), -1), None if lc is None else F.log_softmax(lc.float(), -1))
            continue
        hp, hc = _stack(tp)[:, 0, -1], None if lc is None else _stack(tc)
        for k, lens in lenses.items():
            for l in range(S):
                first = F.log_softmax(lens_logits(model, hp[l + 1], l, lens), -1)
                rest = None if hc is None else F.log_softmax(lens_logits(model, hc[l + 1], l, lens), -1)
                out[k][l, n] = score(first, rest)
    return out


def _accuracy(scores, examples):
    """scores (..., N, C) -> accuracy (...,): the best-scoring candidate is the answer."""
    ans = torch.tensor([ex["answer"] for ex in examples])
    return (scores.argmax(-1) == ans).float().mean(-1)


def first_reaching(rel, level=0.9):
    """First step whose relative accuracy is >= level (None if none)."""
    return next((i for i, r in enumerate(rel) if r is not None and r >= level), None)


@torch.no_grad()
def early_exit(model, plan, x, lens=None, enc=None, examples=None, batch_size=16):
    """Per step l (lens read on h_{l+1}): mean KL(final || lens) and top-5 overlap with the final top-5 over all
    tokens of x, for the logit lens and, if given, the tuned lens. With examples (and enc): candidate accuracy per
    step through each lens, relative to the model's own final accuracy (PAPER §2.8 (2), §7.2 row 6)."""
    S = len(plan)
    lenses = {"logit": None} if lens is None else {"logit": None, "tuned": lens}
    kl = {k: torch.zeros(S, dtype=torch.float64) for k in lenses}
    top = {k: torch.zeros(S, dtype=torch.float64) for k in lenses}
    for xb in x.split(batch_size):
        h = record(model, plan, xb)[0]
        lp_f = F.log_softmax(logits_of(model, h[S]), -1)
        k5 = min(5, lp_f.shape[-1])
        top_f = lp_f.topk(k5, -1).indices
        for name, ln in lenses.items():
            for l in range(S):
                lp = F.log_softmax(lens_logits(model, h[l + 1], l, ln), -1)
                kl[name][l] += float((lp_f.exp() * (lp_f - lp)).sum(-1).double().sum())
                top_l = lp.topk(k5, -1).indices
                top[name][l] += float((top_l[..., :, None] == top_f[..., None, :]).any(-1).double().mean(-1).sum())
    n = x.shape[0] * x.shape[1]
    out = {k: {"kl": (kl[k] / n).tolist(), "top5": (top[k] / n).tolist()} for k in lenses}
    if examples:
        scores = candidate_logprobs(model, plan, enc, examples, lenses)
        acc = {k: _accuracy(sc, examples).tolist() for k, sc in scores.items()}
        final = acc["logit"][-1]  # the logit lens at the last step is the model's own output
        for k, a in acc.items():
            rel = [v / final if final > 0 else None for v in a]
            first = first_reaching(rel)
            acc[k] = {"acc": a, "rel": rel, "first_90": first,
                      "first_90_frac": None if first is None else (first + 1) / S}
        out["accuracy"] = {"final": final, **acc,
                           "note": "full-candidate log-likelihood scoring; first_90_frac = (step + 1) / S"}
    return out


# ---- (3), (4) residual norms, sublayer contributions, periodicity ----

@torch.no_grad()
def resid_norm(model, plan, x, batch_size=16):
    """norm[i] = mean over tokens of ||h_i||, i = 0..S (norm[S]: final residual before the final norm)."""
    tot = 0
    for xb in x.split(batch_size):
        tot = tot + record(model, plan, xb)[0].norm(dim=-1).double().sum((1, 2)).cpu()
    return {"norm": (tot / (x.shape[0] * x.shape[1])).tolist()}


@torch.no_grad()
def contributions(model, plan, x, batch_size=16, eps=1e-12):
    """Per step, means over tokens of ||a||/||h||, ||a+m||/||h||, ||m||/||h+a|| and cos(a, h) (PAPER §2.8 (4))."""
    keys = ("attn", "layer", "mlp", "cos_attn")
    tot = {k: 0 for k in keys}
    for xb in x.split(batch_size):
        h, a, m = record(model, plan, xb)
        h = h[:-1]
        hn = h.norm(dim=-1).clamp_min(eps)
        vals = {"attn": a.norm(dim=-1) / hn, "layer": (a + m).norm(dim=-1) / hn,
                "mlp": m.norm(dim=-1) / (h + a).norm(dim=-1).clamp_min(eps),
                "cos_attn": F.cosine_similarity(a, h, dim=-1)}
        for k in keys:
            tot[k] = tot[k] + vals[k].double().sum((1, 2)).cpu()
    n = x.shape[0] * x.shape[1]
    return {k: (tot[k] / n).tolist() for k in keys}


def periodicity(series, lag, drop=0.25):
    """Periodicity of a per-step series at `lag` (PAPER §6.6): keep the middle steps [k, n-k) with k = floor(n *
    drop), subtract a least-squares line, then
      acf:         sum_i x_i x_{i+lag} / (m - lag)  divided by  sum_i x_i^2 / m   (m = middle length; ~1 when
                   the series repeats with period lag, ~0 for an unrelated lag);
      power_share: share of the detrended power at frequencies j/lag, j = 1..lag//2 (all harmonics of period lag).
    Needs at least 2 lagged pairs: lag <= m - 2, else ValueError."""
    x = np.asarray(series, dtype=np.float64)
    n = len(x)
    k = int(n * drop)
    x = x[k:n - k]
    m = len(x)
    if not isinstance(lag, (int, np.integer)) or lag < 1 or lag > m - 2:
        raise ValueError(f"periodicity lag={lag!r} does not fit the series: {n} steps, middle [{k}, {n - k}) has "
                         f"{m}, so lag must be in 1..{m - 2}; use a smaller --block or a deeper plan")
    i = np.arange(m)
    x = x - np.polyval(np.polyfit(i, x, 1), i)
    power = float((x ** 2).sum())
    if power <= 1e-300:
        return {"acf": 0.0, "power_share": 0.0, "middle": [k, n - k], "lag": int(lag)}
    acf = float((x[:-lag] * x[lag:]).sum() / (m - lag) / (power / m))
    share = 0.0
    for j in range(1, lag // 2 + 1):
        X = (x * np.exp(-2j * np.pi * j / lag * i)).sum()
        share += (1 if 2 * j == lag else 2) * abs(X) ** 2 / (m * power)
    return {"acf": acf, "power_share": float(min(1.0, share)), "middle": [k, n - k], "lag": int(lag)}


# ---- (5) local effects ----

@torch.no_grad()
def local_effects(model, plan, x, boundaries=BOUNDARIES, batch_size=16, eps=1e-6, progress=True):
    """M[s][l], s < l (None elsewhere), PAPER §2.8 (5): subtract c_s = h_{s+1} - h_s from the residual at tokens <= t,
    run step l and compare its update, ||c'_l - c_l|| / ||c_l|| per token at tokens > t, max over batch, positions
    and boundaries. direct: only step l sees the change; propagated: the change is forwarded through steps s+1.."""
    S, T = len(plan), x.shape[1]
    ts = _bounds(T, boundaries)
    direct, prop = torch.zeros(S, S), torch.zeros(S, S)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]

    def update(l, inp):
        return model.layers[plan[l]](inp, cos, sin) - inp

    chunks = x.split(batch_size)
    bar = _pbar(len(chunks) * len(ts), "local effects", progress)
    for xb in chunks:
        h = record(model, plan, xb)[0]
        c = h[1:] - h[:-1]
        B = xb.shape[0]
        for t in ts:
            keep = (torch.arange(T, device=h.device) <= t).float()[:, None]
            for l in range(1, S):
                base = update(l, h[l])
                bn = base[:, t + 1:].norm(dim=-1).clamp_min(eps)
                inp = (h[l][None] - c[:l] * keep).flatten(0, 1)  # every source s < l at once
                new = update(l, inp).view(l, B, T, -1)
                r = ((new - base)[:, :, t + 1:].norm(dim=-1) / bn).amax(dim=(1, 2)).cpu()
                direct[:l, l] = torch.maximum(direct[:l, l], r)
            for s in range(S - 1):
                tr = Trace(record=("h",))
                last = run_steps(model, plan, h[s + 1] - c[s] * keep, s + 1, tr)
                hp = tr.h + [last]  # h'_{s+1} .. h'_S
                for l in range(s + 1, S):
                    new = hp[l - s] - hp[l - s - 1]
                    bn = c[l][:, t + 1:].norm(dim=-1).clamp_min(eps)
                    r = float(((new - c[l])[:, t + 1:].norm(dim=-1) / bn).max())
                    prop[s, l] = max(float(prop[s, l]), r)
            bar.update()
    bar.close()
    mask = lambda M: [[float(M[s, l]) if s < l else None for l in range(S)] for s in range(S)]
    return {"direct": mask(direct), "propagated": mask(prop), "boundaries": ts}


# ---- (6) interventions ----

def plan_edits(plan):
    """(kind, start, plan) for every intervention of PAPER §2.8 (6), edits at plan *positions*: for a looped plan
    the edited list is the plan itself (skipping position 5 of Loop(4x3) drops one run of block 1)."""
    n = len(plan)
    on = lambda pos: [plan[i] for i in pos]
    out = [("skip", i, on(loop.skip_plan(n, i))) for i in range(n) if n > 1]
    for size in (1, 2, 4):
        out += [(f"swap{size}", s, on(loop.swap_plan(n, s, size))) for s in range(n - 2 * size + 1)]
    out += [("reverse4", s, on(loop.reverse_plan(n, s, 4))) for s in range(n - 3)]
    return out


@torch.no_grad()
def text_nll(model, plan, text, batch_size=16):
    """Mean next-token NLL over windows text (N, T+1)."""
    tot = 0.0
    for w in text.split(batch_size):
        tot += float(model(w[:, :-1], targets=w[:, 1:], plan=plan)[1]) * len(w)
    return tot / len(text)


@torch.no_grad()
def interventions(model, plan, enc, task_examples, text, batch_size=16, progress=True):
    """Accuracy on each task (relative to the unmodified plan) and NLL on text windows (difference) for every plan
    of plan_edits. late_early: mean dNLL of single skips over the last vs the first quarter of steps (q = max(1,
    S // 4) positions each), PAPER §7.2 row 5."""
    def evaluate(p):
        acc = {t: float(_accuracy(candidate_logprobs(model, p, enc, ex), ex))
               for t, ex in task_examples.items()}
        return acc, text_nll(model, p, text, batch_size)

    base_acc, base_nll = evaluate(plan)
    edits = []
    for kind, start, p in tqdm(plan_edits(plan), desc="interventions", leave=False, disable=not progress):
        acc, nll = evaluate(p)
        rel = {t: acc[t] / base_acc[t] if base_acc[t] > 0 else None for t in acc}
        vals = [v for v in rel.values() if v is not None]
        edits.append({"kind": kind, "start": start, "plan": p, "acc": acc, "rel_acc": rel,
                      "mean_rel_acc": sum(vals) / len(vals) if vals else None, "nll": nll, "dnll": nll - base_nll})
    S = len(plan)
    q = max(1, S // 4)
    skip = {e["start"]: e["dnll"] for e in edits if e["kind"] == "skip"}
    late_early = None
    if skip:
        early = sum(skip[i] for i in range(q)) / q
        late = sum(skip[i] for i in range(S - q, S)) / q
        late_early = {"q": q, "early_dnll": early, "late_dnll": late, "ratio": late / early if early > 0 else None}
    return {"base": {"acc": base_acc, "nll": base_nll}, "edits": edits, "late_early": late_early}


# ---- (7) block weight similarity ----

@torch.no_grad()
def block_similarity(model, plan, b):
    """Cosine between blocks of b consecutive plan steps, each the concatenation of its steps' MLP weights (gate, up,
    down); a trailing partial block is dropped. Tied blocks of a looped plan are identical: similarity 1 (PAPER
    §2.8 (7)). middle_mean: mean over pairs of the blocks without the first and last (all blocks if fewer than 4)."""
    n = len(plan)
    if not isinstance(b, int) or b < 1 or b > n:
        raise ValueError(f"block size b={b!r} must be in 1..{n} (the plan has {n} steps); set --block")
    # Gram matrix of the unique layers' MLP weights, then block dot products by summing along the plan
    G = 0
    for name in ("gate_proj", "up_proj", "down_proj"):
        W = torch.stack([getattr(blk.mlp, name).weight.flatten().float() for blk in model.layers])
        G = G + (W @ W.T).double().cpu()
    nb = n // b
    D = torch.zeros(nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            D[i, j] = sum(G[plan[i * b + k], plan[j * b + k]] for k in range(b))
    norm = D.diagonal().sqrt()
    M = D / (norm[:, None] * norm[None, :]).clamp_min(1e-300)
    mid = list(range(1, nb - 1)) if nb >= 4 else list(range(nb))
    pairs = [float(M[i, j]) for i in mid for j in mid if i < j]
    return {"b": b, "matrix": M.tolist(), "middle_mean": sum(pairs) / len(pairs) if pairs else None,
            "middle_blocks": mid}


# ---- prompt sets ----

def prompt_batch(enc, examples, block_size):
    """The prompts as one (N, T) batch: each keeps its last T tokens, T = min(shortest prompt, block_size)."""
    ids = [enc.encode_ordinary(ex["prompt"]) for ex in examples]
    T = min(min(len(i) for i in ids), block_size)
    return torch.tensor([i[-T:] for i in ids], dtype=torch.long)


def load_text(data_dir, tokenizer, source, split="val"):
    from data.store import open_tokens
    return open_tokens(Path(data_dir) / tokenizer / source / f"{split}.bin", tokenizer=tokenizer)


def text_windows(tokens, n, length, seed=0, part=1):
    """n non-overlapping windows of `length` tokens from one half of the tokens (part 0: first half, used to train
    the tuned lens; part 1: second half, evaluated), chosen by a seeded permutation."""
    half = len(tokens) // 2
    slots = half // length
    if n > slots:
        raise ValueError(f"{n} text windows of {length} tokens do not fit in half of the held-out text "
                         f"({half} tokens, {slots} windows): use --n_prompts <= {slots}, a shorter --seq_len or "
                         f"another --text_source")
    pick = sorted(np.random.default_rng(seed + part).permutation(slots)[:n])
    lo = part * half
    return torch.tensor(np.stack([np.asarray(tokens[lo + i * length:lo + (i + 1) * length]) for i in pick])
                        .astype(np.int64))


# ---- command line ----

def parse_probes(spec):
    names = list(PROBES) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in names if s not in PROBES]
    if bad or not names:
        raise ValueError(f"unknown probe(s) {bad or spec!r}; valid: {', '.join(PROBES)} or 'all'")
    return names


def loop_block(plan):
    """The recurrent block size of a looped plan, else None."""
    m = re.match(r"Loop\((?:\d+-)?(\d+)×", loop.describe(plan))
    return int(m.group(1)) if m else None


class Context:
    """One checkpoint under probe: model, plan, block size and its (lazily built, cached) prompt sets."""

    def __init__(self, path, args):
        self.path, self.args = path, args
        self.model, ck = load_checkpoint(path, args.device)
        self.model.eval()
        n_layer = self.model.config.n_layer
        self.plan = loop.plan_from_spec(args.plan, n_layer) if args.plan else self.model.plan
        S = len(self.plan)
        self.tokenizer = ck.get("tokenizer") or ("byte" if self.model.config.vocab_size == 257 else "gpt2")
        self.b = args.block or ck.get("grow_block") or loop_block(self.plan) or min(4, S)
        if not 1 <= int(self.b) <= S:
            raise ValueError(f"block / lag b={self.b} is larger than the depth: the plan has {S} steps; "
                             f"use --block in 1..{S}")
        self.b = int(self.b)
        p = Path(path)
        label = f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem
        self.label = label + (f" {args.plan}" if args.plan else "")
        st = os.stat(path)
        self.meta = {"label": self.label, "plan": self.plan, "depth": S, "n_layer": n_layer, "block": self.b,
                     "tokenizer": self.tokenizer, "step": None if ck.get("step") is None else int(ck["step"]),
                     "describe": loop.describe(self.plan),
                     "mtime_ns": st.st_mtime_ns, "size": st.st_size}

    @functools.cached_property
    def enc(self):
        from data.tokenizer import get_tokenizer
        return get_tokenizer(self.tokenizer)

    @functools.cached_property
    def examples(self):
        from data.primitives import make_task
        a = self.args
        return {t: make_task(t, a.n_prompts, shots=a.shots, seed=a.seed) for t in a.tasks}

    @functools.cached_property
    def seq_len(self):
        return min(self.args.seq_len, self.model.config.block_size)

    @functools.cached_property
    def tokens(self):
        return load_text(self.args.data_dir, self.tokenizer, self.args.text_source)

    @functools.cached_property
    def text_eval(self):  # (N, T+1) windows: inputs and next-token targets
        return text_windows(self.tokens, self.args.n_prompts, self.seq_len + 1, self.args.seed, 1).to(self.args.device)

    @functools.cached_property
    def sets(self):
        dev, bs = self.args.device, self.model.config.block_size
        out = {t: prompt_batch(self.enc, ex, bs).to(dev) for t, ex in self.examples.items()}
        out["text"] = self.text_eval[:, :-1]
        return out

    def lens(self):
        """The tuned lens, trained once per (checkpoint file, plan, settings) and cached under <out>/lenses/."""
        a = self.args
        key = hashlib.sha1(json.dumps([os.path.abspath(self.path), self.meta["mtime_ns"], self.meta["size"], self.plan,
                                       a.text_source, self.seq_len, a.lens_windows, a.lens_steps, a.seed]).encode())
        f = Path(a.out) / "lenses" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.label)}-{key.hexdigest()[:12]}.pt"
        lens = TunedLens(len(self.plan), self.model.config.n_embd).to(a.device)
        if f.exists():
            lens.load_state_dict(torch.load(f, map_location=a.device, weights_only=True))
            return lens
        half_slots = (len(self.tokens) // 2) // self.seq_len
        x = text_windows(self.tokens, max(1, min(a.lens_windows, half_slots)), self.seq_len, a.seed, 0).to(a.device)
        lens = train_tuned_lens(self.model, self.plan, x, steps=a.lens_steps, batch_size=a.batch_size, seed=a.seed)
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save(lens.state_dict(), f"{f}.tmp")
        os.replace(f"{f}.tmp", f)
        return lens


def run_probe(name, ctx):
    m, plan, a = ctx.model, ctx.plan, ctx.args
    bs = a.batch_size
    if name == "depth_score":
        return {s: depth_score(m, plan, x, batch_size=bs) for s, x in ctx.sets.items()}
    if name == "resid_norm":
        return {s: resid_norm(m, plan, x, bs) for s, x in ctx.sets.items()}
    if name == "contributions":
        out = {}
        for s, x in ctx.sets.items():
            c = contributions(m, plan, x, bs)
            for series in ("attn", "cos_attn"):
                try:
                    c[f"periodicity_{series}"] = periodicity(c[series], ctx.b)
                except ValueError as e:  # too shallow a plan for lag b: recorded, not fatal
                    c[f"periodicity_{series}"] = {"error": str(e)}
            out[s] = c
        return out
    if name == "local_effects":
        return {s: local_effects(m, plan, x, batch_size=bs) for s, x in ctx.sets.items()}
    if name == "early_exit":
        lens = ctx.lens()
        return {s: early_exit(m, plan, x, lens, ctx.enc, ctx.examples.get(s), bs) for s, x in ctx.sets.items()}
    if name == "interventions":
        return interventions(m, plan, ctx.enc, ctx.examples, ctx.text_eval, bs)
    if name == "block_similarity":
        return block_similarity(m, plan, ctx.b)
    raise ValueError(f"unknown probe {name!r}; valid: {', '.join(PROBES)}")


def _clean(o):
    """JSON-safe: NaN/inf -> None."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def save_json(obj, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f, indent=1)
    os.replace(tmp, path)


# ---- report: summary table and figures ----

def _get(d, *keys):
    """d[k0][k1]... or None when a level is missing."""
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _first_set(e):
    return (_get(e, "meta", "tasks") or ["text"])[0]


def summary_rows(results):
    """One row per model of the numbers §7.2 rows 4-10 compare; reads the first primitive task's prompt set."""
    rows = []
    for key, e in results["models"].items():
        task = _first_set(e)
        le = _get(e, "interventions", "late_early") or {}
        acc = _get(e, "early_exit", task, "accuracy", "tuned") or {}
        rows.append({"model": _get(e, "meta", "label") or key, "plan": _get(e, "meta", "describe"),
                     "depth": _get(e, "meta", "depth"), "b": _get(e, "meta", "block"), "set": task,
                     "depth_score": _get(e, "depth_score", task, "score"),
                     "score/depth": _get(e, "depth_score", task, "score_over_depth"),
                     "skip dNLL late/early": (le.get("late_dnll"), le.get("early_dnll")) if le else None,
                     "periodicity@b": _get(e, "contributions", task, "periodicity_attn", "acf"),
                     "middle block sim": _get(e, "block_similarity", "middle_mean"),
                     "first step >=90% (tuned)": acc.get("first_90"), "fraction of depth": acc.get("first_90_frac")})
    return rows


def summary_markdown(results):
    rows = summary_rows(results)
    if not rows:
        return "no results\n"

    def fmt(v):
        if isinstance(v, (tuple, list)):
            return " / ".join(map(fmt, v))
        return "n/a" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    cols = list(rows[0])
    lines = ["# probe summary", "",
             "depth score: 0-indexed expected step (PAPER §2.8 (1)); skip dNLL: mean over single-step skips of "
             "the last vs the first quarter of steps; periodicity: detrended autocorrelation of ||a||/||h|| at lag "
             "b on the middle steps; first step: 0-indexed, fraction = (step+1)/depth; all on the prompt set named "
             "in `set`.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def make_figures(results, out):
    """Per-step curves with every model of results overlaid, and per-model heatmaps. Returns the file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = results["models"]
    safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s)
    written = []

    def save(fig, fname):
        fig.tight_layout()
        fig.savefig(Path(out) / fname, dpi=110)
        plt.close(fig)
        written.append(fname)

    def curves(fname, panels):  # panels: (title, probe, set or None, keys...); tuned-lens panels add the logit lens
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
        drawn = False
        for ax, (title, probe, where, *keys) in zip(axes[0], panels):
            for mi, (key, e) in enumerate(models.items()):
                where_ = _first_set(e) if where is None else where
                styles = [("-", keys, "")]
                if keys[0] == "tuned" or keys[-2:] == ["tuned", "rel"]:
                    styles.append(("--", [k if k != "tuned" else "logit" for k in keys], " (logit lens)"))
                for style, ks, suffix in styles:
                    ys = _get(e, probe, where_, *ks)
                    if ys:
                        ax.plot(range(len(ys)), [np.nan if y is None else y for y in ys], style, marker=".",
                                color=f"C{mi % 10}", label=(_get(e, "meta", "label") or key) + suffix)
                        drawn = True
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("plan step")
            if title.startswith("||"):  # step 0 reads the bare embedding, so its ratio dwarfs the rest
                ax.set_yscale("log")
        if drawn:
            axes[0][0].legend(fontsize=7)
            save(fig, fname)
        plt.close(fig)

    curves("depth_profile.png", [("depth-score effect d_l", "depth_score", None, "d"),
                                 ("normalised p_l = d_l / sum d", "depth_score", None, "p")])
    curves("early_exit.png", [("KL(final || lens), text", "early_exit", "text", "tuned", "kl"),
                              ("top-5 overlap with final", "early_exit", None, "tuned", "top5"),
                              ("relative accuracy", "early_exit", None, "accuracy", "tuned", "rel")])
    curves("resid_norm.png", [("mean ||h_i|| (last point: final)", "resid_norm", None, "norm")])
    curves("contributions.png", [("||a||/||h||", "contributions", None, "attn"),
                                 ("||a+m||/||h||", "contributions", None, "layer"),
                                 ("cos(a, h)", "contributions", None, "cos_attn")])

    def heat(fname, panels):  # panels: (title, matrix, xlabel, ylabel, ytick labels or None)
        panels = [p for p in panels if p[1]]
        if not panels:
            return
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (title, M, xl, yl, yt) in zip(axes[0], panels):
            A = np.array([[np.nan if v is None else v for v in r] for r in M], dtype=float)
            fig.colorbar(ax.imshow(A, aspect="auto", cmap="viridis"), ax=ax)
            ax.set_title(title, fontsize=9), ax.set_xlabel(xl), ax.set_ylabel(yl)
            if yt:
                ax.set_yticks(range(len(yt)), yt)
        save(fig, fname)

    for key, e in models.items():
        lab = _get(e, "meta", "label") or key
        le = _get(e, "local_effects", _first_set(e)) or {}
        heat(f"local_effects_{safe(lab)}.png",
             [(f"{lab}: direct M[s, l]", le.get("direct"), "target step l", "source step s", None),
              ("propagated", le.get("propagated"), "target step l", "source step s", None)])
        iv = e.get("interventions")
        if iv and iv["edits"]:
            cell = {(x["kind"], x["start"]): x for x in iv["edits"]}
            kinds = [k for k in ("skip", "swap1", "swap2", "swap4", "reverse4") if any(c[0] == k for c in cell)]
            n = max(x["start"] for x in iv["edits"]) + 1
            grid = lambda f: [[f(cell[k, s]) if (k, s) in cell else None for s in range(n)] for k in kinds]
            heat(f"interventions_{safe(lab)}.png",
                 [(f"{lab}: mean relative accuracy", grid(lambda x: x["mean_rel_acc"]), "start position", "", kinds),
                  ("dNLL (text)", grid(lambda x: x["dnll"]), "start position", "", kinds)])
        bsim = e.get("block_similarity")
        if bsim:
            heat(f"similarity_{safe(lab)}.png",
                 [(f"{lab}: MLP weight cosine, b={bsim['b']}", bsim["matrix"], "block", "block", None)])
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description="Depth-wise probes (PAPER §2.8): depth score, logit/tuned lens, residual "
                                             "norms, sublayer contributions, local effects, layer-order interventions, "
                                             "block weight similarity. Writes probe.json, PNGs and summary.md.")
    ap.add_argument("--ckpt", action="append", required=True, help="checkpoint (repeat for several models)")
    ap.add_argument("--plan", default="", help="plan for every checkpoint instead of its own: 'loop(4x3)', "
                                               "'repeat(s,b,r)' or '0,1,2,1,2,3'")
    ap.add_argument("--probes", default="all", help=f"comma list of {', '.join(PROBES)}, or 'all'")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n_prompts", type=int, default=32, help="prompts per task and held-out text windows")
    ap.add_argument("--tasks", default="va_math_d1,copy_random", help="primitive tasks (data.primitives.TASKS)")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--block", type=int, default=None, help="block size b (default: the checkpoint's grow_block, "
                                                            "else a looped plan's recurrent block, else 4)")
    ap.add_argument("--text_source", default="sotu", help="held-out text: data/prepared/<tok>/<source>/val.bin")
    ap.add_argument("--data_dir", default="data/prepared")
    ap.add_argument("--seq_len", type=int, default=256, help="text window length (capped at block_size)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--lens_steps", type=int, default=300, help="tuned-lens training iterations")
    ap.add_argument("--lens_windows", type=int, default=64, help="text windows to train the tuned lens on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--force", action="store_true", help="recompute units already in probe.json")
    args = ap.parse_args(argv)

    probes = parse_probes(args.probes)
    from data.primitives import TASKS
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in args.tasks if t not in TASKS]
    if bad or not args.tasks:
        raise ValueError(f"unknown task(s) {bad or args.tasks}; valid: {', '.join(TASKS)}")
    for name in ("n_prompts", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be >= 1")
    if args.block is not None and args.block < 1:
        raise ValueError(f"--block={args.block} must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "probe.json"
    results = json.loads(jpath.read_text()) if jpath.exists() else {"models": {}}

    for path in args.ckpt:
        ctx = Context(path, args)
        key = path + (f" plan={args.plan}" if args.plan else "")
        entry = results["models"].setdefault(key, {})
        entry["meta"] = {**ctx.meta, "tasks": args.tasks}
        settings = {k: getattr(args, k) for k in ("n_prompts", "tasks", "shots", "text_source", "seq_len", "seed",
                                                  "lens_steps", "lens_windows")}
        settings.update(block=ctx.b, plan=ctx.plan, mtime_ns=ctx.meta["mtime_ns"])
        for name in probes:
            done = entry.get(name, {}).get("_settings") == _clean(settings)
            if done and not args.force:
                print(f"{ctx.label}: {name} done, skipping (--force to redo)")
                continue
            print(f"{ctx.label}: {name} ...")
            entry[name] = {**run_probe(name, ctx), "_settings": settings}
            save_json(results, jpath)
        save_json(results, jpath)

    figs = make_figures(results, out)
    md = summary_markdown(results)
    (out / "summary.md").write_text(md)
    print(md)
    print(f"wrote {jpath}, {out / 'summary.md'} and {len(figs)} figures in {out}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"probe.py: error: {e}")
