"""
Token files on disk.

Our format (nanoGPT style): <split>.bin is a flat array of uint16 token ids; <split>.json beside it says what is
inside (tokenizer, n_tokens, source, split, the fingerprint of the inputs, sha256 of the .bin, format version).
Files live at <data_dir>/<tokenizer>/<source>/<split>.bin and are written atomically (*.tmp, then os.replace;
the sidecar last), so an interrupted prepare leaves either the old complete pair or no pair, never half a file.

Also the llm.c / modded-nanogpt shard format: a header of 256 int32 (magic 20240520, version 1, token count at
header[2]) followed by the uint16 tokens, read and written here so such shards can be used or converted.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "growloop.tokens"
VERSION = 1
DTYPE = np.uint16
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def fingerprint(inputs: dict) -> str:
    """sha256 of a canonical JSON dump of everything a file was made from (archive hashes, seeds, code versions)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def rebuild_hint(path) -> str:
    # files live at <out>/<tokenizer>/<source>/<split>.bin, so the path alone says how to rebuild them
    path = Path(path)
    tok, src = path.parent.parent.name, path.parent.name
    out = path.parent.parent.parent
    return f"rebuild it with: python -m data.prepare --tokenizer {tok} --sources {src} --out {out}"


class TokenWriter:
    """Streaming, atomic writer: `with TokenWriter(path, meta) as w: w.write(ids)`; commits only on a clean exit."""

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.meta = dict(meta)
        self.tmp = self.path.with_suffix(".bin.tmp")
        self.n_tokens = 0
        self.sha = hashlib.sha256()
        self.f = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb")
        return self

    def write(self, ids):
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= 2**16):
            raise ValueError(f"token ids must be in [0, 65535] to fit uint16, got [{ids.min()}, {ids.max()}]")
        b = ids.astype(DTYPE).tobytes()
        self.f.write(b)
        self.sha.update(b)
        self.n_tokens += ids.size

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is not None:  # leave no half-written file behind
            self.tmp.unlink(missing_ok=True)
            return False
        meta = dict(self.meta, format=FORMAT, version=VERSION, dtype="uint16", n_tokens=self.n_tokens,
                    sha256=self.sha.hexdigest())
        side = sidecar_path(self.path)
        side.unlink(missing_ok=True)  # the sidecar marks completion: drop the old one before touching the .bin
        os.replace(self.tmp, self.path)
        tmp_side = side.with_suffix(".json.tmp")
        tmp_side.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp_side, side)
        return False


def write_tokens(path, ids, meta: dict) -> dict:
    with TokenWriter(path, meta) as w:
        w.write(ids)
    return read_meta(path)


def read_meta(path) -> dict:
    """The sidecar of a .bin file, checked against the .bin; FileNotFoundError/ValueError with a rebuild hint."""
    path, side = Path(path), sidecar_path(path)
    if not path.exists():
        raise FileNotFoundError(f"token file {path} does not exist; {rebuild_hint(path)}")
    if not side.exists():
        raise FileNotFoundError(f"token file {path} has no sidecar {side.name} (interrupted prepare?); "
                                f"{rebuild_hint(path)}")
    try:
        meta = json.loads(side.read_text())
        n_tokens = int(meta["n_tokens"])
        ok = meta["format"] == FORMAT and meta["version"] == VERSION and meta["dtype"] == "uint16"
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"sidecar {side} is corrupt ({e}); {rebuild_hint(path)}") from None
    if not ok:
        raise ValueError(f"sidecar {side} is format {meta.get('format')} v{meta.get('version')}, expected "
                         f"{FORMAT} v{VERSION}; {rebuild_hint(path)}")
    size = path.stat().st_size
    if size != 2 * n_tokens:
        raise ValueError(f"token file {path} has {size} bytes but its sidecar says {n_tokens} uint16 tokens "
                         f"({2 * n_tokens} bytes): truncated or corrupt; {rebuild_hint(path)}")
    return meta


def open_tokens(path, tokenizer: str | None = None, verify: bool = False) -> np.memmap:
    """Read-only memmap of a prepared .bin after checking its sidecar (size always; full sha256 if verify)."""
    meta = read_meta(path)
    if tokenizer is not None and meta.get("tokenizer") != tokenizer:
        raise ValueError(f"{path} was tokenized with {meta.get('tokenizer')!r}, not {tokenizer!r}; "
                         f"{rebuild_hint(path)}")
    if verify and file_sha256(path) != meta["sha256"]:
        raise ValueError(f"token file {path} does not match the sha256 in its sidecar: corrupt; {rebuild_hint(path)}")
    if meta["n_tokens"] == 0:
        return np.zeros(0, dtype=DTYPE)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=DTYPE, mode="r")


def file_sha256(path, chunk=1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# ---- llm.c / modded-nanogpt shards ----

def write_shard(path, ids):
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**16):
        raise ValueError("shard token ids must fit uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, ids.size
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(ids.astype(DTYPE).tobytes())
    os.replace(tmp, path)


def open_shard(path) -> np.memmap:
    """The uint16 tokens of an llm.c / modded-nanogpt shard, after checking magic, version and length."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"shard {path} does not exist")
    nbytes_header = 4 * SHARD_HEADER_INTS
    size = path.stat().st_size
    if size < nbytes_header:
        raise ValueError(f"{path} is {size} bytes, shorter than the {nbytes_header}-byte shard header")
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path} is not an llm.c shard: magic {header[0]}, expected {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]}, expected {SHARD_VERSION}")
    n = int(header[2])
    if size != nbytes_header + 2 * n:
        raise ValueError(f"{path}: header says {n} tokens ({nbytes_header + 2 * n} bytes), the file has {size} bytes")
    if n == 0:
        return np.zeros(0, dtype=DTYPE)
    return np.memmap(path, dtype=DTYPE, mode="r", offset=nbytes_header, shape=(n,))
