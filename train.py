"""
Pretraining: a fixed global batch, AdamW, warmup-stable-decay with a 1-sqrt cooldown, looped plans, depth growth
(MIDAS/LIDAS), a cooldown that may switch mixture and plan, DDP, and checkpoints that resume bit-exactly.

    python train.py                                   # the tiny CPU default (config below = config/tiny.py)
    python train.py config/tiny.py --grow=lidas --grow_block=2 --out_dir=out/tiny_lidas
    python train.py config/tiny.py --out_dir=out/tiny --resume
    torchrun --nproc_per_node=8 train.py config/smollm_360m.py
    python train.py --help                            # every key with its default

Config: the defaults below, then a config file (plain Python assigning keys), then --key=value overrides
(parsed with ast.literal_eval, else kept as a string). From Python: `from train import run; run({...})`.

Writes to out_dir: log.jsonl (an object per step, validation, growth and cooldown event), ckpt.pt (latest; model,
optimizer, step, tokens, FLOPs, RNG, mixture state, config, current depth), ckpt_cooldown.pt (the state where the
cooldown starts: cooldown arms branch from it with init_from, PAPER §2.11-2.12) and summary.json at the end.
"""
import ast
import difflib
import json
import math
import os
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import loop
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint

DEFAULTS = dict(
    # run; threads 0 = torch's default; stop_step > 0 = checkpoint and stop there (continue with resume=True)
    out_dir="out/tiny", seed=1337, device="auto", dtype="auto", compile=False, threads=0,
    resume=False, init_from="", stop_step=0,
    # model (vocab_size comes from the tokenizer); plan: a loop.plan_from_spec spec, '' = plain
    n_layer=8, n_embd=128, n_head=4, n_kv_head=4, mlp_hidden=384, block_size=512,
    plan="", loop_sampler="fixed", loop_mean=0.0, loop_max=0, bptt_k=0,
    # data; val_sources [] = every source of the mixtures
    tokenizer="byte", data_dir="data/prepared",
    mixture={"primitives": 0.2, "sotu": 0.4, "wiki": 0.3, "math": 0.1}, cooldown_mixture=None,
    val_sources=[], val_batches=4,
    # optimization and schedule (PAPER §2.2: AdamW, clip 1.0, wd 0.01, WSD with 1-sqrt decay over the last 15%)
    max_steps=60, batch_tokens=16384, micro_batch=8, lr=3e-3, warmup_steps=10, cooldown_frac=0.15,
    weight_decay=0.01, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0,
    cooldown_plan="",  # plan during the cooldown, e.g. 'repeat(4,2,1)': retrofitted recurrence (PAPER §2.12)
    # growth (PAPER §2.4): start at grow_block layers, add grow_block per PROP-alpha stage up to n_layer;
    # grow_window 0 = the growth window ends where the cooldown starts
    grow="", grow_block=4, grow_alpha=1.0, grow_window=0,
    # logging
    log_interval=1, eval_interval=20, ckpt_interval=20,
)
NONE_OK = {"cooldown_mixture": dict}  # keys whose default None stands for "off"
# keys a resumed run may change (everything else must match the checkpoint's config; moved data is fine, the
# mixture's sha256 check still refuses changed data)
RESUME_FREE = {"threads", "resume", "init_from", "stop_step", "device", "dtype", "compile", "micro_batch",
               "log_interval", "eval_interval", "ckpt_interval", "val_sources", "val_batches", "out_dir", "data_dir"}
# keys a branch (init_from) must share with its milestone
SHAPE = ("n_layer", "n_embd", "n_head", "n_kv_head", "mlp_hidden", "block_size", "plan", "tokenizer",
         "max_steps", "cooldown_frac", "grow", "grow_block")
# bf16 dense tensor peak FLOP/s by device name (first match wins); other devices are measured
GPU_PEAK = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
            ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
            ("A10G", 70e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("A6000", 155e12), ("MI300X", 1307e12)]


# ---------------------------------------------------------------- config

def _coerce(key, value):
    default = DEFAULTS[key]
    want = NONE_OK.get(key, type(default))
    if value is None and key in NONE_OK:
        return None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is list and isinstance(value, (tuple, list)):
        return list(value)
    if want is list and isinstance(value, str):  # --val_sources=sotu,math
        return [s.strip() for s in value.split(",") if s.strip()]
    if want is dict and isinstance(value, str):  # --mixture=sotu:0.5,math:0.5
        try:
            return {k.strip(): float(v) for k, v in (kv.split(":") for kv in value.split(","))}
        except ValueError:
            pass
    if type(value) is not want:
        raise ValueError(f"config key {key!r} wants a {want.__name__} (default {default!r}), got {value!r} "
                         f"({type(value).__name__})")
    return value


