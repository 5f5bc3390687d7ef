# GPT-2-small-sized growloop model on one GPU: 12 x d768, SwiGLU 2048, 12 heads, 1024 context, GPT-2 BPE,
# the SmolLM mixture of PAPER §2.2 (Hugging Face sources: python -m data.prepare --tokenizer gpt2 --sources
# fineweb-edu,cosmopedia-v2,python-edu,open-web-math; python-edu needs its code fetched, see data/sources.py).
# ~124M parameters, ~0.9 GFLOP per training token. One H100/H200, bf16 + compile at ~40% MFU: ~450k tok/s,
# 5000 steps x 0.5M tokens (2.6B tokens, ~20 tokens/param) in ~1.6 h; ~30 GB at micro_batch 16.
from data.mixture import PAPER_MIXTURE as _MIX

out_dir = "out/gpt2_125m"
tokenizer = "gpt2"
n_layer = 12
n_embd = 768
n_head = 12
n_kv_head = 12
mlp_hidden = 2048
block_size = 1024
mixture = dict(_MIX)
val_batches = 20
max_steps = 5000
batch_tokens = 524288    # 512 rows of 1024
micro_batch = 16         # 32 micro-steps on one GPU, 4 on eight
lr = 1.5e-3
warmup_steps = 200
cooldown_frac = 0.15
weight_decay = 0.01
compile = True
eval_interval = 250
ckpt_interval = 500
log_interval = 10
