# The paper's SmolLM-1.7B shape and recipe (PAPER §2.2, COD Table 2): 24 x d2048, SwiGLU 8192, 32 heads (MHA),
# 2048 context, AdamW lr 5e-4, wd 0.01, clip 1.0, 2M-token batches, 2000 warmup steps, 200k steps, 1-sqrt cooldown
# over the last 15%. GPT-2 BPE instead of cosmo2 (see smollm_360m.py).
# Cost: ~11 GFLOP per training token, 400B tokens = 4.8e21 FLOP: the paper used 128 A100s for 4.5 days; 8 H100s at
# 40% MFU would need ~2.5 weeks. Memory: ~27 GB of fp32 weights + AdamW state and ~50-60 GB at micro_batch 4, so an
# 80 GB+ GPU per rank (plain DDP, no sharding).
# Retrofitted recurrence (PAPER §2.12, Table 3): branch from ckpt_cooldown.pt with --cooldown_plan="repeat(8,4,1)".
from data.mixture import PAPER_MIXTURE as _MIX

out_dir = "out/smollm_1p7b"
tokenizer = "gpt2"
n_layer = 24
n_embd = 2048
n_head = 32
n_kv_head = 32
mlp_hidden = 8192
block_size = 2048
mixture = dict(_MIX)
val_batches = 20
max_steps = 200_000
batch_tokens = 2_097_152   # 1024 rows of 2048
micro_batch = 4            # 256 micro-steps on one GPU, 32 on eight
lr = 5e-4
warmup_steps = 2000
cooldown_frac = 0.15
weight_decay = 0.01
grad_clip = 1.0
grow_block = 4
compile = True
eval_interval = 2000
ckpt_interval = 2000
log_interval = 10
