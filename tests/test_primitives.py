"""Tests for data/primitives.py: formats (PAPER §2.6), answers, determinism, shot sweeps, hold-out (PAPER §7.1)."""
import re

import pytest

from data import primitives as P

VA_TASKS = [t for t in P.TASKS if t.startswith("va_")]
VA_HEADERS = {"basic": "Fill in blank:",
              "math": "The following is a set of simple mathematical equations.",
              "code": "The following is a very short Python program. Use the program to resolve the value of the "
                      "variable in the question."}


# ---------------------------------------------------------------------------------------------------------------
# independent parsing of the text (does not use the generator's internals)

def split_prompt(text):
    """header, [example blocks]; blocks are separated by a blank line."""
    header, rest = text.split("\n", 1)
    return header, rest.split("\n\n")


def parse_va(block):
    """(bindings, query, answer-or-None) of one variable-assignment example in any of the three forms."""
    bindings, query, answer = [], None, None
    for line in block.strip("\n").split("\n"):
        if line == "Program:":
            continue
        m = re.fullmatch(r"([a-z]) ?= ?([a-z]|\d+)", line)
        if m:
            bindings.append((m.group(1), m.group(2)))
            continue
        m = (re.fullmatch(r"([a-z])=___\. ->(?: (\d+))?", line)
             or re.fullmatch(r"What is the numerical value of ([a-z])\? Answer:(?: (\d+))?", line)
             or re.fullmatch(r"Question: What is the value of ([a-z])\? Answer:(?: (\d+))?", line))
        assert m, f"unparseable line {line!r}"
        query, answer = m.group(1), m.group(2)
    return bindings, query, answer


def resolve(bindings, query):
    env = dict(bindings)
    assert len(env) == len(bindings), "a variable is bound twice"
    hops, x = 0, query
    while not x.isdigit():
        x, hops = env[x], hops + 1
    return x, hops - 1  # depth = substitution hops after reading the query's own binding


def parse_copy(block):
    """(sequence, segment, answer-or-None) of one copying example."""
    m = re.fullmatch(r"([a-z ]+) ___\. ->(?: ([a-z]+))?", block.strip("\n"))
    assert m, f"unparseable copy example {block!r}"
    words = m.group(1).split()
    return words[:P.COPY_LEN], words[P.COPY_LEN:], m.group(2)


def copy_answer(seq, seg):
    assert len(set(seq)) == len(seq)
    starts = [i for i in range(len(seq) - len(seg)) if seq[i:i + len(seg)] == seg]
    assert len(starts) == 1
    return seq[starts[0] + len(seg)]


def key_of(bindings, query):
    return (frozenset(bindings), query)


def doc_va_keys(doc):
    header, blocks = split_prompt(doc)
    if header not in VA_HEADERS.values():
        return []
    out = []
    for b in blocks:
        bindings, q, a = parse_va(b)
        assert resolve(bindings, q)[0] == a
        out.append(key_of(bindings, q))
    return out


# ---------------------------------------------------------------------------------------------------------------
# formats

GOLDEN = {  # make_task(task, 1, shots, seed=0)[0]: prompt + candidates[answer]; also printed in the module docstring
    ("copy_random", 1): "Fill in the blank:\n"
                        "igr qlb hsw tts gln vsq otg pkg grp jpo hsw tts gln vsq otg ___. -> pkg\n\n"
                        "yke bkx sni ozy gxn bru jvj vca gim fii yke bkx sni ozy gxn ___. -> bru\n",
    ("va_basic_d1", 0): "Fill in blank:\nv=14\np=11\nl=13\nc=18\nw=8\ne=l\nt=c\na=w\nr=v\nh=p\na=___. -> 8\n",
    ("va_math_d0", 0): "The following is a set of simple mathematical equations.\n"
                       "h=20\na=6\ny=3\nx=17\np=19\nWhat is the numerical value of x? Answer: 17\n",
    ("va_code_d2", 0): VA_HEADERS["code"] + "\nProgram:\nv = 17\nk = 11\nn = 22\nz = 9\nx = 2\nw = n\np = v\nd = z\n"
                       "m = x\no = k\nh = m\nj = d\nl = p\ne = w\ns = o\nQuestion: What is the value of e? Answer: 22\n",
}


