import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import probe
from model import GPT, GPTConfig, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def tiny(n_layer=6, plan=None, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=257, block_size=64, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=32, mlp_hidden=64,
               plan=plan)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def silence(model, layer):
    """Zero the output projections: the step's a and m are exactly 0, h_{l+1} == h_l."""
    with torch.no_grad():
        model.layers[layer].self_attn.o_proj.weight.zero_()
        model.layers[layer].mlp.down_proj.weight.zero_()
    return model


def test_zero_output_step_has_no_depth_score_and_no_local_effect():
    m = silence(tiny(init_std=0.1), 2)
    x = torch.randint(0, 257, (4, 24), generator=torch.Generator().manual_seed(1))
    ds = probe.depth_score(m, m.plan, x, progress=False)
    assert ds["d"][2] == pytest.approx(0, abs=1e-7)
    assert min(ds["d"][i] for i in (0, 1, 3, 4)) > 1e-4  # the other steps matter (the last one cannot: no later step)
    assert 0 <= ds["score"] <= 5 and ds["score_over_depth"] == pytest.approx(ds["score"] / 6)
    le = probe.local_effects(m, m.plan, x, progress=False)
    for M in (le["direct"], le["propagated"]):
        assert all(v == pytest.approx(0, abs=1e-6) for v in M[2][3:])  # source 2 changes nothing downstream
        assert max(M[1][2:]) > 1e-3 and M[3][4] > 1e-3
        assert M[4][1] is None  # only s < l is defined
    assert all(le["direct"][s][2] == pytest.approx(0, abs=1e-6) for s in range(2))  # a silent target has no update


def test_skipping_a_zero_output_step_changes_nothing():
    from data.primitives import make_task
    from data.tokenizer import get_tokenizer
    m = silence(tiny(init_std=0.1), 3)
    enc = get_tokenizer("byte")
    ex = {"va_basic_d0": make_task("va_basic_d0", 4, shots=0)}
    text = torch.randint(0, 257, (3, 33), generator=torch.Generator().manual_seed(2))
    iv = probe.interventions(m, m.plan, enc, ex, text, progress=False)
    edits = {(e["kind"], e["start"]): e for e in iv["edits"]}
    assert len(edits) == 6 + 5 + 3 + 3  # skips, swap1, swap2, reverse4 (no swap4 at depth 6)
    assert edits[("skip", 3)]["dnll"] == pytest.approx(0, abs=1e-6)
    assert edits[("skip", 3)]["acc"] == iv["base"]["acc"]
    assert abs(edits[("skip", 1)]["dnll"]) > 1e-4
    assert iv["late_early"]["q"] == 1


def test_lenses_reproduce_the_model_and_tuned_lens_starts_as_logit_lens():
    m = tiny(plan=[0, 1, 2, 3, 4, 5, 2, 3])
    x = torch.randint(0, 257, (2, 20))
    h, a, mm = probe.record(m, m.plan, x)
    S = len(m.plan)
    torch.testing.assert_close(probe.lens_logits(m, h[S], S - 1), m(x)[0], rtol=0, atol=1e-5)
    lens = probe.TunedLens(S, 32)
    for l in range(S):
        torch.testing.assert_close(probe.lens_logits(m, h[l + 1], l, lens), probe.lens_logits(m, h[l + 1], l),
                                   rtol=0, atol=0)


def test_tuned_lens_training_beats_logit_lens():
    m = tiny(init_std=0.1)
    x = torch.randint(0, 257, (8, 32), generator=torch.Generator().manual_seed(3))
    lens = probe.train_tuned_lens(m, m.plan, x, steps=60, progress=False)
    r = probe.early_exit(m, m.plan, x, lens)
    for l in range(5):
        assert r["tuned"]["kl"][l] < 0.9 * r["logit"]["kl"][l]
    assert r["tuned"]["kl"][5] == pytest.approx(0, abs=1e-6) and r["tuned"]["top5"][5] == 1.0
    assert all(0 <= v <= 1 for v in r["logit"]["top5"])


