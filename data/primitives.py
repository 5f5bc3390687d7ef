"""
Reasoning-primitive text: 5-shot multiple-choice evaluation prompts, pretraining documents and SFT examples for
copying and variable assignment (PAPER §2.6, §2.10, §7.1), with the hold-out rules of PAPER §7.1/§7.3.

Layout of a prompt: the task's header line once, then solved examples separated by a blank line, then the query,
which stops right before its answer. Every solved example ends with " <answer>\\n"; the candidates carry that same
leading space and trailing newline, so that under byte-level log-likelihood scoring " 2" is not a free prefix of
" 23" (nor "car" of "cart"). The long math/code headers are written once per prompt, not once per example, to keep
prompts compact. Literal examples (make_task(task, 1, shots, seed=0)[0]: prompt + candidates[answer]; pinned by
tests/test_primitives.py::test_golden_literals):

copy_random, shots=1 (10 random three-letter words, then a contiguous 5-word segment of them, then the blank; the
answer is the word that follows the segment in the original order; candidates: the 10 words, chance 1/10):
    Fill in the blank:
    igr qlb hsw tts gln vsq otg pkg grp jpo hsw tts gln vsq otg ___. -> pkg

    yke bkx sni ozy gxn bru jvj vca gim fii yke bkx sni ozy gxn ___. -> bru

copy_real: the same with real English words (held-out half of data/words.txt).

va_basic_d1, shots=0 (5 base bindings, 5 aliases of distinct base variables, query an alias; candidates: the 5 base
values, chance 1/5):
    Fill in blank:
    v=14
    p=11
    l=13
    c=18
    w=8
    e=l
    t=c
    a=w
    r=v
    h=p
    a=___. -> 8

va_math_d0, shots=0:
    The following is a set of simple mathematical equations.
    h=20
    a=6
    y=3
    x=17
    p=19
    What is the numerical value of x? Answer: 17

va_code_d2, shots=0 (a further 5 aliases of the aliases; e -> w -> n = 22):
    The following is a very short Python program. Use the program to resolve the value of the variable in the question.
    Program:
    v = 17
    k = 11
    n = 22
    z = 9
    x = 2
    w = n
    p = v
    d = z
    m = x
    o = k
    h = m
    j = d
    l = p
    e = w
    s = o
    Question: What is the value of e? Answer: 22

With shots > 0 every task looks like copy_random above: header once, solved examples, blank lines between them.
`python -m data.primitives --task=va_code_d1 --n=1 --shots=5` prints any task; `--stats` prints prompt lengths.

Variable assignment at depth d needs d substitution hops: depth 0 has 5 bindings `x=value` and queries one of them;
depth 1 adds 5 aliases `y=x` of distinct base variables and queries an alias; depth 2 adds 5 aliases of those
aliases and queries one of them (PAPER §2.6). Values are distinct within an example, drawn from 1..23.
Surface forms: basic `o=23` ... `o=___. ->`; math `n=22` ... `What is the numerical value of n? Answer:`;
code `Program:` / `n = 22` ... / `Question: What is the value of n? Answer:`.

Hold-out (PAPER §7.1, §7.3):
  * RNG streams: evaluation, training and SFT seeds live in different string namespaces ("eval|", "train|", "sft|").
  * Exact examples: every example has a key (its sorted bindings plus the queried variable, independent of the
    surface form and line order; for copying, the sequence plus the segment start). A hash of the key splits the
    space of examples in two halves: evaluation draws only from one half, training documents and SFT only from the
    other, so no training document ever contains an evaluation example, for any seed or n.
  * Variable names are single lowercase letters in training and evaluation alike: there are only 26, so names
    cannot be held out; the exact (bindings, query) tuples are held out instead.
  * Vocabulary: data/words.txt is split by a fixed hash into two halves; copy_real evaluates on the held-out half;
    training copy documents use random three-letter strings (never equal to a held-out word) and the train half.
  * Depth: training documents use depths (0, 1) by default; depth 2 is held out unless the caller asks for it.
"""
import argparse
import hashlib
import numbers
import random
import re
import statistics
from functools import lru_cache
from pathlib import Path

FORMS = ("basic", "math", "code")
DEPTHS = (0, 1, 2)
TASKS = ("copy_random", "copy_real") + tuple(f"va_{f}_d{d}" for f in FORMS for d in DEPTHS)
FAMILIES = ("copy", "va_basic", "va_math", "va_code", "arith")
VOCABS = ("train", "none")

