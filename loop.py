"""
Plans and looping: every looped shape of the paper is a list of layer indices (PAPER §2.3, §2.9, §6.3-6.4).

    loop_plan(4, 3)                -> [0,1,2,3, 0,1,2,3, 0,1,2,3]          Loop(4×3)
    enc_loop_dec_plan(2, 2, 3, 1)  -> [0,1, 2,3, 2,3, 2,3, 4]              Loop(2-2×3-1)
    repeat_plan(8, 2, 2, 1)        -> [0,1,2,3, 2,3, 4,5,6,7]              inference-time looping of layers 2..3
    skip_plan / swap_plan / reverse_plan                                   layer-order interventions (§2.8 (6))

Training-time looping beyond the paper's plain weight tying (off by default): the loop count can be sampled per
step (fixed, or Huginn's Poisson-lognormal), identically on every DDP rank because the draw is seeded by the step,
and backprop can be truncated to the last `bptt_k` iterations (ANCHORS §5, §12).

Command line: `python loop.py --ckpt out/run/ckpt.pt [--plan "loop(2-2x4-2)"]` prints the plan, unique/effective
layers, parameters and FLOPs; `python loop.py --spec "loop(4x3)"` shows a spec without a checkpoint.
"""
import argparse
import math
import re

import torch


def _positive(name, v, allow_zero=False):
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        raise ValueError(f"{name}={v!r} must be an integer >= {0 if allow_zero else 1}")


def loop_plan(L, k):
    """Loop(L×k): L unique layers applied k times."""
    _positive("L", L), _positive("k", k)
    return list(range(L)) * k


def enc_loop_dec_plan(e, L, k, d):
    """Loop(e-L×k-d): e unique encoder layers, an L-layer block run k times, d unique decoder layers."""
    _positive("e", e, True), _positive("L", L), _positive("k", k), _positive("d", d, True)
    return list(range(e)) + list(range(e, e + L)) * k + list(range(e + L, e + L + d))


def repeat_plan(n_layer, start, size, repeats):
    """Inference-time looping (PAPER §2.9): layers [0, start+size), then [start, start+size) `repeats` more
    times, then the rest. repeats=0 is the unmodified model."""
    _positive("n_layer", n_layer), _positive("size", size), _positive("start", start, True)
    _positive("repeats", repeats, True)
    if start + size > n_layer:
        raise ValueError(f"repeat block [{start}, {start + size}) runs past the last layer {n_layer - 1}; "
                         f"start must be in 0..{n_layer - size} for size={size}")
    block = list(range(start, start + size))
    return list(range(start + size)) + block * repeats + list(range(start + size, n_layer))


def skip_plan(n_layer, skip):
    """Drop the layers in `skip` (an int or an iterable of ints)."""
    skip = {skip} if isinstance(skip, int) else set(skip)
    bad = [s for s in skip if not 0 <= s < n_layer]
    if bad:
        raise ValueError(f"skip names layers {bad}, valid layers are 0..{n_layer - 1}")
    plan = [i for i in range(n_layer) if i not in skip]
    if not plan:
        raise ValueError(f"skipping {sorted(skip)} leaves no layer to run")
    return plan


def swap_plan(n_layer, start, size=1):
    """Swap the adjacent sub-blocks [start, start+size) and [start+size, start+2·size) (PAPER §2.8 (6))."""
    _positive("size", size), _positive("start", start, True)
    if start + 2 * size > n_layer:
        raise ValueError(f"swap of two {size}-layer blocks at start={start} runs past layer {n_layer - 1}; "
                         f"start must be in 0..{n_layer - 2 * size}")
    p = list(range(n_layer))
    p[start:start + 2 * size] = p[start + size:start + 2 * size] + p[start:start + size]
    return p


def reverse_plan(n_layer, start, size=4):
    """Run the window [start, start+size) in reverse order (COD Fig. 6)."""
    _positive("size", size), _positive("start", start, True)
    if start + size > n_layer:
        raise ValueError(f"reverse window [{start}, {start + size}) runs past layer {n_layer - 1}; "
                         f"start must be in 0..{n_layer - size}")
    p = list(range(n_layer))
    p[start:start + size] = p[start:start + size][::-1]
    return p


# ---- plan specs: the strings configs use ----

_SPEC = re.compile(r"^\s*loop\(\s*(?:(\d+)\s*-\s*)?(\d+)\s*[x×]\s*(\d+)\s*(?:-\s*(\d+)\s*)?\)\s*$")


def parse_spec(spec):
    """'loop(4x3)' -> (0, 4, 3, 0); 'loop(2-2x4-2)' -> (2, 2, 4, 2); '' or None -> None (plain model)."""
    if spec in (None, "", "none", "default"):
        return None
    m = _SPEC.match(str(spec))
    if not m:
        raise ValueError(f"plan spec {spec!r} not understood; use 'loop(LxK)' or 'loop(E-LxK-D)', "
                         f"e.g. 'loop(4x3)' or 'loop(2-2x4-2)', or '' for the plain model")
    e, L, k, d = (int(g) if g else 0 for g in m.groups())
    if L < 1 or k < 1:
        raise ValueError(f"plan spec {spec!r}: block size and loop count must be >= 1")
    return e, L, k, d


def spec_plan(spec, k=None):
    """The plan of a spec, optionally with another loop count k."""
    e, L, k0, d = parse_spec(spec)
    return enc_loop_dec_plan(e, L, k0 if k is None else k, d)


def spec_layers(spec):
    """Unique layers a spec needs."""
    e, L, _, d = parse_spec(spec)
    return e + L + d


_REPEAT = re.compile(r"^\s*repeat\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)\s*$")


