"""train.py: schedule, config errors, end-to-end, exact resume (plain, looped, grown), cooldown branching, NaN stop,
2-process DDP == 1 process, and clear errors on bad inputs. Every run is config/micro.py on tiny token files."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from data.store import write_tokens
from data.primitives import training_documents

ROOT = Path(__file__).resolve().parent.parent
MICRO = str(ROOT / "config" / "micro.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Byte-tokenized 'primitives' (synthetic primitives documents) and 'sotu' (this repo's prose and code)."""
    root = tmp_path_factory.mktemp("prepared")
    prose = "\n".join((ROOT / f).read_text() for f in ("model.py", "loop.py", "README.md") if (ROOT / f).exists())
    texts = {"primitives": "\n".join(training_documents(300, seed=0)),
             "sotu": prose}
    for name, text in texts.items():
        ids = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16)
        cut = int(len(ids) * 0.9)
        for split, part in (("train", ids[:cut]), ("val", ids[cut:])):
            meta = {"tokenizer": "byte", "source": name, "split": split}
            write_tokens(root / "byte" / name / f"{split}.bin", part, meta)
    return str(root)


def go(data_dir, out, **kw):
    # CPU even where a GPU exists: the bitwise-resume guarantee is a CPU one (CUDA kernels may use atomics)
    return train.run({"data_dir": data_dir, "out_dir": str(out), "device": "cpu", **kw}, MICRO)


def log(out, event="train"):
    return [e for e in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines()) if e["event"] == event]


def losses(out):
    return [(e["step"], e["loss"]) for e in log(out)]


# ---------------------------------------------------------------- schedule and config

def test_lr_schedule_boundaries():
    cfg = dict(train.DEFAULTS, lr=1.0, max_steps=100, warmup_steps=10, cooldown_frac=0.2)
    lr = [train.get_lr(s, cfg) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0 and lr[10] == 1.0      # warmup ends at full lr
    assert train.cooldown_start(cfg) == 80 and lr[79] == 1.0 and lr[80] == 1.0  # constant until the cooldown
    assert lr[81] == pytest.approx(1 - math.sqrt(1 / 20))                       # 1-sqrt decay
    assert lr[99] == pytest.approx(1 - math.sqrt(19 / 20)) and lr[99] > 0
    assert all(a > b for a, b in zip(lr[80:], lr[81:]))                         # strictly decreasing cooldown
    assert all(a < b for a, b in zip(lr[:9], lr[1:10]))


def test_config_errors_and_parsing(tmp_path):
    with pytest.raises(ValueError, match="n_layer"):             # unknown key names the closest valid ones
        train.make_config(overrides={"n_layr": 4})
    with pytest.raises(ValueError, match="lr.*float"):
        train.make_config(overrides={"lr": "fast"})
    with pytest.raises(ValueError, match="max_steps.*int"):
        train.make_config(*train.parse_argv(["--max_steps=1e3"]))
    bad = tmp_path / "bad.py"
    bad.write_text("n_embed = 64\n")
    with pytest.raises(ValueError, match="n_embd"):
        train.make_config(str(bad))
    f, o = train.parse_argv([MICRO, "--plan=0,1,1,2", "--mixture=sotu:0.5,math:0.5", "--val_sources=sotu,math",
                             "--resume", "--lr=1e-3"])
    cfg = train.make_config(f, o)
    assert cfg["plan"] == "0,1,1,2" and cfg["mixture"] == {"sotu": 0.5, "math": 0.5}
    assert cfg["val_sources"] == ["sotu", "math"] and cfg["resume"] is True and cfg["lr"] == 1e-3
    assert cfg["n_embd"] == 32  # from the config file
    with pytest.raises(ValueError, match="multiple of .* = 256; valid values: 256, 512"):
        train.check_config(dict(cfg, batch_tokens=300, micro_batch=4, block_size=64), 1)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "config").glob("*.py")))
