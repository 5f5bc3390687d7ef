"""
Throughput of one config and plan, as one table of measurements and ratios (no assertions; targets printed beside).

    python bench.py                                  # tiny config on this machine (CPU, 1 thread: ~1 min)
    python bench.py config/gpt2_125m.py              # on a GPU: eager/compiled x fp32/bf16, and the MFU target
    python bench.py config/tiny.py --set plan="loop(2-2x4-2)" --set n_layer=6 --loop_plan="loop(2-2x6-2)"

Rows: training tokens/s (fastest of --steps steps), achieved FLOP/s, MFU and peak memory for each dtype x (eager,
compiled); one training step is one micro-batch (micro_batch x block_size tokens) through train.train_step, the
function train.py runs.
Ratios, measured in this run with the default dtype and compile setting:
  (1) bare step time / our step time: the reference is a plain loop over the same Block modules with the same math
      (embedding, blocks, norm, tied head, cross-entropy, backward, clipping, AdamW), without plan machinery,
      mixture sampling or logging; ours draws its batch from the prepared mixture when it exists. Target >= 0.97.
  (2) (looped plan step time / default plan step time) / (their FLOPs ratio). Target <= 1.05.
  (3) uncached / cached generation time for 256 new tokens (batch 1, 16-token prompt, greedy), in fp32 and under
      bf16 autocast. Target >= 5x.
  (4) CUDA only: MFU of bf16 + compile at config/gpt2_125m.py. Target >= 40%.
"""
import argparse
import resource
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import loop
import train
from model import GPT, GPTConfig

VOCAB = {"byte": 257, "gpt2": 50257}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def vocab_size(name):
    try:
        from data.tokenizer import get_tokenizer
        return get_tokenizer(name).n_vocab
    except Exception:  # the GPT-2 files may not be fetched on this machine; bench only needs the size
        return VOCAB[name]


def build(cfg, device, compile_):
    torch.manual_seed(cfg["seed"])
    plan = loop.plan_from_spec(cfg["plan"], cfg["n_layer"]) if cfg["plan"] else None
    raw = GPT(GPTConfig(vocab_size=vocab_size(cfg["tokenizer"]), block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                        n_head=cfg["n_head"], n_kv_head=cfg["n_kv_head"], n_embd=cfg["n_embd"],
                        mlp_hidden=cfg["mlp_hidden"], plan=plan)).to(device)
    if compile_:
        raw.compile_blocks()
    return raw, train.configure_optimizer(raw, cfg, device)


def batch_source(cfg, vocab):
    """The prepared mixture (what train.py samples) if it exists, else random tokens."""
    rows = cfg["micro_batch"]
    try:
        from data.mixture import Mixture
        mix = Mixture(cfg["data_dir"], cfg["tokenizer"], cfg["mixture"], cfg["block_size"], cfg["seed"])
        return (lambda s: mix.batch(s, range(rows), rows)), "mixture"
    except (ValueError, FileNotFoundError):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, vocab, (rows, cfg["block_size"] + 1), generator=g)
        return (lambda s: (x[:, :-1], x[:, 1:])), "random tokens"


