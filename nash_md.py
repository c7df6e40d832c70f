"""Nash-MD-PG(beta) (Munos et al. 2023, as summarised in Calandriello et al.
2024, Sec. 2.6): a regularised policy gradient towards the Nash equilibrium of
the preference game, Eq. (9). Draw y from the policy pi and y' from the
geometric mixture pi^(1-beta) pi_ref^beta, ask a preference model for
p = p(y > y'), and ascend grad log pi(y) (p - 1/2 - tau log(pi(y)/pi_ref(y))).
Non-contrastive and on-policy: only y carries a gradient. Its fixed points are
those of IPO-MD(beta), Eq. (13) (Sec. 5.2).

Default run (toy task, pi_ref = assets/toy-t5, the toy oracle as the judge;
about 15-20 s on a quiet 2-core CPU; see docs/nash_md.md):

    python nash_md.py

Paper (Sec. 6 and Table 4; T5-L on XSum prompts, a T5-XL preference model):
tau = 0.008, beta = 0.125, Adafactor (decay rate 0.8) at lr 3e-5 with no
warm-up, batch 32, best checkpoint at 20k of 30k steps. Toy defaults below:
tau = 0.008, beta = 0.125, Adafactor at lr 3e-3, batch 64, 150 steps (a
200k-parameter model: the larger relative step gets there in minutes; the
larger batch halves the variance of the non-contrastive estimator, App. E.1,
at about the cost of an online IPO step, whose update runs on 2B sequences).
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
    output_dir: str = "runs/nash_md"
    """run folder: config.json, metrics.jsonl, TensorBoard events, checkpoint.npz, model/"""
    track: bool = False
    """also log to Weights & Biases"""
    steps: int = 150
    """number of optimiser updates"""
    batch_size: int = 64
    """prompts per update, one completion y ~ pi and one opponent y' each (global, split over all
    devices); twice the IPOs' 32: the non-contrastive gradient has twice the variance (App. E.1)"""
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
    """sampling temperature of y and y' (for the mixture: of the mixed logits); the policy
    gradient assumes 1: y from pi itself"""
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
    tau: float = 0.008
    """tau, the KL-regularisation strength of the game, Eq. (9): the fixed point is
    pi(y) ~ pi_ref(y) exp(p(y > pi^(1-beta) pi_ref^beta) / tau), Eq. (13). The paper uses 0.008"""
    beta: float = 0.125
    """beta in [0, 1], the weight of pi_ref in the mixture pi^(1-beta) pi_ref^beta that y' comes
    from: 0 is self-play, 1 plays against pi_ref. The paper uses 0.125 (Table 4)"""


def nash_md_loss(pi_y, ref_y, p, tau):
    """Per-example surrogate whose gradient w.r.t. pi_y = log pi(y) is -(p - 1/2 - tau (pi_y - ref_y)).

    Calandriello et al. 2024, Sec. 2.6. The advantage is held fixed (a
    score-function surrogate): differentiating the KL term as well would add
    tau grad log pi(y), whose mean is zero on-policy; the paper's update omits it.
    """
    advantage = jax.lax.stop_gradient(p - 0.5 - tau * (pi_y - ref_y))
    return -advantage * pi_y


def sample_mixture(policy, ref, prompt_ids, prompt_mask, key, beta, max_new_tokens, temperature):
    """Completions from pi_hat_beta, the one-step-at-a-time mixture of Sec. 6:
    log pi_hat(.|x, y_<n) = (1 - beta) log pi(.|x, y_<n) + beta log pi_ref(.|x, y_<n) + C.
    At beta = 0 and 1 only the model with all the weight is run (same samples, half the cost)."""
    if beta == 0.0:
        return C.sample(policy, prompt_ids, prompt_mask, key, max_new_tokens, temperature)
    if beta == 1.0:
        return C.sample(ref, prompt_ids, prompt_mask, key, max_new_tokens, temperature)
    return C.sample(policy, prompt_ids, prompt_mask, key, max_new_tokens, temperature, ref=ref, beta=beta)


@nnx.jit
def train_step(policy, ref, optimizer, batch, tau):
    # Only y ~ pi enters the update; y' was needed only for the judge's p.
    args = batch["prompt_ids"], batch["prompt_mask"], batch["y_ids"], batch["y_mask"]
    ref_y, p = C.sequence_logps(ref, *args), batch["p"]  # pi_ref is frozen: outside the gradient

    def loss_fn(policy):
        pi_y = C.sequence_logps(policy, *args)
        return nash_md_loss(pi_y, ref_y, p, tau).mean(), pi_y

    (value, pi_y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(policy)
    optimizer.update(policy, grads)
    # rewards/implicit: tau log(pi(y)/pi_ref(y)), the KL penalty inside the advantage
    # (over y ~ pi its mean is tau times a KL(pi || pi_ref) estimate).
    return {"loss/nash_md": value, "loss/grad_norm": optax.tree.norm(grads),
            "rewards/advantage": (p - 0.5 - tau * (pi_y - ref_y)).mean(),
            "rewards/implicit": (tau * (pi_y - ref_y)).mean(),
            "logps/policy": pi_y.mean(), "logps/ref": ref_y.mean()}


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
    # A fixed key: every evaluation scores the same draws. Batches of B prompts: the shape
    # of the training sampler of y ~ pi, compiled once for both.
    evaluate = lambda: C.evaluate(policy, ref, tokenizer, eval_prompts, eval_ids, eval_mask, judge,
                                  eval_key, args.max_completion_len, batch_size=args.batch_size)

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
    for step in C.progress(range(start, args.steps), "nash_md", initial=start, total=args.steps):
        idx = C.batch_indices(len(prompts), B, step, args.seed)
        x, xm = prompt_ids[idx], prompt_mask[idx]
        key, key_y, key_y2 = jax.random.split(key, 3)
        # Sec. 2.6: y ~ pi (the player) and y' ~ pi_hat_beta (the regularised opponent).
        t0 = time.perf_counter()
        xs = C.shard_batch({"ids": x, "mask": xm}, mesh)
        y = C.sample(policy, xs["ids"], xs["mask"], key_y, args.max_completion_len, args.temperature)
        y2 = sample_mixture(policy, ref, xs["ids"], xs["mask"], key_y2, args.beta, args.max_completion_len,
                            args.temperature)
        # the one inherent sync: the judge reads text
        ids, mask = np.concatenate([y[0], y2[0]]), np.concatenate([y[1], y2[1]])
        t1 = time.perf_counter()
        texts = C.decode(tokenizer, ids, mask)
        p = C.check_preferences(judge([prompts[i] for i in idx], texts[:B], texts[B:]),
                                f"--judge {args.judge} at step {step + 1}", B)
        t2 = time.perf_counter()
        batch = C.shard_batch({"prompt_ids": x, "prompt_mask": xm, "y_ids": ids[:B], "y_mask": mask[:B],
                               "p": p}, mesh)
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
