"""
The main job: one command trains, evaluates and probes the paper's arms on the same data, tokens and LR schedule,
then writes out/<preset>/REPORT.md with tables, figures and a verdict per finding (PAPER §7).

    python reproduce.py quick              # CPU smoke scale, 1 seed, <= ~30 min on 2 cores
    python reproduce.py tiny               # the CPU replication proper: 3 seeds, a few hours
    python reproduce.py micro              # seconds per stage (the test suite runs this)
    python reproduce.py quick --dry_run    # print the stages and their commands, run nothing

Every stage is a shell command over the flat scripts (data.prepare, train.py, eval.py, probe.py, report.py); a stage
that finished is recorded in out/<preset>/stages.json with its command and skipped next time, a stage that was
interrupted resumes (train.py --resume, eval.py and probe.py skip their finished units). A stage recorded with a
different command (another config in the same folder) is refused: use another --out or --redo.

The arms (PAPER §7.1): baseline L layers; MIDAS and LIDAS grown to L (PROP-1); Loop(b×L/b); Loop(e-b×k-d) of the same
effective depth; iso-parameter standard models for the two looped arms; math-heavy cooldown branches of the
baseline and LIDAS (§2.11), each also with a middle block retrofitted to run twice (§2.12).
GPU presets are configs in config/ that a user runs with train.py / torchrun; see README.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
PY = sys.executable

# Model shape, schedule and evaluation sizes per preset. L = depth, b = growth / loop block size.
PRESETS = {
    "micro": dict(
        note="test-suite scale: seconds per stage; numbers are meaningless",
        seeds=[0], L=4, b=2, mid="loop(1-1x2-1)", primitives_docs=400,
        train=dict(n_embd=32, n_head=2, n_kv_head=2, mlp_hidden=64, block_size=320, max_steps=12,
                   batch_tokens=1280, micro_batch=4, lr=3e-3, warmup_steps=2, eval_interval=6, ckpt_interval=6,
                   val_batches=1, dtype="float32"),
        n=8, shots=1, tasks="copy_random,va_basic_d0", sweep_tasks="va_basic_d0", sweep_n=6, shots_list="1,2",
        probe_tasks="va_basic_d0", threads=1, sft_sizes="8", sft_seeds="0", sft_steps=2, probe_n=3, lens_steps=5,
        probes="all", nll_windows=4),
    "quick": dict(
        note="smoke scale: one seed, ~0.8M training tokens per arm, 512-byte context (the 5-shot tasks that fit); "
             "read the verdicts as a demonstration of the pipeline, not as evidence",
        seeds=[0], L=8, b=2, mid="loop(2-2x2-2)", primitives_docs=100000,
        train=dict(n_embd=128, n_head=4, n_kv_head=4, mlp_hidden=384, block_size=512, max_steps=48,
                   batch_tokens=16384, micro_batch=8, lr=3e-3, warmup_steps=6, eval_interval=24, ckpt_interval=8,
                   val_batches=2),
        n=100, shots=5, tasks="copy_random,va_basic_d0,va_basic_d1,va_basic_d2,va_math_d0",
        sweep_tasks="copy_random", sweep_n=40, shots_list="1,2,3,5", probe_tasks="va_math_d0,copy_random",
        threads=2, sft_sizes="64", sft_seeds="0", sft_steps=0, probe_n=8, lens_steps=100, probes="all",
        nll_windows=32),
    "tiny": dict(
        note="CPU replication: three seeds, ~3.9M training tokens per arm, 1024-byte context (every 5-shot task fits)",
        seeds=[0, 1, 2], L=8, b=2, mid="loop(2-2x2-2)", primitives_docs=100000,
        train=dict(n_embd=128, n_head=4, n_kv_head=4, mlp_hidden=384, block_size=1024, max_steps=240,
                   batch_tokens=16384, micro_batch=8, lr=3e-3, warmup_steps=20, eval_interval=60, ckpt_interval=20,
                   val_batches=4),
        n=100, shots=5, tasks="all", sweep_tasks="copy_real,va_basic_d0", sweep_n=60, shots_list="1,2,4,8",
        probe_tasks="va_math_d0,copy_real", threads=2, sft_sizes="64,128,256,512", sft_seeds="0", sft_steps=0,
        probe_n=16, lens_steps=200, probes="all", nll_windows=64),
}
# the pretraining mixture mirrors the paper's proportions in spirit (PAPER §2.2: 6% math); the math-heavy cooldown
# raises the math share to 20% (§2.11)
MIXTURE = {"primitives": 0.25, "sotu": 0.35, "wiki": 0.34, "math": 0.06}
MATH_SHARE = 0.2


def math_cooldown(mix, share):
    """Raise the math share to `share` and rescale the rest (PAPER §2.11: 6% -> 20%; the composition of the
    non-math 80% is not given, so we keep the other sources' proportions)."""
    rest = {k: v for k, v in mix.items() if k != "math"}
    tot = sum(rest.values())
    return {"math": share, **{k: (1 - share) * v / tot for k, v in rest.items()}}


def middle_block(L, b):
    """The block retrofitted to loop (PAPER §6.5): the middle block, or the one just below mid-depth."""
    return b * ((L // b - 1) // 2)


def arms(p):
    """name -> train.py overrides. Every arm shares the seed, data order, tokens and LR schedule."""
    from loop import parse_spec
    L, b = p["L"], p["b"]
    e, Lm, k, d = parse_spec(p["mid"])
    s = middle_block(L, b)
    cool = math_cooldown(MIXTURE, MATH_SHARE)
    return {
        "base": {"n_layer": L},
        "midas": {"n_layer": L, "grow": "midas", "grow_block": b},
        "lidas": {"n_layer": L, "grow": "lidas", "grow_block": b},
        "loop_full": {"n_layer": b, "plan": f"loop({b}x{L // b})"},
        "loop_mid": {"n_layer": e + Lm + d, "plan": p["mid"]},
        "std_b": {"n_layer": b},                       # iso-parameter with loop_full
        "std_mid": {"n_layer": e + Lm + d},            # iso-parameter with loop_mid
        # cooldown branches from the pre-cooldown milestone (PAPER §2.11, §2.12)
        "base_math": {"n_layer": L, "init_from": "base", "cooldown_mixture": cool},
        "lidas_math": {"n_layer": L, "grow": "lidas", "grow_block": b, "init_from": "lidas", "cooldown_mixture": cool},
        "base_math_loop": {"n_layer": L, "init_from": "base", "cooldown_mixture": cool,
                           "cooldown_plan": f"repeat({s},{b},1)"},
        "lidas_math_loop": {"n_layer": L, "grow": "lidas", "grow_block": b, "init_from": "lidas",
                            "cooldown_mixture": cool, "cooldown_plan": f"repeat({s},{b},1)"},
    }


def kv(d):
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            v = ",".join(f"{a}:{w:.6g}" for a, w in v.items())
        out.append(f"--{k}={v}")
    return out


def stages(preset, p, out, data_dir):
    """The ordered list of (name, command, done_file); a stage is done when done_file exists."""
    st = []
    srcs = ",".join(MIXTURE)
    st.append(("prepare", [PY, "-m", "data.prepare", "--tokenizer", "byte", "--sources", srcs, "--out", data_dir,
                           "--primitives_docs", str(p["primitives_docs"])], None))
    L, b = p["L"], p["b"]
    A = arms(p)
    for seed in p["seeds"]:
        run = out / f"seed{seed}"
        ck = lambda a: str(run / a / "ckpt.pt")  # noqa: E731
        for name, ov in A.items():
            ov = dict(ov)
            if "init_from" in ov:
                ov["init_from"] = str(run / ov["init_from"] / "ckpt_cooldown.pt")
            cfg = {**p["train"], **ov, "seed": seed, "data_dir": data_dir, "mixture": MIXTURE,
                   "out_dir": str(run / name)}
            st.append((f"train/{seed}/{name}", [PY, "train.py"] + kv(cfg), run / name / "summary.json"))
        ev = run / "eval"
        all_ck = [x for a in A for x in ("--ckpt", ck(a))]
        st.append((f"eval/{seed}/primitives", [PY, "eval.py", *all_ck, "--mode", "primitives", "--tasks", p["tasks"],
                                               "--shots", str(p["shots"]), "--n", str(p["n"]), "--out", str(ev)], None))
        st.append((f"eval/{seed}/nll", [PY, "eval.py", *all_ck, "--mode", "nll", "--data_dir", data_dir,
                                        "--n", str(p["nll_windows"]), "--out", str(ev)], None))
        grown = [x for a in ("base", "midas", "lidas") for x in ("--ckpt", ck(a))]
        st.append((f"eval/{seed}/loopsweep", [PY, "eval.py", *grown, "--mode", "loopsweep", "--tasks",
                                              p["sweep_tasks"], "--block", str(b), "--shots", str(p["shots"]),
                                              "--n", str(p["sweep_n"]), "--out", str(ev / "sweep")], None))
        retro = [x for a in ("base_math", "base_math_loop", "lidas_math", "lidas_math_loop") for x in ("--ckpt", ck(a))]
        st.append((f"eval/{seed}/retro", [PY, "eval.py", *retro, "--mode", "loopsweep", "--tasks", p["sweep_tasks"],
                                          "--block", str(b), "--block_start", str(middle_block(L, b)), "--shots",
                                          str(p["shots"]), "--n", str(p["sweep_n"]), "--out", str(ev / "retro")], None))
        adapt = [x for a in ("base", "midas", "lidas", "loop_full", "loop_mid") for x in ("--ckpt", ck(a))]
        st.append((f"eval/{seed}/shots", [PY, "eval.py", *adapt, "--mode", "shots", "--tasks", p["sweep_tasks"],
                                          "--shots", p["shots_list"], "--n", str(p["sweep_n"]), "--out", str(ev)], None))
        sft = ["--sft_sizes", p["sft_sizes"], "--seeds", p["sft_seeds"], "--n", str(p["n"])]
        if p["sft_steps"]:
            sft += ["--sft_steps", str(p["sft_steps"])]
        st.append((f"eval/{seed}/sft", [PY, "eval.py", *adapt, "--mode", "sft", "--out", str(ev)] + sft, None))
        st.append((f"eval/{seed}/sft_untied", [PY, "eval.py", "--ckpt", ck("loop_mid"), "--ckpt", ck("loop_full"),
                                               "--mode", "sft", "--untie", "--out", str(ev / "untied")] + sft, None))
        st.append((f"probe/{seed}", [PY, "probe.py", *adapt, "--probes", p["probes"], "--block", str(b),
                                     "--n_prompts", str(p["probe_n"]), "--lens_steps", str(p["lens_steps"]),
                                     "--tasks", p["probe_tasks"], "--shots", str(p["shots"]),
                                     "--data_dir", data_dir, "--out", str(run / "probe")], None))
    st.append(("report", [PY, "report.py", "--preset", preset, "--out", str(out)], out / "REPORT.md"))
    return st


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--out", help="output folder (default out/<preset>)")
    ap.add_argument("--data_dir", default="data/prepared", help="prepared token files")
    ap.add_argument("--dry_run", action="store_true", help="print the stages, run nothing")
    ap.add_argument("--redo", default="", help="comma list of stage-name prefixes to run again, e.g. 'report,eval'")
    ap.add_argument("--only", default="", help="comma list of stage-name prefixes to run (others are skipped)")
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)} "
                         f"(GPU shapes are configs: python train.py config/gpt2_125m.py)")
    p = PRESETS[args.preset]
    out = Path(args.out or f"out/{args.preset}")
    os.chdir(ROOT)
    plan = stages(args.preset, p, out, args.data_dir)
    if args.dry_run:
        for name, cmd, _ in plan:
            print(f"{name:28s} {shlex.join(map(str, cmd))}")
        return
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "stages.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    redo = [r for r in args.redo.split(",") if r]
    only = [r for r in args.only.split(",") if r]
    (out / "logs").mkdir(exist_ok=True)
    bar = tqdm(plan, desc=f"reproduce {args.preset}", unit="stage", dynamic_ncols=True)
    for name, cmd, done_file in bar:
        cmd = [str(c) for c in cmd]
        if only and not any(name.startswith(o) for o in only):
            continue
        again = any(name.startswith(r) for r in redo)
        prev = record.get(name)
        if prev and prev["cmd"] != cmd and not again:
            raise SystemExit(f"error: stage {name!r} in {out} was run with another command:\n  was: "
                             f"{shlex.join(prev['cmd'])}\n  now: {shlex.join(cmd)}\nrefusing to mix results; use "
                             f"another --out, or --redo={name} to run it again")
        if prev and prev.get("done") and not again:
            continue
        if again and name.startswith("train/"):
            raise SystemExit(f"error: --redo of a training stage ({name}) would overwrite its run; delete "
                             f"{Path(cmd[-1].split('=', 1)[1])} yourself first if that is what you want")
        if name.startswith("train/"):
            run_dir = Path([c for c in cmd if c.startswith("--out_dir=")][0].split("=", 1)[1])
            if (run_dir / "ckpt.pt").exists():
                cmd = cmd + ["--resume=True"]   # an interrupted run continues exactly
        if again and not name.startswith("train/"):
            cmd = cmd + (["--force"] if name.startswith(("eval", "probe")) else [])
        bar.set_postfix_str(name)
        t0 = time.time()
        log = out / "logs" / (name.replace("/", "_") + ".log")
        record[name] = {"cmd": [c for c in cmd if c not in ("--resume=True", "--force")], "done": False}
        record_path.write_text(json.dumps(record, indent=1))
        with open(log, "a") as f:
            f.write(f"\n$ {shlex.join(cmd)}\n")
            f.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(p["threads"])}
            res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if res.returncode != 0:
            tail = "".join(log.read_text().splitlines(True)[-15:])
            raise SystemExit(f"error: stage {name} failed (exit {res.returncode}); log {log}:\n{tail}\n"
                             f"rerun the same command to resume from here")
        record[name].update(done=True, seconds=round(time.time() - t0, 1), finished=time.strftime("%Y-%m-%d %H:%M"))
        record_path.write_text(json.dumps(record, indent=1))
    print(f"report: {out / 'REPORT.md'}")


if __name__ == "__main__":
    main()
