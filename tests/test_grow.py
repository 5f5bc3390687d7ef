"""grow.py: MIDAS/LIDAS operators, PROP-α schedule, growth == materialized loop, exact optimizer bookkeeping, CLI,
and train.py end to end across growth events."""
import math

import numpy as np
import pytest
import torch

import grow
from grow import growth_boundaries, lidas_order, midas_order, prop_schedule
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint


def tiny(n_layer=8, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=16, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64)
    return GPT(GPTConfig(**{**cfg, **kw}))  # GQA: 4 query heads share 2 key/value heads


def batch(seed=1, B=3, T=16, V=50):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def trained(model, steps=2, groups=None, **opt_kw):
    """A model and an AdamW with non-trivial state (moments and step counts) after `steps` real steps."""
    opt = torch.optim.AdamW(groups or model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, **opt_kw)
    for s in range(steps):
        x, y = batch(seed=10 + s)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def source_name(name, order):
    parts = name.split(".")
    if parts[0] == "layers":
        parts[1] = str(order[int(parts[1])])
    return ".".join(parts)


# ---- operators (PAPER §3.2) ----

def test_operators_on_paper_examples():
    assert midas_order(8, 4) == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    assert lidas_order(8, 4) == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]


def _pseudo_code(op, L, b):
    """PAPER §3.2 pseudo-code on a list of layer indices."""
    layers = list(range(L))
    if op == "midas":
        m = math.ceil(L // b / 2) - 1
        start, end = m * b, (m + 1) * b
    else:
        mid = math.ceil(L / 2)
        start, end = mid - math.ceil(b / 2), mid + b // 2
    return layers[:end] + layers[start:end] + layers[end:]


@pytest.mark.parametrize("L,b", [(2, 2), (4, 2), (6, 2), (8, 2), (10, 2), (4, 4), (8, 4), (12, 4), (16, 4), (20, 4),
                                 (24, 4), (6, 3), (9, 3), (12, 3), (3, 1), (4, 1)])
def test_operators_general_rule(L, b):
    n = L // b
    for op, fn in (("midas", midas_order), ("lidas", lidas_order)):
        order = fn(L, b)
        assert order == _pseudo_code(op, L, b)
        assert len(order) == L + b and sorted(set(order)) == list(range(L))
        # exactly one window of b consecutive layers appears twice in a row, everything else once
        dup = [i for i in range(L) if order.count(i) == 2]
        assert len(dup) == b and dup == list(range(dup[0], dup[0] + b))
        assert order == list(range(dup[-1] + 1)) + dup + list(range(dup[-1] + 1, L))
    if n % 2:  # odd number of blocks: the middle block is the layer-wise middle
        assert midas_order(L, b) == lidas_order(L, b)
    elif b > 1:
        assert midas_order(L, b) != lidas_order(L, b)
        # MIDAS copies the block just below mid-depth; LIDAS the window centred on layer L/2
        m = n // 2 - 1
        assert midas_order(L, b)[(m + 1) * b:(m + 2) * b] == list(range(m * b, (m + 1) * b))
        s, e = L // 2 - math.ceil(b / 2), L // 2 + b // 2
        assert lidas_order(L, b)[e:e + b] == list(range(s, e))


def test_full_growth_sequence_b4_to_12():
    # with b=4 to 12 layers, MIDAS and LIDAS differ only at the 2-block -> 3-block step (PAPER §7.3)
    assert midas_order(4, 4) == lidas_order(4, 4) == [0, 1, 2, 3] * 2
    assert midas_order(8, 4) != lidas_order(8, 4)


# ---- schedule (PAPER §2.4) ----

def test_prop_schedule_hand_checked():
    assert prop_schedule(10, 4) == [1, 2, 3, 4]          # exact quotas
    # 11·(1,2,3)/6 = 1.83, 3.67, 5.5 -> floors 1,3,5 (9); 2 left go to the largest remainders .83 and .67
    assert prop_schedule(11, 3) == [2, 4, 5]
    # 850·(1,2,3)/6 = 141.67, 283.33, 425 -> 141,283,425 (849); the one left goes to stage 1
    assert prop_schedule(850, 3) == [142, 283, 425]
    assert prop_schedule(9, 3, alpha=0) == [3, 3, 3]      # PROP-0 is uniform
    assert prop_schedule(14, 3, alpha=2) == [1, 4, 9]     # T·i²/14
    assert prop_schedule(7, 1) == [7]


@pytest.mark.parametrize("T,n,alpha", [(850, 3, 1.0), (850, 6, 1.0), (1001, 7, 1.0), (170000, 8, 1.0),
                                       (97, 5, 0.5), (500, 4, 2.0), (33, 6, 0.0)])
def test_prop_schedule_sums_exactly_and_is_largest_remainder(T, n, alpha):
    steps = prop_schedule(T, n, alpha)
    assert sum(steps) == T and len(steps) == n
    w = [i ** alpha for i in range(1, n + 1)]
    quota = [T * wi / sum(w) for wi in w]
    # largest remainder: every stage is its quota rounded down or up, and the rounded-up ones have the larger
    # remainders
    assert all(math.floor(q) <= s <= math.floor(q) + 1 for q, s in zip(quota, steps))
    up = [q - math.floor(q) for q, s in zip(quota, steps) if s > math.floor(q)]
    down = [q - math.floor(q) for q, s in zip(quota, steps) if s == math.floor(q)]
    assert not up or not down or min(up) >= max(down) - 1e-9


def test_growth_boundaries():
    assert growth_boundaries(12, 4, 850) == [(142, 8), (425, 12)]
    assert growth_boundaries(12, 2, 850) == [(41, 4), (122, 6), (243, 8), (405, 10), (607, 12)]
    assert growth_boundaries(4, 4, 850) == []  # a single stage never grows
    table = grow.stage_table(12, 4, 850, 1000)
    assert [(r["depth"], r["start"], r["steps"]) for r in table] == [(4, 0, 142), (8, 142, 283), (12, 425, 575)]


def test_flops_ratio_matches_paper():
    # COD Table 7 (PAPER §2.4): baseline/grown training FLOPs 1.289 (360M, 32 layers) and 1.288 (1.7B, 24 layers)
    # with PROP-1, b=4, a 170k-step window and 200k steps in all
    smol360 = GPTConfig(vocab_size=49152, block_size=2048, n_layer=32, n_head=15, n_kv_head=5, n_embd=960,
                        mlp_hidden=2560)
    smol1b7 = GPTConfig(vocab_size=49152, block_size=2048, n_layer=24, n_head=32, n_kv_head=32, n_embd=2048,
                        mlp_hidden=8192)
    for cfg, paper in ((smol360, 1.289), (smol1b7, 1.288)):
        r = grow.flops_ratio(grow.stage_table(cfg.n_layer, 4, 170_000, 200_000), cfg)
        assert abs(1 / r - paper) < 0.002, (cfg.n_layer, 1 / r)
    tiny_table = grow.stage_table(12, 4, 850, 1000)
    assert 0.7 < grow.flops_ratio(tiny_table, GPTConfig(**grow.TINY)) < 0.85
    # no growth at all costs exactly the baseline
    assert grow.flops_ratio(grow.stage_table(12, 12, 850, 1000), GPTConfig(**grow.TINY)) == 1.0


# ---- growth == materialized loop ----

@pytest.mark.parametrize("op,L,b", [("midas", 8, 4), ("lidas", 8, 4), ("midas", 8, 2), ("lidas", 8, 2),
                                    ("lidas", 4, 4), ("lidas", 12, 4)])
def test_grown_model_equals_looped_plan(op, L, b):
    model = tiny(L)
    opt = trained(model)
    order = grow.grow_order(op, L, b)
    x, y = batch(seed=3)
    model.eval()
    with torch.no_grad():
        want_logits, want_loss = model(x, y, plan=order)
    new, _ = grow.grow(model, opt, op, b)
    assert new.config.plan is None and new.config.n_layer == L + b and new.plan == list(range(L + b))
    new.eval()
    with torch.no_grad():
        logits, loss = new(x, y)
    assert torch.equal(logits, want_logits) and torch.equal(loss, want_loss)  # exact, atol=0
    # the old model is untouched and the new one shares no storage with it
    old_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not old_ptrs & {p.data_ptr() for p in new.parameters()}


def test_grow_keeps_dtype_device_mode_and_compiles():
    model = tiny(4).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters())
    model.compile_blocks()
    new, _ = grow.grow(model, opt, "midas", 4)
    assert all(p.dtype == torch.bfloat16 and p.device == model.embed_tokens.weight.device for p in new.parameters())
    assert new.training == model.training
    # compiled again, over the *new* blocks (the old compiled callables wrap the old layers)
    assert new._compiled is not None and len(new._compiled) == 8
    assert all(c._orig_mod is blk for c, blk in zip(new._compiled, new.layers))
    x, _ = batch()
    model._compiled = new._compiled = None  # eager forward for the exactness check (no C++ compiler needed)
    with torch.no_grad():
        assert torch.equal(new(x)[0], model(x, plan=midas_order(4, 4))[0])


