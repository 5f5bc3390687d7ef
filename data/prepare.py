"""
Tokenize training sources into <out>/<tokenizer>/<source>/{train,val}.bin (+ .json sidecars).

    python -m data.prepare --tokenizer byte --sources primitives,sotu,wiki,math
    python -m data.prepare --tokenizer gpt2 --sources fineweb-edu --max_tokens 2e9 --workers 16     # HF hub
    python -m data.prepare --sources finemath-4plus --data_files 'fm/*.parquet'                   # local files
    python -m data.prepare --list          # sources, and what is prepared
    python -m data.prepare --fetch         # only download the offline archives (and the GPT-2 vocabulary)
    python -m data.prepare --import_shards 'fineweb_train_*.bin' --name fineweb --tokenizer gpt2   # llm.c shards

Idempotent: a source whose files exist and whose sidecars record the same inputs (archive sha256, seed, number of
documents, generator code, ...) is skipped. Resumable: each file is written to *.tmp and renamed when complete,
so an interrupted run leaves no half file, and the next run redoes only the sources not yet complete.
Every document is preceded by <|endoftext|>; documents of real text that share a 13-gram with a held-out eval
question are dropped (see data/sources.py).
"""
import argparse
import glob
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import sources
from data.store import TokenWriter, fingerprint, open_shard, read_meta
from data.tokenizer import TOKENIZERS, eot_id, get_tokenizer

PREPARED = Path(__file__).resolve().parent / "prepared"
DEFAULT_SOURCES = "primitives,sotu,wiki,math"
SPLITS = ("train", "val")
CHUNK_DOCS = 256  # documents per unit of work sent to a tokenizer process

_worker = {}


def _init_worker(tokenizer: str, grams):
    _worker["enc"], _worker["grams"] = get_tokenizer(tokenizer), grams


def encode_chunk(chunk):
    """[(split, text)] -> per split: (uint16 tokens, n_docs kept, n_docs dropped as contaminated)."""
    enc, grams = _worker["enc"], _worker["grams"]
    eot = eot_id(enc)
    out = {s: ([], 0, 0) for s in SPLITS}
    for split, text in chunk:
        ids, kept, dropped = out[split]
        if grams is not None and sources.contaminated(text, grams):
            out[split] = (ids, kept, dropped + 1)
            continue
        ids.append(eot)
        ids.extend(enc.encode_ordinary(text))  # ordinary: a literal "<|endoftext|>" in the text is just text
        out[split] = (ids, kept + 1, dropped)
    return {s: (np.array(ids, dtype=np.uint16), k, d) for s, (ids, k, d) in out.items()}


def _chunks(it, n):
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk


