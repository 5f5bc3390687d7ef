"""
The growloop transformer: a list of unique blocks plus an execution plan.

Architecture follows SmolLM / Llama (PAPER §2.2): pre-norm RMSNorm, RoPE (theta 10000, Hugging Face's rotate-half
convention), SwiGLU MLP, grouped-query attention through scaled_dot_product_attention, no biases, tied input/output
embeddings, final RMSNorm. Parameter names map one to one onto Hugging Face `LlamaForCausalLM`
(see `hf_state_dict`), so a checkpoint converts by renaming only.

The forward runs an *execution plan*: the sequence of block indices to apply (PAPER §2.3, §6.1). The default plan
is range(n_layer). Loop(L×k) repeats indices (shared weights), inference-time looping, skips, swaps and reversals
are other plans, and growing a model (grow.py) is `materialize(order)`: a repeated plan turned into new weights.
"""
import math
import operator
import os
from dataclasses import dataclass, asdict, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 257          # byte tokenizer (256 bytes + <|endoftext|>); GPT-2 BPE is 50257
    block_size: int = 512          # context length
    n_layer: int = 4               # number of *unique* blocks
    n_head: int = 4
    n_kv_head: int = 4             # < n_head for grouped-query attention (SmolLM-360M: 15 / 5)
    n_embd: int = 128
    mlp_hidden: int = 512          # SwiGLU hidden size (SmolLM-360M: 2560 at d=960)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    plan: list = field(default=None)   # default execution plan; None means range(n_layer)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"pick n_head from the divisors of {self.n_embd}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                             f"pick n_kv_head from the divisors of {self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim n_embd/n_head={self.n_embd // self.n_head} must be even for RoPE")
        if self.plan is not None:
            self.plan = check_plan(self.plan, self.n_layer)


def check_plan(plan, n_layer):
    """Validate an execution plan; return it as a list of ints. Errors name the bad value and the valid range."""
    plan = list(plan)
    if not plan:
        raise ValueError("empty plan: an execution plan must name at least one layer index")
    out = []
    for p in plan:
        try:
            if isinstance(p, (bool, float)):
                raise TypeError
            i = operator.index(p)
        except TypeError:
            raise ValueError(f"plan entry {p!r} is not an integer layer index (plan={plan})") from None
        if not 0 <= i < n_layer:
            raise ValueError(f"plan names layer {i}, but the model has layers 0..{n_layer - 1} (plan={plan})")
        out.append(i)
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 like HF Llama, then cast back before the gain
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim, length, theta, device=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # HF layout: the two halves share frequencies
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); rotate-half convention of HF Llama
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:  # cache is this plan step's KVCache slot
            past = cache.length
            k, v = cache.append(k, v)
        gqa = self.n_kv_head != self.n_head
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # several new tokens on top of a cache: causal mask offset by the past length
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, trace=None, step=None):
        # h_{i+1} = h_i + a_i + m_i (PAPER §2.8 notation); `trace` lets probes read and edit h, a, m per plan step
        if trace is not None:
            x = trace("h", step, x, x)
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache)
        if trace is not None:
            a = trace("a", step, a, x)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x))
        if trace is not None:
            m = trace("m", step, m, x)
        return x + m