@pytest.mark.parametrize("task,shots", list(GOLDEN))
def test_golden_literals(task, shots):
    ex = P.make_task(task, 1, shots=shots, seed=0)[0]
    text = ex["prompt"] + ex["candidates"][ex["answer"]]
    assert text == GOLDEN[(task, shots)]
    indented = "\n".join("    " + line if line else "" for line in text.rstrip("\n").split("\n"))
    assert indented in P.__doc__, "module docstring example is out of date"


def layout_regex(task, shots):
    if task.startswith("copy"):
        w = "[a-z]{3}" if task == "copy_random" else "[a-z]+"
        body = f"{w}(?: {w}){{{P.COPY_LEN + P.SEG_LEN - 1}}} ___\\. ->"
        header, ans = "Fill in the blank:", f" {w}\n"
    else:
        _, form, d = task.split("_")
        nlines = P.N_BINDINGS * (int(d[1]) + 1)
        if form == "basic":
            body = f"(?:[a-z]=(?:[a-z]|\\d+)\n){{{nlines}}}[a-z]=___\\. ->"
        elif form == "math":
            body = f"(?:[a-z]=(?:[a-z]|\\d+)\n){{{nlines}}}What is the numerical value of [a-z]\\? Answer:"
        else:
            body = f"Program:\n(?:[a-z] = (?:[a-z]|\\d+)\n){{{nlines}}}Question: What is the value of [a-z]\\? Answer:"
        header, ans = VA_HEADERS[form], " \\d+\n"
    return re.escape(header) + "\n" + f"(?:{body}{ans}\n){{{shots}}}" + body


@pytest.mark.parametrize("task", P.TASKS)
def test_layout_and_answers(task):
    for ex in P.make_task(task, 20, shots=3, seed=1):
        assert ex["task"] == task
        assert re.fullmatch(layout_regex(task, 3), ex["prompt"]), ex["prompt"]
        cands = ex["candidates"]
        assert len(cands) == (P.COPY_LEN if task.startswith("copy") else P.N_BINDINGS)
        assert len(set(cands)) == len(cands) and all(re.fullmatch(r" \w+\n", c) for c in cands)
        header, blocks = split_prompt(ex["prompt"])
        for i, block in enumerate(blocks):  # demonstrations carry their answer; the query does not
            if task.startswith("copy"):
                seq, seg, given = parse_copy(block)
                assert len(seg) == P.SEG_LEN
                truth = copy_answer(seq, seg)
            else:
                bindings, q, given = parse_va(block)
                truth, depth = resolve(bindings, q)
                assert depth == int(task[-1])
                assert len({v for _, v in bindings if v.isdigit()}) == P.N_BINDINGS  # distinct values
            if i < len(blocks) - 1:
                assert given == truth
            else:
                assert given is None
                # the correct candidate, found independently, occurs exactly once and is the one marked
                assert [c.strip() for c in cands].count(truth) == 1
                assert cands[ex["answer"]] == f" {truth}\n"
                if task.startswith("va_"):
                    assert sorted(c.strip() for c in cands) == sorted(v for _, v in bindings if v.isdigit())
                else:
                    assert sorted(c.strip() for c in cands) == sorted(seq)


def test_chance_and_task_list():
    assert len(P.TASKS) == 11 and P.TASKS[:2] == ("copy_random", "copy_real")
    assert {P.chance(t) for t in P.TASKS[:2]} == {0.1}
    assert {P.chance(t) for t in VA_TASKS} == {0.2}
    with pytest.raises(ValueError, match="va_code_d2"):
        P.chance("va_code_d3")


# ---------------------------------------------------------------------------------------------------------------
# determinism and shot sweeps

def test_deterministic_and_seeded():
    for task in ("copy_real", "va_math_d1"):
        a = P.make_task(task, 8, shots=2, seed=3)
        assert a == P.make_task(task, 8, shots=2, seed=3)
        assert a[:5] == P.make_task(task, 5, shots=2, seed=3)  # n only extends the list
        assert [e["prompt"] for e in a] != [e["prompt"] for e in P.make_task(task, 8, shots=2, seed=4)]
    docs = list(P.training_documents(20, seed=1))
    assert docs == list(P.training_documents(20, seed=1)) != list(P.training_documents(20, seed=2))
    assert P.sft_examples(8, seed=1) == P.sft_examples(8, seed=1) != P.sft_examples(8, seed=2)