# ---- optimizer bookkeeping (ANCHORS §11) ----

def test_every_parameter_in_new_optimizer_once_with_copied_state():
    model = tiny(8)
    opt = trained(model, steps=2)
    order = lidas_order(8, 4)
    old = dict(model.named_parameters())
    new, new_opt = grow.grow(model, opt, "lidas", 4)
    in_opt = [p for g in new_opt.param_groups for p in g["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt}) == len(list(new.parameters()))
    assert {id(p) for p in in_opt} == {id(p) for p in new.parameters()}
    assert type(new_opt) is type(opt) and new_opt.defaults == opt.defaults
    for name, p in new.named_parameters():
        src = old[source_name(name, order)]
        st, src_st = new_opt.state[p], opt.state[src]
        assert set(st) == set(src_st) == {"step", "exp_avg", "exp_avg_sq"}
        for k in src_st:
            assert torch.equal(st[k], src_st[k]) and st[k].dtype == src_st[k].dtype
            assert st[k].data_ptr() != src_st[k].data_ptr()  # a clone: copies evolve independently
        assert float(st["step"]) == 2 and st["exp_avg_sq"].abs().sum() > 0  # non-trivial state
        assert torch.equal(p, src)
    # two copies of the same layer hold separate state tensors
    a, b = new.layers[2].mlp.up_proj.weight, new.layers[6].mlp.up_proj.weight
    assert torch.equal(new_opt.state[a]["exp_avg"], new_opt.state[b]["exp_avg"])
    assert new_opt.state[a]["exp_avg"].data_ptr() != new_opt.state[b]["exp_avg"].data_ptr()


def test_param_groups_keep_every_hyperparameter():
    model = tiny(8)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0, lr=3e-3)]
    opt = trained(model, groups=groups, foreach=False)
    for g in opt.param_groups:
        g["lr"] *= 0.5          # the caller's LR schedule moved it; growth must keep it, not reset it
        g["initial_lr"] = 1e-2  # keys added by LR schedulers are kept too
    new, new_opt = grow.grow(model, opt, "midas", 4)
    assert len(new_opt.param_groups) == 2
    for g, ng in zip(opt.param_groups, new_opt.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in ng.items() if k != "params"}
    assert {id(p) for p in new_opt.param_groups[0]["params"]} == {id(p) for p in new.parameters() if p.dim() >= 2}
    assert {id(p) for p in new_opt.param_groups[1]["params"]} == {id(p) for p in new.parameters() if p.dim() < 2}
    # params keep the model's named order inside each group
    assert new_opt.param_groups[0]["params"] == [p for p in new.parameters() if p.dim() >= 2]


