import copy

import pytest
import torch

from model import GPT, GPTConfig, KVCache, Trace, check_plan, load_checkpoint, save_checkpoint


def tiny(n_layer=4, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, block_size=64, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=48)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_plan_equivalence_materialized_copies():
    # the paper's thesis as an invariant: a repeated plan == a deeper model made of copies
    m = tiny()
    x = torch.randint(0, 61, (2, 20))
    plan = [0, 1, 2, 1, 2, 3]
    looped, _ = m(x, plan=plan)
    deep = GPT(GPTConfig(**{**m.config.__dict__, "n_layer": 6, "plan": None})).eval()
    deep.embed_tokens.load_state_dict(m.embed_tokens.state_dict())
    deep.norm.load_state_dict(m.norm.state_dict())
    for i, src in enumerate(plan):
        deep.layers[i] = copy.deepcopy(m.layers[src])
    torch.testing.assert_close(deep(x)[0], looped, rtol=0, atol=0)
    torch.testing.assert_close(m.materialize(plan)(x)[0], looped, rtol=0, atol=0)
    # and a plan differs from the default (the plan is really used)
    assert not torch.allclose(m(x)[0], looped)


def test_config_plan_is_default_and_per_call_override():
    m = tiny(plan=[0, 1, 1, 2, 3])
    x = torch.randint(0, 61, (1, 10))
    torch.testing.assert_close(m(x)[0], m(x, plan=[0, 1, 1, 2, 3])[0])
    assert not torch.allclose(m(x)[0], m(x, plan=[0, 1, 2, 3])[0])


@pytest.mark.parametrize("plan", [None, [0, 1, 2, 3] * 3, [0, 1, 2, 3, 2, 3, 2, 3]])
def test_cached_greedy_decode_equals_uncached(plan):
    m = tiny()
    x = torch.randint(0, 61, (2, 7))
    a = m.generate(x, 30, temperature=0, plan=plan, use_cache=True)
    b = m.generate(x, 30, temperature=0, plan=plan, use_cache=False)
    assert torch.equal(a, b)


def test_decode_past_context_matches_uncached():
    m = tiny(block_size=16)
    x = torch.randint(0, 61, (1, 10))
    a = m.generate(x, 20, temperature=0, plan=[0, 1, 1, 2, 3])
    b = m.generate(x, 20, temperature=0, plan=[0, 1, 1, 2, 3], use_cache=False)
    assert torch.equal(a, b)


def test_kv_cache_chunked_prefill_equals_full_forward():
    m = tiny()
    x = torch.randint(0, 61, (2, 24))
    plan = [0, 1, 2, 1, 2, 3]
    full, _ = m(x, plan=plan)
    cache = [KVCache() for _ in plan]
    parts = [m(x[:, a:b], plan=plan, cache=cache)[0] for a, b in ((0, 9), (9, 10), (10, 24))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert len(cache) == len(plan) and cache[1].k is not cache[3].k  # one slot per plan position


def test_trace_records_and_edits():
    m = tiny()
    x = torch.randint(0, 61, (2, 12))
    tr = Trace()
    logits, _ = m(x, trace=tr, plan=[0, 1, 1, 3])
    assert len(tr.h) == len(tr.a) == len(tr.m) == 4
    torch.testing.assert_close(tr.h[1], tr.h[0] + tr.a[0] + tr.m[0])  # h_{i+1} = h_i + a_i + m_i
    torch.testing.assert_close(logits, m(x, plan=[0, 1, 1, 3])[0])    # reading changes nothing

    def drop(kind, step, t, resid):  # removing step 2's contribution == skipping that step
        return torch.zeros_like(t) if step == 2 and kind in "am" else None
    torch.testing.assert_close(m(x, plan=[0, 1, 1, 3], trace=Trace(edit=drop))[0], m(x, plan=[0, 1, 3])[0])


def test_flops_hand_count_and_looped_cost():
    m = tiny()
    T, d, hd = 64, 32, 8
    attn = 2 * (d * 4 * hd * 2 + d * 2 * hd * 2)           # q, o: d x 32 ; k, v: d x 16 (2 kv heads)
    mlp = 2 * 3 * d * 48
    step = attn + mlp + 4 * T * d
    head = 2 * d * 61
    assert m.flops_per_token() == 4 * step + head
    assert m.flops_per_token(train=True) == 3 * (4 * step + head)
    looped = [0, 1, 2, 3, 2, 3]
    assert m.flops_per_token(looped) - m.flops_per_token() == 2 * step   # exactly its extra steps
    assert m.flops_per_token(looped, train=True, no_grad_steps=2) == 3 * (6 * step + head) - 2 * 2 * step
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    blk = sum(p.numel() for p in m.layers[0].parameters())
    assert m.num_params(looped, effective=True) == m.num_params() + 2 * blk


@pytest.mark.parametrize("kw,match", [
    (dict(n_embd=30, n_head=4), "n_embd=30"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head=3"),
    (dict(plan=[0, 9]), "layer 9"),
    (dict(plan=[]), "empty plan"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_bad_plan_per_call_raises():
    m = tiny()
    x = torch.randint(0, 61, (1, 4))
    with pytest.raises(ValueError, match="layers 0..3"):
        m(x, plan=[0, 4])
    with pytest.raises(ValueError, match="not an integer"):
        check_plan([0, 1.5], 4)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = tiny(plan=[0, 1, 2, 2, 3])
    p = tmp_path / "ckpt.pt"
    save_checkpoint(str(p), m, step=7)
    m2, ck = load_checkpoint(str(p))
    x = torch.randint(0, 61, (1, 9))
    torch.testing.assert_close(m2.eval()(x)[0], m(x)[0])
    assert m2.plan == [0, 1, 2, 2, 3] and ck["step"] == 7
    assert not any(k.endswith(".tmp") for k in map(str, tmp_path.iterdir()))
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(p.read_bytes()[:300])
    with pytest.raises(ValueError, match="not a readable growloop checkpoint"):
        load_checkpoint(str(bad))
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError):
        load_checkpoint(str(txt))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_hf_names_and_rope_convention():
    m = tiny()
    sd = m.hf_state_dict(plan=[0, 1, 1, 2])
    assert "model.layers.3.self_attn.q_proj.weight" in sd and "lm_head.weight" in sd
    assert torch.equal(sd["model.layers.2.mlp.up_proj.weight"], m.layers[1].mlp.up_proj.weight)
    # rotate-half RoPE: position 0 is the identity, and q·k depends only on the relative offset
    from model import apply_rope, rope_tables
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    torch.testing.assert_close(apply_rope(q, cos[:1], sin[:1]), q)
    dot = lambda i, j: (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()
    torch.testing.assert_close(dot(5, 3), dot(12, 10))


def test_compiled_blocks_agree_and_plan_change_does_not_recompile():
    torch._dynamo.reset()
    m = tiny(n_layer=2)
    x = torch.randint(0, 61, (2, 16))
    eager = [m(x, plan=p)[0] for p in ([0, 1], [0, 1, 1, 0])]
    m.compile_blocks(dynamic=False)
    from torch._dynamo.utils import counters
    counters.clear()
    comp1 = m(x, plan=[0, 1])[0]
    frames = counters["stats"]["unique_graphs"]
    comp2 = m(x, plan=[0, 1, 1, 0])[0]   # new plan over the same blocks: no new graphs
    assert counters["stats"]["unique_graphs"] == frames
    torch.testing.assert_close(comp1, eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comp2, eager[1], rtol=1e-4, atol=1e-4)
    assert not any("_orig_mod" in k for k in m.state_dict())
