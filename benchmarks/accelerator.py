"""Issue 9 on an accelerator: t5-large in bfloat16, the papers' policy size, on one GPU or TPU chip.

Measures, in one process on the default JAX device (random weights, no download):
  peak     the chip's measured matmul rate in the benchmark dtype (best of square jnp.dot sizes);
  train    the offline IPO step exactly as ipo.py runs it (train_step through nnx.cached_partial,
           pi_ref's log-probs precomputed): B pairs, prompts of P tokens, completions of T tokens,
           each prompt encoded once; its model-FLOPs utilisation (MFU) = the step's model FLOPs
           (3 forward passes of t5_vs_pytorch.t5_forward_flops) / step time / measured peak;
  sample   common.sample: new tokens for a batch of prompts (EOS-free weights: every row runs
           to the end), tokens/s;
  mixture  the same from the geometric mixture of two models (IPO-MD / Nash-MD), tokens/s.

    python benchmarks/accelerator.py                  # t5-large, bfloat16, on the default device
    python benchmarks/accelerator.py --shape tiny --steps 2 --peak-sizes 256 --pairs 4  # CPU smoke test

The shape "t5-large" is google/flan-t5-large's configuration (783M parameters: d_model 1024,
24 + 24 layers, 16 heads, d_ff 2816 gated-gelu, vocab 32128, untied head). Writes JSON to
benchmarks/results/accelerator.json and this benchmark's section of docs/benchmarks.md.
"""
from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import ipo  # noqa: E402
from t5_vs_pytorch import (COMMON_CONFIG, SHAPES as CPU_SHAPES, matmul_peak, replace_section,  # noqa: E402
                           save_results, t5_forward_flops)

SHAPES = {
    "t5-large": dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
                     num_heads=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-small": CPU_SHAPES["t5-small"]["config"],
    "tiny": CPU_SHAPES["tiny"]["config"],
}


@dataclass
class Args:
    shape: Literal["t5-large", "t5-small", "tiny"] = "t5-large"
    """model configuration (random weights); tiny is for a CPU smoke test"""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """parameter dtype, as the scripts' --dtype (norms, softmax and log-probs stay float32)"""
    pairs: int = 32
    """B, pairs per train step (the papers' batch size)"""
    prompt_len: int = 128
    """P, prompt tokens"""
    completion_len: int = 64
    """T, completion tokens of the train step"""
    optimizer: Literal["adafactor", "adamw"] = "adafactor"
    """the scripts' optimiser (Adafactor, decay rate 0.8, as in the papers)"""
    sample_batch: int = 16
    """prompts per sampling call"""
    new_tokens: int = 64
    """tokens sampled per prompt"""
    beta: float = 0.125
    """mixture weight of pi_ref for the mixture sampler"""
    steps: int = 10
    """timed train steps and sampling calls, after the warm-up"""
    warmup: int = 2
    """untimed calls first (the first compiles)"""
    peak_sizes: str = "4096,8192,16384"
    """square matmul sizes tried for the peak rate"""
    parts: str = "peak,train,sample,mixture"
    """what to measure"""
    output: str = os.path.join(ROOT, "benchmarks", "results", "accelerator.json")
    """JSON results ('' to skip)"""
    docs: str = os.path.join(ROOT, "docs", "benchmarks.md")
    """markdown page whose accelerator section is rewritten ('' to skip)"""


