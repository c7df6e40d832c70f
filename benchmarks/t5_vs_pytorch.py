"""Our T5 (JAX / Flax NNX, common.py) against transformers' PyTorch T5, side by side on one machine.

Measures, at each shape (random weights, no download):
  (a) a DPO-shaped train step: policy forward + backward on B chosen and B rejected
      completions (one 2B decoder batch, each of the B prompts encoded once and shared by
      its two completions, in both frameworks, as dpo.py does), a reference forward without
      gradients, the DPO loss, gradient clipping at 1.0 and an optimiser update (the same
      optimiser in both: AdamW by default); ours is the step as dpo.py runs it (nnx.jit,
      models bound by nnx.cached_partial), PyTorch a plain loop over T5ForConditionalGeneration,
      also timed the way most PyTorch code does it (TRL included): prompts duplicated, so
      every prompt is encoded twice ("PyTorch, prompts twice");
  (b) sampling 64 new tokens for 16 prompts: common.sample against transformers'
      generate(do_sample=True, use_cache=True); all 64 tokens are generated in both
      (ours: an EOS-free spec; PyTorch: min_new_tokens=64);
  (c) the machine's float32 matmul peak (the best of jnp.dot and torch.matmul) and the
      train step's achieved FLOP/s (model FLOPs counted analytically: `dpo_step_flops`).
Every measurement runs in its own subprocess, so peak RSS is that measurement's alone and
the two frameworks' thread pools never compete. Timings are medians over steady-state
steps after warm-up.

    python benchmarks/t5_vs_pytorch.py                          # tiny and t5-small, ~6 min on 2 cores
    python benchmarks/t5_vs_pytorch.py --shapes tiny --steps 3  # quick check

Writes a markdown table to stdout, JSON to benchmarks/results/t5_vs_pytorch.json and the
table into docs/benchmarks.md (between this script's markers; the rest is kept).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# T5Config fields of each benchmark shape, and the batch of a train step.
SHAPES = {
    # the toy reference's size (sft.py's TOY_T5), with Flan-T5's gated-gelu and untied lm_head
    "tiny": dict(config=dict(vocab_size=39, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                             num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=32,
                             feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                 pairs=8, prompt_len=24, completion_len=12),
    # the original t5-small (relu, tied embeddings)
    "t5-small": dict(config=dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                                 num_decoder_layers=6, num_heads=8, feed_forward_proj="relu",
                                 tie_word_embeddings=True),
                     pairs=8, prompt_len=128, completion_len=64),
}
COMMON_CONFIG = dict(dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


@dataclass
class Args:
    shapes: str = "tiny,t5-small"
    """comma-separated shapes to run (tiny, t5-small)"""
    steps: int = 5
    """timed train steps (and sampling calls) per measurement, at least; see --min-time"""
    min_time: float = 3.0
    """keep timing until this many seconds have passed too (many steps at the tiny shape)"""
    warmup: int = 2
    """untimed steps first (the first compiles)"""
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """the same in both: optax.adamw / torch.optim.AdamW, or optax.adafactor / transformers' Adafactor"""
    sample_batch: int = 16
    """prompts per sampling call"""
    new_tokens: int = 64
    """tokens sampled per prompt"""
    parts: str = "peak,train,sample"
    """what to measure"""
    repeats: int = 3
    """processes per figure, the frameworks alternating; the table gives the median of their medians and
    the range (on a shared 2-core VM one process's median can sit 20-30% off another's)"""
    output: str = os.path.join(ROOT, "benchmarks", "results", "t5_vs_pytorch.json")
    """JSON results ('' to skip)"""
    docs: str = os.path.join(ROOT, "docs", "benchmarks.md")
    """markdown page whose t5_vs_pytorch section is rewritten ('' to skip)"""
    worker: str = ""
    """internal: run one measurement in this process, as FRAMEWORK:PART[:SHAPE]"""