def _check_keys(keys, where):
    for k in keys:
        if k not in DEFAULTS:
            close = difflib.get_close_matches(k, DEFAULTS, n=3, cutoff=0.5)
            raise ValueError(f"unknown config key {k!r} in {where}" +
                             (f"; did you mean {', '.join(close)}?" if close else "") + " (train.py --help lists keys)")


def make_config(config_file=None, overrides=None):
    """defaults <- config file <- overrides, every key checked by name and type."""
    cfg = dict(DEFAULTS)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file!r} does not exist (see config/)")
        ns = {}
        exec(compile(Path(config_file).read_text(), config_file, "exec"), ns)
        # keys are the file's public names; modules, functions and classes it imports are not keys
        vals = {k: v for k, v in ns.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)
                and not callable(v)}
        _check_keys(vals, config_file)
        cfg.update({k: _coerce(k, v) for k, v in vals.items()})
    overrides = overrides or {}
    _check_keys(overrides, "overrides")
    cfg.update({k: _coerce(k, v) for k, v in overrides.items()})
    return cfg


def parse_argv(argv):
    """-> (config_file, overrides) from `[config.py] [--key=value ...]`."""
    config_file, overrides = None, {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\nkeys (default):")
            for k, v in DEFAULTS.items():
                print(f"  --{k}={v!r}")
            sys.exit(0)
        if not arg.startswith("--"):
            if config_file is not None:
                raise ValueError(f"two config files given ({config_file!r}, {arg!r}); pass one, then --key=value")
            config_file = arg
            continue
        key, eq, raw = arg[2:].partition("=")
        _check_keys([key], "the command line")
        if not eq:  # bare --resume means --resume=True
            if not isinstance(DEFAULTS[key], bool):
                raise ValueError(f"--{key} needs a value: --{key}=VALUE (default {DEFAULTS[key]!r})")
            overrides[key] = True
            continue
        if isinstance(DEFAULTS[key], str):
            overrides[key] = raw  # strings stay strings: --plan=0,1,2 is a spec, not a tuple
        else:
            try:
                overrides[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                overrides[key] = raw
    return config_file, overrides


def cooldown_start(cfg):
    return cfg["max_steps"] - int(round(cfg["cooldown_frac"] * cfg["max_steps"]))


def get_lr(step, cfg):
    """Linear warmup, constant, then 1-sqrt decay over the final cooldown_frac of steps (PAPER §2.2)."""
    s0, S = cooldown_start(cfg), cfg["max_steps"]
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    if step < s0:
        return cfg["lr"]
    return cfg["lr"] * (1 - math.sqrt((step - s0) / (S - s0)))


def check_config(cfg, world):
    if cfg["max_steps"] < 1:
        raise ValueError(f"max_steps={cfg['max_steps']} must be >= 1")
    if not 0 <= cfg["cooldown_frac"] < 1:
        raise ValueError(f"cooldown_frac={cfg['cooldown_frac']} must be in [0, 1) (PAPER: 0.15)")
    if not 0 <= cfg["warmup_steps"] <= cooldown_start(cfg):
        raise ValueError(f"warmup_steps={cfg['warmup_steps']} must be in 0..{cooldown_start(cfg)} (the cooldown start)")
    unit = cfg["block_size"] * cfg["micro_batch"] * world
    if cfg["batch_tokens"] < unit or cfg["batch_tokens"] % unit:
        raise ValueError(f"batch_tokens={cfg['batch_tokens']} must be a multiple of block_size*micro_batch*world_size"
                         f" = {cfg['block_size']}*{cfg['micro_batch']}*{world} = {unit}; valid values: {unit}, "
                         f"{2 * unit}, {4 * unit}, ... (or change micro_batch)")
    if cfg["grow"] not in ("", "midas", "lidas"):
        raise ValueError(f"grow={cfg['grow']!r}: use '' (no growth), 'midas' or 'lidas'")
    if cfg["grow"] and cfg["plan"]:
        raise ValueError(f"grow={cfg['grow']!r} needs the plain plan (plan=''), got plan={cfg['plan']!r}")
    if cfg["dtype"] not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype={cfg['dtype']!r}: use 'auto', 'float32' or 'bfloat16'")
    if cfg["loop_sampler"] not in ("fixed", "poisson-lognormal"):
        raise ValueError(f"loop_sampler={cfg['loop_sampler']!r}: use 'fixed' or 'poisson-lognormal'")
    for key in ("log_interval", "eval_interval", "ckpt_interval", "micro_batch", "val_batches"):
        if cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]} must be >= 1")
    loop.plan_from_spec(cfg["plan"], cfg["n_layer"])  # raises naming the spec and n_layer it needs
    if cfg["cooldown_plan"]:
        loop.plan_from_spec(cfg["cooldown_plan"], cfg["n_layer"])


