"""Everything the algorithm scripts share (and nothing else).

Contents (sections appear in this order):
  1. Model        T5 encoder-decoder in Flax NNX
  2. Checkpoints  load_t5 / save_t5 (Hugging Face folders and hub ids)
  3. Log-probs    teacher-forced per-token and per-sequence log-probs
  4. Sampling     one jitted, KV-cached sampler; geometric mixture of two models
  5. Preferences  judges (prompts, y, y') -> p(y > y' | x)
  6. Data         the embedded toy task; JSONL and hub datasets
  7. Sharding     ('data', 'fsdp') mesh over all devices
  8. Training     optimiser, logging, evaluation, resumable checkpoints
"""
from __future__ import annotations


def fail(msg: str):
    """Stop with one clear line on stderr and exit status 1 (no traceback wall)."""
    raise SystemExit(f"error: {msg}")