def test_early_exit_accuracy_last_step_is_final():
    from data.primitives import make_task
    from data.tokenizer import get_tokenizer
    m = tiny()
    ex = make_task("va_basic_d0", 6, shots=0)
    x = probe.prompt_batch(get_tokenizer("byte"), ex, 64)
    acc = probe.early_exit(m, m.plan, x, probe.TunedLens(6, 32), get_tokenizer("byte"), ex)["accuracy"]
    assert acc["logit"]["acc"][-1] == acc["final"] == acc["tuned"]["acc"][-1]
    assert len(acc["logit"]["acc"]) == 6


def test_cached_candidate_scoring_matches_full_forward():
    from data.primitives import make_task
    from data.tokenizer import get_tokenizer
    m, enc = tiny(plan=[0, 1, 2, 1, 2, 5]), get_tokenizer("byte")
    for ex in (make_task("copy_random", 2, shots=0), make_task("va_basic_d0", 2, shots=0)):  # cropped / not
        sc = probe.candidate_logprobs(m, m.plan, enc, ex)
        lens = probe.candidate_logprobs(m, m.plan, enc, ex, {"logit": None})["logit"]
        for n, e in enumerate(ex):
            cmax = max(len(enc.encode_ordinary(c)) for c in e["candidates"])
            for j, c in enumerate(e["candidates"]):
                cid = enc.encode_ordinary(c)
                ids = enc.encode_ordinary(e["prompt"])[-(64 - cmax):] + cid  # the prompt keeps its end
                with torch.no_grad():
                    lp = torch.log_softmax(m(torch.tensor([ids]))[0][0].float(), -1)
                want = sum(lp[len(ids) - len(cid) - 1 + i, t] for i, t in enumerate(cid))
                assert sc[n, j] == pytest.approx(float(want), abs=1e-4)
                assert lens[-1, n, j] == pytest.approx(float(want), abs=1e-4)


def test_block_similarity_tied_is_one_unrelated_is_zero():
    m = tiny(n_layer=4, plan=[0, 1, 2, 3, 2, 3, 2, 3])  # Loop(2-2x3-0): block [0,1] then [2,3] three times
    bs = probe.block_similarity(m, m.plan, 2)
    M = np.array(bs["matrix"])
    assert M.shape == (4, 4)
    assert np.allclose(M[1:, 1:], 1, atol=1e-12)
    assert np.abs(M[0, 1:]).max() < 0.1 and M[0, 0] == pytest.approx(1)
    with pytest.raises(ValueError, match="1..8"):
        probe.block_similarity(m, m.plan, 9)


def test_periodicity_of_a_constructed_series():
    i = np.arange(40)
    series = 0.05 * i + np.sin(2 * np.pi * i / 4) + 0.3 * np.cos(2 * np.pi * i / 2)  # period 4, with a trend
    at4, at3 = probe.periodicity(series, 4), probe.periodicity(series, 3)
    assert at4["middle"] == [10, 30]
    assert at4["acf"] > 0.9 and at4["power_share"] > 0.9
    assert abs(at3["acf"]) < 0.3 and at3["power_share"] < 0.2
    noise = np.random.default_rng(0).normal(size=40)
    assert probe.periodicity(noise, 4)["acf"] < 0.5
    with pytest.raises(ValueError, match="lag"):
        probe.periodicity(series, 19)  # middle has 20 entries: lag <= 18
    with pytest.raises(ValueError):
        probe.periodicity(series, 0)