def check_data(cfg):
    """Unknown sources -> ValueError; known but unprepared -> FileNotFoundError naming the prepare command."""
    from data.sources import source_names
    train = set(cfg["mixture"]) | set(cfg["cooldown_mixture"] or {})
    val = set(cfg["val_sources"]) or train
    root = Path(cfg["data_dir"]) / cfg["tokenizer"]
    for src in sorted(train | val):
        if src not in source_names() and not (root / src).is_dir():
            raise ValueError(f"unknown data source {src!r}; valid sources: {', '.join(source_names())} "
                             f"(or a folder prepared under {root})")
    missing = sorted({s for s in train if not (root / s / "train.bin").exists()} |
                     {s for s in val if not (root / s / "val.bin").exists()})
    if missing:
        out = "" if cfg["data_dir"] == DEFAULTS["data_dir"] else f" --out {cfg['data_dir']}"
        raise FileNotFoundError(f"data for {', '.join(missing)} is not prepared in {root}; run: python -m data.prepare"
                                f" --tokenizer {cfg['tokenizer']} --sources {','.join(missing)}{out}")
    return sorted(val)


def check_compatible(old, new, keys, what):
    diff = {k: (old.get(k), new[k]) for k in keys if old.get(k) != new[k]}
    if diff:
        lines = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{what} is incompatible with this config ({lines}); use the checkpoint's settings or "
                         f"another out_dir")


# ---------------------------------------------------------------- helpers

