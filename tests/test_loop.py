import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

from loop import (describe, plan_from_spec, enc_loop_dec_plan, loop_plan, parse_spec, repeat_plan, reverse_plan, sample_loops,
                  skip_plan, spec_plan, swap_plan, train_plan)


def test_plan_constructors_match_the_paper_examples():
    assert loop_plan(4, 3) == [0, 1, 2, 3] * 3
    assert enc_loop_dec_plan(2, 2, 3, 1) == [0, 1, 2, 3, 2, 3, 2, 3, 4]
    assert repeat_plan(8, 2, 2, 1) == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7]
    assert repeat_plan(8, 2, 2, 0) == list(range(8))
    assert repeat_plan(24, 8, 4, 2)[:20] == list(range(12)) + [8, 9, 10, 11] * 2
    assert skip_plan(5, 4) == [0, 1, 2, 3] and skip_plan(5, [0, 2]) == [1, 3, 4]
    assert swap_plan(6, 1, 1) == [0, 2, 1, 3, 4, 5]
    assert swap_plan(8, 2, 2) == [0, 1, 4, 5, 2, 3, 6, 7]
    assert reverse_plan(8, 2, 4) == [0, 1, 5, 4, 3, 2, 6, 7]


def test_specs_and_names():
    assert parse_spec("loop(2-2x4-2)") == (2, 2, 4, 2) and parse_spec("Loop(4×3)".lower()) == (0, 4, 3, 0)
    assert parse_spec("") is None
    assert spec_plan("loop(2-2x4-2)") == enc_loop_dec_plan(2, 2, 4, 2)
    assert describe(enc_loop_dec_plan(2, 2, 4, 2)) == "Loop(2-2×4-2)"
    assert describe(loop_plan(4, 3)) == "Loop(4×3)" and describe(list(range(6))) == "plain(6)"
    with pytest.raises(ValueError, match="not understood"):
        parse_spec("loop(4*3)")


@pytest.mark.parametrize("call,match", [
    (lambda: repeat_plan(8, 6, 4, 1), "runs past the last layer 7"),
    (lambda: swap_plan(6, 5, 1), "0..4"),
    (lambda: reverse_plan(6, 3, 4), "0..2"),
    (lambda: skip_plan(4, 7), "0..3"),
    (lambda: loop_plan(0, 3), "L=0"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_loop_sampler_is_reproducible_and_plausible():
    ks = [sample_loops(s, 3, 4, "poisson-lognormal", max_loops=16) for s in range(2000)]
    assert ks == [sample_loops(s, 3, 4, "poisson-lognormal", max_loops=16) for s in range(2000)]
    assert min(ks) >= 1 and max(ks) <= 16 and 4 < sum(ks) / len(ks) < 6   # mean ~ 4 + 1
    assert len(set(ks)) > 5
    assert sample_loops(5, 0, 3) == 3


def test_truncated_backprop_cuts_early_gradients():
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=31, block_size=16, n_layer=3, n_head=2, n_kv_head=2, n_embd=16, mlp_hidden=16))
    plan, grad_from = train_plan("loop(1-1x4-1)", step=0, bptt_k=2)
    assert plan == [0, 1, 1, 1, 1, 2] and grad_from == 3
    x = torch.randint(0, 31, (2, 8))
    _, loss = m(x, x, plan=plan, grad_from=grad_from)
    loss.backward()
    assert m.layers[0].mlp.up_proj.weight.grad is None            # encoder ran before grad_from
    assert m.layers[1].mlp.up_proj.weight.grad.abs().sum() > 0     # last iterations carry gradient


def test_cli_help_and_spec():
    out = subprocess.run([sys.executable, str(ROOT / "loop.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--ckpt" in out.stdout
    out = subprocess.run([sys.executable, str(ROOT / "loop.py"), "--spec", "loop(2-2x4-2)"], capture_output=True, text=True)
    assert "Loop(2-2×4-2)" in out.stdout and "6 unique" in out.stdout


def test_plan_from_spec():
    assert plan_from_spec("", 4) == [0, 1, 2, 3]
    assert plan_from_spec("repeat(2,2,1)", 8) == repeat_plan(8, 2, 2, 1)
    assert plan_from_spec("loop(2-2x4-2)", 6) == enc_loop_dec_plan(2, 2, 4, 2)
    assert plan_from_spec("0,1,1,2", 3) == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="set n_layer=6"):
        plan_from_spec("loop(2-2x4-2)", 8)
    with pytest.raises(ValueError, match="not understood"):
        plan_from_spec("spiral", 8)
