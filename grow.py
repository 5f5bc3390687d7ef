"""
Depth growth: MIDAS and LIDAS (PAPER §2.4, §3.2) with exact optimizer bookkeeping, and the PROP-α stage schedule.

A growth step inserts a copy of a b-layer window right after the window itself. In plan terms that is
`repeat_plan(L, start, b, 1)`: the old model run with plan=order computes exactly what the grown model computes with
its default plan, so growing *materializes* a loop (DESIGN.md). The two operators differ only in `start`:

    midas_order(8, 4) -> [0,1,2,3, 0,1,2,3, 4,5,6,7]    copy of block m_b = ceil(n/2)-1 (just below mid-depth)
    lidas_order(8, 4) -> [0,1,2,3,4,5, 2,3,4,5, 6,7]    copy of the window centred on layer ceil(L/2)

`grow` builds the deeper model and a new optimizer of the same class whose parameters sit in the groups of their
sources and carry a clone of their sources' AdamW state (exp_avg, exp_avg_sq, step): the copies start identical and
diverge later (PAPER §2.4, §6.2 step 4). Rebuilding the optimizer is the point: an optimizer built before growth and
kept afterwards silently never updates the new layers (ANCHORS §11). The LR schedule belongs to the caller.

Command line:
    python grow.py --ckpt out/run/ckpt.pt --op lidas --block 4 --out out/run/grown.pt
    python grow.py --schedule --target 12 --block 4 --total 1000            (window defaults to 85% of total)
"""
import argparse
import dataclasses
import inspect
import math
import warnings
from fractions import Fraction

import torch

from loop import describe, repeat_plan
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint

OPS = ("midas", "lidas")
# the shape train.py trains by default (d=128, 4 heads, SwiGLU 384, context 512, byte vocab): --schedule's FLOPs
TINY = dict(vocab_size=257, block_size=512, n_head=4, n_kv_head=4, n_embd=128, mlp_hidden=384)


# ---- operators (PAPER §3.2) ----

def _check_depth(L, b):
    for name, v in (("depth L", L), ("block size b", b)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if L % b:
        divisors = [d for d in range(1, L + 1) if L % d == 0]
        raise ValueError(f"block size b={b} does not divide the current depth L={L}; "
                         f"use a block size from {divisors} (or grow from a depth that is a multiple of {b})")


def midas_order(L, b):
    """MIDAS: split the L layers into n = L/b blocks and insert a copy of block m = ceil(n/2) - 1 right after it.
    For an even n that is the block just below mid-depth. Returns, for each of the L+b new layers, the old layer
    it copies: [0 .. (m+1)b-1] + [mb .. (m+1)b-1] + [(m+1)b .. L-1]."""
    _check_depth(L, b)
    m = math.ceil(L // b / 2) - 1
    return repeat_plan(L, m * b, b, 1)


def lidas_order(L, b):
    """LIDAS: the b-layer window [c - ceil(b/2), c + floor(b/2)) centred on the middle layer c = ceil(L/2)
    (0-indexed; COD Fig. 2 fixes the off-by-one), followed immediately by its copy. For an even number of blocks
    the window straddles two blocks (last b/2 of B_m, first b/2 of B_{m+1}); for an odd number it is exactly the
    middle block, so lidas_order == midas_order."""
    _check_depth(L, b)
    c = math.ceil(L / 2)
    return repeat_plan(L, c - math.ceil(b / 2), b, 1)


ORDERS = {"midas": midas_order, "lidas": lidas_order}


def grow_order(op, L, b):
    if op not in ORDERS:
        raise ValueError(f"unknown growth operator {op!r}; use one of {list(OPS)}")
    return ORDERS[op](L, b)


# ---- schedule (PAPER §2.4: PROP-α, largest-remainder rounding) ----

def _largest_remainder(total, weights):
    quota = [total * wi / sum(weights) for wi in weights]
    steps = [math.floor(q) for q in quota]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quota[i] - steps[i]), i))
    for i in by_remainder[:total - sum(steps)]:
        steps[i] += 1
    return steps