def test_config_files_are_valid(name):
    cfg = train.make_config(str(ROOT / "config" / f"{name}.py"))
    train.check_config(cfg, 1)


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_argv(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{k}=" in text for k in train.DEFAULTS)


# ---------------------------------------------------------------- training

def test_end_to_end_loss_falls_and_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    s = go(data_dir, out)
    ls = [l for _, l in losses(out)]
    assert len(ls) == 16 and np.mean(ls[-3:]) < ls[0] - 0.5
    assert s["finished"] and s["tokens"] == 16 * 512 and s["flops_ratio"] == pytest.approx(1.0)
    assert set(s["val"]) == {"primitives", "sotu"} and all(0 < v["bpb"] < 9 for v in s["val"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 16
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 16 and ck["tokenizer"] == "byte" and ck["train_config"]["n_embd"] == 32
    assert (out / "ckpt_cooldown.pt").exists()
    assert torch.load(out / "ckpt_cooldown.pt", weights_only=True)["step"] == train.cooldown_start(ck["train_config"])
    before = (out / "ckpt.pt").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="resume"):      # a fresh run never overwrites a finished one
        go(data_dir, out)
    assert (out / "ckpt.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("kw", [
    {},
    # sampled loop counts + truncated backprop, a cooldown that switches mixture and plan after the interruption
    {"n_layer": 3, "plan": "loop(1-1x2-1)", "loop_sampler": "poisson-lognormal", "loop_max": 4, "bptt_k": 1,
     "cooldown_plan": "loop(1-1x3-1)", "cooldown_mixture": {"sotu": 1.0}, "cooldown_frac": 0.25},
], ids=["plain", "looped"])
def test_exact_resume(data_dir, tmp_path, kw):
    go(data_dir, tmp_path / "full", max_steps=12, **kw)
    go(data_dir, tmp_path / "part", max_steps=12, stop_step=5, **kw)
    assert len(losses(tmp_path / "part")) == 5
    go(data_dir, tmp_path / "part", max_steps=12, resume=True, **kw)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")   # bitwise, step by step
    if kw:
        plans = {e["plan"] for e in log(tmp_path / "full")}
        assert len(plans) >= 2, plans                                # the sampler really varied the plan


def test_growth_resume_and_flops(data_dir, tmp_path):
    pytest.importorskip("grow")
    kw = dict(n_layer=6, grow="lidas", grow_block=2, max_steps=12, cooldown_frac=0.25)
    s = go(data_dir, tmp_path / "full", **kw)
    ev = log(tmp_path / "full", "grow")
    assert [e["depth"] for e in ev] == [4, 6] and s["depth"] == 6
    assert 0.5 < s["flops_ratio"] < 1                               # growing trains on fewer FLOPs (PAPER §2.4)
    depths = [e["depth"] for e in log(tmp_path / "full")]
    assert depths == sorted(depths) and depths[0] == 2
    go(data_dir, tmp_path / "part", stop_step=ev[0]["step"] + 1, **kw)  # interrupted after the first growth
    ck = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)
    assert ck["depth"] == 4 and ck["config"]["n_layer"] == 4 and ck["train_config"]["n_layer"] == 6
    go(data_dir, tmp_path / "part", resume=True, **kw)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_cooldown_branch_from_milestone(data_dir, tmp_path):
    base = tmp_path / "base"
    go(data_dir, base)
    s0 = train.cooldown_start(train.make_config(MICRO))
    milestone = str(base / "ckpt_cooldown.pt")
    # branching with the same settings replays the base run's cooldown exactly
    go(data_dir, tmp_path / "same", init_from=milestone)
    assert losses(tmp_path / "same") == [x for x in losses(base) if x[0] >= s0]
    # a real arm: math-heavy mixture and a retrofitted loop of layers 1..2 (PAPER §2.11-2.12)
    arm = tmp_path / "arm"
    go(data_dir, arm, init_from=milestone, cooldown_mixture={"primitives": 0.2, "sotu": 0.8},
       cooldown_plan="repeat(1,2,1)")
    assert {e["plan"] for e in log(arm)} == {"Loop(1-2×2-1)"}                   # [0, 1, 2, 1, 2, 3]
    assert losses(arm)[0][0] == s0 and losses(arm) != losses(tmp_path / "same")
    ck = torch.load(arm / "ckpt.pt", weights_only=True)
    assert ck["config"]["plan"] == [0, 1, 2, 1, 2, 3]                # the trained plan is the model's default
    with pytest.raises(ValueError, match="n_embd"):
        go(data_dir, tmp_path / "bad", init_from=milestone, n_embd=64, n_head=2)


