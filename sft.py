"""Supervised fine-tuning (SFT): make the reference policy pi_ref that every
preference-optimisation script starts from. Minimise the negative
log-likelihood of demonstrations y given prompts x, -log pi(y | x), averaged
over completion tokens (the SFT stage of Stiennon et al. 2020, which the
papers' pi_ref comes from: Calandriello et al. 2024, Sec. 6).

By default it trains a fresh tiny T5 (TOY_T5 below, 200k parameters) on the
embedded toy task's noisy demonstrations; on a quiet 2-core CPU this takes about
20 s, and the result is assets/toy-t5, the default pi_ref of every script:

    python sft.py                  # -> runs/sft/model, identical to assets/toy-t5

(bit for bit with the same jax version on a CPU; elsewhere rounding differs and
so do the weights, not the quality).

Layout of --output-dir: config.json (these Args), metrics.jsonl and TensorBoard
events, checkpoint.npz (rerunning with the same --output-dir resumes from it),
and model/ (the final Hugging Face folder, loadable by common.load_t5 and by
transformers.T5ForConditionalGeneration).
"""
import os
import time
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import nnx

import common as C

# The toy reference: T5 shrunk until it trains in a minute on CPU (200k parameters).
# Flan-T5's gated-gelu, but the original T5's tied output layer scaled by d_model^-0.5:
# without the scaling, initial logits have std ~8 (loss ~13) and the loss after the
# default budget was worse. Few position buckets: toy documents are at most 17 tokens.
TOY_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
              relative_attention_num_buckets=16, relative_attention_max_distance=32,
              feed_forward_proj="gated-gelu", tie_word_embeddings=True,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
TOY_EXAMPLES = 20_000  # default number of toy demonstrations


@dataclass
class Args:
    seed: int = 0
    """seeds the initialisation, the toy demonstrations, the data order and evaluation samples"""
    model: str = "toy"
    """"toy": a fresh random T5 of the TOY_T5 config with the toy word-level tokenizer (how
    assets/toy-t5 is made); else a Hugging Face hub id or local folder for common.load_t5"""
    dataset: str = "toy"
    """"toy": noisy demonstrations of the embedded task; else a .jsonl file, a folder with
    train*.jsonl, or a hub name, with records {"prompt", "completion"} (or xsum's document/summary)"""
    output_dir: str = "runs/sft"
    """run folder: config.json, metrics.jsonl, TensorBoard events, checkpoint.npz and model/"""
    track: bool = False
    """also log to Weights & Biases"""
    steps: int = 600
    """number of optimiser updates (the learning rate decays to 0 at the last one)"""
    batch_size: int = 32
    """examples per update (global, split over all devices)"""
    learning_rate: float = 2e-2
    """peak learning rate (for Adafactor a step size relative to each parameter's scale)"""
    warmup_steps: int = 50
    """linear warm-up from 0, then cosine decay to 0 at --steps"""
    optimizer: Literal["adafactor", "adamw"] = "adafactor"
    """Adafactor with decay rate 0.8 as in the papers, or AdamW"""
    num_examples: int | None = None
    """training records: toy generates this many demonstrations (None: 20000, so that few are
    seen twice: a tiny model memorises noise fast); else the first n records (None: all)"""
    eval_prompts: int = 256
    """held-out examples per evaluation: toy's validation split, else the last records of the data"""
    max_prompt_len: int = 20
    """prompt tokens, including EOS; longer prompts are truncated (counts are printed)"""
    max_completion_len: int = 12
    """completion tokens, including EOS; also the sampling length at evaluation"""
    log_every: int = 50
    """log training metrics (averaged since the last log) every this many steps"""
    eval_every: int = 200
    """evaluate on the held-out examples every this many steps (and at the end)"""
    save_every: int = 200
    """write the resumable checkpoint every this many steps (and at the end)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter dtype (norms, softmax and log-probs are always float32)"""
    fsdp: int = 0
    """devices per parameter shard (0: all devices of one host); see common.make_mesh"""
    distributed: bool = False
    """multi-host (TPU pod, multi-node GPU): join the job with jax.distributed.initialize() first"""


