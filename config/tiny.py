# tiny: the CPU default (same values as train.py's defaults, spelled out). Byte tokenizer, 8 x d128 SwiGLU blocks
# (1.7M parameters), 512-token context, a mixture of reasoning primitives, prose and math (PAPER §7.1).
# Cost: ~16.7 MFLOP per training token, 1M tokens in all. Measured on 2 AVX512-BF16 cores: ~8k tok/s with bf16
# autocast on idle cores (fp32 ~6.7k), i.e. ~2 min; ~3.3k tok/s (5 min) with --threads=1 while other jobs share the
# cores, where 2 threads fall to ~1k tok/s: use --threads=1 on a busy machine.
#   python -m data.prepare --tokenizer byte                                 data (once)
#   python train.py config/tiny.py                                         baseline
#   python train.py config/tiny.py --grow=lidas --grow_block=2 --out_dir=out/tiny_lidas
#   python train.py config/tiny.py --n_layer=6 --plan="loop(2-2x4-2)" --out_dir=out/tiny_loop
out_dir = "out/tiny"
tokenizer = "byte"
n_layer = 8
n_embd = 128
n_head = 4
n_kv_head = 4
mlp_hidden = 384
block_size = 512
mixture = {"primitives": 0.2, "sotu": 0.4, "wiki": 0.3, "math": 0.1}  # math a minority, as in SmolLM (6%)
max_steps = 60
batch_tokens = 16384     # 32 rows of 512
micro_batch = 8
lr = 3e-3
warmup_steps = 10
cooldown_frac = 0.15     # the final 9 steps: 1-sqrt decay, cooldown mixture / plan (PAPER §2.2, §2.11-2.12)
val_batches = 4
eval_interval = 20
ckpt_interval = 20