LETTERS = "abcdefghijklmnopqrstuvwxyz"  # variable names and the letters of random words
VALUES = tuple(range(1, 24))  # PAPER §2.6: values seen in the paper's examples range from 1 to 23
N_BINDINGS = 5  # per level; also the number of VA candidates (chance 20%)
COPY_LEN, SEG_LEN = 10, 5  # PAPER §2.6: sequence of 10, repeated segment of 5 (chance 10%)
DOC_EXAMPLES = (2, 8)  # solved examples per training document (inclusive range)
ARITH_LINES = (8, 16)  # sums per arithmetic document
WORDS_PATH = Path(__file__).with_name("words.txt")

HEADERS = {
    "copy": "Fill in the blank:",
    "basic": "Fill in blank:",
    "math": "The following is a set of simple mathematical equations.",
    "code": "The following is a very short Python program. Use the program to resolve the value of the variable "
            "in the question.",
}


# ----------------------------------------------------------------------------------------------------------------
# vocabulary and hold-out split

@lru_cache(maxsize=None)
def word_split():
    """(train_words, heldout_words): data/words.txt split into halves by a fixed hash of each word (PAPER §7.1)."""
    if not WORDS_PATH.exists():
        raise FileNotFoundError(f"word list {WORDS_PATH} is missing; it ships with the repository (data/words.txt)")
    words = [w.strip() for w in WORDS_PATH.read_text().splitlines() if w.strip()]
    bad = [w for w in words if not re.fullmatch(r"[a-z]+", w)]
    if bad:
        raise ValueError(f"{WORDS_PATH}: words must be lowercase a-z only, one per line; bad entries: {bad[:5]}")
    words = sorted(set(words))
    if len(words) < 4 * COPY_LEN:
        raise ValueError(f"{WORDS_PATH} has {len(words)} distinct words; need at least {4 * COPY_LEN}")
    ranked = sorted(words, key=lambda w: hashlib.blake2b(("vocab|" + w).encode(), digest_size=8).digest())
    half = len(ranked) // 2
    return tuple(sorted(ranked[half:])), tuple(sorted(ranked[:half]))


def is_eval_key(key):
    """True when an example with this key belongs to the evaluation half of the example space."""
    return hashlib.blake2b(key.encode(), digest_size=8).digest()[0] & 1 == 1


def va_key(bindings, query):
    """Form- and order-independent identity of a variable-assignment example: sorted bindings + queried variable."""
    return "va:" + ",".join(sorted(f"{a}={b}" for a, b in bindings)) + "?" + query


def copy_key(seq, start):
    return "copy:" + " ".join(seq) + "@" + str(start)


# ----------------------------------------------------------------------------------------------------------------
# samplers: each returns (key, body, answer, choices); body is the example text up to (not including) the answer

def _sample_va(rng, depth, form):
    names = rng.sample(LETTERS, N_BINDINGS * (depth + 1))
    values = rng.sample(VALUES, N_BINDINGS)
    bindings = [(a, str(v)) for a, v in zip(names[:N_BINDINGS], values)]
    prev = names[:N_BINDINGS]
    for level in range(1, depth + 1):  # each alias points to a distinct variable of the level below (PAPER §2.6)
        new = names[N_BINDINGS * level:N_BINDINGS * (level + 1)]
        bindings += list(zip(new, rng.sample(prev, N_BINDINGS)))
        prev = new
    query = rng.choice(prev)
    env, answer = dict(bindings), query
    while not answer.isdigit():  # depth hops
        answer = env[answer]
    if form == "basic":
        body = "".join(f"{a}={b}\n" for a, b in bindings) + f"{query}=___. ->"
    elif form == "math":
        body = "".join(f"{a}={b}\n" for a, b in bindings) + f"What is the numerical value of {query}? Answer:"
    else:
        body = ("Program:\n" + "".join(f"{a} = {b}\n" for a, b in bindings)
                + f"Question: What is the value of {query}? Answer:")
    choices = sorted((str(v) for v in values), key=int)
    return va_key(bindings, query), body, answer, choices


def _random_word(rng, banned):
    while True:
        w = "".join(rng.choice(LETTERS) for _ in range(3))
        if w not in banned:
            return w