def bare_step(raw, opt, x, y, autocast, clip):
    """The reference: the same modules and math as GPT.forward + train_step, written as a plain loop."""
    T = x.size(1)
    cos, sin = raw.rope_cos[:T], raw.rope_sin[:T]
    blocks = raw._compiled if raw._compiled is not None else raw.layers
    with autocast:
        h = raw.embed_tokens(x)
        for i in raw.plan:  # the config's plan (plain: 0..L-1)
            h = blocks[i](h, cos, sin)
        logits = F.linear(raw.norm(h), raw.embed_tokens.weight)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(raw.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(cfg, device, dtype, compile_, steps, warmup, loop_plan=None, reference=False):
    """Fastest step time of train.train_step (and of the bare reference / a looped plan, interleaved so that
    machine noise hits both alike; the minimum is the time least disturbed by other load). Returns times, FLOPs
    per step and peak memory."""
    raw, opt = build(cfg, device, compile_)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    get, source = batch_source(cfg, raw.config.vocab_size)
    plans = {"default": raw.plan}
    if loop_plan:
        plans["looped"] = loop.plan_from_spec(loop_plan, cfg["n_layer"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {k: [] for k in list(plans) + (["bare"] if reference else [])}
    for i in range(warmup + steps):
        for name in times:
            if name == "bare":
                x, y = (t.to(device) for t in get(i))
                fn = lambda: bare_step(raw, opt, x, y, autocast, cfg["grad_clip"])
            else:
                fn = lambda: train.train_step(raw, raw, opt, [get(i)], 1, plans[name], 0, autocast, device,
                                              cfg["grad_clip"])
            dt = timed(fn, device)
            if i >= warmup:
                times[name].append(dt)
    tokens = cfg["micro_batch"] * cfg["block_size"]
    out = {"source": source, "tokens": tokens}
    for name, ts in times.items():
        plan = plans.get(name, raw.plan)
        out[name] = {"s": min(ts), "flops": raw.flops_per_token(plan, train=True) * tokens}
    if device.type == "cuda":
        out["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:
        out["mem"] = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process)"
    out["model"] = raw
    return out


def generation_ratio(raw, device, dtype, n_new, n_prompt=16):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    n_prompt = min(n_prompt, raw.config.block_size - 1)
    prompt = torch.randint(0, raw.config.vocab_size, (1, n_prompt), device=device)
    raw._compiled = None  # eager: on the uncached path every new length would recompile a compiled block
    n_new = min(n_new, raw.config.block_size - n_prompt)
    t = {}
    with autocast:
        raw.generate(prompt, 4, temperature=0)  # warm up
        for use_cache in (True, False):
            t[use_cache] = timed(lambda: raw.generate(prompt, n_new, temperature=0, use_cache=use_cache), device)
    return t[False] / t[True], t, n_new


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="config/tiny.py", help="config file (default config/tiny.py)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override as in train.py, e.g. --set micro_batch=4 (repeatable)")
    ap.add_argument("--loop_plan", default=None, help="looped plan for ratio (2); default 'repeat(L/4,L/2,1)': the "
                                                      "middle half of the layers run twice")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiled: at least 3)")
    ap.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                    help="compiled rows: auto = on CUDA only (inductor needs minutes on a small CPU)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a small shared CPU "
                                                           "more threads make every timing noisy; 0 = torch's default)")
    ap.add_argument("--gen_tokens", type=int, default=256, help="new tokens for the KV-cache ratio")
    ap.add_argument("--gen_prompt", type=int, default=16, help="prompt tokens for the KV-cache ratio (a longer "
                    "prompt is what the cache saves most on; at 16 tokens tiny models are launch-overhead bound)")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    if args.threads:
        torch.set_num_threads(args.threads)
    _, overrides = train.parse_argv([f"--{kv}" for kv in args.set])
    cfg = train.make_config(args.config, overrides)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    default_dtype = "bfloat16" if device.type == "cuda" or train.cpu_has_bf16() else "float32"
    compiles = {"auto": [False, True] if device.type == "cuda" else [False], "yes": [False, True], "no": [False]}
    compiles = compiles[args.compile]
    L = cfg["n_layer"]
    loop_plan = args.loop_plan or f"repeat({L // 4},{max(1, L // 2)},1)"
    print(f"config {args.config} {' '.join(args.set)}: {L} layers d={cfg['n_embd']} T={cfg['block_size']}, "
          f"micro_batch {cfg['micro_batch']}, plan {cfg['plan'] or 'plain'}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    rows, ref = [], None
    for compile_ in compiles:
        for dtype in ("float32", "bfloat16"):
            is_ref = dtype == default_dtype and compile_ == compiles[-1]
            warm = max(args.warmup, 3) if compile_ else args.warmup
            r = measure(cfg, device, dtype, compile_, args.steps, warm, loop_plan if is_ref else None, is_ref)
            peak, peak_name = train.peak_flops(device, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
            d = r["default"]
            rows.append((f"{'compiled' if compile_ else 'eager'} {dtype}", r["tokens"] / d["s"], d["flops"] / d["s"],
                         d["flops"] / d["s"] / peak, r["mem"], d["s"] * 1e3, peak_name))
            if is_ref:
                ref = (r, dtype, compile_)

    print(f"\none training step = {rows and ref[0]['tokens']} tokens ({ref[0]['source']})")
    print(f"{'variant':<18} {'tok/s':>10} {'FLOP/s':>10} {'MFU':>7} {'step ms':>9}  {'peak memory':<26} MFU peak")
    for name, tok_s, fs, mfu, mem, ms, pk in rows:
        print(f"{name:<18} {tok_s:>10.0f} {fs:>10.3g} {mfu:>7.1%} {ms:>9.1f}  {mem:<26} {pk}")

    r, dtype, compile_ = ref
    tag = f"({'compiled' if compile_ else 'eager'} {dtype})"
    print(f"\n{'ratio ' + tag:<58} {'measured':>10}  target")
    print(f"{'(1) bare reference step / our train step':<58} {r['bare']['s'] / r['default']['s']:>10.3f}  >= 0.97")
    fr = r["looped"]["flops"] / r["default"]["flops"]
    tr = r["looped"]["s"] / r["default"]["s"]
    print(f"{f'(2) {loop_plan} time ratio {tr:.3f} / FLOPs ratio {fr:.3f}':<58} {tr / fr:>10.3f}  <= 1.05")
    for gdtype in ("float32", "bfloat16"):  # autocast re-casts the weights at every decode step: both shown
        g, t, n = generation_ratio(r["model"], device, gdtype, args.gen_tokens, args.gen_prompt)
        print(f"{f'(3) uncached/cached gen {args.gen_prompt}+{n} tok {gdtype} {t[False]:.2f}s/{t[True]:.2f}s':<58} "
              f"{g:>9.1f}x  >= 5x")
    if device.type == "cuda":
        c125 = train.make_config("config/gpt2_125m.py")
        m = measure(c125, device, "bfloat16", True, args.steps, max(args.warmup, 3))
        peak, _ = train.peak_flops(device, torch.bfloat16)
        mfu = m["default"]["flops"] / m["default"]["s"] / peak
        print(f"{'(4) bf16 + compile MFU at config/gpt2_125m.py':<58} {mfu:>10.1%}  >= 40%")
    else:
        print(f"{'(4) bf16 + compile MFU at config/gpt2_125m.py':<58} {'n/a':>10}  >= 40% (CUDA only)")


if __name__ == "__main__":
    main()