def nll(model, batch):
    """Mean negative log-likelihood per completion token, and log pi(y|x) per sequence."""
    logp = C.token_logps(model, batch["prompt_ids"], batch["prompt_mask"],
                         batch["completion_ids"], batch["completion_mask"])  # fp32, 0 at padding
    # per token, not per sequence: long demonstrations should not dominate the gradient
    return -logp.sum() / batch["completion_mask"].sum(), logp.sum(-1)


@nnx.jit
def train_step(model, optimizer, batch):
    (loss, seq_logps), grads = nnx.value_and_grad(nll, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return {"loss/nll": loss, "loss/grad_norm": optax.tree.norm(grads), "logps/sequence": seq_logps.mean()}


def tokenize(tokenizer, records, args, name):
    """Prompt and completion ids/masks as numpy arrays; says how many were truncated."""
    px, pm, pt = C.tokenize(tokenizer, [r["prompt"] for r in records], args.max_prompt_len)
    cx, cm, ct = C.tokenize(tokenizer, [r["completion"] for r in records], args.max_completion_len)
    print(f"{name}: {len(records)} examples; truncated {pt} prompts (--max-prompt-len {args.max_prompt_len}) "
          f"and {ct} completions (--max-completion-len {args.max_completion_len})")
    return {"prompt_ids": px, "prompt_mask": pm, "completion_ids": cx, "completion_mask": cm}


def evaluate(model, tokenizer, held, prompts, key, args, toy):
    """Held-out loss; on the toy task also the oracle's view of samples at temperature 1.
    A fixed key: every evaluation scores the same random draws, so curves are comparable."""
    logps = C.batched_logps(model, held["prompt_ids"], held["prompt_mask"], held["completion_ids"],
                            held["completion_mask"])  # batches of 256: compiled once
    out = {"eval/loss": float(-logps.sum() / held["completion_mask"].sum())}  # per token, as in training
    if toy:
        y, ym, _ = C.sample(model, held["prompt_ids"], held["prompt_mask"], key, args.max_completion_len)
        ys = C.decode(tokenizer, y, ym)
        ideal = [C.toy_ideal_summary(x) for x in prompts]
        out["eval/reward"] = float(C.toy_rewards(prompts, ys).mean())
        # how often the ideal summary beats our sample: the room left for preference optimisation
        out["eval/headroom"] = float(C.toy_judge()(prompts, ideal, ys).mean())
        out["eval/exact_match"] = float(np.mean([a == b for a, b in zip(ys, ideal)]))
        out["eval/length"] = float(np.asarray(ym).sum(-1).mean())  # tokens, EOS included
        out["eval/eos_rate"] = float(np.asarray((y == model.spec.eos_id).any(-1)).mean())
    return out


def main(args: Args):
    C.init_distributed(args.distributed)  # before any other JAX call
    for flag in ("steps", "batch_size", "eval_prompts", "log_every", "eval_every", "save_every"):
        if getattr(args, flag) < 1:
            C.fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.model == "toy" and args.dataset != "toy":
        C.fail(f"--model toy knows only the toy task's words, not those of {args.dataset}; "
               "start from a real T5 instead, e.g. --model google/flan-t5-small")
    eval_key = jax.random.key(args.seed)
    mesh = C.make_mesh(args.fsdp)
    print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices")
    dtype = jnp.dtype(args.dtype)
    if args.model == "toy":
        from transformers import T5Config

        tokenizer = C.build_toy_tokenizer()
        model = C.T5(T5Config(vocab_size=len(tokenizer), **TOY_T5), dtype=dtype, rngs=nnx.Rngs(args.seed))
    else:
        model, tokenizer = C.load_t5(args.model, dtype)
    C.shard_model(model, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model: {args.model} ({n_params:,} parameters, {args.dtype})")

    # Data: held-out examples never enter training.
    toy = args.dataset == "toy"
    n = args.num_examples or (TOY_EXAMPLES if toy else None)
    records = C.load_data(args.dataset, "sft", "train", n, args.seed)
    if toy:
        held_records = C.load_data("toy", "sft", "validation", args.eval_prompts, args.seed)
    elif len(records) <= args.eval_prompts:
        C.fail(f"{args.dataset}: {len(records)} records leave none for training after holding out "
               f"--eval-prompts {args.eval_prompts}; lower --eval-prompts or add data")
    else:
        records, held_records = records[:-args.eval_prompts], records[-args.eval_prompts:]
    train = tokenize(tokenizer, records, args, "train")
    held = tokenize(tokenizer, held_records, args, "held-out")
    held_prompts = [r["prompt"] for r in held_records]
    tokens_per_row = train["prompt_mask"].sum(-1) + train["completion_mask"].sum(-1)

    # Cosine decay to 0: at this budget it beats a constant rate (the preference papers' choice).
    # A rerun with another --steps continues on the schedule of the new --steps.
    tx = C.make_optimizer(args.optimizer, args.learning_rate, args.warmup_steps, total_steps=args.steps)
    optimizer = C.shard_model(nnx.Optimizer(model, tx, wrt=nnx.Param), mesh)
    state = lambda: {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    # Resume: model and optimiser state come back; the data order is a function of the step.
    start, restored = 0, C.restore_checkpoint(args.output_dir, state())
    if restored is not None:
        saved, start, _ = restored
        nnx.update(model, saved["model"])
        nnx.update(optimizer, saved["optimizer"])
        print(f"resumed from step {start} ({os.path.join(args.output_dir, C.CHECKPOINT)})")
    if start > args.steps:
        C.fail(f"{args.output_dir} holds a checkpoint at step {start}, past --steps {args.steps}; "
               "raise --steps or use another --output-dir")

    logger = C.Logger(args.output_dir, args, args.track)
    sums, count, tokens, t0 = None, 0, 0, time.perf_counter()
    # models bound once: nnx.jit does not re-walk their graphs each call (~2 ms of Python per step)
    step_fn = nnx.cached_partial(train_step, model, optimizer)
    for step in C.progress(range(start, args.steps), "sft", initial=start, total=args.steps):
        idx = C.batch_indices(len(records), args.batch_size, step, args.seed)
        metrics = step_fn(C.shard_batch({k: v[idx] for k, v in train.items()}, mesh))
        # accumulate on device: the host waits only at log steps
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        count, tokens, done = count + 1, tokens + int(tokens_per_row[idx].sum()), step + 1
        save = done % args.save_every == 0 or done == args.steps
        evaluate_now = done % args.eval_every == 0 and done < args.steps  # the final one comes below
        if done % args.log_every == 0 or save or evaluate_now:  # a NaN is caught before any save
            jax.block_until_ready(sums)
            rate = {"perf/tokens_per_s": tokens / (time.perf_counter() - t0)}
            values = logger.log({**{k: v / count for k, v in sums.items()}, **rate}, done)
            C.check_finite(values, done, args.output_dir)
            if evaluate_now:
                logger.log(evaluate(model, tokenizer, held, held_prompts, eval_key, args, toy), done)
            if save:
                C.save_checkpoint(args.output_dir, state(), done)
            sums, count, tokens, t0 = None, 0, 0, time.perf_counter()  # the rate leaves out eval and saving

    final = logger.log(evaluate(model, tokenizer, held, held_prompts, eval_key, args, toy), args.steps)
    logger.close()
    model_dir = os.path.join(args.output_dir, "model")
    C.save_t5(model, tokenizer, model_dir)
    if args.model == "toy":  # tokenizer files that transformers 4.x reads too (5.x writes others)
        C.save_toy_tokenizer(model_dir)
    print(f"final (step {args.steps}): " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    print(f"saved {model_dir}")
    return final


if __name__ == "__main__":
    main(tyro.cli(Args))