@pytest.mark.parametrize("task", ["copy_random", "va_basic_d2", "va_code_d0"])
def test_shot_sweep_shares_queries(task):
    sweeps = {k: P.make_task(task, 6, shots=k, seed=0) for k in (0, 1, 5, 12)}
    for i in range(6):
        queries = {split_prompt(sweeps[k][i]["prompt"])[1][-1] for k in sweeps}
        assert len(queries) == 1
        assert len({(tuple(sweeps[k][i]["candidates"]), sweeps[k][i]["answer"]) for k in sweeps}) == 1
        demos = {k: split_prompt(sweeps[k][i]["prompt"])[1][:-1] for k in sweeps}
        assert [len(demos[k]) for k in sweeps] == list(sweeps)
        assert demos[5] == demos[12][:5] and demos[1] == demos[5][:1]  # more shots = more of the same stream
        query = split_prompt(sweeps[12][i]["prompt"])[1][-1]
        assert all(not d.startswith(query) for d in demos[12])  # the query is never its own demonstration


# ---------------------------------------------------------------------------------------------------------------
# hold-out

def test_training_never_contains_eval_examples():
    eval_keys = set()
    for task in VA_TASKS:
        for seed in (0, 1):
            for ex in P.make_task(task, 100, shots=2, seed=seed):
                for block in split_prompt(ex["prompt"])[1]:  # queries and demonstrations
                    bindings, q, _ = parse_va(block)
                    eval_keys.add(key_of(bindings, q))
    train_keys = []
    for doc in P.training_documents(600, seed=0, depths=(0, 1, 2)):
        train_keys += doc_va_keys(doc)
    for ex in P.sft_examples(200, depths=(0, 1), seed=0) + P.sft_examples(100, depths=(2,), form="basic"):
        bindings, q, _ = parse_va(split_prompt(ex["prompt"])[1][-1])
        assert resolve(bindings, q)[0] == ex["answer"].strip()
        train_keys.append(key_of(bindings, q))
    assert len(train_keys) > 1000 and not eval_keys & set(train_keys)


def test_holdout_enforced_in_tiny_example_space(monkeypatch):
    # With 5 letters and 5 values there are only 5! * 5 = 600 depth-0 examples: without the eval/train split of the
    # example space, hundreds of training examples would repeat evaluation ones. This test fails if the split goes.
    monkeypatch.setattr(P, "LETTERS", "abcde")
    monkeypatch.setattr(P, "VALUES", (1, 2, 3, 4, 5))
    eval_keys = set()
    for ex in P.make_task("va_basic_d0", 150, shots=1, seed=0):
        for block in split_prompt(ex["prompt"])[1]:
            bindings, q, _ = parse_va(block)
            eval_keys.add(key_of(bindings, q))
    train_keys = set()
    for doc in P.training_documents(150, seed=0, families=("va_basic", "va_math", "va_code"), depths=(0,)):
        train_keys |= set(doc_va_keys(doc))
    for ex in P.sft_examples(150, depths=(0,), form="code"):
        bindings, q, _ = parse_va(split_prompt(ex["prompt"])[1][0])
        train_keys.add(key_of(bindings, q))
    assert len(eval_keys) > 100 and len(train_keys) > 150
    assert not eval_keys & train_keys
    # in so small a space a query would often reappear among its own 20 demonstrations unless excluded
    for ex in P.make_task("va_basic_d0", 30, shots=20, seed=0):
        keys = [key_of(*parse_va(block)[:2]) for block in split_prompt(ex["prompt"])[1]]
        assert len(set(keys)) == len(keys) == 21