def prop_schedule(window_steps, n_stages, alpha=1.0):
    """PROP-α: stage i (1-based) lasts T·i^α / Σ_j j^α steps. Quotas are floored and the leftover steps go to the
    stages with the largest remainders (ties to the earlier stage), so the stages sum to T exactly. Arithmetic is
    exact (Fractions), so ties are real ties and not float noise."""
    if not isinstance(n_stages, int) or isinstance(n_stages, bool) or n_stages < 1:
        raise ValueError(f"n_stages={n_stages!r} must be an integer >= 1")
    if not isinstance(window_steps, int) or isinstance(window_steps, bool) or window_steps < 1:
        raise ValueError(f"growth window={window_steps!r} steps must be an integer >= 1")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha!r} must be a finite number (PROP-1 is alpha=1)")
    w = [Fraction(i ** alpha) for i in range(1, n_stages + 1)]  # exact value of each float weight
    steps = _largest_remainder(window_steps, w)
    if min(steps) < 1:
        # the smallest window from which on every window works (rounding makes "works" non-monotone below it)
        need = sure = math.ceil(sum(w) / min(w))  # here even the floored smallest quota is >= 1
        while need - 1 > window_steps and sure - need < 10_000 and min(_largest_remainder(need - 1, w)) >= 1:
            need -= 1
        raise ValueError(f"growth window of {window_steps} steps is too short for {n_stages} PROP-{alpha:g} stages "
                         f"(schedule {steps} has a stage of zero steps); any window of {need} steps or more works; or "
                         f"use a larger block size (fewer stages)")
    return steps


