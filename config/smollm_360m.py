# The paper's SmolLM-360M shape and recipe (PAPER §2.2, COD Table 2): 32 x d960, SwiGLU 2560, 15 query / 5 KV heads,
# 2048 context, AdamW lr 3e-3, wd 0.01, clip 1.0, 1M-token batches, 2000 warmup steps, 200k steps with a 1-sqrt
# cooldown over the last 15% (30k). Tokenizer: GPT-2 BPE (50,257) instead of SmolLM's cosmo2 (49,152), which is
# not available offline; the vocabulary changes the embedding size only.
# Cost: ~2.9 GFLOP per training token, 200B tokens = 6.2e20 FLOP (PAPER: 6.1e20); the paper used 64 A100s for
# 1.5 days; one H200 at 40% MFU would need ~18 days, 8 H100s ~2.2 days. Memory: ~30-35 GB per GPU at
# micro_batch 8 (bf16, compile).
# Growth arms: --grow=midas|lidas --grow_block=4 (8 stages, PROP-1, window = the 170k steps before the cooldown).
# Looped arms (PAPER Table 1): --n_layer=12 --plan="loop(4-4x4-4)". Cooldown arms branch from ckpt_cooldown.pt:
# --init_from=out/smollm_360m/ckpt_cooldown.pt --cooldown_mixture="{...math 20%...}" --cooldown_plan="repeat(12,4,1)".
from data.mixture import PAPER_MIXTURE as _MIX

out_dir = "out/smollm_360m"
tokenizer = "gpt2"
n_layer = 32
n_embd = 960
n_head = 15
n_kv_head = 5
mlp_hidden = 2560
block_size = 2048
mixture = dict(_MIX)
val_batches = 20
max_steps = 200_000
batch_tokens = 1_048_576   # 512 rows of 2048
micro_batch = 8            # 64 micro-steps on one GPU, 8 on eight
lr = 3e-3
warmup_steps = 2000
cooldown_frac = 0.15
weight_decay = 0.01
grad_clip = 1.0
grow_block = 4
compile = True
eval_interval = 2000
ckpt_interval = 2000
log_interval = 10