def peak_flops(device, dtype):
    """bf16 dense peak of a known GPU, else a ~0.3 s matmul timing (MFU against it is an estimate)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK:
            if key in name:
                return peak, name
    n = 1024 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        a @ b
        k += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n ** 3 * k / (time.perf_counter() - t0), f"measured {str(dtype)[6:]} matmul on {device.type}"


def cpu_has_bf16():
    # bf16 autocast was faster than fp32 on an AVX512-BF16 CPU at the tiny config (477 vs 614 ms/step, 2 cores);
    # without native bf16 it is emulated and much slower
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def configure_optimizer(model, cfg, device, saved=None):
    """AdamW, weight decay on >= 2-D tensors only. `saved` = (state_dict, param names in its order): the groups
    are rebuilt from it by name, so a state written after growth (grow.py's group layout) loads exactly."""
    named = dict(model.named_parameters())
    if saved is None:
        groups = [{"params": [p for p in named.values() if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
                  {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0}]
    else:
        sd, names = saved
        it = iter(names)
        groups = [{"params": [named[next(it)] for _ in g["params"]]} for g in sd["param_groups"]]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
                            weight_decay=cfg["weight_decay"], fused=fused)
    if saved is not None:
        opt.load_state_dict(saved[0])
    return opt


def param_names(model, opt):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def token_bytes(enc):
    """UTF-8 bytes per token id (0 for special tokens, which stand for no text), for bits per byte."""
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    return torch.tensor([0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
                        dtype=torch.float64)


@torch.no_grad()
def evaluate(model, val, tbytes, device, autocast, rank, world):
    """Mean NLL per token and bits per byte on each val source's fixed windows (ranks split the batches)."""
    out = {}
    for src, batches in val.items():
        s = torch.zeros(4, dtype=torch.float64, device=device)  # nll sum, tokens, nll sum on bytes, bytes
        for i, (x, y) in enumerate(batches):
            if i % world != rank:
                continue
            x, y = x.to(device), y.to(device)
            with autocast:
                logits, _ = model(x)
            nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="none").double()
            nb = tbytes.to(device)[y.view(-1)]
            s += torch.stack([nll.sum(), torch.tensor(float(nll.numel()), device=device),
                              (nll * (nb > 0)).sum(), nb.sum()])
        if world > 1:
            dist.all_reduce(s)
        out[src] = {"loss": (s[0] / s[1]).item(), "bpb": (s[2] / s[3] / math.log(2)).item() if s[3] > 0 else None}
    return out


# ---------------------------------------------------------------- training

def train_step(model, raw, opt, batches, accum, plan, grad_from, autocast, device, grad_clip, world=1):
    """One optimizer step over `accum` micro-batches (x, y) -> (mean loss, grad norm). Gradients are averaged over
    the global batch (DDP syncs only on the last micro-step); the update is skipped if loss or norm is not finite."""
    loss_sum = torch.zeros((), device=device)
    for j, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with model.no_sync() if world > 1 and j < accum - 1 else nullcontext():
            with autocast:
                _, loss = model(x, y, plan=plan, grad_from=grad_from)
            (loss / accum).backward()
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum)
    loss_val = loss_sum.item() / (accum * world)
    gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip if grad_clip > 0 else float("inf")).item()
    if math.isfinite(loss_val) and math.isfinite(gnorm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_val, gnorm


def run(overrides=None, config_file=None):
    """Train with defaults <- config_file <- overrides; returns the summary dict."""
    cfg = make_config(config_file, overrides)
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    master = rank == 0
    if cfg["device"] == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg["device"] if not ddp or "cuda" not in cfg["device"] else f"cuda:{local_rank}")
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, device, rank, world, master)
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(cfg, device, rank, world, master):
    from data.mixture import Mixture, val_batches
    from data.tokenizer import get_tokenizer
    t_start = time.time()
    check_config(cfg, world)
    if cfg["threads"] > 0:  # 1 is fastest for tiny models on a busy CPU
        torch.set_num_threads(cfg["threads"])
    val_sources = check_data(cfg)
    enc = get_tokenizer(cfg["tokenizer"])
    out = Path(cfg["out_dir"])
    ckpt_path, log_path = out / "ckpt.pt", out / "log.jsonl"
    dtype = cfg["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" or cpu_has_bf16() else "float32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    s0, S = cooldown_start(cfg), cfg["max_steps"]

    # ---- where do we start: fresh, resume (same out_dir) or branch (init_from a milestone) ----
    ckpt = None
    if cfg["resume"]:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"resume=True but {ckpt_path} does not exist; start a fresh run (resume=False) "
                                    f"or point out_dir at a run")
        loaded, ckpt = load_checkpoint(ckpt_path)
        src, must_match = str(ckpt_path), [k for k in DEFAULTS if k not in RESUME_FREE]
    else:
        held = [f for f in ("ckpt.pt", "summary.json") if (out / f).exists()]
        if held:
            raise FileExistsError(f"{out} already holds a run ({', '.join(held)}); continue it with --resume=True or "
                                  f"choose another out_dir (nothing was overwritten)")
        if cfg["init_from"]:
            loaded, ckpt = load_checkpoint(cfg["init_from"])
            src, must_match = f"init_from {cfg['init_from']!r}", SHAPE
    if ckpt is not None:
        if not {"train_config", "optimizer", "optimizer_names", "step"} <= set(ckpt):
            raise ValueError(f"{src} was not written by train.py (no training state); resume and init_from need a "
                             f"train.py checkpoint (ckpt.pt or ckpt_cooldown.pt)")
        check_compatible(ckpt["train_config"], cfg, must_match, src)

    # ---- model and optimizer ----
    growing = bool(cfg["grow"])
    boundaries = {}
    if growing:
        import grow
        window = cfg["grow_window"] or s0
        boundaries = dict(grow.growth_boundaries(cfg["n_layer"], cfg["grow_block"], window, cfg["grow_alpha"]))
    torch.manual_seed(cfg["seed"])
    if ckpt is None:
        base_plan = None if not cfg["plan"] else loop.plan_from_spec(cfg["plan"], cfg["n_layer"])
        mcfg = GPTConfig(vocab_size=enc.n_vocab, block_size=cfg["block_size"],
                         n_layer=cfg["grow_block"] if growing else cfg["n_layer"], n_head=cfg["n_head"],
                         n_kv_head=cfg["n_kv_head"], n_embd=cfg["n_embd"], mlp_hidden=cfg["mlp_hidden"], plan=base_plan)
        raw = GPT(mcfg).to(device)
        opt = configure_optimizer(raw, cfg, device)
        step, tokens, flops = 0, 0, 0.0
    else:
        raw = loaded.to(device)
        opt = configure_optimizer(raw, cfg, device, (ckpt["optimizer"], ckpt["optimizer_names"]))
        step, tokens, flops = ckpt["step"], ckpt["tokens"], ckpt["flops"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state_all(list(ckpt["rng"]["cuda"]))
    expect = max([cfg["grow_block"]] + [d for s, d in boundaries.items() if s < step]) if growing else cfg["n_layer"]
    if raw.config.n_layer != expect:
        raise ValueError(f"checkpoint depth {raw.config.n_layer} != {expect} expected at step {step} for this config")
    if cfg["compile"]:
        raw.compile_blocks()

    def spec_at(s):
        return cfg["cooldown_plan"] if s >= s0 and cfg["cooldown_plan"] else cfg["plan"]

    def covers_all(spec):
        return set(loop.plan_from_spec(spec, cfg["n_layer"])) == set(range(cfg["n_layer"]))

    find_unused = cfg["bptt_k"] > 0 or not covers_all(cfg["plan"]) or not covers_all(cfg["cooldown_plan"])

    def wrap(m):
        if world == 1:
            return m
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(m, device_ids=ids, find_unused_parameters=find_unused)

    model = wrap(raw)

    def plan_at(s):
        """(plan, grad_from) of step s: sampled loop counts and truncated backprop for loop specs (loop.py)."""
        spec, cool = spec_at(s), s >= s0 and bool(cfg["cooldown_plan"])
        if spec.strip().lower().startswith("loop"):
            mean = None if cool or not cfg["loop_mean"] else cfg["loop_mean"]
            return loop.train_plan(spec, s, cfg["seed"], "fixed" if cool else cfg["loop_sampler"], mean,
                                   cfg["loop_max"] or None, cfg["bptt_k"])
        return loop.plan_from_spec(spec, raw.config.n_layer), 0

    # the same-size baseline: the final depth with the config plan, every step (PAPER §2.4 FLOPs comparison)
    with torch.device("meta"):
        ref = GPT(GPTConfig(**{**vars(raw.config), "n_layer": cfg["n_layer"], "plan": None}))
    base_plan = loop.plan_from_spec(cfg["plan"], cfg["n_layer"])
    baseline_flops = float(ref.flops_per_token(base_plan, train=True)) * cfg["batch_tokens"] * S

    # ---- data ----
    mix = Mixture(cfg["data_dir"], cfg["tokenizer"], cfg["mixture"], cfg["block_size"], cfg["seed"])
    cool_mix = None
    if cfg["cooldown_mixture"]:
        cool_mix = Mixture(cfg["data_dir"], cfg["tokenizer"], cfg["cooldown_mixture"], cfg["block_size"], cfg["seed"])
    if ckpt is not None and cfg["resume"]:
        mix.load_state_dict(ckpt["mixture"]["train"])  # raises if the data changed under the run
        if cool_mix is not None:
            cool_mix.load_state_dict(ckpt["mixture"]["cooldown"])
    val = {s: val_batches(cfg["data_dir"], cfg["tokenizer"], s, cfg["block_size"], cfg["micro_batch"],
                          cfg["val_batches"]) for s in val_sources}
    tbytes = token_bytes(enc)
    rows = cfg["batch_tokens"] // cfg["block_size"]
    accum = rows // (cfg["micro_batch"] * world)
    peak, peak_name = peak_flops(device, torch.bfloat16 if dtype == "bfloat16" else torch.float32)

    # ---- logging ----
    def log(entry):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    if master:
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if ckpt is not None and cfg["resume"] and log_path.exists():  # drop entries past the checkpoint
            for line in log_path.read_text().splitlines():
                e = json.loads(line)
                if e["step"] < step or (e["event"] == "val" and e["step"] <= step):
                    kept.append(line + "\n")
        log_path.write_text("".join(kept))
        print("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in cfg.items()))
        print(f"device {device} x{world}, {dtype}, {raw.num_params():,} params at depth {raw.config.n_layer}, "
              f"{accum} micro-steps of {cfg['micro_batch']}x{cfg['block_size']} per step, peak {peak:.3g} FLOP/s "
              f"({peak_name}), starting at step {step}/{S}")

    def save(path, at_step):
        if not master:
            return
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        save_checkpoint(path, raw, optimizer=opt.state_dict(), optimizer_names=param_names(raw, opt), step=at_step,
                        tokens=tokens, flops=flops, rng=rng, train_config=cfg, tokenizer=cfg["tokenizer"],
                        **({"grow_block": cfg["grow_block"]} if growing else {}), depth=raw.config.n_layer,
                        mixture={"train": mix.state_dict(), "cooldown": cool_mix.state_dict() if cool_mix else None})

    # ---- the loop ----
    last_val, loss_val, train_time, stop = None, None, 0.0, cfg["stop_step"] or S
    bar = tqdm(total=S, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    while step < min(S, stop):
        if step in boundaries:  # growth before this step's forward; LR schedule continues (PAPER §2.4)
            raw, opt = grow.grow(raw, opt, cfg["grow"], cfg["grow_block"])
            model = wrap(raw)
            log({"event": "grow", "step": step, "depth": raw.config.n_layer})
        if step == s0 and cfg["cooldown_frac"] > 0:
            if not (cfg["init_from"] and ckpt is not None and step == ckpt["step"]):
                save(out / "ckpt_cooldown.pt", step)  # the branching point of the cooldown arms (PAPER §2.11)
                save(ckpt_path, step)  # so that a run stopped in the cooldown resumes from here at the latest
            if cfg["cooldown_plan"]:  # the trained plan becomes the model's default (retrofitted recurrence)
                raw.config.plan = loop.plan_from_spec(cfg["cooldown_plan"], raw.config.n_layer)
            log({"event": "cooldown", "step": step, "plan": loop.describe(raw.plan),
                 "mixture": cfg["cooldown_mixture"] or cfg["mixture"]})
        t0 = time.perf_counter()
        plan, grad_from = plan_at(step)
        source = cool_mix if cool_mix is not None and step >= s0 else mix
        lr = get_lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        first = rank * accum * cfg["micro_batch"]
        batches = ((source.batch(step, range(r, r + cfg["micro_batch"]), rows))
                   for r in range(first, first + accum * cfg["micro_batch"], cfg["micro_batch"]))
        loss_val, gnorm = train_step(model, raw, opt, batches, accum, plan, grad_from, autocast, device,
                                     cfg["grad_clip"], world)
        if not (math.isfinite(loss_val) and math.isfinite(gnorm)):
            bar.close()
            last = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
            raise FloatingPointError(f"loss {loss_val} / grad norm {gnorm} at step {step} is not finite; stopped "
                                     f"without saving this state; {last} (lower lr, raise warmup_steps or use "
                                     f"dtype=float32)")
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_time += dt
        step_flops = float(raw.flops_per_token(plan, train=True, no_grad_steps=grad_from)) * cfg["batch_tokens"]
        flops += step_flops
        tokens += cfg["batch_tokens"]
        if step % cfg["log_interval"] == 0 or step == S - 1:
            log({"event": "train", "step": step, "loss": loss_val, "lr": lr, "tokens": tokens,
                 "tok_s": cfg["batch_tokens"] / dt, "flops": flops, "mfu": step_flops / dt / (peak * world),
                 "depth": raw.config.n_layer, "plan": loop.describe(plan), "grad_norm": gnorm})
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{cfg['batch_tokens'] / dt:.0f}", depth=raw.config.n_layer)
        if step % cfg["eval_interval"] == 0 or step == S:
            last_val = evaluate(raw, val, tbytes, device, autocast, rank, world)
            log({"event": "val", "step": step, "val": last_val})
            bar.write(f"step {step}: " + ", ".join(f"{k} {v['loss']:.4f}" for k, v in last_val.items()))
        if step % cfg["ckpt_interval"] == 0 or step == S or step == stop:
            save(ckpt_path, step)
    bar.close()

    finished = step >= S
    summary = {"out_dir": str(out), "finished": finished, "step": step, "tokens": tokens, "loss": loss_val,
               "flops": flops, "baseline_flops": baseline_flops,
               "flops_ratio": flops / baseline_flops if finished else None, "wall_s": time.time() - t_start, "train_s": train_time, "tok_s": None, "depth": raw.config.n_layer,
               "plan": loop.describe(raw.plan), "params": raw.num_params(), "val": last_val}
    if train_time > 0:
        summary["tok_s"] = cfg["batch_tokens"] * (step - (ckpt["step"] if ckpt else 0)) / train_time
    if finished and master:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None):
    try:
        config_file, overrides = parse_argv(sys.argv[1:] if argv is None else argv)
        summary = run(overrides, config_file)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "val"}, indent=1))


if __name__ == "__main__":
    main()