# ---------------------------------------------------------------------------
# FLOP count
# ---------------------------------------------------------------------------
def t5_forward_flops(c: dict, batch: int, src_len: int, tgt_len: int, prompts: int | None = None) -> int:
    """FLOPs of one teacher-forced T5 forward pass: 2 per multiply-add, matrix products only.
    `batch` sequences; the encoder and the cross-attention K, V run on `prompts` of them
    (default all: with 2 completions per prompt, prompts = batch / 2 when each is encoded once).

    Per layer and token: Q, K, V, O projections (4 d_model x inner), the feed-forward
    (2 or, gated, 3 d_model x d_ff), and attention itself (scores QK^T and the weighted sum of
    V: 2 x inner per key, every key of the full matrix, as both frameworks compute it). The decoder
    adds cross-attention: Q and O on decoder tokens, K and V on encoder tokens, and 2 x inner
    per encoder key. Then the LM head, d_model x vocab per decoder token. Norms, softmax and
    elementwise ops are < 1% and left out.
    At t5-small, 16 sequences of 128 + 64 tokens: 174.6 GFLOP. The issue's ~692 GFLOP for the
    DPO step (4 forwards) is this count without the cross-attention scores and sum (692.0).
    With the 16 sequences' 8 prompts encoded once: 127.9 GFLOP.
    """
    prompts = batch if prompts is None else prompts
    d, inner, ff, vocab = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"], c["vocab_size"]
    ff_macs = (3 if c["feed_forward_proj"].startswith("gated") else 2) * d * ff
    enc = src_len * c["num_layers"] * (4 * d * inner + ff_macs + 2 * src_len * inner)
    dec = tgt_len * c["num_decoder_layers"] * (
        4 * d * inner + ff_macs + 2 * tgt_len * inner  # self-attention, feed-forward
        + 2 * d * inner + 2 * src_len * inner)  # cross-attention Q, O and scores/sum
    cross_kv = src_len * c["num_decoder_layers"] * 2 * d * inner
    head = tgt_len * d * vocab
    return 2 * (prompts * (enc + cross_kv) + batch * (dec + head))


def dpo_step_flops(shape: dict) -> int:
    """Model FLOPs of the step: policy forward + backward (backward = 2 forwards: gradients
    w.r.t. activations and weights) on the 2B sequences, plus one reference forward: 4 forwards,
    each encoding the B prompts once. PyTorch's prompts-twice variant executes more (1.37x at
    t5-small) for the same result; its FLOP/s are quoted on this count too (useful work)."""
    b = shape["pairs"]
    return 4 * t5_forward_flops(shape["config"], 2 * b, shape["prompt_len"], shape["completion_len"], prompts=b)


# ---------------------------------------------------------------------------
# Workers: one measurement per process
# ---------------------------------------------------------------------------
def timed(fn, args: Args, sync) -> list[float]:
    """Wall-clock and CPU seconds of each steady-state call of fn (after warm-up)."""
    for _ in range(args.warmup):
        sync(fn())
    times, cpu, start = [], [], time.perf_counter()
    while len(times) < args.steps or time.perf_counter() - start < args.min_time:
        t0, c0 = time.perf_counter(), time.process_time()
        sync(fn())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # CPU seconds (all threads) per call: less sensitive to other processes than wall time
    return dict(times=times, cpu_times=cpu)


def batch_arrays(shape: dict, seed: int = 0) -> dict:
    """Random token ids (no special tokens), full masks: every position is real work."""
    rng = np.random.default_rng(seed)
    v, b, p, t = shape["config"]["vocab_size"], shape["pairs"], shape["prompt_len"], shape["completion_len"]
    ids = lambda n: rng.integers(3, v, (b, n)).astype(np.int32)
    return dict(prompt_ids=ids(p), prompt_mask=np.ones((b, p), np.int32), chosen_ids=ids(t),
                chosen_mask=np.ones((b, t), np.int32), rejected_ids=ids(t), rejected_mask=np.ones((b, t), np.int32))


def sample_prompts(shape: dict, args: Args) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(3, shape["config"]["vocab_size"], (args.sample_batch, shape["prompt_len"])).astype(np.int32)


def hf_config(shape: dict):
    from transformers import T5Config
    return T5Config(**shape["config"], **COMMON_CONFIG)


def dpo_loss(pi_w, pi_l, ref_w, ref_l, tau, log_sigmoid):
    """dpo.py's dpo_loss: -log sigma(tau * h) (Calandriello et al. 2024, Eq. 4)."""
    return -log_sigmoid(tau * ((pi_w - ref_w) - (pi_l - ref_l)))