def growth_boundaries(target_layers, b, window_steps, alpha=1.0):
    """Start at b layers and grow by b per stage up to target_layers (n_stages = target_layers // b). Returns
    [(step, new_depth), ...] for the n_stages - 1 growth events, `step` being the first step that trains the grown
    model. The growth window usually ends where the cooldown starts; the last stage then runs through it."""
    if not isinstance(b, int) or isinstance(b, bool) or b < 1:
        raise ValueError(f"block size b={b!r} must be an integer >= 1")
    if not isinstance(target_layers, int) or isinstance(target_layers, bool) or target_layers < b or target_layers % b:
        raise ValueError(f"target depth {target_layers!r} must be a multiple of the block size b={b} and >= b "
                         f"(e.g. {3 * b}): growth starts at b layers and adds b per stage")
    stages = prop_schedule(window_steps, target_layers // b, alpha)
    events, step = [], 0
    for i, s in enumerate(stages[:-1]):
        step += s
        events.append((step, (i + 2) * b))
    return events


def stage_table(target_layers, b, window_steps, total_steps=None, alpha=1.0):
    """[{stage, depth, start, steps}, ...]; the last stage also runs the steps after the window (the cooldown)."""
    total = window_steps if total_steps is None else total_steps
    if not isinstance(total, int) or total < window_steps:
        raise ValueError(f"total steps {total!r} must be an integer >= the growth window ({window_steps} steps)")
    starts = [0] + [s for s, _ in growth_boundaries(target_layers, b, window_steps, alpha)]
    ends = starts[1:] + [total]
    return [dict(stage=i + 1, depth=(i + 1) * b, start=s, steps=e - s) for i, (s, e) in enumerate(zip(starts, ends))]


def flops_ratio(table, cfg: GPTConfig, seq_len=None):
    """Training FLOPs of a grown run over a baseline of the final depth trained for the same steps and tokens
    (PAPER §2.4: ≈0.77). Uses model.flops_per_token on a meta-device model, so no weights are allocated."""
    depth = table[-1]["depth"]
    with torch.device("meta"):
        m = GPT(dataclasses.replace(cfg, n_layer=depth, plan=None))
    per = {r["depth"]: m.flops_per_token(list(range(r["depth"])), seq_len, train=True) for r in table}
    grown = sum(r["steps"] * per[r["depth"]] for r in table)
    return grown / (sum(r["steps"] for r in table) * per[depth])


# ---- growth with optimizer bookkeeping ----

def grow(model, optimizer, op, b, compile_kwargs=None):
    """Grow `model` (a raw GPT, not DDP) by one MIDAS/LIDAS step of b layers. Returns (grown model, new optimizer).

    Layer i of the new model is a deep copy of old layer order[i]; embeddings and the final norm are copied as
    they are. The new optimizer has the class, defaults and every per-group hyperparameter of the old one; each new
    parameter sits in the group of its source parameter and gets a clone of the source's state (exp_avg,
    exp_avg_sq, step, ...). A compiled model gets compiled blocks again (with compile_kwargs)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or not isinstance(model, GPT):
        raise ValueError(f"grow() needs a raw model.GPT, got {type(model).__name__}; pass ddp_model.module")
    if model.config.plan is not None:
        raise ValueError(f"cannot grow a model whose default plan is {model.config.plan} (not plain): growth copies "
                         f"unique layers of a plain model; materialize the plan first (model.materialize(plan))")
    L = model.config.n_layer
    order = grow_order(op, L, b)
    ref = model.embed_tokens.weight
    with torch.random.fork_rng(devices=[]):  # materialize inits fresh weights first: keep the caller's RNG stream
        new = model.materialize(order).to(device=ref.device, dtype=ref.dtype)
    new.train(model.training)

    # every new parameter name -> the old parameter it was copied from
    old_params = dict(model.named_parameters())
    source = {}
    for name, p in new.named_parameters():
        parts = name.split(".")
        if parts[0] == "layers":
            parts[1] = str(order[int(parts[1])])
        source[name] = old_params[".".join(parts)]

    group_of = {}
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            group_of[p] = gi
    own = {id(p) for p in old_params.values()}
    foreign = [p for p in group_of if id(p) not in own]
    if foreign:
        raise ValueError(f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of the model "
                         f"(shapes {[tuple(p.shape) for p in foreign[:3]]}); build it from model.parameters()")

    groups = []
    for gi, g in enumerate(optimizer.param_groups):
        named = [(n, p) for n, p in new.named_parameters() if group_of.get(source[n]) == gi]
        hyper = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        # named groups (optimizer built from named_parameters()) stay named, with the new names
        groups.append(dict(hyper, params=named if "param_names" in g else [p for _, p in named]))
    accepted = inspect.signature(type(optimizer).__init__).parameters
    kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    new_opt = type(optimizer)(groups, **kwargs)
    new_opt.defaults = dict(optimizer.defaults)  # keys the constructor does not take (e.g. decoupled_weight_decay)

    # the AdamW state of each source, cloned to every copy (PAPER §2.4: copies start identical)
    for name, p in new.named_parameters():
        st = optimizer.state.get(source[name])
        if st:
            new_opt.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}

    if model._compiled is not None:
        new.compile_blocks(**(compile_kwargs or {}))
    return new, new_opt


# ---- command line ----

def _saved_optimizer(model, ckpt):
    """The checkpoint's AdamW, its param groups rebuilt by name: from train.py's `optimizer_names` (its decay /
    no-decay groups), else the groups' own `param_names`, else one group of model.parameters() in named order."""
    sd, named = ckpt["optimizer"], dict(model.named_parameters())
    names = ckpt.get("optimizer_names")
    if names is None and all("param_names" in g for g in sd["param_groups"]):
        names = [n for g in sd["param_groups"] for n in g["param_names"]]
    if names is None:
        groups = [{"params": list(named.values())}]
    else:
        if sorted(names) != sorted(named) or len(names) != sum(len(g["params"]) for g in sd["param_groups"]):
            raise ValueError("its parameter names do not match the model's")
        it = iter(names)
        groups = [{"params": [named[next(it)] for _ in g["params"]]} for g in sd["param_groups"]]
    opt = torch.optim.AdamW(groups)
    opt.load_state_dict(sd)
    for p in model.parameters():  # load_state_dict does not check shapes: a mismatch means a wrong mapping
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                raise ValueError(f"state {k!r} of shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")
    return opt


def grow_checkpoint(path_in, path_out, op, b):
    """Grow a saved checkpoint offline, keeping its AdamW state when it can be mapped and every other extra.
    Returns (old plan, new plan, order)."""
    try:
        model, ckpt = load_checkpoint(path_in)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot grow {path_in!r}: not a growloop checkpoint ({e}); give a checkpoint written by "
                         f"train.py or grow.py") from None
    opt = None
    if isinstance(ckpt.get("optimizer"), dict):
        try:
            opt = _saved_optimizer(model, ckpt)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            warnings.warn(f"{path_in}: the saved optimizer state does not map onto the model's parameters ({e}); "
                          f"dropping it, the grown checkpoint has no optimizer state")
    old_plan = model.plan
    new, new_opt = grow(model, opt or torch.optim.AdamW(model.parameters()), op, b)
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "config", "model", "optimizer", "optimizer_names")}
    if opt is not None:
        name_of = {id(p): n for n, p in new.named_parameters()}
        extra["optimizer"] = new_opt.state_dict()
        extra["optimizer_names"] = [name_of[id(p)] for g in new_opt.param_groups for p in g["params"]]
    extra.update(grow_block=b, grow_op=op, depth=new.config.n_layer)
    save_checkpoint(path_out, new, **extra)
    return old_plan, new.plan, grow_order(op, len(old_plan), b)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Grow a checkpoint by one MIDAS/LIDAS step (--ckpt ... --out ...), or print a PROP-α growth "
                    "schedule and its training-FLOPs ratio (--schedule).")
    g = ap.add_argument_group("grow a checkpoint")
    g.add_argument("--ckpt", help="input checkpoint (train.py / grow.py)")
    g.add_argument("--out", help="output checkpoint path (written atomically)")
    g.add_argument("--op", default="lidas", help="growth operator: midas | lidas (default lidas)")
    g.add_argument("--block", type=int, default=4, help="block size b: layers added per growth step (default 4)")
    s = ap.add_argument_group("schedule")
    s.add_argument("--schedule", action="store_true", help="print the stage table instead of growing")
    s.add_argument("--target", type=int, default=12, help="final depth (default 12)")
    s.add_argument("--total", type=int, help="total training steps (growth window + cooldown)")
    s.add_argument("--window", type=int, help="growth window in steps (default: 85%% of --total, PAPER §6.2)")
    s.add_argument("--alpha", type=float, default=1.0, help="PROP-α exponent (default 1)")
    c = ap.add_argument_group("model shape for the FLOPs ratio (defaults: train.py's tiny config, byte tokenizer)")
    for k, v in TINY.items():
        c.add_argument(f"--{k}", type=int, default=v, help=f"(default {v})")
    args = ap.parse_args(argv)

    if args.schedule:
        if args.window is None and args.total is None:
            ap.error("--schedule needs --total STEPS and/or --window STEPS")
        window = args.window if args.window is not None else round(0.85 * args.total)
        table = stage_table(args.target, args.block, window, args.total, args.alpha)
        print(f"PROP-{args.alpha:g} growth to {args.target} layers, block {args.block}, window {window} steps"
              + (f", {args.total} total" if args.total else ""))
        print(f"{'stage':>5} {'depth':>5} {'start':>7} {'steps':>7}")
        for r in table:
            print(f"{r['stage']:>5} {r['depth']:>5} {r['start']:>7} {r['steps']:>7}")
        cfg = GPTConfig(**{k: getattr(args, k) for k in TINY})
        ratio = flops_ratio(table, cfg)
        print(f"training FLOPs vs a {args.target}-layer baseline over the same {table[-1]['start'] + table[-1]['steps']}"
              f" steps: {ratio:.4f} (baseline/grown = {1 / ratio:.3f}x; d={cfg.n_embd}, T={cfg.block_size})")
        return
    if args.ckpt is None or args.out is None:
        ap.error("give --ckpt IN --out OUT to grow a checkpoint, or --schedule to print a schedule")
    old_plan, new_plan, order = grow_checkpoint(args.ckpt, args.out, args.op, args.block)
    print(f"{args.op} b={args.block}: depth {len(old_plan)} -> {len(new_plan)}")
    print(f"old plan  {old_plan}  ({describe(old_plan)})")
    print(f"copies    {order}  (new layer i copies old layer order[i])")
    print(f"new plan  {new_plan}  ({describe(new_plan)})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
