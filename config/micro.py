# micro: a few seconds on one CPU core; used by the tests and for smoke runs.
# python train.py config/micro.py --data_dir=... --out_dir=out/micro
out_dir = "out/micro"
n_layer = 4
n_embd = 32
n_head = 2
n_kv_head = 2
mlp_hidden = 96
block_size = 64
mixture = {"primitives": 0.5, "sotu": 0.5}
val_batches = 2
max_steps = 16
batch_tokens = 512   # 8 rows of 64 tokens, 2 micro-steps of 4
micro_batch = 4
lr = 3e-3
warmup_steps = 2
eval_interval = 8
ckpt_interval = 8
dtype = "float32"
