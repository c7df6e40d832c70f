"""The cost of being online: an online IPO step against an offline IPO step, on one machine.

Issue target: an online step costs at most 2x an offline step at equal batch and lengths
on CPU. At each shape, in one process, from the same initial weights:

  offline  ipo.py's train_step: one nnx.jit update on a pre-made pair, pi_ref's log-probs
           precomputed once with the dataset (as ipo.py does);
  online   online_ipo.py's step (Algorithm 2): sample two completions per prompt in one
           sampler call, bring the ids to the host, decode and judge them, then one nnx.jit
           update (online_ipo.train_step) that also runs pi_ref's forward (new samples: its
           log-probs cannot be precomputed).

Equal batch and lengths: B prompts, the same prompt length, and completion arrays of
max_completion_len tokens in both (the update's cost does not depend on where EOS falls;
the sampler stops when every row has produced EOS, so a model that stops early samples
fewer steps). Shapes: "toy" is the toy task at online_ipo.py's defaults (B = 32, prompt
20, completion 12) with assets/toy-t5 when it exists; "t5-small" is t5-small with random
weights (d_model 512, 6 + 6 layers, 8 heads, d_ff 2048, vocab 32128), B = 8, prompt 128,
completion 64: random weights never emit EOS, so all 64 tokens are sampled (the worst
case). The judge is the toy oracle (cheap; a T5-XL preference model, as in the paper,
would add a forward pass per pair). Timings are medians over steady-state steps.

    python benchmarks/online_vs_offline.py                      # ~4 min of CPU on 2 cores
    python benchmarks/online_vs_offline.py --shapes toy         # ~30 s

Prints a markdown table; writes benchmarks/results/online_vs_offline.json and this
benchmark's section of docs/benchmarks.md (between its markers; the rest is kept).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import ipo  # noqa: E402
from t5_vs_pytorch import busy_cores, machine, replace_section, save_results  # noqa: E402
import online_ipo  # noqa: E402

TOY_CONFIG = dict(vocab_size=len(C.TOY_SPECIAL) + len(C.TOY_TOPIC_WORDS) + len(C.TOY_FILLER_WORDS), d_model=64,
                  d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                  relative_attention_num_buckets=16, relative_attention_max_distance=32,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # sft.py's TOY_T5
SHAPES = {
    "toy": dict(config=TOY_CONFIG, batch=32, prompt_len=20, completion_len=12, steps=10),
    "t5-small": dict(config=dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                                 num_decoder_layers=6, num_heads=8, feed_forward_proj="relu",
                                 tie_word_embeddings=True),
                     batch=8, prompt_len=128, completion_len=64, steps=3),
}


@dataclass
class Args:
    shapes: str = "toy,t5-small"
    """comma-separated shapes to run (toy, t5-small)"""
    steps: int = 0
    """timed steps of each kind per shape (0: the shape's default, 10 toy / 3 t5-small)"""
    warmup: int = 1
    """untimed steps first (the first compiles)"""
    output: str = os.path.join(ROOT, "benchmarks", "results", "online_vs_offline.json")
    """JSON results ('' to skip)"""
    docs: str = os.path.join(ROOT, "docs", "benchmarks.md")
    """markdown page whose online_vs_offline section is rewritten ('' to skip)"""


def setup(name: str, shape: dict):
    """(policy, tokenizer, prompts, prompt ids, prompt mask) for a shape."""
    from transformers import T5Config
    b, n_prompt = shape["batch"], shape["prompt_len"]
    if name == "toy":
        if os.path.exists(os.path.join(C.TOY_MODEL, "config.json")):
            policy, tok = C.load_t5(C.TOY_MODEL)
        else:  # before assets/toy-t5 exists: the same architecture, random weights
            tok = C.build_toy_tokenizer()
            policy = C.T5(T5Config(**shape["config"], pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
                          rngs=nnx.Rngs(0))
        prompts = C.toy_split("train", b)
    else:  # a word-level vocabulary of the right size, so decode and the judge do real work
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import save_word_tokenizer
        import tempfile
        tok = save_word_tokenizer(tempfile.mkdtemp(), shape["config"]["vocab_size"])
        policy = C.T5(T5Config(**shape["config"], pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
                      rngs=nnx.Rngs(0))
        rng = np.random.default_rng(0)
        prompts = [" ".join(f"w{i}" for i in rng.integers(3, shape["config"]["vocab_size"], n_prompt - 1))
                   for _ in range(b)]
    ids, mask, _ = C.tokenize(tok, prompts, n_prompt)
    return policy, tok, prompts, ids, mask


def run_shape(name: str, shape: dict, args: Args) -> dict:
    policy, tok, prompts, x, xm = setup(name, shape)
    ref = nnx.clone(policy)
    b, t_len, tau = shape["batch"], shape["completion_len"], jnp.float32(1.0)
    judge = C.toy_judge()
    steps = args.steps or shape["steps"]
    make_opt = lambda model: nnx.Optimizer(model, C.make_optimizer("adafactor", 1e-4), wrt=nnx.Param)

    # A pre-made pair of full-length completions, and pi_ref's log-probs (computed once, as offline scripts do).
    rng = np.random.default_rng(1)
    y = rng.integers(3, shape["config"]["vocab_size"], (2 * b, t_len)).astype(np.int32)
    ym = np.ones_like(y)
    pair = {"prompt_ids": x, "prompt_mask": xm, "chosen_ids": y[:b], "chosen_mask": ym[:b],
            "rejected_ids": y[b:], "rejected_mask": ym[b:]}
    pair["ref_chosen"], pair["ref_rejected"] = map(np.asarray, ipo.policy_logps(ref, pair))
    offline_policy = nnx.clone(policy)
    offline_step = nnx.cached_partial(ipo.train_step, offline_policy, make_opt(offline_policy))  # as ipo.py

    def offline():
        t0 = time.perf_counter()
        jax.block_until_ready(offline_step(pair, tau))
        return {"step_s": time.perf_counter() - t0}

    online_policy = nnx.clone(policy)
    online_step = nnx.cached_partial(online_ipo.train_step, online_policy, ref, make_opt(online_policy))
    state = {"key": jax.random.key(0)}

    def online():  # online_ipo.py's loop body, timed the same way
        state["key"], k = jax.random.split(state["key"])
        t0 = time.perf_counter()
        ids, mask, _ = C.sample(online_policy, x, xm, k, t_len, num_samples=2)  # as online_ipo.py
        ids, mask = np.asarray(ids), np.asarray(mask)
        t1 = time.perf_counter()
        texts = C.decode(tok, ids, mask)
        p = C.check_preferences(judge(prompts, texts[:b], texts[b:]), "judge")
        t2 = time.perf_counter()
        batch = {"prompt_ids": x, "prompt_mask": xm, "y_ids": ids[:b], "y_mask": mask[:b], "y2_ids": ids[b:],
                 "y2_mask": mask[b:], "p": p}
        jax.block_until_ready(online_step(batch, tau, "ipo"))
        t3 = time.perf_counter()
        return {"step_s": t3 - t0, "sample_s": t1 - t0, "judge_s": t2 - t1, "update_s": t3 - t2,
                "sampled_tokens": int(ids.shape[1])}

    out = {"batch": b, "prompt_len": shape["prompt_len"], "completion_len": t_len, "steps": steps,
           "load_before": busy_cores()}
    for kind, fn in (("offline", offline), ("online", online)):  # the first calls compile
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            fn()
        out[f"{kind}_warmup_s"] = time.perf_counter() - t0
    # Alternate the two kinds, so that both see the same background load on a shared machine;
    # also record CPU seconds (all threads), less sensitive to other processes than wall time.
    runs = {"offline": [], "online": []}
    for _ in range(steps):
        for kind, fn in (("offline", offline), ("online", online)):
            c0 = time.process_time()
            r = fn()
            runs[kind].append({**r, "cpu_s": time.process_time() - c0})
    for kind, rs in runs.items():
        out[kind] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        out[kind]["all_step_s"] = [r["step_s"] for r in rs]
        print(f"  {name} {kind}: {out[kind]['step_s']:.4g} s/step, {out[kind]['cpu_s']:.4g} CPU-s/step",
              file=sys.stderr)
    out["load_after"] = busy_cores()
    out["ratio"] = out["online"]["step_s"] / out["offline"]["step_s"]
    out["ratio_cpu"] = out["online"]["cpu_s"] / out["offline"]["cpu_s"]
    return out


def table(results: dict) -> str:
    rows = ["| shape | B, prompt, completion | offline step, s | online step, s | online / offline | "
            "online / offline, CPU-s | online split: sample / judge / update, s |",
            "|---|---|---:|---:|---:|---:|---|"]
    for name, r in results["shapes"].items():
        on = r["online"]
        rows.append(f"| {name} | {r['batch']}, {r['prompt_len']}, {r['completion_len']} | "
                    f"{r['offline']['step_s']:.4g} | {on['step_s']:.4g} | **{r['ratio']:.2f}x** | "
                    f"{r['ratio_cpu']:.2f}x | {on['sample_s']:.3g} / {on['judge_s']:.2g} / {on['update_s']:.3g} |")
    return "\n".join(rows)


def write_docs(path: str, results: dict, md: str, args: Args) -> None:
    begin, end = "<!-- online_vs_offline:begin -->", "<!-- online_vs_offline:end -->"
    m = results["machine"]
    loads = [r[k] for r in results["shapes"].values() for k in ("load_before", "load_after")]
    section = f"""{begin}
## Online vs offline IPO step (CPU)

Generated by `python benchmarks/online_vs_offline.py --shapes {args.shapes}` on {m['date'][:10]}:
{m['cpu']}, {m['cores']} cores; jax {m['jax']}, flax {m['flax']}. Cores busy with other processes
just before and after (from /proc/stat): {min(loads):.2f} to {max(loads):.2f} (a quiet machine: below 0.25).
Issue target: online / offline <= 2 at equal batch and lengths.

{md}

- Offline: `ipo.py`'s `train_step`, one `nnx.jit` update on a pre-made pair, called through
  `nnx.cached_partial` as ipo.py's loop does; pi_ref's log-probs precomputed with the data, as ipo.py does.
  Both updates encode each prompt once for its two completions.
- Online (online_ipo.py, Algorithm 2): sample 2 completions per prompt (one `common.sample` call with
  num_samples=2: each prompt encoded once), ids to the host, decode + toy oracle, then one `nnx.jit` update that also runs pi_ref's
  forward. The update's share is the offline step plus that pi_ref forward.
- toy: online_ipo.py's default shape{' with assets/toy-t5' if results['toy_asset'] else ' (random weights)'};
  t5-small: random weights, so no EOS: all completion tokens are sampled (the worst case).
- Medians over steady-state steps, the two kinds alternating (both see the same background load);
  CPU-s counts all threads of this process. Raw timings in `benchmarks/results/online_vs_offline.json`.
{end}"""
    replace_section(path, begin, end, section)


def main(args: Args) -> None:
    names = [s for s in args.shapes.split(",") if s]
    for name in names:
        if name not in SHAPES:
            sys.exit(f"error: unknown shape {name!r} in --shapes; choose from {', '.join(SHAPES)}")
    results = dict(machine=machine(("jax", "flax")), args=asdict(args),
                   toy_asset=os.path.exists(os.path.join(C.TOY_MODEL, "config.json")),
                   shapes={name: run_shape(name, SHAPES[name], args) for name in names})
    md = table(results)
    print(md)
    save_results(results, md, args, write_docs)


if __name__ == "__main__":
    main(tyro.cli(Args))