def _ordered_map(pool, chunks, window):
    """pool.imap with back-pressure: imap's feeder thread would read a whole (streaming, huge) source into memory
    and can deadlock on terminate; here at most `window` chunks are in flight and the source is read here."""
    pending = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(encode_chunk, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def out_paths(out, tokenizer, name) -> dict:
    return {s: Path(out) / tokenizer / name / f"{s}.bin" for s in SPLITS}


def up_to_date(path, inputs) -> bool:
    try:
        return read_meta(path).get("inputs_sha256") == fingerprint(inputs)
    except (FileNotFoundError, ValueError):
        return False


def prepare_source(name, tokenizer="byte", out=PREPARED, primitives_docs=100_000, seed=0, data_files=None,
                   text_field=None, max_tokens=None, workers=1, force=False, downloads=None,
                   generator=None) -> list[dict]:
    """Build (or skip, if up to date) the train and val files of one source; returns one summary row per split."""
    sources.check_source(name)
    if name == "primitives" and primitives_docs < 1:
        raise ValueError(f"--primitives_docs must be >= 1, got {primitives_docs}")
    enc = get_tokenizer(tokenizer)
    inputs = sources.source_inputs(name, tokenizer, primitives_docs=primitives_docs, seed=seed,
                                   data_files=data_files, text_field=text_field, max_tokens=max_tokens)
    if generator is not None:
        # a stand-in generator (tests) must never count as "up to date" for the real one, nor vice versa
        inputs["generator"] = getattr(generator, "__qualname__", repr(generator))
    paths = out_paths(out, tokenizer, name)
    if not force and all(up_to_date(p, inputs) for p in paths.values()):
        return [dict(_row(read_meta(p)), status="up to date", seconds=0.0) for p in paths.values()]

    t0 = time.time()
    grams = None  # decontamination reference: 13-grams of the eval questions (synthetic primitives need none)
    if name != "primitives":
        for a in sources.EVAL_ARCHIVES:
            sources.fetch_archive(a, downloads)
        grams = sources.eval_ngrams(downloads)
    docs = sources.iter_documents(name, primitives_docs=primitives_docs, seed=seed, data_files=data_files,
                                  text_field=text_field, downloads=downloads, generator=generator)
    meta = dict(tokenizer=tokenizer, n_vocab=enc.n_vocab, eot=eot_id(enc), source=name, inputs=inputs,
                inputs_sha256=fingerprint(inputs), decontaminated=grams is not None)
    counts = {s: [0, 0] for s in SPLITS}
    # workers start before any other thread (tqdm's monitor, a hub stream) exists: forking threads invites deadlocks
    pool = mp.Pool(workers, _init_worker, (tokenizer, grams)) if workers > 1 else None
    finished = False
    try:
        with TokenWriter(paths["train"], dict(meta, split="train")) as wt, \
                TokenWriter(paths["val"], dict(meta, split="val")) as wv, \
                tqdm(desc=f"{tokenizer}/{name}", unit="doc", file=sys.stderr) as bar:
            writers = {"train": wt, "val": wv}
            if pool is None:
                _init_worker(tokenizer, grams)
            results = _ordered_map(pool, _chunks(docs, CHUNK_DOCS), 4 * workers) if pool else \
                map(encode_chunk, _chunks(docs, CHUNK_DOCS))
            for res in results:  # in order, so the output does not depend on the number of workers
                for s, (ids, kept, dropped) in res.items():
                    writers[s].write(ids)
                    counts[s][0] += kept
                    counts[s][1] += dropped
                    bar.update(kept + dropped)
                if max_tokens and wt.n_tokens >= max_tokens:
                    break
            for s, w in writers.items():
                w.meta.update(n_docs=counts[s][0], n_dropped_contaminated=counts[s][1])
        finished = True
    finally:
        if pool is not None:  # terminate() can hang on idle workers: use it only on errors
            pool.close() if finished else pool.terminate()
            pool.join()
    dt = time.time() - t0
    return [dict(_row(read_meta(p)), status="built", seconds=dt) for p in paths.values()]


def _row(meta):
    return dict(source=meta["source"], split=meta["split"], tokenizer=meta["tokenizer"], n_docs=meta.get("n_docs", 0),
                dropped=meta.get("n_dropped_contaminated", 0), n_tokens=meta["n_tokens"])


def import_shards(pattern, name, tokenizer, split="train", out=PREPARED) -> dict:
    """Concatenate llm.c / modded-nanogpt shards into one of our token files (they must use `tokenizer`)."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shard matches {pattern!r}")
    enc = get_tokenizer(tokenizer)
    shards = [dict(name=Path(f).name, size=os.path.getsize(f)) for f in files]
    inputs = dict(source=name, tokenizer=tokenizer, shards=shards)
    path = out_paths(out, tokenizer, name)[split]
    with TokenWriter(path, dict(tokenizer=tokenizer, n_vocab=enc.n_vocab, eot=eot_id(enc), source=name, split=split,
                                inputs=inputs, inputs_sha256=fingerprint(inputs))) as w:
        for f in tqdm(files, desc="shards", file=sys.stderr):
            toks = open_shard(f)
            if toks.size and int(toks.max()) >= enc.n_vocab:
                raise ValueError(f"{f} has token id {int(toks.max())} >= n_vocab {enc.n_vocab} of {tokenizer!r}")
            w.write(toks)
    return read_meta(path)


def print_table(rows):
    print(f"{'tokenizer':9} {'source':24} {'split':5} {'docs':>9} {'dropped':>7} {'tokens':>13} {'seconds':>8}  status")
    for r in rows:
        print(f"{r['tokenizer']:9} {r['source']:24} {r['split']:5} {r['n_docs']:9,d} {r['dropped']:7,d} "
              f"{r['n_tokens']:13,d} {r.get('seconds', 0):8.1f}  {r.get('status', '')}")


def list_sources(out):
    print("training sources (data/sources.py):")
    print("  primitives              synthetic reasoning primitives, data.primitives.training_documents (PAPER §2.6)")
    for name, archive in sources.OFFLINE_SOURCES.items():
        print(f"  {name:23} offline, {sources.ARCHIVES[archive][3]}")
    for name, (hub, cfg, field, about) in sources.HF_SOURCES.items():
        print(f"  {name:23} HF hub {hub} [{cfg}] field '{field}': {about}")
    rows = []
    for tok in TOKENIZERS:
        for meta_path in sorted(Path(out).glob(f"{tok}/*/*.json")):
            try:
                rows.append(dict(_row(read_meta(meta_path.with_suffix(".bin"))), status="ok"))
            except (FileNotFoundError, ValueError) as e:
                print(f"  broken: {e}")
    print(f"\nprepared under {out}:")
    print_table(rows) if rows else print("  nothing yet")


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize training sources into .bin token files.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tokenizer", default="byte", help=f"one of {', '.join(TOKENIZERS)} (default byte)")
    p.add_argument("--sources", default=DEFAULT_SOURCES, help=f"comma-separated (default {DEFAULT_SOURCES}); --list")
    p.add_argument("--out", default=str(PREPARED), help="output root (default data/prepared)")
    p.add_argument("--primitives_docs", type=int, default=100_000,
                   help="training documents of `primitives` (val: 1/20 as many)")
    p.add_argument("--seed", type=int, default=0, help="seed of the primitives generator (val uses another)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)), help="tokenizer processes")
    p.add_argument("--max_tokens", type=float, default=None, help="stop a (HF) source after this many train tokens")
    p.add_argument("--data_files", default=None, help="local jsonl/parquet glob replacing the hub for one HF source")
    p.add_argument("--text_field", default=None, help="column holding the text (HF sources; default from the table)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--list", action="store_true", help="list sources and prepared files, then exit")
    p.add_argument("--fetch", action="store_true", help="download the offline archives and GPT-2 vocabulary, then exit")
    p.add_argument("--import_shards", default=None, help="glob of llm.c/modded-nanogpt .bin shards to convert")
    p.add_argument("--name", default=None, help="source name for --import_shards")
    p.add_argument("--split", default="train", choices=SPLITS, help="split for --import_shards")
    args = p.parse_args(argv)

    if args.tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {args.tokenizer!r}; valid tokenizers: {', '.join(TOKENIZERS)}")
    if args.list:
        return list_sources(args.out)
    if args.fetch:
        for a in sources.ARCHIVES:
            print(f"{a}: {sources.fetch_archive(a)}")
        get_tokenizer("gpt2")
        return
    if args.import_shards:
        if not args.name:
            raise ValueError("--import_shards needs --name NAME (the source name to file the tokens under)")
        meta = import_shards(args.import_shards, args.name, args.tokenizer, args.split, args.out)
        return print_table([dict(_row(meta), status="imported")])
    names = [s.strip() for s in args.sources.split(",") if s.strip()]
    for n in names:
        sources.check_source(n)  # fail before any work
    data_files = None
    if args.data_files:
        data_files = sorted(glob.glob(args.data_files))
        if not data_files:
            raise FileNotFoundError(f"--data_files {args.data_files!r} matches no file")
        if len(names) != 1 or names[0] not in sources.HF_SOURCES:
            raise ValueError(f"--data_files needs exactly one HF source in --sources ({', '.join(sources.HF_SOURCES)})")
    rows = []
    for n in names:
        rows += prepare_source(n, args.tokenizer, args.out, primitives_docs=args.primitives_docs, seed=args.seed,
                               data_files=data_files, text_field=args.text_field,
                               max_tokens=int(args.max_tokens) if args.max_tokens else None,
                               workers=args.workers, force=args.force)
    print_table(rows)


if __name__ == "__main__":
    main()
