"""
Evaluate growloop checkpoints (PAPER §2.5, §2.6, §2.9, §2.10, §2.12; findings #2, #11-#13, #15 of PAPER §7.2).

    python eval.py --ckpt out/base/ckpt.pt --ckpt out/lidas/ckpt.pt --mode primitives --tasks all --out out/eval

Modes (one per run; each writes <out>/<mode>.json, <mode>.md and PNG figures):
  primitives  k-shot multiple choice (default 5): the summed log-likelihood of every candidate continuation after
              the same prompt, prediction = argmax (PAPER §2.6, §7.3); accuracy, 95% Wilson interval, chance.
  nll         held-out NLL (nats/token) and bits per byte on prepared validation sources, fixed windows.
  math        GSM8K test / ASDiv, k-shot, greedy decoding with the KV cache, prediction = last number generated.
  shots       in-context sweep: accuracy vs number of shots, the same queries for every k (PAPER §2.10, Fig. 7).
  loopsweep   inference-time looping: re-run the b-layer block at plan position s r more times, r = 1..4, for every
              s (PAPER §2.9, §6.4, Fig. 6). With --block_start only that block, r = 0..4: the "extra repetitions"
              curve of PAPER §2.12 / Fig. 9.
  sft         fine-tune a copy on n VA-code depth-1/2 examples (n = 64..512, 3 seeds), then score va_code_d1/d2
              (PAPER §2.10, Fig. 8). Looped models stay tied unless --untie (the paper's untying ablation).

Resumable: the JSON is rewritten after every unit (checkpoint, task, settings); a rerun skips units already in it
unless --force. The tokenizer comes from the checkpoint's `tokenizer` key ("byte" if absent). Prompts never get
cropped: a prompt longer than the context raises and says how many shots fit.

SFT hyperparameters are ours (the paper gives none, PAPER §2.10): AdamW (betas 0.9/0.95, no weight decay), constant
lr 3e-4, batch 16, 10 epochs over the n examples (so 64 examples get 40 steps, 512 get 320), gradient clip 1.0,
loss on the answer tokens only. Change them with --sft_lr / --sft_batch / --sft_epochs / --sft_steps.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import loop
from data import primitives, sources
from data.store import open_tokens, rebuild_hint
from data.tokenizer import get_tokenizer
from model import KVCache, load_checkpoint

MODES = ("primitives", "nll", "math", "shots", "loopsweep", "sft")
MATH_TASKS = ("gsm8k", "asdiv")
MATH_POOL = 8       # exemplars come from the first 8 items (GSM8K has no train split offline); scoring starts at item 8
MATH_MAX_NEW = {"gsm8k": 256, "asdiv": 32}
STOPS = ("\n\n", "Question:", "<|endoftext|>")
SFT_TASKS = ("va_code_d1", "va_code_d2")


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)


def acc_row(correct, n, **kw):
    lo, hi = wilson(correct, n)
    return dict(kw, n=n, correct=correct, accuracy=correct / n, ci_low=lo, ci_high=hi)


def autocast(device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---------------------------------------------------------------------------------------------------------------
# multiple-choice scoring (PAPER §2.6, §7.3)

def tokenize_example(enc, ex):
    # prompt and candidates are encoded separately (candidates start with a space, so BPE splits there anyway)
    return {"prompt": enc.encode_ordinary(ex["prompt"]), "cands": [enc.encode_ordinary(c) for c in ex["candidates"]],
            "answer": ex["answer"]}


def context_needed(t):
    # the last candidate token is predicted, never fed: prompt + longest candidate - 1 tokens must fit
    return len(t["prompt"]) + max(len(c) for c in t["cands"]) - 1


@torch.no_grad()
def score_candidates(model, prompt, cands, plan=None):
    """Summed log-probability of each candidate (lists of token ids) after the prompt -> float tensor (C,).
    The prompt runs once and fills the KV cache; the candidates then run as one right-padded batch on top of it
    (padding after a candidate cannot reach its tokens through the causal mask)."""
    plan = model.plan if plan is None else plan
    dev = model.embed_tokens.weight.device
    C, M = len(cands), max(len(c) for c in cands)
    toks = torch.zeros(C, M, dtype=torch.long, device=dev)
    mask = torch.zeros(C, M, dtype=torch.bool, device=dev)
    for i, c in enumerate(cands):
        toks[i, :len(c)] = torch.tensor(c, device=dev)
        mask[i, :len(c)] = True
    cache = [KVCache() for _ in plan]
    logits, _ = model(torch.tensor([prompt], device=dev), plan=plan, cache=cache)
    logits = logits[:, -1:].float().expand(C, 1, -1)  # predicts every candidate's first token
    if M > 1:
        for kv in cache:  # share the prompt's keys/values across the candidate rows
            kv.k, kv.v = kv.k.expand(C, -1, -1, -1), kv.v.expand(C, -1, -1, -1)
        rest, _ = model(toks[:, :-1], plan=plan, cache=cache)
        logits = torch.cat((logits, rest.float()), dim=1)
    logp = F.log_softmax(logits, dim=-1).gather(-1, toks.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(1)


def score_task(model, toks, plan, desc="scoring"):
    """-> (number correct, predicted indices) over tokenized examples."""
    preds, dev = [], model.embed_tokens.weight.device
    with autocast(dev):
        for t in tqdm(toks, desc=desc, leave=False):
            preds.append(int(score_candidates(model, t["prompt"], t["cands"], plan).argmax()))
    return sum(p == t["answer"] for p, t in zip(preds, toks)), preds


def max_shots_fit(enc, task, n, seed, block_size, hi):
    """Largest k in 0..hi whose prompts all fit the context (-1 if none). Demonstrations for k shots are a prefix of
    those for k+1 (data.primitives.make_task), so fitting is monotone in k: binary search."""
    def fits(k):
        return all(context_needed(tokenize_example(enc, e)) <= block_size for e in primitives.make_task(task, n, k, seed))
    lo, hi = -1, hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def prepare_task(enc, task, n, shots, seed, block_size):
    """make_task examples, tokenized, or ValueError saying how many shots fit (prompts are never cropped)."""
    exs = primitives.make_task(task, n, shots, seed)
    toks = [tokenize_example(enc, e) for e in exs]
    need = max(context_needed(t) for t in toks)
    if need > block_size:
        fit = max_shots_fit(enc, task, n, seed, block_size, shots - 1)
        hint = f"at most {fit} shots fit: pass --shots {fit}" if fit >= 0 else "not even 0 shots fit"
        raise ValueError(f"{task} with shots={shots} needs {need} tokens of context but the model's block_size is "
                         f"{block_size}; {hint} (for these n={n} examples, seed {seed})")
    return exs, toks


def query_text(prompt, shots):
    """The query part of a prompt (demonstrations are separated by blank lines; the header is the first line)."""
    return prompt.rsplit("\n\n", 1)[-1] if shots else prompt.split("\n", 1)[1]


def repeated_plan(base, start, size, repeats):
    """Inference-time looping over any base plan (PAPER §2.9): plan positions [start, start+size) run `repeats`
    more times. For a plain model this is loop.repeat_plan; for a looped one it repeats steps of its plan."""
    return [base[i] for i in loop.repeat_plan(len(base), start, size, repeats)]


# ---------------------------------------------------------------------------------------------------------------
# held-out NLL, math word problems, SFT

def bytes_per_token(enc):
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    return np.array([0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)])


@torch.no_grad()
def heldout_nll(model, tokens, n_windows, block, plan, nbytes, batch=8):
    """Mean NLL (nats/token) and bits per byte over n fixed windows spread evenly over a token file."""
    T = min(block, len(tokens) - 1)
    if T < 1:
        raise ValueError(f"token file has {len(tokens)} tokens; need at least 2")
    dev = model.embed_tokens.weight.device
    starts = np.unique(np.linspace(0, len(tokens) - T - 1, n_windows).astype(np.int64))
    tot, ntok, nb = 0.0, 0, 0
    for i in tqdm(range(0, len(starts), batch), desc="nll", leave=False):
        w = np.stack([np.asarray(tokens[s:s + T + 1], dtype=np.int64) for s in starts[i:i + batch]])
        x, y = torch.from_numpy(w[:, :-1]).to(dev), torch.from_numpy(w[:, 1:]).to(dev)
        with autocast(dev):
            logits, _ = model(x, plan=plan)
        tot += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        ntok, nb = ntok + y.numel(), nb + int(nbytes[w[:, 1:]].sum())
    return dict(nll=tot / ntok, bpb=tot / math.log(2) / max(nb, 1), tokens=ntok, windows=len(starts), window=T)


def math_items(task):
    """(question, answer text, gold) triples; ASDiv items with non-numeric answers are dropped."""
    if task == "gsm8k":  # strip the <<48/2=24>> calculator annotations from the gold chains of thought
        return [(d["question"], re.sub(r"<<[^>]*>>", "", d["answer"]), d["gold"]) for d in sources.load_gsm8k_test()
                if d["gold"] is not None]
    return [(f"{d['passage']} {d['question']}", d["answer"], d["gold"]) for d in sources.load_asdiv()
            if d["gold"] is not None]


def math_prompt(exemplars, question):
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a, _ in exemplars) + f"Question: {question}\nAnswer:"


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text):
    """Cut a generation at a blank line / the next "Question:", return its last number (None if there is none)."""
    for s in STOPS:
        text = text.split(s, 1)[0]
    nums = _NUM.findall(text)
    return float(nums[-1].replace(",", "")) if nums else None


def greedy_answer(model, enc, prompt_ids, max_new, plan, chunk=32):
    """Greedy decoding with model.generate's KV cache, in chunks so that it stops soon after a stop string."""
    dev = model.embed_tokens.weight.device
    x, out = torch.tensor([prompt_ids], device=dev), []
    while len(out) < max_new:
        with autocast(dev):
            y = model.generate(x, min(chunk, max_new - len(out)), temperature=0, plan=plan, use_cache=True)
        out, x = out + y[0, x.size(1):].tolist(), y
        if any(s in enc.decode(out) for s in STOPS):
            break
    return enc.decode(out)