def _sample_copy(rng, pool, banned=frozenset()):
    """pool: a word list to draw from, or None for random three-letter strings (never one of `banned`)."""
    if pool is not None:
        seq = rng.sample(pool, COPY_LEN)
    else:
        seq = []
        while len(seq) < COPY_LEN:  # distinct words, so the answer is unambiguous
            w = _random_word(rng, banned)
            if w not in seq:
                seq.append(w)
    start = rng.randrange(COPY_LEN - SEG_LEN)  # the segment must be followed by a word of the sequence
    body = " ".join(seq + seq[start:start + SEG_LEN]) + " ___. ->"
    return copy_key(seq, start), body, seq[start + SEG_LEN], sorted(seq)


def _draw(rng, sampler, split):
    """Rejection-sample until the example falls in the wanted half ('eval' or 'train') of the example space."""
    want = split == "eval"
    for _ in range(10_000):
        ex = sampler(rng)
        if is_eval_key(ex[0]) == want:
            return ex
    raise RuntimeError(f"could not draw a {split} example in 10000 tries; is the example space (LETTERS, VALUES) "
                       f"too small?")


def _task_sampler(task):
    """(header, sampler) for an evaluation task."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if task == "copy_random":
        return HEADERS["copy"], lambda rng: _sample_copy(rng, None)
    if task == "copy_real":
        heldout = list(word_split()[1])
        return HEADERS["copy"], lambda rng: _sample_copy(rng, heldout)
    _, form, d = task.split("_")
    return HEADERS[form], lambda rng: _sample_va(rng, int(d[1:]), form)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# public API

def chance(task):
    """Chance accuracy of a task: 1/10 for copying (10 candidates), 1/5 for variable assignment (PAPER §2.6)."""
    _task_sampler(task)  # validates the name
    return 1.0 / COPY_LEN if task.startswith("copy") else 1.0 / N_BINDINGS


def make_task(task, n, shots=5, seed=0):
    """n multiple-choice examples {"prompt", "candidates", "answer", "task"} of one task, fixed by (task, n, shots,
    seed). Query i depends only on (task, seed, i), so different n give prefixes of one list and different shots give
    the same queries; its demonstrations are the first `shots` of a per-query stream, so shots=k demonstrations are a
    prefix of shots=k+1 ones. Queries and demonstrations come from the evaluation half of the example space."""
    header, sampler = _task_sampler(task)
    _check_int("n", n, 1)
    _check_int("shots", shots, 0)
    _check_int("seed", seed, 0)
    out = []
    for i in range(n):
        key, body, answer, choices = _draw(random.Random(f"eval|{task}|{seed}|query|{i}"), sampler, "eval")
        demo_rng = random.Random(f"eval|{task}|{seed}|demos|{i}")
        seen, demos = {key}, []
        for _ in range(100 * shots + 100):
            if len(demos) == shots:
                break
            d = _draw(demo_rng, sampler, "eval")
            if d[0] not in seen:  # never show the query itself (or a repeated demonstration) in context
                seen.add(d[0])
                demos.append(f"{d[1]} {d[2]}\n\n")
        if len(demos) < shots:
            raise RuntimeError(f"could not draw {shots} distinct demonstrations for {task}")
        out.append({"prompt": header + "\n" + "".join(demos) + body,
                    "candidates": [f" {c}\n" for c in choices],
                    "answer": choices.index(answer), "task": task})
    return out


def training_documents(n_docs, seed, families=FAMILIES, depths=(0, 1), vocab="train"):
    """Iterator over n_docs pretraining documents (n_docs=None: endless). Each is one family: a header and 2-8 solved
    examples in the evaluation surface forms, or lines of sums like "17+25=42"; the caller appends <|endoftext|>.
    Examples come from the training half of the example space (PAPER §7.1). vocab="train": copy documents use random
    three-letter strings and the train half of data/words.txt; vocab="none": random strings only."""
    if n_docs is not None:
        _check_int("n_docs", n_docs, 0)
    _check_int("seed", seed, 0)
    families, depths = tuple(families), tuple(depths)
    if not families or any(f not in FAMILIES for f in families):
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families}")
    if not depths or any(d not in DEPTHS for d in depths):
        raise ValueError(f"depths must be a non-empty subset of {DEPTHS}, got {depths}")
    if vocab not in VOCABS:
        raise ValueError(f"vocab must be one of {VOCABS}, got {vocab!r}")
    train_words, heldout = word_split()
    banned = frozenset(heldout)  # a random string that happens to be a held-out word would leak it
    pool = list(train_words) if vocab == "train" else None
    return _documents(n_docs, random.Random(f"train|{seed}"), families, depths, pool, banned)


def _documents(n_docs, rng, families, depths, pool, banned):
    i = 0
    while n_docs is None or i < n_docs:
        i += 1
        family = rng.choice(families)
        if family == "arith":
            lines = []
            for _ in range(rng.randint(*ARITH_LINES)):
                a, b = rng.randrange(100), rng.randrange(100)
                lines.append(f"{a}+{b}={a + b}\n")
            yield "".join(lines)
            continue
        if family == "copy":
            words = pool if pool is not None and rng.random() < 0.5 else None
            header, sampler = HEADERS["copy"], lambda r: _sample_copy(r, words, banned)
        else:
            form, depth = family[3:], rng.choice(depths)
            header, sampler = HEADERS[form], lambda r: _sample_va(r, depth, form)
        examples = [_draw(rng, sampler, "train") for _ in range(rng.randint(*DOC_EXAMPLES))]
        yield header + "\n" + "\n".join(f"{body} {answer}\n" for _, body, answer, _ in examples)


def sft_examples(n, depths=(1, 2), form="code", seed=0):
    """n zero-shot examples {"prompt", "answer", "depth", "task"} for supervised fine-tuning (PAPER §2.10: VA code,
    depths 1 and 2, equal numbers per depth, interleaved). "answer" is the target continuation (" 23\\n"); the prompt
    has make_task's layout with shots=0. Drawn from the training half, so never one of make_task's examples; example
    j of a depth depends only on (form, depth, seed, j), so sft_examples(64) is a prefix of sft_examples(128)."""
    depths = tuple(depths)
    if not depths or any(d not in DEPTHS for d in depths) or len(set(depths)) != len(depths):
        raise ValueError(f"depths must be distinct values from {DEPTHS}, got {depths}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    if n % len(depths):
        raise ValueError(f"n={n} must be a multiple of len(depths)={len(depths)} (equal numbers per depth)")
    out = []
    for i in range(n):
        d, j = depths[i % len(depths)], i // len(depths)
        rng = random.Random(f"sft|{form}|{d}|{seed}|{j}")
        _, body, answer, _ = _draw(rng, lambda r: _sample_va(r, d, form), "train")
        out.append({"prompt": HEADERS[form] + "\n" + body, "answer": f" {answer}\n", "depth": d,
                    "task": f"va_{form}_d{d}"})
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI: show examples, documents, or prompt-length statistics

def main():
    p = argparse.ArgumentParser(description="Reasoning-primitive generator (PAPER §2.6). Prints evaluation prompts, "
                                            "training documents, or prompt byte lengths.")
    p.add_argument("--task", default="va_basic_d1", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--n", type=int, default=2, help="examples (or documents) to print")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_docs", action="store_true", help="print training documents instead of eval prompts")
    p.add_argument("--depths", default="0,1", help="training document depths, comma separated")
    p.add_argument("--stats", action="store_true", help="byte length (median, max) of prompts per task")
    args = p.parse_args()
    if args.stats:
        print(f"prompt bytes with shots={args.shots}, n={args.n} (prompt + longest candidate)")
        for task in TASKS:
            ex = make_task(task, args.n, args.shots, args.seed)
            lens = [len((e["prompt"] + max(e["candidates"], key=len)).encode()) for e in ex]
            print(f"{task:12s} median {statistics.median(lens):7.1f}  max {max(lens):5d}")
    elif args.train_docs:
        depths = tuple(int(d) for d in args.depths.split(","))
        for doc in training_documents(args.n, args.seed, depths=depths):
            print(doc + "<|endoftext|>")
    else:
        for ex in make_task(args.task, args.n, args.shots, args.seed):
            print(ex["prompt"] + "\x1b[1m" + ex["candidates"][ex["answer"]] + "\x1b[0m")
            print(f"candidates={ex['candidates']} answer={ex['answer']} chance={chance(args.task)}\n" + "-" * 40)


if __name__ == "__main__":
    main()