def jax_worker(part: str, shape: dict, args: Args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import common as C

    if part == "peak":
        return matmul_peak(lambda n: jax.random.normal(jax.random.key(0), (n, n), jnp.float32),
                           jax.jit(jnp.dot), lambda x: x.block_until_ready())

    # EOS-free (no token id is -1): the sampler never stops early, every row gets new_tokens.
    spec = C.replace(C.T5Spec.from_config(hf_config(shape)), eos_id=-1)
    policy = C.T5(spec, rngs=nnx.Rngs(0))
    if part == "sample":
        ids = jnp.asarray(sample_prompts(shape, args))
        mask = jnp.ones_like(ids)
        keys = iter(jax.random.split(jax.random.key(0), 10_000))
        call = lambda: C.sample(policy, ids, mask, next(keys), args.new_tokens)
        out = call()[1]
        assert int(out.sum()) == ids.shape[0] * args.new_tokens, "sampler stopped early"
        return timed(call, args, jax.block_until_ready)

    ref = C.T5(spec, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(policy, C.make_optimizer(args.optimizer, 1e-4), wrt=nnx.Param)

    @nnx.jit
    def train_step(policy, ref, optimizer, batch, tau):
        # chosen and rejected as one 2B batch sharing the B prompts' encoding, as dpo.py does
        both = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
        inputs = batch["prompt_ids"], batch["prompt_mask"], both("ids"), both("mask")
        ref_logps = jax.lax.stop_gradient(C.sequence_logps(ref, *inputs))
        n = batch["prompt_ids"].shape[0]

        def loss_fn(policy):
            logps = C.sequence_logps(policy, *inputs)
            return dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], tau, jax.nn.log_sigmoid).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(policy)
        optimizer.update(policy, grads)
        return loss

    batch = {k: jnp.asarray(v) for k, v in batch_arrays(shape).items()}
    tau = jnp.float32(0.1)
    step_fn = nnx.cached_partial(train_step, policy, ref, optimizer)  # as the scripts run their steps
    return timed(lambda: step_fn(batch, tau), args, jax.block_until_ready)


def torch_worker(part: str, shape: dict, args: Args, prompts_twice: bool = False) -> dict:
    import torch
    from transformers import T5ForConditionalGeneration

    torch.set_num_threads(os.cpu_count())
    if part == "peak":
        return matmul_peak(lambda n: torch.randn(n, n), torch.matmul, lambda x: None)

    torch.manual_seed(0)
    policy = T5ForConditionalGeneration(hf_config(shape)).eval()  # eval: no dropout (rate is 0 anyway)
    if part == "sample":
        ids = torch.tensor(sample_prompts(shape, args), dtype=torch.long)
        mask = torch.ones_like(ids)

        def call():
            with torch.inference_mode():
                # top_k=0: plain sampling from the softmax, as ours (generate's default top_k is 50)
                return policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, use_cache=True,
                                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       top_k=0, top_p=1.0, temperature=1.0)
        out = call()
        assert out.shape == (ids.shape[0], args.new_tokens + 1), out.shape  # + decoder start token
        return timed(call, args, lambda x: None)

    ref = T5ForConditionalGeneration(hf_config(shape)).eval().requires_grad_(False)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.0)
    else:
        from transformers.optimization import Adafactor
        opt = Adafactor(policy.parameters(), lr=1e-4, decay_rate=-0.8, clip_threshold=1.0,
                        scale_parameter=True, relative_step=False, warmup_init=False)
    b = {k: torch.tensor(v, dtype=torch.long) for k, v in batch_arrays(shape).items()}
    # chosen and rejected as one 2B batch, as ours
    ids, mask = torch.cat([b["chosen_ids"], b["rejected_ids"]]), torch.cat([b["chosen_mask"], b["rejected_mask"]])
    prompt_mask2 = torch.cat([b["prompt_mask"]] * 2)
    n, tau = shape["pairs"], 0.1

    def logps(model):
        if prompts_twice:  # what most PyTorch DPO code does (TRL's concatenated_forward too)
            inputs = dict(input_ids=torch.cat([b["prompt_ids"]] * 2))
        else:  # each prompt encoded once; its two completions read the same encoder states, as ours
            enc = model.get_encoder()(input_ids=b["prompt_ids"], attention_mask=b["prompt_mask"]).last_hidden_state
            inputs = dict(encoder_outputs=(torch.cat([enc, enc]),))
        logits = model(**inputs, attention_mask=prompt_mask2, decoder_input_ids=model._shift_right(ids),
                       use_cache=False).logits
        return (logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0] * mask).sum(-1)

    def step():
        with torch.no_grad():
            ref_logps = logps(ref)
        pi = logps(policy)
        loss = dpo_loss(pi[:n], pi[n:], ref_logps[:n], ref_logps[n:], tau, torch.nn.functional.logsigmoid).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return timed(step, args, lambda x: x.item())


