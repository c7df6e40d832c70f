"""Our offline train steps and mixture sampler against TRL's, side by side on one machine (CPU).

Peer: TRL 0.28.0, the last release whose DPOTrainer supports encoder-decoder models
(`pip install trl==0.28.0 weave torch==2.13.0`; not in requirements.txt: benchmarks are not
tests). Measures, at each shape (random weights, nothing downloaded):

  (a) an offline train step on B pairs, for DPO (TRL loss_type "sigmoid"), IPO ("ipo") and
      SLiC ("hinge"). Ours: dpo.py / ipo.py / slic.py's `train_step` (one nnx.jit call:
      policy forward + backward on the 2B concatenated sequences, loss, clipping at 1.0,
      update). TRL: `DPOTrainer.train()` with `precompute_ref_log_probs=True` (as our scripts
      do: pi_ref's log-probs are computed once per dataset, outside the timed steps), timed
      between consecutive `on_step_end` callbacks, so a step includes TRL's collation,
      forward/backward, metrics and update. Float32 in both (TRL's default, bf16 autocast even on
      CPU, is timed too, as an extra column). The same optimiser in both: AdamW (lr 1e-4,
      no weight decay, global-norm clipping at 1.0), because TRL's `optim="adafactor"` is
      transformers' Adafactor without parameter scaling, which is not our T5X Adafactor;
  (b) sampling 64 tokens for 16 prompts from the token-wise geometric mixture of two T5s at
      beta = 0.125: `common.sample(policy, ..., ref=ref, beta=0.125)` (jitted, KV-cached, both
      models) against TRL's Nash-MD `GeometricMixtureWrapper(...).generate(...)` (which turns
      the KV cache off), with min_new_tokens = 64 (TRL) and an EOS-free spec (ours), so both
      generate all 64 tokens;
  (c) achieved FLOP/s of our steps against the float32 matmul peak (t5_vs_pytorch's helpers);
  (d) optionally, how our offline IPO step's cost grows with batch and completion length at
      the toy shape (4 points each, fitted log-log exponent).

Data: a word-level tokenizer (tests/conftest.py's `save_word_tokenizer`, T5's special ids)
so that a prompt of P random words tokenises to exactly P tokens in TRL and a completion of
T-1 words to exactly T (TRL appends EOS to completions; the worker asserts the shapes); ours gets random ids with full masks at the
same lengths. Every measurement runs in its own subprocess; timings are medians over
steady-state steps after warm-up.

    python benchmarks/trl_vs_ours.py                          # toy and t5-small, ~14 min on 2 cores
    python benchmarks/trl_vs_ours.py --shapes toy --parts train,mixture   # quick check

Writes a markdown table to stdout, JSON to benchmarks/results/trl_vs_ours.json and the
table into docs/benchmarks.md (between this script's markers; the rest is kept).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from t5_vs_pytorch import (COMMON_CONFIG, SHAPES as T5_SHAPES, machine, measure_in_subprocess,  # noqa: E402
                           measure_repeated, matmul_peak, replace_section, sample_prompts, save_results,
                           t5_forward_flops)

# "toy" is sft.py's TOY_T5 (vocab 39, gated-gelu, untied) = t5_vs_pytorch's "tiny".
SHAPES = {"toy": T5_SHAPES["tiny"], "t5-small": T5_SHAPES["t5-small"]}
LOSSES = {"dpo": "sigmoid", "ipo": "ipo", "slic": "hinge"}  # our script -> TRL's loss_type
TAU = {"dpo": 0.5, "ipo": 0.1, "slic": 0.5}  # our scripts' defaults (TRL's beta)


@dataclass
class Args:
    shapes: str = "toy,t5-small"
    """comma-separated shapes to run (toy, t5-small)"""
    steps: int = 3
    """timed steps per train measurement at t5-small (TRL runs exactly warmup + steps steps)"""
    toy_steps: int = 100
    """timed steps per train measurement at the toy shape (the sweep's points take twice as many)"""
    warmup: int = 2
    """untimed steps first (ours: the first compiles; at least 1)"""
    losses: str = "dpo,ipo,slic"
    """comma-separated losses (dpo = TRL sigmoid, ipo = ipo, slic = hinge)"""
    sample_batch: int = 16
    """prompts per mixture-sampling call"""
    new_tokens: int = 64
    """tokens sampled per prompt"""
    beta: float = 0.125
    """mixture weight of pi_ref in pi^(1-beta) pi_ref^beta"""
    sample_calls: int = 3
    """timed sampling calls (after one untimed call)"""
    repeats: int = 3
    """processes per train figure (ours and TRL float32 alternating): the table gives the median of their
    medians and the range of ours (on a shared 2-core VM one process's median can sit 20-30% off another's)"""
    trl_bf16: bool = True
    """also time TRL's train step at its default precision (bf16 autocast, on CPU too); the comparison proper is float32"""
    parts: str = "peak,train,mixture,sweep"
    """what to measure (sweep: our IPO step vs batch and completion length, toy shape)"""
    output: str = os.path.join(ROOT, "benchmarks", "results", "trl_vs_ours.json")
    """JSON results ('' to skip)"""
    docs: str = os.path.join(ROOT, "docs", "benchmarks.md")
    """markdown page whose trl_vs_ours section is rewritten ('' to skip)"""
    worker: str = ""
    """internal: run one measurement in this process, as SIDE:PART[:SHAPE[:LOSS]] or ours:sweep:B:T"""


# ---------------------------------------------------------------------------
# Data: exactly-sized sequences for both sides
# ---------------------------------------------------------------------------
def pair_ids(shape: dict, rows: int, seed: int = 0) -> dict:
    """Random word ids; completions end with EOS (1), as TRL makes them (TRL 0.28 adds nothing to prompts)."""
    rng = np.random.default_rng(seed)
    v, p, t = shape["config"]["vocab_size"], shape["prompt_len"], shape["completion_len"]
    completion = lambda: np.concatenate([rng.integers(3, v, (rows, t - 1)), np.ones((rows, 1))], 1).astype(np.int32)
    return dict(prompt_ids=rng.integers(3, v, (rows, p)).astype(np.int32), chosen_ids=completion(),
                rejected_ids=completion())


def words(ids) -> str:
    """The text that save_word_tokenizer turns back into ids (a final EOS dropped: TRL appends it)."""
    return " ".join(f"w{i}" for i in (ids[:-1] if ids[-1] == 1 else ids))


def step_flops(shape: dict) -> int:
    """Model FLOPs of the offline step with pi_ref's log-probs precomputed: policy forward + backward
    on 2B sequences = 3 forwards, each prompt encoded once (TRL encodes each twice: it executes more)."""
    b = shape["pairs"]
    return 3 * t5_forward_flops(shape["config"], 2 * b, shape["prompt_len"], shape["completion_len"], prompts=b)


# ---------------------------------------------------------------------------
# Workers: one measurement per process
# ---------------------------------------------------------------------------
def times_of(fn, warmup: int, steps: int, sync) -> dict:
    for _ in range(warmup):
        sync(fn())
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        sync(fn())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return dict(times=times, cpu_times=cpu)


def ours_train(loss: str, shape: dict, steps: int, args: Args) -> dict:
    import importlib

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from transformers import T5Config

    import common as C
    script = importlib.import_module(loss)  # dpo.py / ipo.py / slic.py
    config = T5Config(**shape["config"], **COMMON_CONFIG)
    policy, ref = C.T5(config, rngs=nnx.Rngs(0)), C.T5(config, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(policy, C.make_optimizer("adamw", 1e-4), wrt=nnx.Param)
    ids = pair_ids(shape, shape["pairs"])
    batch = {k: jnp.asarray(v) for k, v in ids.items()}
    for k in ("prompt", "chosen", "rejected"):
        batch[f"{k}_mask"] = jnp.ones_like(batch[f"{k}_ids"])
    # pi_ref's log-probs, once per dataset (as the scripts' load_pairs does): not timed
    batch["ref_chosen"], batch["ref_rejected"] = script.policy_logps(ref, batch)
    tau = jnp.float32(TAU[loss])
    step_fn = nnx.cached_partial(script.train_step, policy, optimizer)  # as the scripts' loops call it
    return times_of(lambda: step_fn(batch, tau), args.warmup, steps, jax.block_until_ready)


def trl_train(loss: str, shape: dict, steps: int, args: Args, bf16: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import T5Config, T5ForConditionalGeneration, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import save_word_tokenizer

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    tok = save_word_tokenizer(folder, shape["config"]["vocab_size"])
    config = T5Config(**shape["config"], **COMMON_CONFIG)
    policy, ref = T5ForConditionalGeneration(config), T5ForConditionalGeneration(config)
    n_steps, b = args.warmup + steps, shape["pairs"]
    ids = pair_ids(shape, n_steps * b)
    data = Dataset.from_dict({"prompt": [words(r) for r in ids["prompt_ids"]],
                              "chosen": [words(r) for r in ids["chosen_ids"]],
                              "rejected": [words(r) for r in ids["rejected_ids"]]})
    cfg = DPOConfig(output_dir=folder, loss_type=LOSSES[loss], beta=TAU[loss], per_device_train_batch_size=b,
                    max_steps=n_steps, max_prompt_length=shape["prompt_len"],
                    max_completion_length=shape["completion_len"],
                    max_length=shape["prompt_len"] + shape["completion_len"], precompute_ref_log_probs=True,
                    use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True,
                    optim="adamw_torch", learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0,
                    lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0, seed=0,
                    bf16=bf16)  # TRL's default (None) turns bf16 autocast on; ours computes in float32
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append((time.perf_counter(), time.process_time()))

    trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=data, processing_class=tok,
                         callbacks=[Clock()])
    # Check that TRL sees exactly the shapes ours does (no padding, no truncation).
    first = next(iter(trainer.get_train_dataloader()))
    shapes_seen = {k: list(v.shape) for k, v in first.items() if hasattr(v, "shape")}
    want = {"prompt_input_ids": [b, shape["prompt_len"]], "chosen_input_ids": [b, shape["completion_len"]],
            "rejected_input_ids": [b, shape["completion_len"]]}
    for k, v in want.items():
        assert shapes_seen.get(k) == v, (k, shapes_seen.get(k), v)
    assert "ref_chosen_logps" in first, "pi_ref's log-probs were not precomputed"
    trainer.train()
    assert len(ends) == n_steps, len(ends)
    # step i = the interval between on_step_end i-1 and i; the first `warmup` steps are dropped
    times = [ends[i][0] - ends[i - 1][0] for i in range(args.warmup, n_steps)]
    cpu = [ends[i][1] - ends[i - 1][1] for i in range(args.warmup, n_steps)]
    return dict(times=times, cpu_times=cpu, batch_shapes=shapes_seen)


def ours_mixture(shape: dict, args: Args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from transformers import T5Config

    import common as C
    # EOS-free (no token id is -1): every row gets new_tokens
    spec = C.replace(C.T5Spec.from_config(T5Config(**shape["config"], **COMMON_CONFIG)), eos_id=-1)
    policy, ref = C.T5(spec, rngs=nnx.Rngs(0)), C.T5(spec, rngs=nnx.Rngs(1))
    ids = jnp.asarray(sample_prompts(shape, args))
    mask = jnp.ones_like(ids)
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    call = lambda: C.sample(policy, ids, mask, next(keys), args.new_tokens, ref=ref, beta=args.beta)
    assert int(call()[1].sum()) == ids.shape[0] * args.new_tokens, "sampler stopped early"
    return times_of(call, 1, args.sample_calls, jax.block_until_ready)


def trl_mixture_model(policy, ref, gen, beta: float):
    """TRL's GeometricMixtureWrapper over two T5s, made able to generate (see EncoderDecoderMixture)."""
    import torch
    from trl.experimental.nash_md.nash_md_trainer import GeometricMixtureWrapper

    class RefWithItsEncoding:
        """pi_ref as the wrapper calls it, fed pi_ref's own encoder output (generate hands the policy's)."""
        def __init__(self, ref):
            self.ref, self.encoder_outputs = ref, None
            self.prepare_inputs_for_generation = ref.prepare_inputs_for_generation

        def __call__(self, *a, **kw):
            return self.ref(*a, **dict(kw, encoder_outputs=self.encoder_outputs))

    class BothEncoders(torch.nn.Module):
        """What generate() asks get_encoder() for: encodes the prompts once with each model."""
        def __init__(self, policy, ref):
            super().__init__()
            self.policy, self.ref = policy, ref

        def forward(self, input_ids, attention_mask=None, output_attentions=None, output_hidden_states=None,
                    return_dict=True):
            self.ref.encoder_outputs = self.ref.ref.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                                                  return_dict=True)
            return self.policy.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)

    class EncoderDecoderMixture(GeometricMixtureWrapper):
        """TRL 0.28's wrapper has no get_encoder, so generate() fails on T5 (an AttributeError); this adds
        the least that makes it work and stay correct: each model's encoder runs once per call. The
        mixing (TRL's forward) and the cache-free decoding (TRL's prepare_inputs_for_generation) are TRL's."""
        def __init__(self, policy, ref, gen, mixture_coef):
            super().__init__(policy, RefWithItsEncoding(ref), gen, mixture_coef=mixture_coef,
                             device=torch.device("cpu"))

        def get_encoder(self):
            return BothEncoders(self.model, self.ref_model)

        def __getattr__(self, name):  # what newer transformers' generate() asks of a model (TRL 0.28 predates it)
            if name == "model" or "model" not in self.__dict__:
                raise AttributeError(name)
            return getattr(self.__dict__["model"], name)

    return EncoderDecoderMixture(policy, ref, gen, mixture_coef=beta)


def trl_mixture(shape: dict, args: Args) -> dict:
    import torch
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = T5Config(**shape["config"], **COMMON_CONFIG)
    policy, ref = T5ForConditionalGeneration(config).eval(), T5ForConditionalGeneration(config).eval()
    # as NashMDTrainer builds it; top_k=0: plain sampling from the softmax, as ours
    gen = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True,
                           top_k=0, top_p=1.0, temperature=1.0, use_cache=False, pad_token_id=0, eos_token_id=1,
                           decoder_start_token_id=0)
    mixture = trl_mixture_model(policy, ref, gen, args.beta)
    ids = torch.tensor(sample_prompts(shape, args), dtype=torch.long)
    mask = torch.ones_like(ids)

    def call():
        with torch.inference_mode():
            return mixture.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    out = call()
    assert out.shape == (ids.shape[0], args.new_tokens + 1), out.shape  # + decoder start token
    return times_of(call, 0, args.sample_calls, lambda x: None)