def sft_finetune(model, enc, examples, plan, steps, batch, lr, seed):
    """Fine-tune in place on {"prompt", "answer"} pairs, loss on the answer tokens only -> list of losses. The plan
    keeps running the same modules, so a looped model stays tied (its unique parameters are all AdamW sees)."""
    dev = model.embed_tokens.weight.device
    seqs = [(enc.encode_ordinary(e["prompt"]), enc.encode_ordinary(e["answer"])) for e in examples]
    longest = max(len(p) + len(a) - 1 for p, a in seqs)
    if longest > model.config.block_size:
        raise ValueError(f"SFT example needs {longest} tokens, block_size is {model.config.block_size}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g, order, losses = torch.Generator().manual_seed(seed), [], []
    model.train()
    for _ in tqdm(range(steps), desc="sft", leave=False):
        while len(order) < min(batch, len(seqs)):  # epochs of shuffled examples
            order += torch.randperm(len(seqs), generator=g).tolist()
        rows, order = [seqs[i] for i in order[:batch]], order[batch:]
        T = max(len(p) + len(a) for p, a in rows) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: ignored by the loss (prompt and padding)
        for j, (p, a) in enumerate(rows):
            s = p + a
            x[j, :len(s) - 1] = torch.tensor(s[:-1])
            y[j, len(p) - 1:len(s) - 1] = torch.tensor(a)
        with autocast(dev):
            _, loss = model(x.to(dev), y.to(dev), plan=plan)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------------------
# results: resumable JSON, markdown, figures

class Store:
    """<out>/<mode>.json holding units {key: {"rows": [...], ...}}; written atomically after every unit."""

    def __init__(self, out, mode, force):
        self.path = Path(out) / f"{mode}.json"
        self.mode = mode
        self.units = {}
        if self.path.exists() and not force:
            self.units = json.loads(self.path.read_text())["units"]

    def rows(self):
        return [r for u in self.units.values() for r in u["rows"]]

    def add(self, key, unit):
        self.units[key] = unit
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"mode": self.mode, "units": self.units, "rows": self.rows()}, indent=1))
        os.replace(tmp, self.path)