def test_plan_edits_act_on_plan_positions():
    plan = [0, 1, 0, 1]  # Loop(2x2)
    edits = {(k, s): p for k, s, p in probe.plan_edits(plan)}
    assert edits[("skip", 2)] == [0, 1, 1]
    assert edits[("swap1", 1)] == [0, 0, 1, 1]
    assert edits[("swap2", 0)] == [0, 1, 0, 1]
    assert edits[("reverse4", 0)] == [1, 0, 1, 0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="depth_score"):
        probe.parse_probes("depth_score,nope")
    with pytest.raises(ValueError, match="windows"):
        probe.text_windows(np.arange(100), 5, 20)
    assert probe.text_windows(np.arange(100), 2, 20, part=1).min() >= 50


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from data.store import write_tokens
    d = tmp_path_factory.mktemp("probe")
    text = (b"the quick brown fox jumps over the lazy dog. " * 60)[:2400]
    write_tokens(d / "prepared" / "byte" / "sotu" / "val.bin", np.frombuffer(text, dtype=np.uint8),
                 {"tokenizer": "byte", "source": "sotu", "split": "val"})
    save_checkpoint(d / "base" / "ckpt.pt", tiny(n_layer=8), tokenizer="byte", step=0)
    save_checkpoint(d / "loop" / "ckpt.pt", tiny(n_layer=4, plan=[0, 1, 2, 3] * 2, seed=1), tokenizer="byte", step=0)
    argv = ["--ckpt", str(d / "base" / "ckpt.pt"), "--ckpt", str(d / "loop" / "ckpt.pt"), "--out", str(d / "out"),
            "--data_dir", str(d / "prepared"), "--n_prompts", "3", "--shots", "1", "--tasks", "va_basic_d0,copy_random",
            "--seq_len", "32", "--lens_steps", "10", "--block", "2", "--device", "cpu"]
    return d, argv


def test_cli_end_to_end_and_resume(tiny_run, capsys):
    d, argv = tiny_run
    probe.main(argv)
    out = d / "out"
    res = json.loads((out / "probe.json").read_text())
    assert len(res["models"]) == 2
    for e in res["models"].values():
        assert set(probe.PROBES) <= set(e)
        assert len(e["depth_score"]["va_basic_d0"]["d"]) == 8
        assert len(e["resid_norm"]["text"]["norm"]) == 9
        assert "acf" in e["contributions"]["copy_random"]["periodicity_attn"]
        assert len(e["early_exit"]["va_basic_d0"]["accuracy"]["tuned"]["acc"]) == 8
    loop_sim = np.array(res["models"][str(d / "loop" / "ckpt.pt")]["block_similarity"]["matrix"])
    assert np.allclose([loop_sim[0, 2], loop_sim[1, 3]], 1)  # blocks [0,1] and [2,3] each run twice
    for f in ("depth_profile.png", "early_exit.png", "resid_norm.png", "contributions.png", "summary.md",
              "interventions_base_ckpt.png", "local_effects_loop_ckpt.png", "similarity_loop_ckpt.png"):
        assert (out / f).stat().st_size > 0, f
    md = (out / "summary.md").read_text()
    assert "base/ckpt" in md and "loop/ckpt" in md and "depth_score" in md
    assert list((out / "lenses").glob("*.pt"))  # tuned lenses cached
    capsys.readouterr()
    probe.main(argv + ["--probes", "resid_norm,block_similarity"])
    assert capsys.readouterr().out.count("done, skipping") == 4
    probe.main(argv + ["--probes", "resid_norm", "--force"])
    assert "skipping" not in capsys.readouterr().out


def test_cli_bad_inputs(tiny_run, tmp_path):
    d, argv = tiny_run
    with pytest.raises(ValueError, match="valid"):
        probe.main(argv + ["--probes", "depth"])
    with pytest.raises(ValueError, match="windows"):
        probe.main(argv + ["--probes", "interventions", "--n_prompts", "500", "--out", str(tmp_path / "o1")])
    with pytest.raises(ValueError, match="larger than the depth"):
        probe.main(argv + ["--probes", "block_similarity", "--block", "9", "--out", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="unknown task"):
        probe.main(argv + ["--tasks", "va_nope"])
    bad = tmp_path / "not_a_ckpt.pt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a readable"):
        probe.main(["--ckpt", str(bad), "--out", str(tmp_path / "o3")])
    with pytest.raises(FileNotFoundError):
        probe.main(argv + ["--probes", "interventions", "--text_source", "wiki", "--out", str(tmp_path / "o4")])


def test_cli_help():
    r = subprocess.run([sys.executable, "probe.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--probes" in r.stdout and "--n_prompts" in r.stdout
    r = subprocess.run([sys.executable, "probe.py", "--ckpt", "nope.pt", "--out", "/tmp/x", "--probes", "bogus"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "valid:" in r.stderr