def run_worker(args: Args) -> None:
    side, part, *rest = args.worker.split(":")
    if part == "peak":
        if side == "ours":
            import jax
            import jax.numpy as jnp
            out = matmul_peak(lambda n: jax.random.normal(jax.random.key(0), (n, n), jnp.float32), jax.jit(jnp.dot),
                              lambda x: x.block_until_ready())
        else:
            import torch
            torch.set_num_threads(os.cpu_count())
            out = matmul_peak(lambda n: torch.randn(n, n), torch.matmul, lambda x: None)
    elif part == "sweep":  # ours:sweep:B:T, offline IPO at the toy shape
        shape = dict(SHAPES["toy"], pairs=int(rest[0]), completion_len=int(rest[1]))
        out = ours_train("ipo", shape, 2 * args.toy_steps, args)
    else:
        shape = SHAPES[rest[0]]
        steps = args.steps if rest[0] == "t5-small" else args.toy_steps
        if part == "train":
            if side == "ours":
                out = ours_train(rest[1], shape, steps, args)
            else:
                out = trl_train(rest[1], shape, steps, args, bf16=side == "trl-bf16")
        else:
            out = (ours_mixture if side == "ours" else trl_mixture)(shape, args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def measure(worker: str, args: Args) -> dict:
    return measure_in_subprocess(__file__, worker, [
        "--steps", str(args.steps), "--toy-steps", str(args.toy_steps), "--warmup", str(args.warmup),
        "--sample-batch", str(args.sample_batch), "--new-tokens", str(args.new_tokens), "--beta", str(args.beta),
        "--sample-calls", str(args.sample_calls)])


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def loglog_slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def step_range(o: dict) -> str:
    m = o.get("process_medians_s", [])
    return f", {min(m):.3g}-{max(m):.3g}" if len(m) > 1 else ""


def table(results: dict, args: Args) -> str:
    targets = {"toy": 5.0, "t5-small": 1.5}
    rows = ["| shape | measurement | ours (JAX, float32) | TRL 0.28 (float32) | ours / TRL | target | "
            "TRL, its default bf16 autocast (ours / it) |", "|---|---|---:|---:|---:|---|---|"]
    peak = results.get("peak_flops_per_s")
    for name, r in results["shapes"].items():
        shape = SHAPES[name]
        for loss, pair in r.get("train", {}).items():
            o, t = pair["ours"], pair["trl"]
            ratio = t["median_s"] / o["median_s"]
            goal = targets[name] if loss in ("dpo", "ipo") else None
            status = "" if goal is None else f">= {goal:g}x: {'met' if ratio >= goal else '**missed**'}"
            flops = step_flops(shape)
            pct = lambda s: f", {100 * flops / s / peak:.0f}% of peak" if peak else ""
            rows.append(f"| {name} | {loss.upper()} ({LOSSES[loss]}) train pairs/s (step s; GFLOP/s) | "
                        f"{shape['pairs'] / o['median_s']:.1f} ({o['median_s']:.3g} s{step_range(o)}; "
                        f"{flops / o['median_s'] / 1e9:.0f}"
                        f"{pct(o['median_s'])}) | {shape['pairs'] / t['median_s']:.1f} ({t['median_s']:.3g} s{step_range(t)}; "
                        f"{flops / t['median_s'] / 1e9:.0f}{pct(t['median_s'])}) | **{ratio:.2f}x** | {status} | "
                        + (f"{shape['pairs'] / pair['trl-bf16']['median_s']:.1f} pairs/s "
                           f"({pair['trl-bf16']['median_s'] / o['median_s']:.2f}x) |" if "trl-bf16" in pair else "|"))
        if "mixture" in r:
            o, t = r["mixture"]["ours"], r["mixture"]["trl"]
            ratio = t["median_s"] / o["median_s"]
            tokens = args.sample_batch * args.new_tokens
            rows.append(f"| {name} | mixture sampling tokens/s ({args.sample_batch} x {args.new_tokens}, beta "
                        f"{args.beta:g}; s per call) | {tokens / o['median_s']:.0f} ({o['median_s']:.3g} s) | "
                        f"{tokens / t['median_s']:.0f} ({t['median_s']:.3g} s) | **{ratio:.1f}x** | "
                        f">= 10x: {'met' if ratio >= 10 else '**missed**'} | |")
        measured = list(r.get("train", {}).values()) + ([r["mixture"]] if "mixture" in r else [])
        if measured:
            ours_rss = max(x["ours"]["peak_rss_mb"] for x in measured)
            trl_rss = max(x["trl"]["peak_rss_mb"] for x in measured)
            rows.append(f"| {name} | peak RSS of any measurement, MB | {ours_rss:.0f} | {trl_rss:.0f} | | | |")
    if peak:
        p = results["peak"]
        rows.append(f"| machine | float32 matmul peak, GFLOP/s (jnp.dot / torch.matmul) | "
                    f"{p['ours']['flops_per_s'] / 1e9:.0f} | {p['trl']['flops_per_s'] / 1e9:.0f} | (peak = max) | | |")
    md = "\n".join(rows)
    if "sweep" in results:
        s = results["sweep"]
        lines = ["", "Our offline IPO step at the toy shape (prompt 24), cost against batch and completion length:", "",
                 "| B pairs, completion | step, ms | pairs/s |", "|---|---:|---:|"]
        for kind in ("batch", "completion"):
            for p in s[kind]["points"]:
                lines.append(f"| {p['pairs']}, {p['completion_len']} | {1e3 * p['median_s']:.2f} | "
                             f"{p['pairs'] / p['median_s']:.0f} |")
        lines += ["", f"Fitted log-log exponents: step time ~ B^{s['batch']['exponent']:.2f} (completion 12), "
                  f"~ T^{s['completion']['exponent']:.2f} (B = 8)."]
        md += "\n" + "\n".join(lines)
    return md


def write_docs(path: str, results: dict, md: str, args: Args) -> None:
    begin, end = "<!-- trl_vs_ours:begin -->", "<!-- trl_vs_ours:end -->"
    m = results["machine"]
    loads = [results["peak"][s]["load_before"] for s in results.get("peak", {})]
    for r in results["shapes"].values():
        loads += [x["load_before"] for p in r.get("train", {}).values() for x in p.values()]
        loads += [x["load_before"] for x in r.get("mixture", {}).values()]
    loads = loads or [0.0]
    warning = ("\n\n**Taken on a loaded machine: provisional; rerun on a quiet machine.**" if max(loads) > 0.25 else "")
    section = f"""{begin}
## Our offline steps and mixture sampler vs TRL (CPU)

Generated by `python benchmarks/trl_vs_ours.py --shapes {args.shapes} --steps {args.steps} --toy-steps {args.toy_steps} --repeats {args.repeats}`
on {m['date'][:10]}: {m['cpu']}, {m['cores']} cores; jax {m['jax']}, flax {m['flax']}, trl {m['trl']},
torch {m['torch']}, transformers {m['transformers']}. Cores busy with other processes in the second before each
measurement (from /proc/stat): {min(loads):.2f} to {max(loads):.2f} (a quiet machine: below 0.25).{warning}

{md}

- Train step, both sides: B={SHAPES['t5-small']['pairs']} pairs, every prompt exactly P tokens and every
  completion exactly T tokens (toy P=24, T=12; t5-small P=128, T=64), no padding; pi_ref's log-probs
  precomputed once per dataset and not timed (ours: as dpo.py/ipo.py/slic.py do; TRL:
  `precompute_ref_log_probs=True`); float32 on both sides (TRL with `bf16=False`; its default, bf16
  autocast even on CPU, is the last column: what a TRL user gets out of the box); AdamW lr 1e-4 with
  global-norm clipping 1.0 in both (TRL's `optim="adafactor"` is not our T5X Adafactor, so Adafactor
  would not compare like with like).
  Ours: the script's `train_step` as its loop calls it (one `nnx.jit` call through `nnx.cached_partial`:
  policy forward + backward on the 2B concatenated sequences with each prompt encoded once, loss,
  metrics, update). TRL: `DPOTrainer.train()` (loss_type sigmoid / ipo /
  hinge, beta = our tau), a step being the time between consecutive `on_step_end` callbacks (data
  collation, forward + backward, TRL's metrics, clipping, update), {args.warmup} warm-up steps dropped.
  GFLOP/s are model FLOPs for both sides: 3 forward passes (policy forward + backward) of the analytic
  T5 count in t5_vs_pytorch.py, each prompt encoded once (TRL's `concatenated_forward` duplicates the
  prompts and so executes ~1.37x more at t5-small for the same result).
- Mixture sampling: {args.sample_batch} prompts, {args.new_tokens} new tokens each from
  softmax((1 - beta) log pi + beta log pi_ref), beta = {args.beta:g}. Ours: `common.sample(policy, ...,
  ref=ref, beta={args.beta:g})` (jitted, both models KV-cached, the encoder run once).
  TRL: `trl.experimental.nash_md.nash_md_trainer.GeometricMixtureWrapper(policy, ref, ...).generate(...)`
  as NashMDTrainer uses it (it sets `use_cache=False`: each new token re-runs both decoders over the
  whole prefix), `do_sample=True, top_k=0, min_new_tokens={args.new_tokens}`. As shipped, TRL 0.28's wrapper
  cannot generate from T5 (it has no `get_encoder`, and transformers 5's `generate` asks for more model
  methods than it defines); the benchmark adds the least that makes it run and stay correct (each model's
  encoder once per call, pi_ref fed its own encoding, other attributes delegated to the policy); the
  mixing and the cache-free decoding are TRL's code. Median of {args.sample_calls} calls after one untimed call.
- Sweep: our IPO `train_step` alone (as above) at the toy model, prompt 24, B in 4-32 pairs or T in
  6-48 tokens; median of {2 * args.toy_steps} steps per point.
- Each figure comes from its own process; the train figures of ours and of TRL float32 from {args.repeats}
  processes each (alternating), as the median of their medians, with the range of the process medians
  after the step time. Raw timings: `benchmarks/results/trl_vs_ours.json`.
{end}"""
    replace_section(path, begin, end, section)


def main(args: Args) -> None:
    if args.worker:
        return run_worker(args)
    if args.warmup < 1:
        sys.exit("error: --warmup must be at least 1 (TRL's steps are timed between consecutive step ends)")
    names = [s for s in args.shapes.split(",") if s]
    losses = [s for s in args.losses.split(",") if s]
    for name in names:
        if name not in SHAPES:
            sys.exit(f"error: unknown shape {name!r} in --shapes; choose from {', '.join(SHAPES)}")
    for loss in losses:
        if loss not in LOSSES:
            sys.exit(f"error: unknown loss {loss!r} in --losses; choose from {', '.join(LOSSES)}")
    parts = args.parts.split(",")
    t_start = time.perf_counter()
    results = dict(machine=machine(("jax", "flax", "torch", "transformers", "trl")), args=asdict(args), shapes={})
    if "peak" in parts:
        results["peak"] = {side: measure(f"{side}:peak", args) for side in ("ours", "trl")}
        results["peak_flops_per_s"] = max(p["flops_per_s"] for p in results["peak"].values())
    for name in names:
        r = results["shapes"][name] = {}
        if "train" in parts:
            sides = ("ours", "trl") + (("trl-bf16",) if args.trl_bf16 else ())
            r["train"] = {}
            for loss in losses:
                w = {side: f"{side}:train:{name}:{loss}" for side in sides}
                got = measure_repeated([w["ours"], w["trl"]], args.repeats, lambda x: measure(x, args))
                r["train"][loss] = {side: got[w[side]] if side in ("ours", "trl") else measure(w[side], args)
                                    for side in sides}
        if "mixture" in parts:
            r["mixture"] = {side: measure(f"{side}:mixture:{name}", args) for side in ("ours", "trl")}
    if "sweep" in parts:
        base = SHAPES["toy"]
        sweep = {"batch": [(b, base["completion_len"]) for b in (4, 8, 16, 32)],
                 "completion": [(base["pairs"], t) for t in (6, 12, 24, 48)]}
        results["sweep"] = {}
        for kind, points in sweep.items():
            pts = []
            for b, t in points:
                out = measure(f"ours:sweep:{b}:{t}", args)
                pts.append(dict(pairs=b, completion_len=t, median_s=out["median_s"], load_before=out["load_before"]))
            xs = [p["pairs" if kind == "batch" else "completion_len"] for p in pts]
            results["sweep"][kind] = dict(points=pts, exponent=loglog_slope(xs, [p["median_s"] for p in pts]))
    results["flops_per_step"] = {n: step_flops(SHAPES[n]) for n in names}
    results["total_s"] = time.perf_counter() - t_start
    md = table(results, args)
    print(md)
    print(f"total {results['total_s']:.0f} s", file=sys.stderr)
    save_results(results, md, args, write_docs)


if __name__ == "__main__":
    main(tyro.cli(Args))