def plan_from_spec(spec, n_layer):
    """Any plan a config or command line can name, for a model with n_layer unique layers:
    '' (default range), 'loop(4x3)' / 'loop(2-2x4-2)', 'repeat(start,size,repeats)' (PAPER §2.9, §2.12), or an
    explicit comma list '0,1,2,1,2,3'."""
    from model import check_plan
    if spec in (None, "", "none", "default"):
        return list(range(n_layer))
    if isinstance(spec, (list, tuple)):
        return check_plan(spec, n_layer)
    s = str(spec).strip()
    m = _REPEAT.match(s)
    if m:
        return repeat_plan(n_layer, *map(int, m.groups()))
    if s.lower().startswith("loop"):
        need = spec_layers(s.lower())
        if need != n_layer:
            raise ValueError(f"plan spec {spec!r} needs {need} unique layers but the model has n_layer={n_layer}; "
                             f"set n_layer={need}")
        return spec_plan(s.lower())
    try:
        return check_plan([int(t) for t in s.split(",")], n_layer)
    except ValueError as e:
        raise ValueError(f"plan {spec!r} not understood ({e}); use '', 'loop(LxK)', 'loop(E-LxK-D)', "
                         f"'repeat(start,size,repeats)' or a comma list of layer indices") from None


def describe(plan):
    """A short human name for a plan: 'Loop(2-2×4-2)', 'Loop(4×3)', 'plain(8)' or the raw list."""
    n = max(plan) + 1
    if plan == list(range(n)):
        return f"plain({n})"
    for L in range(1, n + 1):
        for e in range(0, n - L + 1):
            d = n - e - L
            k, rem = divmod(len(plan) - e - d, L)
            if k >= 2 and not rem and plan == enc_loop_dec_plan(e, L, k, d):
                return f"Loop({L}×{k})" if e == d == 0 else f"Loop({e}-{L}×{k}-{d})"
    return str(plan)


# ---- training-time looping ----

def sample_loops(step, seed, mean, scheme="fixed", max_loops=None, sigma=0.5):
    """Loop count for training step `step`. 'fixed' returns `mean`. 'poisson-lognormal' (Huginn, ANCHORS §5):
    rate ~ LogNormal(log(mean) - sigma²/2, sigma), k = Poisson(rate) + 1, clipped to max_loops. The generator is
    seeded by (seed, step) only, so every DDP rank and every resumed run draws the same k."""
    if scheme == "fixed":
        return int(mean)
    if scheme != "poisson-lognormal":
        raise ValueError(f"loop sampler {scheme!r} unknown; use 'fixed' or 'poisson-lognormal'")
    g = torch.Generator().manual_seed(1_000_003 * int(seed) + int(step))
    rate = math.exp(math.log(mean) - sigma ** 2 / 2 + sigma * torch.randn((), generator=g).item())
    k = int(torch.poisson(torch.tensor([rate]), generator=g).item()) + 1
    return k if max_loops is None else min(k, int(max_loops))


def train_plan(spec, step, seed=0, sampler="fixed", mean=None, max_loops=None, bptt_k=0):
    """(plan, grad_from) for one training step of a looped spec. bptt_k > 0 truncates backprop to the last bptt_k
    iterations of the loop: the steps before run without gradient (pass grad_from to GPT.forward). Without input
    injection this also cuts the gradient to the encoder layers: use bptt_k with Loop(L×k), or accept it."""
    e, L, k0, d = parse_spec(spec)
    k = sample_loops(step, seed, k0 if mean is None else mean, sampler, max_loops)
    grad_from = e + L * (k - bptt_k) if 0 < bptt_k < k else 0
    return enc_loop_dec_plan(e, L, k, d), grad_from


def main():
    ap = argparse.ArgumentParser(description="Show a model's execution plan, unique/effective layers, parameters "
                                             "and FLOPs per token.")
    ap.add_argument("--ckpt", help="checkpoint written by train.py or grow.py")
    ap.add_argument("--plan", help="plan to show instead of the checkpoint's: a spec like 'loop(2-2x4-2)' or a "
                                   "comma list like '0,1,2,1,2,3'")
    ap.add_argument("--spec", help="show a spec without a checkpoint, e.g. 'loop(4x3)'")
    args = ap.parse_args()
    if args.ckpt is None and args.spec is None:
        ap.error("give --ckpt PATH or --spec 'loop(LxK)'")
    if args.ckpt is None:
        plan = spec_plan(args.spec)
        print(f"spec {args.spec}: plan {plan} ({describe(plan)}), {spec_layers(args.spec)} unique layers, "
              f"{len(plan)} effective")
        return
    from model import load_checkpoint
    model, ckpt = load_checkpoint(args.ckpt)
    plan = model.plan
    if args.plan:
        plan = plan_from_spec(args.plan, model.config.n_layer)
    c = model.config
    print(f"checkpoint      {args.ckpt}" + (f" (step {ckpt['step']})" if "step" in ckpt else ""))
    print(f"plan            {plan}  ({describe(plan)})")
    print(f"layers          {c.n_layer} unique, {len(plan)} effective")
    print(f"parameters      {model.num_params():,} unique, {model.num_params(plan, effective=True):,} effective")
    print(f"FLOPs/token     {model.flops_per_token(plan):,} forward, "
          f"{model.flops_per_token(plan, train=True):,} training (T={c.block_size})")
    print(f"shape           d={c.n_embd} heads={c.n_head}/{c.n_kv_head} mlp={c.mlp_hidden} "
          f"vocab={c.vocab_size} ctx={c.block_size}")


if __name__ == "__main__":
    main()