def test_nan_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="not finite"):
        go(data_dir, out, lr=1e6, ckpt_interval=1, max_steps=8, warmup_steps=4)
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    good = losses(out)
    assert ck["step"] == len(good) >= 1 and all(math.isfinite(l) for _, l in good)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (out / "summary.json").exists()


def test_ddp_two_processes_match_one(data_dir, tmp_path):
    args = [f"--data_dir={data_dir}", "--device=cpu", "--max_steps=6", "--eval_interval=3", "--ckpt_interval=6"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", MICRO, f"--out_dir={tmp_path / 'ddp'}", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    go(data_dir, tmp_path / "one", max_steps=6, eval_interval=3, ckpt_interval=6)
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(6))
    assert np.allclose([l for _, l in a], [l for _, l in b], rtol=0, atol=1e-5), (a, b)
    va, vb = log(tmp_path / "ddp", "val")[-1]["val"], log(tmp_path / "one", "val")[-1]["val"]
    assert all(abs(va[k]["loss"] - vb[k]["loss"]) < 1e-5 for k in vb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_growth_and_resume(data_dir, tmp_path):
    kw = dict(device="cuda", dtype="auto", n_layer=4, grow="midas", grow_block=2, max_steps=8)
    full = go(data_dir, tmp_path / "full", **kw)
    go(data_dir, tmp_path / "part", stop_step=5, **kw)
    go(data_dir, tmp_path / "part", resume=True, **kw)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert full["depth"] == 4 and [s for s, _ in a] == [s for s, _ in b]
    assert np.allclose([l for _, l in a], [l for _, l in b], atol=2e-2)  # bf16 on CUDA: close, not bitwise


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        go(data_dir, tmp_path / "nothing", resume=True)
    go(data_dir, tmp_path / "r", max_steps=4)
    with pytest.raises(ValueError, match="n_embd"):                  # incompatible checkpoint, nothing touched
        go(data_dir, tmp_path / "r", max_steps=4, resume=True, n_embd=64)
    with pytest.raises(ValueError, match="max_steps"):
        go(data_dir, tmp_path / "r", max_steps=8, resume=True)
    from model import GPT, GPTConfig, save_checkpoint
    save_checkpoint(tmp_path / "foreign.pt", GPT(GPTConfig(n_layer=4, n_embd=32, n_head=2, n_kv_head=2)))
    with pytest.raises(ValueError, match="not written by train.py"):
        go(data_dir, tmp_path / "f", init_from=str(tmp_path / "foreign.pt"))
    with pytest.raises(ValueError, match="unknown data source 'shakespeare'.*valid sources"):
        go(data_dir, tmp_path / "u", mixture={"shakespeare": 1.0})
    with pytest.raises(FileNotFoundError, match="python -m data.prepare --tokenizer byte --sources math"):
        go(data_dir, tmp_path / "m", mixture={"math": 1.0})
    with pytest.raises(ValueError, match="batch_tokens=1000 must be a multiple"):
        go(data_dir, tmp_path / "b", batch_tokens=1000)
    with pytest.raises(ValueError, match="n_layer=3"):                # plan needs 3 unique layers
        go(data_dir, tmp_path / "p", plan="loop(1-1x4-1)")
    assert not (tmp_path / "u").exists() and not (tmp_path / "b").exists()
