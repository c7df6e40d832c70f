"""Offline Sequence Likelihood Calibration (SLiC; Zhao et al. 2023) with the
reference-normalised log-ratio of Liu et al. 2023: a hinge loss
max(0, 1 - tau * h) on pairs (x, y_w, y_l) of a fixed preference dataset
(Calandriello et al. 2024, Eq. (5); the hinge row of Tang et al. 2024, Table 1).
The hinge is flat once tau * h >= 1: pairs already separated by the margin
stop contributing, which is what keeps pi_theta near pi_ref (Zhao et al.'s
extra SFT term is not part of Eq. (5), so it is not here either). Training
follows Algorithm 1 of Calandriello et al. 2024: sample a batch of pairs, take
a gradient step on the mean loss; pi_ref stays frozen.

Default run (toy task, pi_ref = assets/toy-t5, pairs sampled from pi_ref and
labelled by the oracle; about 15-20 s on a quiet 2-core CPU; see docs/slic.md):

    python slic.py

Paper (Calandriello et al. 2024, Sec. 6 and Table 4; T5 on XSum): tau = 10.0,
Adafactor (decay rate 0.8) at lr 1e-4 with no warm-up, batch 32, best
checkpoint at 30k of 30k steps. Toy defaults below: tau = 0.5, Adafactor at
lr 3e-3, batch 32, 200 steps.
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


@dataclass
class Args:
    seed: int = 0
    """seeds the toy pairs, the data order and the evaluation samples"""
    model: str = C.TOY_MODEL
    """pi_ref, and the initial pi_theta: a Hugging Face hub id or a local T5 folder"""
    dataset: str = "toy"
    """"toy": pairs sampled from pi_ref, labelled by the toy oracle; else a .jsonl file, a folder with train*.jsonl, or a hub name, of records {"prompt", "chosen", "rejected"}"""
    output_dir: str = "runs/slic"
    """run folder: config.json, metrics.jsonl, TensorBoard events, checkpoint.npz, model/"""
    track: bool = False
    """also log to Weights & Biases"""
    steps: int = 200
    """number of optimiser updates (K in Algorithm 1)"""
    batch_size: int = 32
    """pairs per update (B in Algorithm 1; global, split over all devices)"""
    learning_rate: float = 3e-3
    """peak learning rate (for Adafactor a step size relative to each parameter's scale)"""
    optimizer: Literal["adafactor", "adamw"] = "adafactor"
    """Adafactor with decay rate 0.8 as in the paper, or AdamW"""
    warmup_steps: int = 0
    """linear warm-up from 0, then constant (the paper uses none)"""
    num_examples: int | None = None
    """training pairs: toy samples this many (None: 2000); else the first n records (None: all)"""
    eval_prompts: int = 256
    """prompts per evaluation: toy's validation split; else the prompts of the last this-many records, held out of training"""
    max_prompt_len: int = 20
    """prompt tokens, including EOS; longer prompts are truncated (counts are printed)"""
    max_completion_len: int = 12
    """completion tokens, including EOS; also the sampling length of toy pairs and evaluation"""
    log_every: int = 25
    """log training metrics (averaged since the last log) every this many steps"""
    eval_every: int = 100
    """evaluate against pi_ref every this many steps (and at the end)"""
    save_every: int = 100
    """write the resumable checkpoint every this many steps (and at the end)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter dtype of pi_theta and pi_ref (norms, softmax and log-probs are always float32)"""
    fsdp: int = 0
    """devices per parameter shard (0: all devices of one host); see common.make_mesh"""
    distributed: bool = False
    """multi-host (TPU pod, multi-node GPU): join the job with jax.distributed.initialize() first"""

    # Algorithm
    tau: float = 0.5
    """tau, the KL-regularisation strength: a pair stops contributing once its log-ratio gap h reaches the margin 1/tau (Eq. 5), so a larger tau keeps pi_theta closer to pi_ref. The paper's best: 10.0 (Calandriello et al. 2024, Table 4)"""


def slic_loss(pi_w, pi_l, ref_w, ref_l, tau):
    """Per-example SLiC loss max(0, 1 - tau * h), Calandriello et al. 2024 Eq. (5)."""
    h = (pi_w - ref_w) - (pi_l - ref_l)
    return jnp.maximum(0.0, 1.0 - tau * h)


def policy_logps(policy, batch):
    """log pi_theta(y_w | x) and log pi_theta(y_l | x): one forward pass over the 2B sequences,
    each prompt encoded once (rows i and B + i share prompt i)."""
    both = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
    logps = C.sequence_logps(policy, batch["prompt_ids"], batch["prompt_mask"], both("ids"), both("mask"))
    n = batch["prompt_ids"].shape[0]
    return logps[:n], logps[n:]


@nnx.jit
def train_step(policy, optimizer, batch, tau):
    def loss_fn(policy):
        pi_w, pi_l = policy_logps(policy, batch)
        loss = slic_loss(pi_w, pi_l, batch["ref_chosen"], batch["ref_rejected"], tau).mean()
        return loss, (pi_w, pi_l)

    (loss, (pi_w, pi_l)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(policy)
    optimizer.update(policy, grads)
    # Implicit rewards tau * log(pi/pi_ref), as for DPO; the hinge is flat once their gap tau * h >= 1.
    r_w, r_l = tau * (pi_w - batch["ref_chosen"]), tau * (pi_l - batch["ref_rejected"])
    return {"loss/slic": loss, "loss/grad_norm": optax.tree.norm(grads),
            "rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(), "rewards/margin": (r_w - r_l).mean(),
            "rewards/accuracy": (r_w > r_l).mean(), "logps/chosen": pi_w.mean(), "logps/rejected": pi_l.mean()}


def load_pairs(args, ref, tokenizer, key):
    """Training pairs (numpy arrays, with pi_ref's log-probs) and evaluation prompts."""
    toy = args.dataset == "toy"
    # The toy task's mu is pi_ref itself (as for TL;DR): two samples per prompt, the
    # winner drawn from the oracle's p(y > y' | x). Deterministic given --seed.
    sample_fn = C.text_sampler(ref, tokenizer, key, args.max_prompt_len, args.max_completion_len) if toy else None
    records = C.load_data(args.dataset, "pairwise", "train", args.num_examples, args.seed, sample_fn)
    if toy:
        prompts = C.toy_split("validation", args.eval_prompts, args.seed)
    elif len(records) <= args.eval_prompts:
        C.fail(f"{args.dataset}: {len(records)} pairs leave none for training after holding out "
               f"--eval-prompts {args.eval_prompts}; lower --eval-prompts or add data")
    else:  # hold out the last records: their prompts are never trained on
        records, held = records[:-args.eval_prompts], records[-args.eval_prompts:]
        prompts = list(dict.fromkeys(r["prompt"] for r in held))
    if args.batch_size > len(records):
        C.fail(f"--batch-size {args.batch_size} is larger than the training set ({len(records)} pairs "
               f"of {args.dataset}); lower --batch-size or add data")
    data = C.pairwise_arrays(records, tokenizer, args.max_prompt_len, args.max_completion_len)
    # pi_ref is frozen, so its log-probs are a property of the dataset: computed once.
    for y in ("chosen", "rejected"):
        data[f"ref_{y}"] = C.batched_logps(ref, data["prompt_ids"], data["prompt_mask"],
                                           data[f"{y}_ids"], data[f"{y}_mask"])
    print(f"train: {len(records)} pairs; eval: {len(prompts)} prompts "
          f"({'toy validation split' if toy else 'held-out tail of ' + args.dataset})")
    return data, prompts


def main(args: Args):
    C.init_distributed(args.distributed)  # before any other JAX call
    if not args.tau > 0:
        C.fail(f"--tau {args.tau} must be > 0 (the KL-regularisation strength; the paper uses 10.0)")
    data_key, eval_key = jax.random.split(jax.random.key(args.seed))
    mesh = C.make_mesh(args.fsdp)
    print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices")
    policy, tokenizer = C.load_t5(args.model, jnp.dtype(args.dtype))
    ref = nnx.clone(policy)  # pi_ref: a frozen copy; it never meets the optimiser
    C.shard_model(policy, mesh)
    C.shard_model(ref, mesh)

    data, prompts = load_pairs(args, ref, tokenizer, data_key)
    prompt_ids, prompt_mask, _ = C.tokenize(tokenizer, prompts, args.max_prompt_len)
    toy = args.dataset == "toy"
    # The toy oracle only judges toy prompts; other data have no judge here (eval/kl only):
    # score saved policies with evaluate.py and a trained preference model.
    judge = C.toy_judge() if toy else (lambda x, y, y2: np.full(len(x), 0.5, np.float32))

    def evaluate():  # a fixed key: every evaluation scores the same random draws
        # batches of 256, the shapes of the data pass: the sampler and log-probs are compiled once
        out = C.evaluate(policy, ref, tokenizer, prompts, prompt_ids, prompt_mask, judge, eval_key,
                         args.max_completion_len, batch_size=256)
        return out if toy else {k: v for k, v in out.items() if "win_rate" not in k}

    tx = C.make_optimizer(args.optimizer, args.learning_rate, args.warmup_steps)
    optimizer = C.shard_model(nnx.Optimizer(policy, tx, wrt=nnx.Param), mesh)
    state = lambda: {"model": nnx.state(policy), "optimizer": nnx.state(optimizer)}
    # Resume: policy and optimiser state come back; the data order is a function of the step.
    start, restored = 0, C.restore_checkpoint(args.output_dir, state())
    if restored is not None:
        saved, start, _ = restored
        nnx.update(policy, saved["model"])
        nnx.update(optimizer, saved["optimizer"])
        print(f"resumed from step {start} ({os.path.join(args.output_dir, C.CHECKPOINT)})")
    if start > args.steps:
        C.fail(f"{args.output_dir} holds a checkpoint at step {start}, past --steps {args.steps}; "
               "raise --steps or use another --output-dir")

    logger = C.Logger(args.output_dir, args, args.track)
    tau = jnp.float32(args.tau)
    sums, count, t0 = None, 0, time.perf_counter()
    # models bound once: nnx.jit does not re-walk their graphs each call (~2 ms of Python per step)
    step_fn = nnx.cached_partial(train_step, policy, optimizer)
    for step in C.progress(range(start, args.steps), "slic", initial=start, total=args.steps):
        idx = C.batch_indices(len(data["prompt_ids"]), args.batch_size, step, args.seed)
        metrics = step_fn(C.shard_batch({k: v[idx] for k, v in data.items()}, mesh), tau)
        # accumulate on device: the host waits only at log steps
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        count, done = count + 1, step + 1
        save = done % args.save_every == 0 or done == args.steps
        evaluate_now = done % args.eval_every == 0 and done < args.steps  # the final one comes below
        if done % args.log_every == 0 or save or evaluate_now:  # a NaN is caught before any save
            jax.block_until_ready(sums)
            rate = {"perf/pairs_per_s": count * args.batch_size / (time.perf_counter() - t0)}
            values = logger.log({**{k: v / count for k, v in sums.items()}, **rate}, done)
            C.check_finite(values, done, args.output_dir)
            if evaluate_now:
                logger.log(evaluate(), done)
            if save:
                C.save_checkpoint(args.output_dir, state(), done)
            sums, count, t0 = None, 0, time.perf_counter()  # the rate leaves out eval and saving

    final = logger.log(evaluate(), args.steps)
    logger.close()
    C.save_t5(policy, tokenizer, os.path.join(args.output_dir, "model"))
    print(f"final (step {args.steps}): " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    print(f"saved {os.path.join(args.output_dir, 'model')}")
    return final


if __name__ == "__main__":
    main(tyro.cli(Args))