class KVCache:
    """Keys/values of one *plan step* (not one layer): a looped block has one slot per time it runs."""

    def __init__(self):
        self.k = self.v = None

    @property
    def length(self):
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class Trace:
    """Records, per plan step, the residual entering it (h), the attention output (a) and the MLP output (m).

    `edit(kind, step, tensor, resid) -> tensor or None` may replace any of them (kind in "h", "a", "m"), e.g. to
    remove a step's contribution at chosen positions (depth score, PAPER §2.8 (1)). Recorded tensors are detached
    unless keep_grad=True (the tuned lens trains on them). Costs nothing when no trace is passed."""

    def __init__(self, record=("h", "a", "m"), edit=None, keep_grad=False):
        self.record, self.edit, self.keep_grad = set(record), edit, keep_grad
        self.h, self.a, self.m = [], [], []

    def __call__(self, kind, step, t, resid):
        if self.edit is not None:
            new = self.edit(kind, step, t, resid)
            t = t if new is None else new
        if kind in self.record:
            getattr(self, kind).append(t if self.keep_grad else t.detach())
        return t


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._compiled = None  # per-block compiled callables, kept out of the module tree (no `_orig_mod.` keys)
        self.apply(self._init_weights)
        # residual-output projections scaled by the effective depth, as GPT-2/nanoGPT do
        depth = len(self.plan)
        for blk in self.layers:
            for w in (blk.self_attn.o_proj.weight, blk.mlp.down_proj.weight):
                nn.init.normal_(w, mean=0.0, std=cfg.init_std / math.sqrt(2 * depth))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    @property
    def plan(self):
        return list(range(self.config.n_layer)) if self.config.plan is None else list(self.config.plan)

    # the output head is tied to the input embedding (SmolLM, PAPER §2.2)
    def lm_head(self, x):
        return F.linear(x, self.embed_tokens.weight)

    def compile_blocks(self, **kwargs):
        """torch.compile each unique block once: any plan over them reuses the same graphs, so changing the plan
        never recompiles. Call again after growth (new blocks)."""
        self._compiled = [torch.compile(blk, **kwargs) for blk in self.layers]
        return self

    def forward(self, idx, targets=None, plan=None, trace=None, cache=None, grad_from=0):
        """idx (B, T) -> (logits, loss). `plan`: layer indices to run (default self.plan). `trace`: a Trace to
        read/edit per-step activations. `cache`: list of KVCache, one per plan step (see generate). `grad_from`:
        plan steps before this position run without gradient (truncated backprop through a loop, loop.py)."""
        plan = self.plan if plan is None else check_plan(plan, self.config.n_layer)
        B, T = idx.shape
        past = 0 if cache is None else cache[0].length
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size={self.config.block_size}")
        cos, sin = self.rope_cos[past:past + T], self.rope_sin[past:past + T]
        use_compiled = self._compiled is not None and trace is None and cache is None
        x = self.embed_tokens(idx)
        for step, li in enumerate(plan):
            blk = self._compiled[li] if use_compiled else self.layers[li]
            kv = None if cache is None else cache[step]
            with torch.set_grad_enabled(torch.is_grad_enabled() and step >= grad_from):
                x = blk(x, cos, sin, kv) if trace is None else blk(x, cos, sin, kv, trace, step)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, plan=None, use_cache=True, eos=None):
        """Sample continuations of idx (B, T). temperature=0 is greedy. The KV cache has one slot per plan
        *position*, so a looped plan (same block run several times) keeps separate keys/values for each run."""
        plan = self.plan if plan is None else check_plan(plan, self.config.n_layer)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        compiled, self._compiled = self._compiled, None  # decode eagerly: every new length would recompile
        try:
            return self._generate(idx, max_new_tokens, temperature, top_k, plan, use_cache, eos)
        finally:
            self._compiled = compiled

    def _generate(self, idx, max_new_tokens, temperature, top_k, plan, use_cache, eos):
        cache, fed = None, 0
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.config.block_size:]
            if not use_cache:
                logits, _ = self(ctx, plan=plan)
            else:
                if cache is None or idx.size(1) > self.config.block_size:
                    # (re)fill the cache from the visible window; past the context this equals uncached cropping
                    cache, fed = [KVCache() for _ in plan], 0
                    ctx_new = ctx
                else:
                    ctx_new = idx[:, fed:]
                logits, _ = self(ctx_new, plan=plan, cache=cache)
                fed = idx.size(1)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
            if eos is not None and bool((nxt == eos).all()):
                break
        return idx

    # ---- bookkeeping: plans as weights, parameter and FLOP counts ----

    def materialize(self, order):
        """A new model whose layer i is a deep copy of layer order[i] (default plan range(len(order))).
        Its default forward equals this model run with plan=order: growing (MIDAS/LIDAS) materializes a loop."""
        order = check_plan(order, self.config.n_layer)
        cfg = GPTConfig(**{**asdict(self.config), "n_layer": len(order), "plan": None})
        ref = self.embed_tokens.weight
        with torch.device("meta"):  # no random init of weights that are overwritten below (matters at 1.7B)
            new = GPT(cfg)
        new = new.to_empty(device=ref.device).to(ref.dtype)
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta, device=ref.device)
        new.rope_cos, new.rope_sin = cos, sin
        new.embed_tokens.load_state_dict(self.embed_tokens.state_dict())
        new.norm.load_state_dict(self.norm.state_dict())
        for i, src in enumerate(order):
            new.layers[i].load_state_dict(self.layers[src].state_dict())
        return new

    def num_params(self, plan=None, effective=False):
        """Unique parameters, or *effective* ones (a block counted every time the plan runs it)."""
        block = sum(p.numel() for p in self.layers[0].parameters())
        other = self.embed_tokens.weight.numel() + self.norm.weight.numel()
        n = len(self.plan if plan is None else plan) if effective else self.config.n_layer
        return other + n * block

    def flops_per_token(self, plan=None, seq_len=None, train=False, no_grad_steps=0):
        """Matmul FLOPs per token. Forward: 2 x (matmul weights run) + attention scores and values 4·T·d per step
        (full-T count, as nanoGPT/PaLM) + the LM head. Training adds backward = 2 x forward for every step that
        carries gradient (no_grad_steps leading steps run forward only, truncated backprop)."""
        c = self.config
        plan = self.plan if plan is None else check_plan(plan, c.n_layer)
        T = c.block_size if seq_len is None else seq_len
        hd = c.n_embd // c.n_head
        attn_w = c.n_embd * (c.n_head * hd) * 2 + c.n_embd * (c.n_kv_head * hd) * 2
        per_step = 2 * (attn_w + 3 * c.n_embd * c.mlp_hidden) + 4 * T * c.n_embd
        head = 2 * c.n_embd * c.vocab_size
        fwd = len(plan) * per_step + head
        if not train:
            return fwd
        return 3 * fwd - 2 * no_grad_steps * per_step

    def hf_state_dict(self, plan=None):
        """State dict in Hugging Face LlamaForCausalLM names (the plan is unrolled into unique layers)."""
        m = self.materialize(self.plan if plan is None else plan)
        sd = {"model." + k: v for k, v in m.state_dict().items()}
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return sd


# ---- checkpoints ----

CKPT_FORMAT = "growloop-checkpoint-v1"


def save_checkpoint(path, model, **extra):
    """Atomically write {model, config, **extra} (temp file + rename): a crash never leaves a half-written file."""
    ckpt = {"format": CKPT_FORMAT, "config": asdict(model.config), "model": model.state_dict(), **extra}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """-> (model, ckpt dict). A missing, foreign or truncated file raises a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist (train.py writes out/<run>/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, text file...
        raise ValueError(f"{path!r} is not a readable growloop checkpoint (truncated or another format): {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path!r} is not a growloop checkpoint (missing format tag {CKPT_FORMAT!r})")
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt
