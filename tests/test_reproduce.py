"""The main job end to end at micro scale: every stage produces its outputs, an interrupted training stage resumes,
a second run skips everything, another config in the same folder is refused, and the report renders every section."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import reproduce  # noqa: E402
from data.primitives import training_documents  # noqa: E402
from data.store import write_tokens  # noqa: E402


def fake_prepared(root):
    """Tiny byte-token files for the four sources of the preset mixture (primitives are real generated text)."""
    rng = np.random.default_rng(0)
    for src in reproduce.MIXTURE:
        for split, n in (("train", 60_000), ("val", 12_000)):
            if src == "primitives":
                text = "\n".join(training_documents(400 if split == "train" else 80, seed=1 if split == "val" else 0))
                ids = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16)
            else:
                ids = rng.integers(32, 127, size=n).astype(np.uint16)
            write_tokens(root / "byte" / src / f"{split}.bin", ids,
                         {"tokenizer": "byte", "source": src, "split": split})


def run(out, data, *extra):
    cmd = [sys.executable, str(ROOT / "reproduce.py"), "micro", "--out", str(out), "--data_dir", str(data),
           "--only", "train,eval,probe,report", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_micro_pipeline_end_to_end(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    fake_prepared(data)
    p = reproduce.PRESETS["micro"]
    stages = {name: cmd for name, cmd, _ in reproduce.stages("micro", p, out, str(data))}
    # interrupt the first training stage half way, as a crash would
    base_cmd = [str(c) for c in stages["train/0/base"]] + ["--stop_step=6"]
    r = subprocess.run(base_cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "seed0" / "base" / "ckpt.pt").exists() and not (out / "seed0" / "base" / "summary.json").exists()

    r = run(out, data)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (out / "logs" / "train_0_base.log").read_text()
    assert "--resume=True" in log and "starting at step 6" in log
    record = json.loads((out / "stages.json").read_text())
    assert all(v["done"] for v in record.values()) and len(record) == len(stages) - 1  # all but prepare
    for arm in reproduce.arms(p):
        assert (out / "seed0" / arm / "summary.json").exists(), arm
    for f in ("primitives.json", "nll.json", "shots.json", "sft.json", "sweep/loopsweep.json",
              "retro/loopsweep.json", "untied/sft.json"):
        assert (out / "seed0" / "eval" / f).exists(), f
    assert (out / "seed0" / "probe" / "probe.json").exists()
    report = (out / "REPORT.md").read_text()
    for section in ("## Findings", "## Training", "## Reasoning primitives", "## Inference-time loop sweeps",
                    "## Retrofitted recurrence", "## Accuracy vs shots", "## SFT sample efficiency",
                    "## Depth-wise signatures", "## Probe summary", "## Data"):
        assert section in report, section
    rows = [line for line in report.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert {int(line.split("|")[1]) for line in rows} == set(range(1, 17))  # every finding of PAPER §7.2 has a row
    assert (out / "loss_vs_flops.png").stat().st_size > 1000

    # a second run does nothing
    before = (out / "stages.json").read_text()
    r = run(out, data)
    assert r.returncode == 0 and (out / "stages.json").read_text() == before

    # another config in the same folder is refused, naming the stage
    bad = dict(p, n=p["n"] + 1)
    reproduce.PRESETS["micro_changed"] = bad
    try:
        with pytest.raises(SystemExit, match="was run with another command"):
            reproduce.main(["micro_changed", "--out", str(out), "--data_dir", str(data), "--only", "eval"])
    finally:
        del reproduce.PRESETS["micro_changed"]


def test_unknown_preset_is_refused():
    with pytest.raises(SystemExit, match="unknown preset 'huge'"):
        reproduce.main(["huge", "--dry_run"])