def test_named_param_groups_get_new_names():
    model = tiny(4)
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
    new, new_opt = grow.grow(model, opt, "lidas", 4)
    assert new_opt.param_groups[0]["param_names"] == [n for n, _ in new.named_parameters()]


def test_step_after_growth_matches_hand_built_reference():
    model = tiny(8)
    opt = trained(model, steps=2)
    order = midas_order(8, 4)
    old_sd = opt.state_dict()  # params indexed 0..n-1 in model.named_parameters() order
    old_index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    new, new_opt = grow.grow(model, opt, "midas", 4)

    # reference: a fresh grown model and an AdamW whose state dict we map by hand, index by index
    ref = model.materialize(order)
    ref_opt = torch.optim.AdamW(ref.parameters())
    names = [n for n, _ in ref.named_parameters()]
    ref_opt.load_state_dict({
        "state": {i: {k: v.clone() for k, v in old_sd["state"][old_index[source_name(n, order)]].items()}
                  for i, n in enumerate(names)},
        "param_groups": [dict(old_sd["param_groups"][0], params=list(range(len(names))))]})
    x, y = batch(seed=5)
    for m, o in ((new, new_opt), (ref, ref_opt)):
        m(x, y)[1].backward()
        o.step()
    for (n, p), (_, q) in zip(new.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(new_opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"]), n
    # every parameter moved (none was left out of the optimizer) and the copies started to diverge
    before = model.materialize(order)
    assert all(not torch.equal(p, before.get_parameter(n)) for n, p in new.named_parameters())
    assert not torch.equal(new.layers[0].mlp.up_proj.weight, new.layers[4].mlp.up_proj.weight)


def test_adamw_formula_on_a_copied_layer():
    # the step uses the copied moments and step count: check one tensor against AdamW written out by hand
    model = tiny(4)
    opt = trained(model, steps=3)
    lr, (b1, b2), eps, wd = 1e-2, (0.8, 0.95), 1e-8, 0.1
    new, new_opt = grow.grow(model, opt, "midas", 4)
    p = new.layers[5].self_attn.q_proj.weight  # a copy of old layer 1
    st = {k: v.clone() for k, v in opt.state[model.layers[1].self_attn.q_proj.weight].items()}
    before = p.detach().clone()
    new(*batch(seed=7))[1].backward()
    g = p.grad.clone()
    new_opt.step()
    t = float(st["step"]) + 1
    m = b1 * st["exp_avg"] + (1 - b1) * g
    v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
    want = before * (1 - lr * wd) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    assert torch.allclose(p.detach(), want, rtol=0, atol=1e-7)
    assert float(new_opt.state[p]["step"]) == 4


# ---- bad input ----

def test_bad_inputs():
    model = tiny(8)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="b=3 does not divide the current depth L=8"):
        grow.grow(model, opt, "midas", 3)
    with pytest.raises(ValueError, match="unknown growth operator 'stack'"):
        grow.grow(model, opt, "stack", 4)
    with pytest.raises(ValueError, match="target depth 10 must be a multiple of the block size b=4"):
        growth_boundaries(10, 4, 850)
    with pytest.raises(ValueError, match="target depth 2 must be a multiple"):
        growth_boundaries(2, 4, 850)
    with pytest.raises(ValueError, match="too short for 6 PROP-1 stages.*any window of 12 steps or more works"):
        growth_boundaries(12, 2, 11)  # 11·(1..6)/21 rounds the first stage to 0 steps (but 10 and >= 12 work)
    assert all(min(prop_schedule(t, 6)) >= 1 for t in [10] + list(range(12, 200)))
    with pytest.raises(ValueError, match="window"):
        prop_schedule(0, 3)
    with pytest.raises(ValueError, match="total steps 500 must be an integer >= the growth window"):
        grow.stage_table(12, 4, 850, 500)
    with pytest.raises(ValueError, match="raw model.GPT"):
        grow.grow(torch.nn.Linear(2, 2), opt, "midas", 4)
    looped = tiny(4, plan=[0, 1, 2, 3, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="default plan"):
        grow.grow(looped, torch.optim.AdamW(looped.parameters()), "midas", 4)
    with pytest.raises(ValueError, match="not parameters of the model"):
        grow.grow(model, torch.optim.AdamW(list(model.parameters()) + [torch.nn.Parameter(torch.ones(3))]),
                  "midas", 4)


# ---- command line ----

def test_cli_grows_a_checkpoint(tmp_path, capsys):
    model = tiny(8)
    opt = trained(model, steps=2)
    src = tmp_path / "ckpt.pt"
    save_checkpoint(src, model, optimizer=opt.state_dict(), step=2, tokenizer="byte", train_config={"lr": 1e-2})
    out = tmp_path / "grown.pt"
    grow.main(["--ckpt", str(src), "--op", "lidas", "--block", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert "depth 8 -> 12" in text and "plain(8)" in text and "plain(12)" in text and str(lidas_order(8, 4)) in text

    new, ck = load_checkpoint(out)
    assert ck["step"] == 2 and ck["tokenizer"] == "byte" and ck["train_config"] == {"lr": 1e-2}
    assert ck["grow_block"] == 4 and ck["grow_op"] == "lidas" and new.config.plan is None
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(new(x)[0], model(x, plan=lidas_order(8, 4))[0])
    # the saved optimizer state loads into AdamW(new.parameters()) and equals the sources' state
    new_opt = torch.optim.AdamW(new.parameters())
    new_opt.load_state_dict(ck["optimizer"])
    old = dict(model.named_parameters())
    for name, p in new.named_parameters():
        src_st = opt.state[old[source_name(name, lidas_order(8, 4))]]
        assert all(torch.equal(new_opt.state[p][k], src_st[k]) for k in src_st)
    assert new_opt.param_groups[0]["lr"] == 1e-2 and new_opt.param_groups[0]["betas"] == (0.8, 0.95)


def test_cli_drops_unmappable_optimizer_state(tmp_path):
    model = tiny(8)
    other = tiny(8, mlp_hidden=48)  # same parameter count per tensor list, different shapes
    opt = trained(other, steps=1)
    src = tmp_path / "ckpt.pt"
    save_checkpoint(src, model, optimizer=opt.state_dict())
    with pytest.warns(UserWarning, match="does not map onto the model"):
        grow.main(["--ckpt", str(src), "--op", "midas", "--block", "4", "--out", str(tmp_path / "g.pt")])
    _, ck = load_checkpoint(tmp_path / "g.pt")
    assert "optimizer" not in ck


def test_cli_rejects_non_checkpoints_and_bad_blocks(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a growloop checkpoint"):
        grow.main(["--ckpt", str(bad), "--out", str(tmp_path / "o.pt")])
    with pytest.raises(FileNotFoundError):
        grow.main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o.pt")])
    src = tmp_path / "ckpt.pt"
    save_checkpoint(src, tiny(8))
    with pytest.raises(ValueError, match="b=3 does not divide"):
        grow.main(["--ckpt", str(src), "--block", "3", "--out", str(tmp_path / "o.pt")])
    assert not (tmp_path / "o.pt").exists()


def test_cli_schedule_and_help(capsys):
    grow.main(["--schedule", "--target", "12", "--block", "4", "--total", "1000"])
    text = capsys.readouterr().out
    assert "window 850 steps" in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert rows == [["1", "4", "0", "142"], ["2", "8", "142", "283"], ["3", "12", "425", "575"]]
    ratio = float(text.split("same 1000 steps: ")[1].split()[0])
    assert abs(ratio - grow.flops_ratio(grow.stage_table(12, 4, 850, 1000), GPTConfig(**grow.TINY))) < 1e-4
    with pytest.raises(SystemExit):
        grow.main(["--help"])
    assert "--schedule" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        grow.main(["--schedule", "--target", "12"])  # needs --total or --window


# ---- train.py end to end: growth events, FLOPs and exact resume across growth ----

def micro_data(root):
    """A tiny prepared byte-level source 'toy' under root/byte/toy/{train,val}.bin (data.store's writer)."""
    from data.store import write_tokens
    rng = np.random.default_rng(0)
    words = [bytes(rng.integers(97, 123, size=rng.integers(2, 7))).decode() for _ in range(40)]
    for split, n in (("train", 3000), ("val", 200)):
        text = " ".join(words[i] for i in rng.integers(0, len(words), size=n))
        write_tokens(root / "byte" / "toy" / f"{split}.bin", np.frombuffer(text.encode(), dtype=np.uint8),
                     {"tokenizer": "byte", "source": "toy", "split": split})
    return root


@pytest.fixture(scope="module")
def micro_train(tmp_path_factory):
    """train.run on a micro config, each distinct run once per module: -> (summary, out_dir)."""
    import train
    root = tmp_path_factory.mktemp("micro")
    micro_data(root / "data")
    done = {}

    def run(name, **kw):
        # 8 layers grown by 2 from 2; 20 steps, cooldown 3 -> PROP-1 window 17 -> stages [2, 3, 5, 7+3]
        cfg = dict(dict(data_dir=str(root / "data"), mixture={"toy": 1.0}, out_dir=str(root / name), device="cpu",
                   dtype="float32", n_layer=8, n_embd=32, n_head=2, n_kv_head=1, mlp_hidden=64, block_size=32,
                   max_steps=20, batch_tokens=128, micro_batch=4, warmup_steps=2, val_batches=1, eval_interval=10,
                   ckpt_interval=10, grow="lidas", grow_block=2), **kw)
        key = (name, tuple(sorted(kw.items())))
        if key not in done:  # (runs on one thread: the autouse fixture above)
            done[key] = train.run(cfg), root / name
        return done[key]
    return run


def read_log(path):
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("op", ["midas", "lidas"])
def test_train_grows_through_the_stages(micro_train, op):
    summary, out = micro_train(op, grow=op)
    log = read_log(out / "log.jsonl")
    table = grow.stage_table(8, 2, 17, 20)
    assert [(r["start"], r["depth"]) for r in table] == [(0, 2), (2, 4), (5, 6), (10, 8)]
    assert [(e["step"], e["depth"]) for e in log if e["event"] == "grow"] == [(2, 4), (5, 6), (10, 8)]
    depth_at = {e["step"]: e["depth"] for e in log if e["event"] == "train"}
    assert depth_at == {s: r["depth"] for r in table for s in range(r["start"], r["start"] + r["steps"])}
    assert summary["finished"] and summary["depth"] == 8
    want = grow.flops_ratio(table, GPTConfig(vocab_size=257, block_size=32, n_layer=8, n_head=2, n_kv_head=1,
                                             n_embd=32, mlp_hidden=64))
    assert summary["flops_ratio"] < 1 and summary["flops_ratio"] == pytest.approx(want, rel=1e-12)
    # bookkeeping through the whole run: every parameter of the final model is in the optimizer and its AdamW
    # step count is 20, i.e. it (or the layer it was copied from) was updated at every step since step 0
    model, ck = load_checkpoint(out / "ckpt.pt")
    names = [n for n, _ in model.named_parameters()]
    assert sorted(ck["optimizer_names"]) == sorted(names)
    assert len(ck["optimizer"]["state"]) == len(names)
    assert all(float(st["step"]) == 20 for st in ck["optimizer"]["state"].values())


def test_train_resume_across_growth_is_exact(micro_train):
    full, full_dir = micro_train("lidas", grow="lidas")
    # stop at step 10: the growth events at steps 2 and 5 happen before, the one at step 10 right after the resume
    half, half_dir = micro_train("half", stop_step=10)
    assert not half["finished"] and half["step"] == 10 and half["depth"] == 6
    resumed, _ = micro_train("half", resume=True)
    assert resumed["finished"] and resumed["depth"] == 8
    a, b = read_log(full_dir / "log.jsonl"), read_log(half_dir / "log.jsonl")
    losses = lambda log: [(e["step"], e["loss"]) for e in log if e["event"] == "train"]
    assert len(losses(a)) == 20 and losses(a) == losses(b)  # identical with ==, not approx
    assert [e for e in a if e["event"] == "grow"] == [e for e in b if e["event"] == "grow"]
    assert full["flops"] == resumed["flops"] and full["val"] == resumed["val"]
    m1, _ = load_checkpoint(full_dir / "ckpt.pt")
    m2, _ = load_checkpoint(half_dir / "ckpt.pt")
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_cli_grows_a_train_checkpoint(micro_train, tmp_path):
    # train.py saves AdamW with decay / no-decay groups and `optimizer_names`: both must survive offline growth
    import train
    _, out = micro_train("lidas", grow="lidas")
    model, ck = load_checkpoint(out / "ckpt.pt")
    assert len(ck["optimizer"]["param_groups"]) == 2
    grow.main(["--ckpt", str(out / "ckpt.pt"), "--op", "midas", "--block", "2", "--out", str(tmp_path / "g.pt")])
    new, gk = load_checkpoint(tmp_path / "g.pt")
    assert gk["depth"] == new.config.n_layer == 10 and gk["step"] == ck["step"] and gk["tokens"] == ck["tokens"]
    cfg = train.make_config({})
    opt = train.configure_optimizer(new, cfg, torch.device("cpu"), (gk["optimizer"], gk["optimizer_names"]))
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in ck["optimizer"]["param_groups"]]
    old_opt = train.configure_optimizer(model, cfg, torch.device("cpu"), (ck["optimizer"], ck["optimizer_names"]))
    old = dict(model.named_parameters())
    for name, p in new.named_parameters():
        src = old[source_name(name, midas_order(8, 2))]
        assert all(torch.equal(opt.state[p][k], old_opt.state[src][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