def median_time(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_ids(rng, vocab, rows, length, eos=True):
    ids = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    if eos:  # completions end with EOS, as the scripts' data do
        ids[:, -1] = 1
    return ids


def train(args: Args, spec: C.T5Spec) -> dict:
    b, p, t = args.pairs, args.prompt_len, args.completion_len
    policy = C.T5(spec, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = {"prompt_ids": random_ids(rng, spec.vocab_size, b, p, eos=False), "prompt_mask": np.ones((b, p), np.int32),
             "chosen_ids": random_ids(rng, spec.vocab_size, b, t), "chosen_mask": np.ones((b, t), np.int32),
             "rejected_ids": random_ids(rng, spec.vocab_size, b, t), "rejected_mask": np.ones((b, t), np.int32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ref = C.T5(spec, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(1))
    batch["ref_chosen"], batch["ref_rejected"] = ipo.policy_logps(ref, batch)  # once per dataset, as ipo.py
    del ref
    optimizer = nnx.Optimizer(policy, C.make_optimizer(args.optimizer, 1e-4), wrt=nnx.Param)
    step_fn = nnx.cached_partial(ipo.train_step, policy, optimizer)
    tau = jnp.float32(0.1)
    step_s = median_time(lambda: step_fn(batch, tau), args.warmup, args.steps)
    flops = 3 * t5_forward_flops(SHAPES[args.shape], 2 * b, p, t, prompts=b)
    return dict(step_s=step_s, pairs_per_s=b / step_s, model_flops=flops, flops_per_s=flops / step_s,
                params=sum(x.size for x in jax.tree.leaves(nnx.state(policy, nnx.Param))))


def sample(args: Args, spec: C.T5Spec, mixture: bool) -> dict:
    spec = C.replace(spec, eos_id=-1)  # no token is EOS: every row samples all new_tokens
    dtype = jnp.dtype(args.dtype)
    policy = C.T5(spec, dtype=dtype, rngs=nnx.Rngs(0))
    ref = C.T5(spec, dtype=dtype, rngs=nnx.Rngs(1)) if mixture else None
    rng = np.random.default_rng(1)
    ids = jnp.asarray(random_ids(rng, spec.vocab_size, args.sample_batch, args.prompt_len, eos=False))
    mask = jnp.ones_like(ids)
    keys = iter(jax.random.split(jax.random.key(0), args.warmup + args.steps + 1))
    call = lambda: C.sample(policy, ids, mask, next(keys), args.new_tokens, ref=ref, beta=args.beta if mixture else 0.0)
    s = median_time(call, args.warmup, args.steps)
    return dict(call_s=s, tokens_per_s=args.sample_batch * args.new_tokens / s)


def device_info() -> dict:
    import flax
    d = jax.devices()[0]
    return dict(platform=d.platform, device_kind=d.device_kind, device_count=jax.device_count(),
                jax=jax.__version__, flax=flax.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"))


def peak_memory_gb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def table(r: dict, args: Args) -> str:
    rows = ["| measurement | value |", "|---|---:|"]
    if "peak_flops_per_s" in r:
        rows.append(f"| measured {args.dtype} matmul peak, TFLOP/s | {r['peak_flops_per_s'] / 1e12:.1f} |")
    if "train" in r:
        t = r["train"]
        rows.append(f"| offline IPO train step, s (B={args.pairs}, P={args.prompt_len}, T={args.completion_len}) "
                    f"| {t['step_s']:.4g} |")
        rows.append(f"| train pairs/s | {t['pairs_per_s']:.1f} |")
        rows.append(f"| train model TFLOP/s (step = {t['model_flops'] / 1e12:.3g} TFLOP) | {t['flops_per_s'] / 1e12:.1f} |")
        if "peak_flops_per_s" in r:
            mfu = t["flops_per_s"] / r["peak_flops_per_s"]
            rows.append(f"| train MFU (target >= 40%) | **{100 * mfu:.0f}%**: {'met' if mfu >= 0.4 else 'missed'} |")
    for part, name in (("sample", "sampling"), ("mixture", f"mixture sampling (beta {args.beta:g})")):
        if part in r:
            rows.append(f"| {name} tokens/s ({args.sample_batch} x {args.new_tokens} new, prompt {args.prompt_len}) "
                        f"| {r[part]['tokens_per_s']:.0f} |")
    if r.get("peak_memory_gb") is not None:
        rows.append(f"| peak device memory, GiB | {r['peak_memory_gb']:.1f} |")
    return "\n".join(rows)


def write_docs(path: str, r: dict, md: str, args: Args) -> None:
    m = r["device"]
    begin, end = "<!-- accelerator:begin -->", "<!-- accelerator:end -->"
    section = f"""{begin}
## On an accelerator: {args.shape} in {args.dtype}

Generated by `python benchmarks/accelerator.py --shape {args.shape} --dtype {args.dtype} --pairs {args.pairs}`
on {m['date'][:10]}: {m['device_kind']} ({m['platform']}, {m['device_count']} device(s), one used); jax {m['jax']},
flax {m['flax']}. {r['train']['params'] / 1e6 if 'train' in r else float('nan'):.0f}M parameters, random weights.

{md}

- Train step: `ipo.py`'s `train_step` through `nnx.cached_partial`, as its loop runs it ({args.optimizer});
  pi_ref's log-probs precomputed. MFU = model FLOPs (3 forward passes, each prompt encoded once,
  `t5_vs_pytorch.t5_forward_flops`) / median step time / the measured matmul peak above.
- Sampling: `common.sample` (one jitted call, KV-cached), weights that never emit EOS; median of {args.steps} calls.
{end}"""
    replace_section(path, begin, end, section)


def main(args: Args) -> dict:
    parts = args.parts.split(",")
    spec = C.T5Spec.from_config(__import__("transformers").T5Config(**SHAPES[args.shape], **COMMON_CONFIG))
    r = dict(device=device_info(), args=asdict(args))
    print(f"{r['device']['device_kind']} ({r['device']['platform']}); {args.shape} in {args.dtype}", file=sys.stderr)
    if "peak" in parts:
        # the denominator of MFU: measured on this chip, not a spec sheet; ~2 TFLOP per timing
        make = lambda n: jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(args.dtype)
        r["peak_flops_per_s"] = matmul_peak(make, jax.jit(jnp.dot), jax.block_until_ready,
                                            [int(n) for n in args.peak_sizes.split(",")], work=2e12)["flops_per_s"]
    if "train" in parts:
        r["train"] = train(args, spec)
    for part in ("sample", "mixture"):
        if part in parts:
            r[part] = sample(args, spec, mixture=part == "mixture")
    r["peak_memory_gb"] = peak_memory_gb()
    md = table(r, args)
    print(md)
    save_results(r, md, args, write_docs)
    return r


if __name__ == "__main__":
    main(tyro.cli(Args))