def unit_key(ck, task, **settings):
    return f"{ck.path}|{task}|{ck.plan}|" + json.dumps(settings, sort_keys=True)


def run_unit(store, key, desc, fn):
    if key in store.units:
        print(f"skip {desc} (already in {store.path}; --force reruns)")
        return store.units[key]
    t0 = time.time()
    unit = fn()
    unit["seconds"] = round(time.time() - t0, 3)
    store.add(key, unit)
    vals = [f"{r['accuracy']:.3f}" if "accuracy" in r else f"nll {r['nll']:.4f} bpb {r['bpb']:.4f}" for r in unit["rows"]]
    print(f"{desc}: {' '.join(vals[:6])}{' ...' if len(vals) > 6 else ''}  ({unit['seconds']:.1f}s)")
    return unit


def short(path):
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def markdown(rows, keys, cell):
    """One line per setting (keys), one column per model; cell(rows of that setting and model) -> text."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    settings = list(dict.fromkeys(tuple(r.get(k) for k in keys) for r in rows))
    lines = ["| " + " | ".join(keys + models) + " |", "|" + "---|" * (len(keys) + len(models))]
    for s in settings:
        cells = [cell([r for r in rows if r["model"] == m and tuple(r.get(k) for k in keys) == s]) for m in models]
        lines.append("| " + " | ".join([str(v) for v in s] + cells) + " |")
    return "\n".join(lines)


def acc_cell(rs):
    return "" if not rs else f"{rs[0]['accuracy']:.3f} [{rs[0]['ci_low']:.2f}, {rs[0]['ci_high']:.2f}]"


def seeds_cell(rs):
    a = np.array([r["accuracy"] for r in rs])
    return "" if not rs else f"{a.mean():.3f} ± {a.std():.3f} ({len(a)})"


def best_over_s(rs):
    if not rs:
        return ""
    b = max(rs, key=lambda r: r["accuracy"])
    return f"{b['accuracy']:.3f}" + ("" if b["start"] is None else f" @s={b['start']}")


def figures(mode, rows, units, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out)
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    slug = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s)
    if mode in ("primitives", "math"):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 4))
        w = 0.8 / len(models)
        for j, m in enumerate(models):
            rs = [next((r for r in rows if r["model"] == m and r["task"] == t), None) for t in tasks]
            acc = [r["accuracy"] if r else np.nan for r in rs]
            err = [[r["accuracy"] - r["ci_low"] if r else 0 for r in rs], [r["ci_high"] - r["accuracy"] if r else 0 for r in rs]]
            ax.bar(np.arange(len(tasks)) + j * w, acc, w, yerr=err, label=m, capsize=2)
        for i, t in enumerate(tasks):
            ch = next((r.get("chance") for r in rows if r["task"] == t), None)
            if ch:
                ax.hlines(ch, i - w / 2, i - w / 2 + 0.8, colors="k", linestyles=":")
        ax.set_xticks(np.arange(len(tasks)) + 0.4 - w / 2, tasks, rotation=30, ha="right")
        ax.set_ylabel("accuracy (95% CI; dotted: chance)"), ax.legend(fontsize=7)
        fig.tight_layout(), fig.savefig(out / f"{mode}.png", dpi=120), plt.close(fig)
    elif mode in ("shots", "sft"):
        x = "shots" if mode == "shots" else "n_train"
        panels = list(dict.fromkeys((r["task"], r["shots"]) for r in rows))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
        for ax, (t, k) in zip(axes[0], panels):
            for m in models:
                rs = [r for r in rows if r["model"] == m and r["task"] == t and (mode == "shots" or r["shots"] == k)]
                xs = sorted({r[x] for r in rs})
                acc = [[r["accuracy"] for r in rs if r[x] == v] for v in xs]
                ax.errorbar(xs, [np.mean(a) for a in acc], yerr=[np.std(a) for a in acc], marker="o", label=m, capsize=2)
            ax.axhline(primitives.chance(t), color="k", ls=":")
            ax.set_title(t if mode == "shots" else f"{t}, {k}-shot"), ax.set_xlabel(x), ax.set_ylabel("accuracy")
            if mode == "sft":
                ax.set_xscale("symlog", base=2)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout(), fig.savefig(out / f"{mode}.png", dpi=120), plt.close(fig)
    elif mode == "loopsweep":
        for u in (u for u in units.values() if len(u["starts"]) > 1):  # single-start units are curves (below)
            g = np.array(u["grid"])  # (r, s)
            fig, ax = plt.subplots(figsize=(1 + 0.5 * g.shape[1], 3))
            im = ax.imshow(g, origin="lower", aspect="auto", cmap="viridis",
                           extent=(u["starts"][0] - .5, u["starts"][-1] + .5, .5, g.shape[0] + .5))
            for (r, i), v in np.ndenumerate(g):
                ax.text(u["starts"][i], r + 1, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="k" if v > (g.min() + g.max()) / 2 else "w")
            b = u["best"]
            ax.plot(b["start"], b["repeats"], marker="*", color="red", ms=14, alpha=0.6)
            ax.set_xlabel(f"block start s (block {u['block']})"), ax.set_ylabel("extra repetitions r")
            ax.set_title(f"{u['model']} {u['task']}: original {u['original']:.3f}, best {b['accuracy']:.3f}", fontsize=8)
            fig.colorbar(im, ax=ax), fig.tight_layout()
            fig.savefig(out / f"loopsweep_{slug(u['model'])}_{u['task']}.png", dpi=120), plt.close(fig)
        curves = [u for u in units.values() if len(u["starts"]) == 1]
        for t in dict.fromkeys(u["task"] for u in curves):  # PAPER Fig. 9: accuracy vs extra repetitions
            fig, ax = plt.subplots(figsize=(4, 3))
            for u in (u for u in curves if u["task"] == t):
                ax.plot(range(len(u["grid"]) + 1), [u["original"]] + [c[0] for c in u["grid"]], marker="o",
                        label=f"{u['model']} s={u['starts'][0]}")
            ax.set_xlabel("extra repetitions"), ax.set_ylabel("accuracy"), ax.set_title(t), ax.legend(fontsize=7)
            fig.tight_layout(), fig.savefig(out / f"loopcurve_{t}.png", dpi=120), plt.close(fig)


def report(mode, store, out):
    rows = store.rows()
    if not rows:
        return
    tables = {"primitives": (["task", "shots"], acc_cell), "shots": (["task", "shots"], acc_cell),
              "math": (["task", "shots"], acc_cell), "loopsweep": (["task", "block", "repeats"], best_over_s),
              "sft": (["task", "shots", "n_train"], seeds_cell),
              "nll": (["task"], lambda rs: f"{rs[0]['nll']:.4f} / {rs[0]['bpb']:.4f}" if rs else "")}
    keys, cell = tables[mode]
    note = {"nll": "cells: NLL (nats/token) / bits per byte", "loopsweep": "cells: best accuracy over block starts s "
            "(repeats 0 = original model)", "sft": "cells: mean ± std over seeds (number of seeds); n_train 0 = "
            "before fine-tuning"}.get(mode, "cells: accuracy [95% Wilson interval]")
    (Path(out) / f"{mode}.md").write_text(f"# eval {mode}\n\n{note}\n\n{markdown(rows, keys, cell)}\n")
    figures(mode, rows, store.units, out)


# ---------------------------------------------------------------------------------------------------------------
# modes: each runs the units of one checkpoint

def run_primitives(ck, args, store, tasks):
    for task in tasks:
        for k in args.shots:
            def unit(task=task, k=k):
                _, toks = prepare_task(ck.enc, task, args.n, k, args.seed, ck.block)
                t0 = time.time()
                correct, _ = score_task(ck.model, toks, ck.plan, f"{task} {k}-shot")
                return {"rows": [acc_row(correct, len(toks), **ck.row(task), shots=k, chance=primitives.chance(task))],
                        "ex_per_s": len(toks) / (time.time() - t0)}
            run_unit(store, unit_key(ck, task, shots=k, n=args.n, seed=args.seed), f"{ck.label} {task} {k}-shot", unit)


def shots_examples(enc, task, n, ks, seed, block_size):
    """{k: tokenized examples} for the in-context sweep; make_task keeps query i fixed for every k."""
    return {k: prepare_task(enc, task, n, k, seed, block_size) for k in ks}


def run_shots(ck, args, store, tasks):
    for task in tasks:
        ks = args.shots
        if ks is None:  # 1..max that fits, thinned geometrically past 8
            top = max_shots_fit(ck.enc, task, args.n, args.seed, ck.block, args.max_shots)
            if top < 1:
                raise ValueError(f"{task}: not even 1 shot fits block_size={ck.block}")
            ks = sorted({k for k in range(1, top + 1) if k <= 8 or k == top or (k & (k - 1)) == 0 or k % 8 == 0})

        def unit(task=task, ks=tuple(ks)):
            rows = []
            for k, (exs, toks) in shots_examples(ck.enc, task, args.n, ks, args.seed, ck.block).items():
                correct, _ = score_task(ck.model, toks, ck.plan, f"{task} {k}-shot")
                qid = hash_queries(exs, k)
                rows.append(acc_row(correct, len(toks), **ck.row(task), shots=k, chance=primitives.chance(task), queries=qid))
            return {"rows": rows}
        run_unit(store, unit_key(ck, task, shots=list(ks), n=args.n, seed=args.seed), f"{ck.label} {task} shots", unit)


def hash_queries(exs, k):
    text = "\x00".join(query_text(e["prompt"], k) + repr(e["candidates"]) + str(e["answer"]) for e in exs)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def run_loopsweep(ck, args, store, tasks):
    L = len(ck.plan)
    b = args.block or int(ck.ckpt.get("grow_block", 0)) or (4 if L >= 12 else 2)
    repeated_plan(ck.plan, args.block_start or 0, b, 1)  # raises if the block runs past the last plan step
    starts = [args.block_start] if args.block_start is not None else list(range(L - b + 1))
    for task, k in ((t, k) for t in tasks for k in args.shots):
        def unit(task=task, k=k):
            _, toks = prepare_task(ck.enc, task, args.n, k, args.seed, ck.block)
            ch = primitives.chance(task)
            orig, _ = score_task(ck.model, toks, ck.plan, f"{task} original")
            rows = [acc_row(orig, len(toks), **ck.row(task), shots=k, chance=ch, block=b, start=None, repeats=0)]
            for r in range(1, args.max_repeats + 1):
                for s in starts:
                    plan = repeated_plan(ck.plan, s, b, r)
                    c, _ = score_task(ck.model, toks, plan, f"{task} s={s} r={r}")
                    rows.append(acc_row(c, len(toks), **dict(ck.row(task), plan=loop.describe(plan)), shots=k,
                                        chance=ch, block=b, start=s, repeats=r))
            grid = [[rows[1 + (r - 1) * len(starts) + i]["accuracy"] for i in range(len(starts))]
                    for r in range(1, args.max_repeats + 1)]
            best = max(rows[1:], key=lambda x: x["accuracy"])
            return {"rows": rows, "grid": grid, "starts": starts, "block": b, "original": rows[0]["accuracy"],
                    "best": {"start": best["start"], "repeats": best["repeats"], "accuracy": best["accuracy"]},
                    "model": ck.label, "task": task}
        run_unit(store, unit_key(ck, task, shots=k, n=args.n, seed=args.seed, block=b, starts=starts,
                                 max_repeats=args.max_repeats), f"{ck.label} {task} loopsweep", unit)


def run_sft(ck, args, store, tasks):
    prepared = {(t, k): prepare_task(ck.enc, t, args.n, k, args.seed, ck.block)[1] for t in tasks for k in args.shots}
    label = ck.label + (" untied" if args.untie else "")

    def evaluate(model, plan, **kw):
        return [acc_row(score_task(model, toks, plan, f"{t} {k}-shot")[0], len(toks), **dict(ck.row(t), model=label),
                        shots=k, chance=primitives.chance(t), untie=args.untie, **kw) for (t, k), toks in prepared.items()]
    run_unit(store, unit_key(ck, "sft", n_train=0, n=args.n, seed=args.seed, shots=args.shots, tasks=tasks,
                             untie=args.untie), f"{label} before SFT",
             lambda: {"rows": evaluate(ck.model, ck.plan, n_train=0, sft_seed=None)})
    for n_train in args.sft_sizes:
        for seed in args.seeds:
            def unit(n_train=n_train, seed=seed):
                model, plan, losses = finetune_copy(ck.model, ck.plan, ck.enc, n_train, seed, args)
                return {"rows": evaluate(model, plan, n_train=n_train, sft_seed=seed), "losses": losses}
            key = unit_key(ck, "sft", n_train=n_train, sft_seed=seed, n=args.n, seed=args.seed, shots=args.shots,
                           tasks=tasks, untie=args.untie, lr=args.sft_lr, batch=args.sft_batch,
                           epochs=args.sft_epochs, steps=args.sft_steps)
            run_unit(store, key, f"{label} SFT n={n_train} seed={seed}", unit)


def finetune_copy(model, plan, enc, n_train, seed, args):
    """-> (fine-tuned copy, the plan to run it with, losses); the checkpoint's model is left untouched. --untie
    materializes the plan into unique layers first (PAPER §2.10 untying ablation)."""
    if args.untie:
        model, plan = model.materialize(plan), None
    else:
        model = copy.deepcopy(model)
    plan = model.plan if plan is None else plan
    torch.manual_seed(seed)
    exs = primitives.sft_examples(n_train, depths=(1, 2), form="code", seed=seed)
    steps = args.sft_steps or math.ceil(args.sft_epochs * n_train / args.sft_batch)
    return model, plan, sft_finetune(model, enc, exs, plan, steps, args.sft_batch, args.sft_lr, seed)


def run_nll(ck, args, store, tasks):
    tok = ck.ckpt.get("tokenizer", "byte")
    if tasks is None:  # --tasks all: every source prepared for this tokenizer
        tasks = [s for s in sources.source_names() if (Path(args.data_dir) / tok / s / "val.bin").exists()]
        if not tasks:
            raise FileNotFoundError(f"no prepared validation files under {Path(args.data_dir) / tok}; make them with: "
                                    f"python -m data.prepare --tokenizer {tok} --sources primitives,sotu,wiki,math "
                                    f"--out {args.data_dir}")
    nbytes = bytes_per_token(ck.enc)
    for src in tasks:
        path = Path(args.data_dir) / tok / src / "val.bin"

        def unit(src=src, path=path):
            if not path.exists():
                raise FileNotFoundError(f"validation file {path} does not exist; {rebuild_hint(path)}")
            res = heldout_nll(ck.model, open_tokens(path, tokenizer=tok), args.n, ck.block, ck.plan, nbytes)
            return {"rows": [dict(ck.row(src), **res)]}
        run_unit(store, unit_key(ck, src, n=args.n, data=str(path)), f"{ck.label} nll {src}", unit)


def run_math(ck, args, store, tasks):
    for task in tasks:
        for k in args.shots:
            if not 0 <= k <= MATH_POOL:
                raise ValueError(f"math shots={k}: exemplars come from the first {MATH_POOL} items, use 0..{MATH_POOL}")

            def unit(task=task, k=k):
                items = math_items(task)
                pool, scored = items[:MATH_POOL], items[MATH_POOL:][:args.limit]
                gen = args.max_new or MATH_MAX_NEW[task]
                ids = [ck.enc.encode_ordinary(math_prompt(pool[:k], q)) for q, _, _ in scored]
                worst = max(len(i) for i in ids) + gen
                if worst > ck.block:
                    fit = max((j for j in range(k) if all(len(ck.enc.encode_ordinary(math_prompt(pool[:j], q))) + gen
                                                         <= ck.block for q, _, _ in scored)), default=-1)
                    raise ValueError(f"{task} {k}-shot: prompt + --max_new {gen} needs {worst} tokens but block_size is "
                                     f"{ck.block}; at most {fit} shots fit (or lower --max_new / --limit)")
                correct, samples = 0, []
                for (q, _, gold), p in zip(tqdm(scored, desc=f"{task} {k}-shot", leave=False), ids):
                    text = greedy_answer(ck.model, ck.enc, p, gen, ck.plan)
                    pred = extract_answer(text)
                    correct += pred is not None and abs(pred - gold) < 1e-6
                    samples.append({"question": q[:200], "generation": text, "pred": pred, "gold": gold})
                return {"rows": [acc_row(correct, len(scored), **ck.row(task), shots=k, max_new=gen)],
                        "samples": samples[:20]}
            run_unit(store, unit_key(ck, task, shots=k, limit=args.limit, max_new=args.max_new),
                     f"{ck.label} {task} {k}-shot", unit)


RUNNERS = {"primitives": run_primitives, "shots": run_shots, "loopsweep": run_loopsweep, "sft": run_sft,
           "nll": run_nll, "math": run_math}


class Ckpt:
    """A loaded checkpoint: model (eval mode), tokenizer, plan to evaluate, context length, row fields."""

    def __init__(self, path, plan_spec, device):
        self.path, self.label = os.path.normpath(path), short(path) + (f" [{plan_spec}]" if plan_spec else "")
        self.model, self.ckpt = load_checkpoint(path, device)
        self.model.eval()
        self.enc = get_tokenizer(self.ckpt.get("tokenizer", "byte"))
        if self.enc.n_vocab > self.model.config.vocab_size:
            raise ValueError(f"{path}: tokenizer {self.enc.name!r} has {self.enc.n_vocab} tokens but the model's "
                             f"vocab_size is {self.model.config.vocab_size}")
        self.plan = self.model.plan if not plan_spec else loop.plan_from_spec(plan_spec, self.model.config.n_layer)
        self.block = self.model.config.block_size

    def row(self, task):
        return {"ckpt": self.path, "model": self.label, "task": task, "plan": loop.describe(self.plan)}


def resolve_tasks(mode, spec):
    valid = {"primitives": primitives.TASKS, "shots": primitives.TASKS, "loopsweep": primitives.TASKS,
             "sft": primitives.TASKS, "math": MATH_TASKS, "nll": tuple(sources.source_names())}[mode]
    if spec in (None, ""):
        spec = {"sft": ",".join(SFT_TASKS), "math": ",".join(MATH_TASKS)}.get(mode, "all")
    if spec == "all":
        return None if mode == "nll" else list(valid)
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in tasks if t not in valid]
    if bad or not tasks:
        raise ValueError(f"unknown task(s) {bad or spec!r} for mode {mode}; valid tasks: {', '.join(valid)} (or 'all')")
    return tasks


def ints(s, flag):
    try:
        return [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {s!r}: expected an integer or a comma list of integers, e.g. 1,2,4") from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ckpt", action="append", required=True, help="checkpoint path; repeat for side-by-side columns")
    ap.add_argument("--mode", required=True, choices=MODES)
    ap.add_argument("--tasks", default=None, help="comma list or 'all' (default: all; sft: va_code_d1,va_code_d2; "
                                                  "math: gsm8k,asdiv; nll: every prepared source)")
    ap.add_argument("--shots", default=None, help="shots, or a comma list (default: 5; sft 0; shots mode: 1..max "
                                                  "that fits, up to --max_shots)")
    ap.add_argument("--max_shots", type=int, default=64, help="upper end of the default shots sweep")
    ap.add_argument("--n", type=int, default=200, help="evaluation examples per task (nll: windows per source)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the evaluation examples")
    ap.add_argument("--out", default="out/eval", help="output folder for <mode>.json/.md/.png")
    ap.add_argument("--plan", default=None, help="evaluate under this plan: 'loop(4x3)', 'repeat(s,b,r)', '0,1,1,2' "
                                                 "(default: the checkpoint's own plan)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--force", action="store_true", help="recompute units already in the JSON")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is fastest for "
                                                          "tiny models on a busy machine")
    ap.add_argument("--data_dir", default="data/prepared", help="nll: folder of prepared <tok>/<source>/val.bin")
    ap.add_argument("--limit", type=int, default=None, help="math: score only the first N items (after the exemplars)")
    ap.add_argument("--max_new", type=int, default=None, help="math: tokens to generate (default gsm8k 256, asdiv 32)")
    ap.add_argument("--block", type=int, default=None, help="loopsweep block size (default: checkpoint's grow_block, "
                                                            "else 4 for >= 12 plan steps, else 2)")
    ap.add_argument("--block_start", type=int, default=None, help="loopsweep: only this block start (Fig. 9 curve)")
    ap.add_argument("--max_repeats", type=int, default=4, help="loopsweep: r = 1..max_repeats")
    ap.add_argument("--sft_sizes", default="64,128,256,512", help="sft: training set sizes")
    ap.add_argument("--seeds", default="0,1,2", help="sft: fine-tuning seeds")
    ap.add_argument("--sft_lr", type=float, default=3e-4)
    ap.add_argument("--sft_batch", type=int, default=16)
    ap.add_argument("--sft_epochs", type=float, default=10, help="passes over the n examples (steps = epochs*n/batch)")
    ap.add_argument("--sft_steps", type=int, default=0, help="fixed number of steps instead of --sft_epochs")
    ap.add_argument("--untie", action="store_true", help="sft: materialize the plan (untie a looped model) first")
    args = ap.parse_args(argv)
    shots = args.shots if args.shots is not None else {"sft": "0", "shots": None}.get(args.mode, "5")
    args.shots = None if shots is None else ints(shots, "--shots")  # None: the shots mode sweeps 1..max that fits
    args.sft_sizes, args.seeds = ints(args.sft_sizes, "--sft_sizes"), ints(args.seeds, "--seeds")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit={args.limit} must be >= 1 (or leave it out to score every item)")
    for name in ("n", "sft_batch", "max_repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be >= 1")
    if args.shots is not None and (not args.shots or min(args.shots) < 0):
        raise ValueError(f"--shots {args.shots}: shots must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = resolve_tasks(args.mode, args.tasks)  # fail on a bad task name before loading anything
    store = Store(args.out, args.mode, args.force)
    for path in args.ckpt:
        ck = Ckpt(path, args.plan, torch.device(args.device))
        RUNNERS[args.mode](ck, args, store, tasks)
        report(args.mode, store, args.out)
    return store


if __name__ == "__main__":
    main()
