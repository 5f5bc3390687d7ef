"""Tests for eval.py: multiple-choice scoring, shot/loop sweeps, SFT, math extraction, NLL, outputs, resumability."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import eval as E
from data import primitives, sources
from data.store import write_tokens
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig, save_checkpoint

ENC = get_tokenizer("byte")


def tiny(n_layer=2, plan=None, block=1100, seed=0, init_std=0.02):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=n_layer, n_embd=32, n_head=2, n_kv_head=1, mlp_hidden=64, block_size=block, plan=plan,
                    init_std=init_std)
    return GPT(cfg).eval()


def save(tmp_path, name, model, **extra):
    path = tmp_path / name / "ckpt.pt"
    save_checkpoint(str(path), model, tokenizer="byte", **extra)
    return str(path)


def naive_scores(model, prompt, cands, plan):
    """One full forward per candidate, no cache: the reference the batched scorer must equal."""
    out = []
    for c in cands:
        ids = torch.tensor([prompt + c])
        logits, _ = model(ids, plan=plan)
        logp = F.log_softmax(logits[0, len(prompt) - 1:-1].float(), -1)
        out.append(logp.gather(-1, torch.tensor(c)[:, None]).sum().item())
    return torch.tensor(out)


# ---------------------------------------------------------------------------------------------------------------
# scoring

def test_scorer_picks_the_candidate_a_biased_model_prefers():
    model = tiny()
    bias = torch.zeros(model.config.vocab_size)
    bias[list(b"qrs")] = 8.0  # the model strongly prefers the bytes q, r, s
    W = model.embed_tokens.weight
    model.lm_head = lambda x: F.linear(x, W) + bias
    prompt = ENC.encode_ordinary("Fill in the blank: abc ___. ->")
    others = [" xyz\n", " klm\n", " abc\n", " dgh\n"]
    for pos in range(5):  # wherever the favoured candidate sits, it wins
        cands = others[:pos] + [" qrs\n"] + others[pos:]
        scores = E.score_candidates(model, prompt, [ENC.encode_ordinary(c) for c in cands])
        assert int(scores.argmax()) == pos


@pytest.mark.parametrize("plan", [None, [0, 1, 1, 2, 1, 2]])
def test_batched_scoring_equals_one_at_a_time(plan):
    model = tiny(n_layer=3, init_std=0.2)
    prompt = ENC.encode_ordinary("x=3\ny=x\nWhat is y? Answer:")
    cands = [ENC.encode_ordinary(c) for c in [" 3\n", " 23\n", " 7", " 1234567\n", " q"]]
    plan = model.plan if plan is None else plan
    got = E.score_candidates(model, prompt, cands, plan)
    assert torch.allclose(got, naive_scores(model, prompt, cands, plan), atol=1e-4)
    single = [[c[0]] for c in cands]  # one-token candidates take the prompt-only path
    assert torch.allclose(E.score_candidates(model, prompt, single, plan), naive_scores(model, prompt, single, plan),
                          atol=1e-4)


def binomial_interval(n, p, level=0.99):
    """Central binomial interval (counts) holding `level` of the mass."""
    pmf = [math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo, acc = 0, 0.0
    while acc + pmf[lo] <= (1 - level) / 2:
        acc, lo = acc + pmf[lo], lo + 1
    hi, acc = n, 0.0
    while acc + pmf[hi] <= (1 - level) / 2:
        acc, hi = acc + pmf[hi], hi - 1
    return lo, hi


def test_random_model_scores_at_chance_on_every_task():
    model, n = tiny(init_std=0.1, seed=1), 150
    for task in primitives.TASKS:
        exs, toks = E.prepare_task(ENC, task, n, 1, 0, model.config.block_size)
        lo, hi = binomial_interval(n, primitives.chance(task))
        correct, preds = E.score_task(model, toks, model.plan, task)
        assert lo <= correct <= hi, f"{task}: random model got {correct}/{n}, chance interval [{lo}, {hi}]"
        assert len(set(preds)) > 1, f"{task}: the scorer always picks index {preds[0]}"
        # candidate length alone must not reveal the answer (summed log-probabilities favour short candidates)
        shortest = sum(min(range(len(t["cands"])), key=lambda i: len(t["cands"][i])) == t["answer"] for t in toks)
        assert shortest <= hi, f"{task}: 'pick the shortest candidate' scores {shortest}/{n}"


def test_too_many_shots_raises_with_the_number_that_fits():
    block, task, n = 300, "va_basic_d1", 10
    fit = max(k for k in range(6) if all(
        len(ENC.encode_ordinary(e["prompt"])) + max(len(c) for c in e["candidates"]) - 1 <= block
        for e in primitives.make_task(task, n, k, 0)))
    assert fit < 5
    with pytest.raises(ValueError, match=f"at most {fit} shots fit"):
        E.prepare_task(ENC, task, n, 5, 0, block)
    E.prepare_task(ENC, task, n, fit, 0, block)  # and that many do fit


def test_unknown_task_raises_listing_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="va_code_d2"):
        E.resolve_tasks("primitives", "copy_random,bogus")
    with pytest.raises(ValueError, match="gsm8k"):
        E.resolve_tasks("math", "svamp")
    # checked before any checkpoint is loaded
    with pytest.raises(ValueError, match="bogus"):
        E.main(["--ckpt", str(tmp_path / "missing.pt"), "--mode", "primitives", "--tasks", "bogus"])


# ---------------------------------------------------------------------------------------------------------------
# sweeps

def test_shots_sweep_uses_the_same_queries(tmp_path):
    per_k = E.shots_examples(ENC, "copy_real", 6, [0, 1, 3], 0, 4096)
    base = per_k[0][0]
    for k, (exs, _) in per_k.items():
        assert [e["candidates"] for e in exs] == [e["candidates"] for e in base]
        assert [e["answer"] for e in exs] == [e["answer"] for e in base]
        assert [E.query_text(e["prompt"], k) for e in exs] == [E.query_text(e["prompt"], 0) for e in base]
    ck = save(tmp_path, "m", tiny())
    store = E.main(["--ckpt", ck, "--mode", "shots", "--tasks", "va_basic_d0", "--shots", "1,2,4", "--n", "4",
                    "--out", str(tmp_path / "o")])
    rows = store.rows()
    assert [r["shots"] for r in rows] == [1, 2, 4] and len({r["queries"] for r in rows}) == 1
    assert (tmp_path / "o" / "shots.png").exists() and (tmp_path / "o" / "shots.md").exists()


def test_loop_sweep_grid_and_original(tmp_path):
    model = tiny(n_layer=4)
    ck = save(tmp_path, "m", model)
    out = str(tmp_path / "o")
    common = ["--ckpt", ck, "--tasks", "va_basic_d0", "--n", "6", "--shots", "1", "--out", out]
    store = E.main(common + ["--mode", "loopsweep", "--block", "2"])
    (unit,) = store.units.values()
    assert len(unit["grid"]) == 4 and all(len(row) == 3 for row in unit["grid"])  # r = 1..4, s = 0..2
    assert unit["starts"] == [0, 1, 2] and unit["block"] == 2
    # r = 0 is the unmodified model, and a grid cell equals evaluating that plan directly
    for s in range(3):
        assert E.repeated_plan(model.plan, s, 2, 0) == model.plan
    plain = E.main(common + ["--mode", "primitives"]).rows()[0]
    assert unit["original"] == plain["accuracy"]
    cell = E.main(common + ["--mode", "primitives", "--plan", "repeat(1,2,3)"]).rows()
    assert unit["grid"][2][1] == next(r for r in cell if r["plan"] != "plain(4)")["accuracy"]
    assert (tmp_path / "o" / "loopsweep_m_ckpt.pt_va_basic_d0.png").exists()
    assert "@s=" in (tmp_path / "o" / "loopsweep.md").read_text()


def test_loop_sweep_block_from_checkpoint_and_past_the_end(tmp_path):
    looped = save(tmp_path, "loop", tiny(n_layer=4, plan=[0, 1, 2, 1, 2, 3]), grow_block=3)
    out = str(tmp_path / "o")
    store = E.main(["--ckpt", looped, "--mode", "loopsweep", "--tasks", "copy_random", "--n", "3", "--shots", "0",
                    "--block_start", "2", "--max_repeats", "2", "--out", out])
    (unit,) = store.units.values()
    assert unit["block"] == 3 and unit["starts"] == [2] and len(unit["grid"]) == 2
    assert (tmp_path / "o" / "loopcurve_copy_random.png").exists()
    with pytest.raises(ValueError, match="past the last"):
        E.main(["--ckpt", looped, "--mode", "loopsweep", "--tasks", "copy_random", "--n", "3", "--shots", "0",
                "--block_start", "4", "--out", out])
    with pytest.raises(ValueError, match="past the last"):
        E.repeated_plan(list(range(4)), 3, 2, 1)


def test_resumable_and_outputs(tmp_path, monkeypatch):
    ck_a, ck_b = save(tmp_path, "a", tiny(seed=0)), save(tmp_path, "b", tiny(seed=1))
    argv = ["--ckpt", ck_a, "--ckpt", ck_b, "--mode", "primitives", "--tasks", "copy_random,va_math_d0",
            "--n", "5", "--shots", "1", "--out", str(tmp_path / "o")]
    first = E.main(argv)
    assert len(first.units) == 4
    for f in ("primitives.json", "primitives.md", "primitives.png"):
        assert (tmp_path / "o" / f).exists()
    md = (tmp_path / "o" / "primitives.md").read_text()
    assert "a/ckpt.pt" in md and "b/ckpt.pt" in md  # checkpoints side by side as columns
    rows = json.loads((tmp_path / "o" / "primitives.json").read_text())["rows"]
    assert {"ckpt", "task", "shots", "plan", "n", "accuracy", "ci_low", "ci_high", "chance"} <= set(rows[0])

    calls = []
    real = E.score_task
    monkeypatch.setattr(E, "score_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    E.main(argv)
    assert calls == []  # every unit was already there
    E.main(argv[:-2] + ["--shots", "0", "--out", str(tmp_path / "o")])
    assert len(calls) == 4  # new settings are new units
    E.main(argv + ["--force"])
    assert len(calls) == 8


# ---------------------------------------------------------------------------------------------------------------
# SFT

def test_sft_changes_weights_keeps_a_looped_model_tied_and_untie_unties():
    plan = [0, 1, 2, 1, 2, 3]
    model = tiny(n_layer=4, plan=plan, block=400)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = E.parse_args(["--ckpt", "x", "--mode", "sft", "--sft_steps", "2", "--sft_batch", "4", "--sft_lr", "1e-2"])
    tuned, tplan, losses = E.finetune_copy(model, model.plan, ENC, 8, 0, args)
    assert len(losses) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert tuned.config.n_layer == 4 and tplan == plan and set(tuned.state_dict()) == set(before)  # still tied
    assert tuned.layers[tplan[1]] is tuned.layers[tplan[3]]
    assert any(not torch.equal(v, tuned.state_dict()[k]) for k, v in before.items())  # weights moved

    args.untie = True
    untied, uplan, _ = E.finetune_copy(model, model.plan, ENC, 8, 0, args)
    assert untied.config.n_layer == 6 and uplan == list(range(6))
    w1, w3 = untied.layers[1].mlp.up_proj.weight, untied.layers[3].mlp.up_proj.weight  # both copies of layer 1
    assert w1 is not w3 and not torch.equal(w1, w3)  # the copies trained apart


def test_sft_mode_outputs(tmp_path):
    ck = save(tmp_path, "loop", tiny(n_layer=3, plan=[0, 1, 1, 2], block=400))
    store = E.main(["--ckpt", ck, "--mode", "sft", "--sft_sizes", "8", "--seeds", "0,1", "--sft_steps", "2",
                    "--sft_batch", "4", "--n", "4", "--out", str(tmp_path / "o")])
    rows = store.rows()
    assert sorted({(r["n_train"], r["task"]) for r in rows}) == [(0, "va_code_d1"), (0, "va_code_d2"),
                                                                (8, "va_code_d1"), (8, "va_code_d2")]
    assert sum(r["n_train"] == 8 for r in rows) == 4  # 2 tasks x 2 seeds
    assert (tmp_path / "o" / "sft.png").exists() and "±" in (tmp_path / "o" / "sft.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# math, NLL

def test_math_answer_extraction():
    assert E.extract_answer(" She sells 16 - 3 = 13 eggs.\n#### 18\n\nQuestion: 99 ducks") == 18
    assert E.extract_answer(" It costs $1,234 in total.") == 1234
    assert E.extract_answer(" The answer is -3.5.") == -3.5
    assert E.extract_answer(" 7 apples\nQuestion: Tom has 12") == 7
    assert E.extract_answer(" no number here") is None
    assert E.extract_answer(" .5 of it") == 0.5


def test_math_mode_with_fake_items(tmp_path, monkeypatch):
    items = [dict(id=i, question=f"Tom has {i} apples and buys {i + 1}. How many?",
                  answer=f"{i}+{i + 1}=<<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}\n#### {2 * i + 1}", gold=2 * i + 1)
             for i in range(12)]
    monkeypatch.setattr(sources, "load_gsm8k_test", lambda: items)
    assert "<<" not in E.math_items("gsm8k")[0][1]
    ck = save(tmp_path, "m", tiny(block=400))
    store = E.main(["--ckpt", ck, "--mode", "math", "--tasks", "gsm8k", "--shots", "2", "--limit", "3",
                    "--max_new", "8", "--out", str(tmp_path / "o")])
    (unit,) = store.units.values()
    assert unit["rows"][0]["n"] == 3 and len(unit["samples"]) == 3
    assert unit["samples"][0]["question"].startswith("Tom has 8 ")  # the first 8 items are exemplars only
    with pytest.raises(ValueError, match="shots fit"):
        E.main(["--ckpt", save(tmp_path, "short", tiny(block=150)), "--mode", "math", "--tasks", "gsm8k",
                "--shots", "3", "--limit", "3", "--max_new", "8", "--out", str(tmp_path / "o2")])


def test_nll_on_a_tiny_prepared_file(tmp_path):
    model = tiny(block=64)
    ck = save(tmp_path, "m", model)
    ids = torch.randint(0, 256, (65,))
    write_tokens(tmp_path / "prep" / "byte" / "wiki" / "val.bin", ids.numpy(), {"tokenizer": "byte"})
    store = E.main(["--ckpt", ck, "--mode", "nll", "--tasks", "wiki", "--n", "3", "--data_dir",
                    str(tmp_path / "prep"), "--out", str(tmp_path / "o")])
    row = store.rows()[0]
    with torch.no_grad():
        _, loss = model(ids[None, :-1], ids[None, 1:])
    assert row["windows"] == 1 and abs(row["nll"] - loss.item()) < 1e-4  # one window covers the whole file
    assert abs(row["bpb"] - row["nll"] / math.log(2)) < 1e-6  # byte tokens: one byte each
    with pytest.raises(FileNotFoundError, match="data.prepare"):
        E.main(["--ckpt", ck, "--mode", "nll", "--tasks", "sotu", "--data_dir", str(tmp_path / "prep"),
                "--out", str(tmp_path / "o")])