def test_copy_vocabulary_holdout():
    train_words, heldout = P.word_split()
    assert len(train_words) >= 500 and abs(len(train_words) - len(heldout)) <= 1 and not set(train_words) & set(heldout)
    for ex in P.make_task("copy_real", 50, shots=5, seed=0):  # evaluation uses held-out words only
        words = set(re.findall(r"[a-z]+", ex["prompt"].split("\n", 1)[1])) | {c.strip() for c in ex["candidates"]}
        assert words <= set(heldout)
    seen, n_copy = set(), 0
    for doc in P.training_documents(3000, seed=0, families=("copy",)):
        header, blocks = split_prompt(doc)
        assert header == "Fill in the blank:"
        for b in blocks:
            seq, seg, ans = parse_copy(b)
            assert copy_answer(seq, seg) == ans
            seen |= set(seq)
            n_copy += 1
    assert not seen & set(heldout)  # includes random 3-letter strings that happen to spell a held-out word
    assert seen & set(train_words) and n_copy > 5000
    only_random = set()
    for doc in P.training_documents(100, seed=0, families=("copy",), vocab="none"):
        only_random |= set(re.findall(r"[a-z]+", doc.split("\n", 1)[1]))
    assert all(len(w) == 3 for w in only_random)


def test_training_depths_and_families():
    n_lines = set()
    families = {"copy": 0, "va": 0, "arith": 0}
    for doc in P.training_documents(400, seed=5):  # default depths (0, 1): depth 2 is held out
        header, blocks = split_prompt(doc)
        if header in VA_HEADERS.values():
            families["va"] += 1
            for b in blocks:
                bindings, q, a = parse_va(b)
                n_lines.add(len(bindings))
                assert resolve(bindings, q)[1] in (0, 1)
        elif header == "Fill in the blank:":
            families["copy"] += 1
        else:
            families["arith"] += 1
            for line in doc.strip("\n").split("\n"):
                a, b, c = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", line).groups())
                assert a + b == c
        assert doc.endswith("\n") and "<|endoftext|>" not in doc
    assert n_lines == {5, 10} and min(families.values()) > 40
    deep = [resolve(*parse_va(b)[:2])[1] for d in P.training_documents(100, 0, ("va_code",), depths=(2,))
            for b in split_prompt(d)[1]]
    assert set(deep) == {2}


def test_sft_examples():
    exs = P.sft_examples(64, seed=0)
    assert [e["depth"] for e in exs].count(1) == 32 and [e["depth"] for e in exs].count(2) == 32
    assert exs[:32] == P.sft_examples(32, seed=0)  # nested dataset sizes
    for e in exs:
        header, blocks = split_prompt(e["prompt"])
        assert header == VA_HEADERS["code"] and len(blocks) == 1  # zero-shot
        bindings, q, given = parse_va(blocks[0])
        assert given is None and resolve(bindings, q) == (e["answer"].strip(), e["depth"])
        assert re.fullmatch(r" \d+\n", e["answer"]) and e["task"] == f"va_code_d{e['depth']}"


# ---------------------------------------------------------------------------------------------------------------
# bad inputs

@pytest.mark.parametrize("call", [
    lambda: P.make_task("va_basic_d3", 1),
    lambda: P.make_task("copy", 1),
    lambda: P.make_task("copy_random", 0),
    lambda: P.make_task("copy_random", 2.0),
    lambda: P.make_task("copy_random", 2, shots=-1),
    lambda: P.make_task("copy_random", 2, shots="5"),
    lambda: P.make_task("copy_random", 2, seed=-1),
    lambda: P.training_documents(5, 0, families=("copy", "wiki")),
    lambda: P.training_documents(5, 0, depths=(3,)),
    lambda: P.training_documents(5, 0, depths=()),
    lambda: P.training_documents(5, 0, vocab="all"),
    lambda: P.training_documents(-1, 0),
    lambda: P.sft_examples(63),
    lambda: P.sft_examples(64, form="python"),
    lambda: P.sft_examples(64, depths=(1, 1)),
])
def test_bad_inputs_raise(call):
    with pytest.raises(ValueError):
        call()  # training_documents must validate eagerly, before the first next()


def test_unknown_task_lists_tasks():
    with pytest.raises(ValueError) as err:
        P.make_task("va_bogus", 3)
    assert all(t in str(err.value) for t in P.TASKS)
