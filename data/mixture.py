"""
Training batches from a weighted mixture of prepared sources, and fixed validation windows.

Sampling is stateless: the source and start offset of every row of the global batch of optimizer step `step`
are drawn from one RNG seeded by (seed, step). A rank or micro-step asks only for its rows, so any split of the
global batch over ranks and gradient-accumulation steps sees exactly the same data, and resuming at step s needs
no data-loader state at all. Each source is sampled with probability proportional to its weight, whatever its
size: small sources are up-sampled, as in the SmolLM mixture (PAPER §2.2). The math-heavy cooldown (PAPER §2.11)
is just another weight dict (see math_cooldown); the trainer chooses which Mixture to draw from at each step.
"""
from pathlib import Path

import numpy as np
import torch

from data.store import open_tokens, read_meta

# PAPER §2.2: SmolLM-v1 mixture by proportion (HF sources; see data/sources.py)
PAPER_MIXTURE = {"fineweb-edu": 0.70, "cosmopedia-v2": 0.15, "python-edu": 0.09, "open-web-math": 0.06}


def math_cooldown(weights: dict, math_source: str, share: float = 0.20) -> dict:
    """PAPER §2.11: math raised to `share` of the data; the rest is the standard mixture rescaled (an assumption:
    the paper does not say how the remaining 80% is composed). A math source already in `weights` is replaced."""
    if not 0 < share < 1:
        raise ValueError(f"math share must be in (0, 1), got {share}")
    rest = {k: float(v) for k, v in weights.items() if k != math_source}
    total = sum(rest.values())
    if total <= 0:
        raise ValueError(f"the non-math weights {rest} must sum to a positive number")
    return {**{k: (1 - share) * v / total for k, v in rest.items()}, math_source: share}


def prepared_sources(data_dir, tokenizer, split="train") -> list[str]:
    return sorted(p.parent.name for p in Path(data_dir, tokenizer).glob(f"*/{split}.bin"))


def _source_path(data_dir, tokenizer, name, split) -> Path:
    path = Path(data_dir) / tokenizer / name / f"{split}.bin"
    if not path.exists():
        valid = prepared_sources(data_dir, tokenizer, split)
        raise ValueError(f"source {name!r} is not prepared for tokenizer {tokenizer!r} in {data_dir} (no {path.name}); "
                         f"prepared: {', '.join(valid) or 'none'}; prepare it with: python -m data.prepare "
                         f"--tokenizer {tokenizer} --sources {name} --out {data_dir}")
    return path


def _xy(chunks):
    t = torch.from_numpy(np.stack(chunks).astype(np.int64))  # the memmap is uint16; models want int64 ids
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class Mixture:
    def __init__(self, data_dir, tokenizer: str, weights: dict, block_size: int, seed: int, split="train"):
        if not isinstance(weights, dict) or not weights:
            raise ValueError(f"weights must be a non-empty dict source -> weight, got {weights!r}")
        bad = {k: v for k, v in weights.items() if not (float(v) >= 0)}  # also catches NaN
        if bad:
            raise ValueError(f"mixture weights must be >= 0, got {bad}")
        total = sum(float(v) for v in weights.values())
        if not total > 0 or not np.isfinite(total):
            raise ValueError(f"mixture weights must sum to a positive finite number, got {weights}")
        if block_size < 1 or seed < 0:
            raise ValueError(f"need block_size >= 1 and seed >= 0, got block_size={block_size}, seed={seed}")
        self.data_dir, self.tokenizer, self.split = str(data_dir), tokenizer, split
        self.block_size, self.seed = int(block_size), int(seed)
        self.weights = {k: float(v) for k, v in weights.items()}
        self.names = sorted(k for k, v in self.weights.items() if v > 0)  # sorted: independent of dict order
        self.probs = np.array([self.weights[k] for k in self.names]) / total
        self.cum = np.cumsum(self.probs)
        self.cum[-1] = 1.0
        self.data, self.sha = [], {}
        for name in self.names:
            path = _source_path(data_dir, tokenizer, name, split)
            data = open_tokens(path, tokenizer=tokenizer)
            if len(data) < block_size + 1:
                raise ValueError(f"source {name!r} {split} has {len(data)} tokens, fewer than block_size + 1 = "
                                 f"{block_size + 1}; use a smaller block_size or more data")
            self.data.append(data)
            self.sha[name] = read_meta(path)["sha256"]

    def draw(self, step: int, global_rows: int):
        """(source index, start offset) of every row of the global batch of `step`."""
        if step < 0 or global_rows < 1:
            raise ValueError(f"need step >= 0 and global_rows >= 1, got step={step}, global_rows={global_rows}")
        # plain uniforms (stable across numpy versions) -> source by inverse CDF, offset by scaling
        u = np.random.default_rng([self.seed, int(step)]).random((global_rows, 2))
        src = np.searchsorted(self.cum, u[:, 0], side="right")
        n_starts = np.array([len(d) - self.block_size for d in self.data])  # valid starts: 0 .. len - block_size - 1
        starts = (u[:, 1] * n_starts[src]).astype(np.int64)
        return src, starts

    def batch(self, step: int, rows, global_rows: int):
        """x, y int64 [len(rows), block_size] for rows `rows` (a range or list) of step `step`'s global batch."""
        rows = list(rows)
        if not rows or min(rows) < 0 or max(rows) >= global_rows:
            raise ValueError(f"rows must be a non-empty subset of range({global_rows}), got {rows[:3]}...")
        src, starts = self.draw(step, global_rows)
        return _xy([self.data[src[r]][starts[r]:starts[r] + self.block_size + 1] for r in rows])

    def state_dict(self) -> dict:
        return dict(tokenizer=self.tokenizer, split=self.split, seed=self.seed, block_size=self.block_size,
                    weights={k: float(p) for k, p in zip(self.names, self.probs)}, sources_sha256=dict(self.sha))

    def load_state_dict(self, state: dict):
        """Nothing to restore (sampling is stateless); refuse to resume on different data or settings."""
        mine = self.state_dict()
        for key in mine:
            theirs = state.get(key)
            if key == "weights":
                same = theirs is not None and set(theirs) == set(mine[key]) and \
                    all(abs(theirs[k] - mine[key][k]) < 1e-9 for k in theirs)
            else:
                same = theirs == mine[key]
            if not same:
                raise ValueError(f"mixture {key} differs from the checkpoint's: checkpoint {theirs!r}, now "
                                 f"{mine[key]!r}; resume with the same data and settings (re-prepared data changes "
                                 f"sources_sha256)")


def val_batches(data_dir, tokenizer, source, block_size, batch_size, n_batches=None) -> list:
    """Fixed, disjoint windows spread evenly over `source`'s val split, as n_batches (x, y) pairs
    (n_batches=None: as many full batches as fit)."""
    data = open_tokens(_source_path(data_dir, tokenizer, source, "val"), tokenizer=tokenizer)
    available = (len(data) - 1) // block_size  # disjoint windows of block_size + 1 tokens sharing end tokens
    max_batches = available // batch_size
    if n_batches is None:
        n_batches = max_batches
    if n_batches < 1 or n_batches > max_batches:
        raise ValueError(f"{source} val has {len(data)} tokens: room for at most {max_batches} batches of "
                         f"{batch_size} x {block_size}, asked for {n_batches}")
    need = n_batches * batch_size
    idx = (np.arange(need) * available) // need  # evenly spread, deterministic
    starts = idx * block_size
    return [_xy([data[s:s + block_size + 1] for s in starts[i * batch_size:(i + 1) * batch_size]])
            for i in range(n_batches)]
