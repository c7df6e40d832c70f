"""IPO-MD (Calandriello et al. 2024, Sec. 5 and Algorithm 3): online IPO whose
two completions are drawn from the geometric mixture pi^(1-beta) pi_ref^beta
(in practice the token-wise mixture of logits, Sec. 6) instead of from pi.
beta = 0 is online IPO (self-play), beta = 1 is IPO against samples of pi_ref.
Its fixed points are those of Nash-MD-PG(beta), Eq. (13). The loss is the
online IPO loss; only the sampling differs.

Default run (toy task, pi_ref = assets/toy-t5, the toy oracle as the judge;
about 15-20 s on a quiet 2-core CPU; see docs/ipo_md.md):

    python ipo_md.py

Paper (Sec. 6 and Table 4; T5-L on XSum prompts, a T5-XL preference model):
tau = 1.0, beta = 0.125, Adafactor (decay rate 0.8) at lr 1e-4 with no
warm-up, batch 32, best checkpoint at 28k of 30k steps. Toy defaults below:
tau = 0.1, beta = 0.125, Adafactor at lr 3e-3, batch 32, 200 steps (as for
online_ipo.py: a 200k-parameter model, far from the optimum, in minutes).
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
    """seeds the samples, the prompt order and the evaluation samples"""
    model: str = C.TOY_MODEL
    """pi_ref, and the initial pi_theta: a Hugging Face hub id or a local T5 folder"""
    dataset: str = "toy"
    """prompts: "toy" (the embedded task's train split), or a .jsonl file, a folder with
    train*.jsonl, or a hub name, with records {"prompt"} (or xsum's {"document"})"""
    judge: str = "toy"
    """the preference model p(y > y' | x): "toy" is the embedded task's exact oracle, or
    the output folder of preference_model.py (a pairwise preference model or a reward model)"""
    output_dir: str = "runs/ipo_md"
    """run folder: config.json, metrics.jsonl, TensorBoard events, checkpoint.npz, model/"""
    track: bool = False
    """also log to Weights & Biases"""
    steps: int = 200
    """number of optimiser updates (K in Algorithm 3)"""
    batch_size: int = 32
    """prompts per update, two completions each (B in Algorithm 3; global, split over all devices)"""
    learning_rate: float = 3e-3
    """peak learning rate (for Adafactor a step size relative to each parameter's scale)"""
    optimizer: Literal["adafactor", "adamw"] = "adafactor"
    """Adafactor with decay rate 0.8 as in the paper, or AdamW"""
    warmup_steps: int = 0
    """linear warm-up from 0, then constant (the paper uses none)"""
    num_prompts: int | None = None
    """training prompts: toy draws this many (None: 2000); else the first n records (None: all)"""
    eval_prompts: int = 256
    """prompts per evaluation: toy's validation split; else the last prompts of the data,
    which are then held out of training"""
    max_prompt_len: int = 20
    """prompt tokens, including EOS; longer prompts are truncated (counts are printed)"""
    max_completion_len: int = 12
    """completion tokens, including EOS: the sampling length, in training and evaluation"""
    temperature: float = 1.0
    """sampling temperature of the training completions, applied to the mixed logits (the
    analysis assumes 1: samples from the mixture)"""
    log_every: int = 25
    """log training metrics (averaged since the last log) every this many steps"""
    eval_every: int = 50
    """evaluate against pi_ref every this many steps (and at the end)"""
    save_every: int = 50
    """write the resumable checkpoint every this many steps (and at the end)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter dtype of pi_theta and pi_ref (norms, softmax and log-probs are always float32)"""
    fsdp: int = 0
    """devices per parameter shard (0: all devices of one host); see common.make_mesh"""
    distributed: bool = False
    """multi-host (TPU pod, multi-node GPU): join the job with jax.distributed.initialize() first"""

    # Algorithm
    tau: float = 0.1
    """tau, the KL-regularisation strength of the game, Eq. (9): the fixed point is
    pi(y) ~ pi_ref(y) exp(p(y > pi^(1-beta) pi_ref^beta) / tau), Eq. (13). The paper uses 1.0"""
    beta: float = 0.125
    """beta in [0, 1], the weight of pi_ref in the sampling mixture pi^(1-beta) pi_ref^beta:
    0 is online IPO (self-play), 1 samples from pi_ref. The paper uses 0.125 (Table 4)"""


def ipo_md_loss(pi_y, pi_y2, ref_y, ref_y2, p, tau):
    """Per-example p L(y, y') + (1 - p) L(y', y), L = IPO loss, Algorithm 3.

    y, y' come from the mixture and p = p(y > y'); the caller samples them.
    p is data: no gradient flows into it. The exact expected gradient for
    beta > 0 differs from Proposition 5.1 as printed (docs/ipo_md.md).
    """
    p = jax.lax.stop_gradient(p)
    h = (pi_y - ref_y) - (pi_y2 - ref_y2)
    # Azar et al. Eq. (17); duplicated from ipo.py so this script stands alone.
    ipo = lambda h: (h - 1.0 / (2.0 * tau)) ** 2
    return p * ipo(h) + (1.0 - p) * ipo(-h)


def sample_mixture(policy, ref, prompt_ids, prompt_mask, key, beta, max_new_tokens, temperature, num_samples=1):
    """Completions from pi_hat_beta, the one-step-at-a-time mixture of Sec. 6:
    log pi_hat(.|x, y_<n) = (1 - beta) log pi(.|x, y_<n) + beta log pi_ref(.|x, y_<n) + C.
    At beta = 0 and 1 only the model with all the weight is run (same samples, half the cost)."""
    args = (prompt_ids, prompt_mask, key, max_new_tokens, temperature)
    if beta == 0.0:
        return C.sample(policy, *args, num_samples=num_samples)
    if beta == 1.0:
        return C.sample(ref, *args, num_samples=num_samples)
    return C.sample(policy, *args, ref=ref, beta=beta, num_samples=num_samples)


def pair_logps(model, batch):
    """log model(y | x) and log model(y' | x): one forward pass over the 2B sequences,
    each prompt encoded once (rows i and B + i share prompt i)."""
    both = lambda k: jnp.concatenate([batch[f"y_{k}"], batch[f"y2_{k}"]])
    logps = C.sequence_logps(model, batch["prompt_ids"], batch["prompt_mask"], both("ids"), both("mask"))
    n = batch["prompt_ids"].shape[0]
    return logps[:n], logps[n:]


@nnx.jit
def train_step(policy, ref, optimizer, batch, tau):
    # pi_ref is frozen: its log-probs are computed here, outside the differentiated function.
    ref_y, ref_y2 = pair_logps(ref, batch)
    p = batch["p"]

    def loss_fn(policy):
        pi_y, pi_y2 = pair_logps(policy, batch)
        return ipo_md_loss(pi_y, pi_y2, ref_y, ref_y2, p, tau).mean(), (pi_y, pi_y2)

    (value, (pi_y, pi_y2)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(policy)
    optimizer.update(policy, grads)
    # The offline metrics, averaged over the two labellings of the pair with the loss's
    # weights: "chosen" is y with probability p, y' with 1 - p. Implicit reward
    # r = tau log(pi/pi_ref): at the fixed point, Eq. (13), it is p(y > pi_hat) + const.
    r, r2 = tau * (pi_y - ref_y), tau * (pi_y2 - ref_y2)
    weigh = lambda a, b: p * a + (1.0 - p) * b
    return {"loss/ipo_md": value, "loss/grad_norm": optax.tree.norm(grads),
            "rewards/chosen": weigh(r, r2).mean(), "rewards/rejected": weigh(r2, r).mean(),
            "rewards/margin": ((2.0 * p - 1.0) * (r - r2)).mean(),
            "rewards/accuracy": (weigh(r > r2, r2 > r) + 0.5 * (r == r2)).mean(),  # a tie scores 1/2
            "logps/chosen": weigh(pi_y, pi_y2).mean(), "logps/rejected": weigh(pi_y2, pi_y).mean()}


def make_judge(name, tokenizer):
    """The preference model: a host function (prompts, ys, ys2) -> p(y > y' | x), float32 [B]."""
    return C.toy_judge() if name == "toy" else C.load_judge(name, tokenizer)


def load_prompts(args):
    """Training and evaluation prompts (lists of str)."""
    if args.dataset == "toy":
        n = 2000 if args.num_prompts is None else args.num_prompts
        return C.toy_split("train", n, args.seed), C.toy_split("validation", args.eval_prompts, args.seed)
    prompts = [r["prompt"] for r in C.load_data(args.dataset, "prompts", "train", args.num_prompts)]
    if len(prompts) <= args.eval_prompts:
        C.fail(f"{args.dataset}: {len(prompts)} prompts leave none for training after holding out "
               f"--eval-prompts {args.eval_prompts}; lower --eval-prompts or add prompts")
    if args.judge == "toy":
        print("note: --judge toy scores any text by the toy task's rule; on other prompts it means little")
    return prompts[:-args.eval_prompts], prompts[-args.eval_prompts:]  # the tail is never trained on


def main(args: Args):
    C.init_distributed(args.distributed)  # before any other JAX call
    if not args.tau > 0:
        C.fail(f"--tau {args.tau} must be > 0 (the KL-regularisation strength; the paper uses 1.0)")
    if not 0.0 <= args.beta <= 1.0:
        C.fail(f"--beta {args.beta} must be in [0, 1] (the weight of pi_ref in the sampling mixture; "
               f"the paper uses 0.125)")
    if args.eval_prompts < 1:
        C.fail(f"--eval-prompts {args.eval_prompts} must be >= 1")
    key, eval_key = jax.random.split(jax.random.key(args.seed))
    mesh = C.make_mesh(args.fsdp)
    print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices")
    policy, tokenizer = C.load_t5(args.model, jnp.dtype(args.dtype))
    judge = make_judge(args.judge, tokenizer)  # a trained judge must share the policy's tokenizer
    ref = nnx.clone(policy)  # pi_ref: a frozen copy; it never meets the optimiser
    C.shard_model(policy, mesh)
    C.shard_model(ref, mesh)

    prompts, eval_prompts = load_prompts(args)
    prompt_ids, prompt_mask, cut = C.tokenize(tokenizer, prompts, args.max_prompt_len)
    eval_ids, eval_mask, _ = C.tokenize(tokenizer, eval_prompts, args.max_prompt_len)
    print(f"train: {len(prompts)} prompts ({cut} truncated to --max-prompt-len {args.max_prompt_len}); "
          f"eval: {len(eval_prompts)} prompts")
    # A fixed key: every evaluation scores the same draws. Batches of 2B = 64 prompts at the
    # defaults: the shape of the training sampler, compiled once for both.
    evaluate = lambda: C.evaluate(policy, ref, tokenizer, eval_prompts, eval_ids, eval_mask, judge,
                                  eval_key, args.max_completion_len, batch_size=2 * args.batch_size)

    tx = C.make_optimizer(args.optimizer, args.learning_rate, args.warmup_steps)
    optimizer = C.shard_model(nnx.Optimizer(policy, tx, wrt=nnx.Param), mesh)
    state = lambda: {"model": nnx.state(policy), "optimizer": nnx.state(optimizer), "key": key}
    # Resume: policy, optimiser and sampling key come back; the prompt order is a function of the step.
    start, restored = 0, C.restore_checkpoint(args.output_dir, state())
    if restored is not None:
        saved, start, _ = restored
        nnx.update(policy, saved["model"])
        nnx.update(optimizer, saved["optimizer"])
        key = saved["key"]
        print(f"resumed from step {start} ({os.path.join(args.output_dir, C.CHECKPOINT)})")
    if start > args.steps:
        C.fail(f"{args.output_dir} holds a checkpoint at step {start}, past --steps {args.steps}; "
               "raise --steps or use another --output-dir")

    logger = C.Logger(args.output_dir, args, args.track)
    tau, B = jnp.float32(args.tau), args.batch_size
    sums, host, count, t_log = None, {}, 0, time.perf_counter()
    # models bound once: nnx.jit does not re-walk their graphs each call (~2 ms of Python per step)
    step_fn = nnx.cached_partial(train_step, policy, ref, optimizer)
    for step in C.progress(range(start, args.steps), "ipo_md", initial=start, total=args.steps):
        idx = C.batch_indices(len(prompts), B, step, args.seed)
        x, xm = prompt_ids[idx], prompt_mask[idx]
        key, sample_key = jax.random.split(key)
        # Algorithm 3: two independent completions per prompt from the mixture, drawn in
        # one sampler call (rows [y; y']). Sampling is not differentiated (SG[.] in Sec. 5.1).
        t0 = time.perf_counter()
        xs = C.shard_batch({"ids": x, "mask": xm}, mesh)
        ids, mask, _ = sample_mixture(policy, ref, xs["ids"], xs["mask"], sample_key, args.beta,
                                      args.max_completion_len, args.temperature, num_samples=2)
        ids, mask = np.asarray(ids), np.asarray(mask)  # the one inherent sync: the judge reads text
        t1 = time.perf_counter()
        texts = C.decode(tokenizer, ids, mask)
        p = C.check_preferences(judge([prompts[i] for i in idx], texts[:B], texts[B:]),
                                f"--judge {args.judge} at step {step + 1}", B)
        t2 = time.perf_counter()
        batch = C.shard_batch({"prompt_ids": x, "prompt_mask": xm, "y_ids": ids[:B], "y_mask": mask[:B],
                               "y2_ids": ids[B:], "y2_mask": mask[B:], "p": p}, mesh)
        metrics = step_fn(batch, tau)
        # The next sampling call needs the updated policy anyway, so waiting here costs
        # nothing and keeps the time split honest.
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)  # on device
        for k, v in {"rewards/preference": p.mean(), "samples/length": mask.sum(-1).mean(),
                     "samples/eos_rate": (ids == policy.spec.eos_id).any(-1).mean(),
                     "samples/same_pair": (ids[:B] == ids[B:]).all(-1).mean(),
                     "perf/sample_s": t1 - t0, "perf/judge_s": t2 - t1, "perf/update_s": t3 - t2}.items():
            host[k] = host.get(k, 0.0) + float(v)
        count, done = count + 1, step + 1
        save = done % args.save_every == 0 or done == args.steps
        evaluate_now = done % args.eval_every == 0 and done < args.steps  # the final one comes below
        if done % args.log_every == 0 or save or evaluate_now:  # a NaN is caught before any save
            rate = {"perf/prompts_per_s": count * B / (time.perf_counter() - t_log)}
            values = logger.log({**{k: v / count for k, v in {**sums, **host}.items()}, **rate}, done)
            C.check_finite(values, done, args.output_dir)
            if evaluate_now:
                logger.log(evaluate(), done)
            if save:
                C.save_checkpoint(args.output_dir, state(), done)
            sums, host, count, t_log = None, {}, 0, time.perf_counter()  # the rate leaves out eval and saving

    final = logger.log(evaluate(), args.steps)
    logger.close()
    C.save_t5(policy, tokenizer, os.path.join(args.output_dir, "model"))
    print(f"final (step {args.steps}): " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    print(f"saved {os.path.join(args.output_dir, 'model')}")
    return final


if __name__ == "__main__":
    main(tyro.cli(Args))