def matmul_peak(make, matmul, sync, sizes=(1024, 2048, 4096), work=2e10) -> dict:
    """Best matmul rate over a few square sizes (FLOP/s), each timing ~`work` FLOPs (at most 100 calls)."""
    best = 0.0
    for n in sizes:
        a, b = make(n), make(n)
        sync(matmul(a, b))
        reps = min(100, max(2, int(work // (2 * n**3))))
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                sync(matmul(a, b))
            best = max(best, reps * 2 * n**3 / (time.perf_counter() - t0))
    return dict(flops_per_s=best)


def run_worker(args: Args) -> None:
    framework, part, *name = args.worker.split(":")
    shape = SHAPES[name[0]] if name else None
    if framework == "jax":
        out = jax_worker(part, shape, args)
    else:
        out = torch_worker(part, shape, args, prompts_twice=framework == "torch-twice")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over the next `seconds` (this one sleeps meanwhile).

    The 1-minute load average is no use here: it still holds the previous measurement's
    own two busy cores for minutes after it ended. Linux's /proc/stat counts CPU time directly.
    """
    def ticks():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait

    if not os.path.exists("/proc/stat"):
        return os.getloadavg()[0]
    (t0, i0), _, (t1, i1) = ticks(), time.sleep(seconds), ticks()
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * os.cpu_count()


def measure(worker: str, args: Args) -> dict:
    return measure_in_subprocess(__file__, worker, [
        "--steps", str(args.steps), "--min-time", str(args.min_time), "--warmup", str(args.warmup),
        "--optimizer", args.optimizer, "--sample-batch", str(args.sample_batch), "--new-tokens", str(args.new_tokens)])


def measure_in_subprocess(script: str, worker: str, flags: list[str]) -> dict:
    """Run `script --worker WORKER FLAGS` in a fresh process and read its RESULT line; add the medians
    and how busy other processes kept the cores just before."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", worker, *flags]
    load = busy_cores()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"error: worker {worker} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out.update(load_before=load, wall_s=time.perf_counter() - t0)
    if "times" in out:
        out["median_s"] = statistics.median(out["times"])
        out["median_cpu_s"] = statistics.median(out["cpu_times"])
    figure = f"{out['median_s']:.4g} s, {out['median_cpu_s']:.4g} CPU-s" if "times" in out else f"{out['flops_per_s'] / 1e9:.0f} GFLOP/s"
    print(f"  {worker}: {figure} (other processes busy {load:.2f} cores, {out['wall_s']:.0f} s)",
          file=sys.stderr)
    return out


def combine(outs: list[dict]) -> dict:
    """One figure from several processes: the median of their medians, and each process's median."""
    out = dict(outs[0])
    for k in ("median_s", "median_cpu_s"):
        out[k] = statistics.median(o[k] for o in outs)
    out["process_medians_s"] = [o["median_s"] for o in outs]
    out["times"] = [t for o in outs for t in o["times"]]
    out["cpu_times"] = [t for o in outs for t in o["cpu_times"]]
    out["peak_rss_mb"] = max(o["peak_rss_mb"] for o in outs)
    out["load_before"] = max(o["load_before"] for o in outs)
    return out


def spread(out: dict) -> str:
    """' (a-b)': the range of the process medians, when there are several."""
    m = out.get("process_medians_s", [])
    return f" ({min(m):.3g}-{max(m):.3g})" if len(m) > 1 else ""


def measure_repeated(workers: list[str], repeats: int, run) -> dict:
    """{worker: combined figure}, the workers alternating within each round (all see the same drift)."""
    outs = {w: [] for w in workers}
    for _ in range(repeats):
        for w in workers:
            outs[w].append(run(w))
    return {w: combine(o) for w, o in outs.items()}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def machine(packages=("jax", "flax", "torch", "transformers")) -> dict:
    """CPU, cores, Python and the packages' versions, and the date: the header of every report."""
    import importlib
    cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
    return dict(cpu=cpu.group(1) if cpu else platform.processor(), cores=os.cpu_count(),
                python=platform.python_version(), **{p: importlib.import_module(p).__version__ for p in packages},
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def table(results: dict, args: Args) -> str:
    rows = ["| shape | measurement | ours (JAX) | PyTorch | ours / PyTorch |", "|---|---|---:|---:|---:|"]
    peak = results.get("peak_flops_per_s")
    for name, r in results["shapes"].items():
        shape = SHAPES[name]
        if "train" in r:
            j, t = r["train"]["jax"], r["train"]["torch"]
            pairs = shape["pairs"]
            rows.append(f"| {name} | train step, s (median{' (range of processes)' if spread(j) else ''}) | "
                        f"{j['median_s']:.4g}{spread(j)} | {t['median_s']:.4g}{spread(t)} | "
                        f"**{t['median_s'] / j['median_s']:.2f}x** |")
            rows.append(f"| {name} | train pairs/s | {pairs / j['median_s']:.1f} | {pairs / t['median_s']:.1f} | |")
            if "torch-twice" in r["train"]:
                t2 = r["train"]["torch-twice"]
                rows.append(f"| {name} | train step, s, PyTorch encoding every prompt twice (as TRL) | | "
                            f"{t2['median_s']:.4g}{spread(t2)} | {t2['median_s'] / j['median_s']:.2f}x |")
            flops = dpo_step_flops(shape)
            jf, tf = flops / j["median_s"], flops / t["median_s"]
            pct = lambda f: f" ({100 * f / peak:.0f}% of peak)" if peak else ""
            rows.append(f"| {name} | train GFLOP/s (step = {flops / 1e9:.3g} model GFLOP) | {jf / 1e9:.1f}{pct(jf)} | "
                        f"{tf / 1e9:.1f}{pct(tf)} | |")
            rows.append(f"| {name} | train peak RSS, MB | {j['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | |")
        if "sample" in r:
            j, t = r["sample"]["jax"], r["sample"]["torch"]
            tokens = args.sample_batch * args.new_tokens
            rate = lambda o: f"{tokens / o['median_s']:.0f}" + (
                f" ({tokens / max(o['process_medians_s']):.0f}-{tokens / min(o['process_medians_s']):.0f})"
                if spread(o) else "")
            rows.append(f"| {name} | sampling tokens/s ({args.sample_batch} x {args.new_tokens} new, prompt "
                        f"{shape['prompt_len']}) | {rate(j)} | {rate(t)} | "
                        f"**{t['median_s'] / j['median_s']:.2f}x** |")
            rows.append(f"| {name} | sampling peak RSS, MB | {j['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | |")
    if peak:
        p = results["peak"]
        rows.append(f"| machine | float32 matmul peak, GFLOP/s | {p['jax']['flops_per_s'] / 1e9:.0f} | "
                    f"{p['torch']['flops_per_s'] / 1e9:.0f} | (peak = max) |")
    return "\n".join(rows)


def write_docs(path: str, results: dict, md: str, args: Args) -> None:
    begin, end = "<!-- t5_vs_pytorch:begin -->", "<!-- t5_vs_pytorch:end -->"
    m = results["machine"]
    loads = [w["load_before"] for r in results["shapes"].values() for part in r.values() for w in part.values()]
    loads = loads + [p["load_before"] for p in results.get("peak", {}).values()] or [0.0]
    warning = ("\n\n**Taken on a shared, loaded machine: provisional. PyTorch's OpenMP threads degrade badly when "
               "cores are oversubscribed, so the ratios overstate our lead; rerun on a quiet machine.**"
               if max(loads) > 0.25 else "")
    section = f"""{begin}
## Our T5 vs transformers' PyTorch T5 (CPU)

Generated by `python benchmarks/t5_vs_pytorch.py --shapes {args.shapes} --steps {args.steps} --optimizer {args.optimizer} --repeats {args.repeats}`
on {m['date'][:10]}: {m['cpu']}, {m['cores']} cores; jax {m['jax']}, flax {m['flax']}, torch {m['torch']},
transformers {m['transformers']}. Cores busy with other processes in the second before each
measurement (from /proc/stat): {min(loads):.2f} to {max(loads):.2f} (a quiet machine: below 0.25).{warning}

{md}

- Train step: a DPO step on B={SHAPES['t5-small']['pairs']} pairs; policy forward + backward on the 2B
  concatenated chosen + rejected sequences, each of the B prompts encoded once for its two completions,
  a reference forward without gradients, the DPO loss, gradient clipping at 1.0, {args.optimizer} update.
  Ours: one `nnx.jit` function called through `nnx.cached_partial`, as the scripts do; PyTorch: a plain
  loop over `T5ForConditionalGeneration` (eval mode, dropout 0, `torch.set_num_threads({m['cores']})`),
  the encoder run once on the B prompts and its states passed to both completions (`encoder_outputs`).
  The ratio is taken against that like-for-like loop; the row "encoding every prompt twice" is the
  same loop fed the prompts duplicated, as most PyTorch DPO code (TRL's included) does it.
- FLOPs are model FLOPs, counted analytically (`dpo_step_flops`: 4 forward passes with each prompt
  encoded once, 2 FLOPs per multiply-add, attention included) and quoted for both sides; the peak is
  the best of `jnp.dot` and `torch.matmul` on square float32 matrices.
- Sampling: `common.sample` (jitted, KV-cached `lax.while_loop`) vs `generate(do_sample=True,
  use_cache=True, top_k=0, min_new_tokens={args.new_tokens})`; both generate all {args.new_tokens} tokens.
- Each figure: {args.repeats} process(es) per side, the sides alternating; in each, the median over
  steady-state calls; the table gives the median of those medians and their range (peak RSS: the largest).
  Raw timings: `benchmarks/results/t5_vs_pytorch.json`.
{end}"""
    replace_section(path, begin, end, section)


def save_results(results: dict, md: str, args, write_docs) -> None:
    """Raw results to args.output (JSON) and the markdown into args.docs; '' skips either."""
    if args.output:
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    if args.docs:
        write_docs(args.docs, results, md, args)


def replace_section(path: str, begin: str, end: str, section: str) -> None:
    """Write `section` between its markers in docs/benchmarks.md, keeping the rest (each benchmark
    script owns one section); append it when the markers are not there yet."""
    text = open(path).read() if os.path.exists(path) else (
        "# Benchmarks\n\nSpeed comparisons against peers, regenerated by the scripts in `benchmarks/`.\n\n")
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(args: Args) -> None:
    if args.worker:
        return run_worker(args)
    names = [s for s in args.shapes.split(",") if s]
    for name in names:
        if name not in SHAPES:
            sys.exit(f"error: unknown shape {name!r} in --shapes; choose from {', '.join(SHAPES)}")
    parts = args.parts.split(",")
    results = dict(machine=machine(), args=asdict(args), shapes={})
    for name in names:
        results["shapes"][name] = {}
        for part in ("train", "sample"):
            if part in parts:
                fws = ("jax", "torch", "torch-twice") if part == "train" else ("jax", "torch")
                got = measure_repeated([f"{fw}:{part}:{name}" for fw in fws], args.repeats,
                                       lambda w: measure(w, args))
                results["shapes"][name][part] = {fw: got[f"{fw}:{part}:{name}"] for fw in fws}
    if "peak" in parts:
        results["peak"] = {fw: measure(f"{fw}:peak", args) for fw in ("jax", "torch")}
        results["peak_flops_per_s"] = max(p["flops_per_s"] for p in results["peak"].values())
    results["flops_per_step"] = {n: dpo_step_flops(SHAPES[n]) for n in names}
    md = table(results, args)
    print(md)
    save_results(results, md, args, write_docs)


if __name__ == "__main__":
    main(tyro.cli(Args))
