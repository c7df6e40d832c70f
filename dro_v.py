"""Direct Reward Optimisation with a value function (DRO-V; Richemond et al.
2024, Sec. 3.3 and Algorithm 1): learn from single-trajectory data (x, y, r)
by fitting r(x, y) - V(x) = tau log(pi(y|x)/pi_ref(y|x)) in the square,
Eq. (4), whose unique minimiser is the KL-regularised optimum
pi* ~ pi_ref exp(r/tau) with V* = tau log E_pi_ref[exp(r/tau)] (Theorem 1).
The policy and the value are updated separately: the value by the gradient of
Eq. (4), Eq. (7); the policy by Eq. (8), the policy gradient of Eq. (4),
rescaled by 1/tau as the paper does in practice. As the paper recommends
("double net, multiple values", Sec. 3.3 and Figure 5), V_phi is a network of
its own: a T5 encoder, initialised from pi_ref's, with a scalar head, giving
one value per prompt.

Default run (toy task, pi_ref = assets/toy-t5, one pi_ref sample per prompt
scored by the oracle, rewards normalised to mean 0 / variance 1; about 15 s
on a quiet 2-core CPU; see docs/dro_v.md):

    python dro_v.py

Paper (Richemond et al. 2024, Sec. 4; T5-L on UltraFeedback): tau = 1.0,
Adafactor (decay rate 0.8) at lr 1e-4 for both networks with 150 warm-up
steps, batch 32, 40k steps. Toy defaults below: tau = 0.5, Adafactor at lr
1e-3 (policy) and 3e-2 (value) with 20 warm-up steps, batch 32, 200 steps (a
200k-parameter model moves much less per step at the paper's learning rate;
with tau = 1.0 even the exact optimum pi* wins only ~70% on the toy task).
"""
import os
import time
from dataclasses import dataclass, replace
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
    """seeds the toy data, the data order and the evaluation samples"""
    model: str = C.TOY_MODEL
    """pi_ref, the initial pi_theta and the initial value encoder: a Hugging Face hub id or a local T5 folder"""
    dataset: str = "toy"
    """"toy": one pi_ref sample per prompt, rewarded by the toy oracle; else a .jsonl file, a folder
    with train*.jsonl, or a hub name, with records {"prompt", "completion", "reward"} (or UltraFeedback's)"""
    output_dir: str = "runs/dro_v"
    """run folder: config.json, metrics.jsonl, TensorBoard events, checkpoint.npz, model/, value/"""
    track: bool = False
    """also log to Weights & Biases"""
    steps: int = 200
    """number of updates of both networks (K in Algorithm 1)"""
    batch_size: int = 32
    """(x, y, r) triplets per update (B in Algorithm 1; global, split over all devices)"""
    learning_rate: float = 1e-3
    """peak learning rate of the policy (for Adafactor a step size relative to each parameter's scale)"""
    value_learning_rate: float = 3e-2
    """peak learning rate of the value network (the paper finds a faster V slightly better, Figure 3)"""
    optimizer: Literal["adafactor", "adamw"] = "adafactor"
    """Adafactor with decay rate 0.8 as in the paper, or AdamW (both networks)"""
    warmup_steps: int = 20
    """linear warm-up from 0, then constant, for both networks (the paper: 150 of 40k steps)"""
    num_examples: int | None = None
    """training triplets: toy samples this many (None: 2000); else the first n records (None: all)"""
    eval_prompts: int = 256
    """prompts per evaluation: toy's validation split; else the prompts of the last records,
    which are then held out of training"""
    max_prompt_len: int = 20
    """prompt tokens, including EOS; longer prompts are truncated (counts are printed)"""
    max_completion_len: int = 12
    """completion tokens, including EOS; also the sampling length of toy data and evaluation"""
    log_every: int = 25
    """log training metrics (averaged since the last log) every this many steps"""
    eval_every: int = 100
    """evaluate against pi_ref every this many steps (and at the end)"""
    save_every: int = 100
    """write the resumable checkpoint every this many steps (and at the end)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter dtype of pi_theta, pi_ref and the value encoder (norms, softmax, log-probs and the
    value head are always float32)"""
    fsdp: int = 0
    """devices per parameter shard (0: all devices of one host); see common.make_mesh"""
    distributed: bool = False
    """multi-host (TPU pod, multi-node GPU): join the job with jax.distributed.initialize() first"""

    # Algorithm
    tau: float = 0.5
    """tau, the KL-regularisation strength: the optimum is pi_ref * exp(r / tau) (Eq. 2); a larger
    tau keeps pi_theta closer to pi_ref. Richemond et al. 2024 use 1.0 (best of 0.1, 1, 5; Figure 4)"""
    single_value: bool = False
    """ablation (Figure 5): use one value per batch, the batch mean of V_phi(x), instead of one per prompt"""


def dro_v_losses(pi_y, ref_y, v, r, tau):
    """Per-example (policy_loss, value_loss) of DRO-V.

    value_loss = 1/2 (r - v - tau log(pi/pi_ref))^2 with the policy held fixed:
    gradient (v - r + tau log(pi/pi_ref)) grad v, Eq. (7).
    policy_loss = value_loss / tau with v held fixed: gradient
    -[(r - v) grad log pi - tau/2 grad (log(pi/pi_ref))^2], i.e. Eq. (8) times
    1/tau; w.r.t. pi_y = log pi(y) it is -(r - v - tau (pi_y - ref_y)).
    Algorithm 1 writes the square term without its tau; we follow Eq. (8),
    whose fixed point is pi* (with the tau dropped it is not, unless tau = 1).
    """
    log_ratio = pi_y - ref_y
    policy_loss = (r - jax.lax.stop_gradient(v) - tau * log_ratio) ** 2 / (2.0 * tau)
    value_loss = 0.5 * (r - v - tau * jax.lax.stop_gradient(log_ratio)) ** 2
    return policy_loss, value_loss


class ValueNet(nnx.Module):
    """V_phi(x): a T5 encoder, a masked mean over the prompt's tokens, a linear head -> one value per prompt.

    `encoder` is a common.T5 without a decoder (num_decoder_layers=0); only T5.encode is used.
    The head starts at zero, so V = 0 = the mean normalised reward before training.
    """

    def __init__(self, encoder: C.T5, *, rngs: nnx.Rngs):
        self.encoder = encoder
        zeros = nnx.initializers.zeros
        self.head = nnx.Linear(encoder.spec.d_model, 1, kernel_init=zeros, bias_init=zeros, rngs=rngs)

    def __call__(self, prompt_ids, prompt_mask):
        h = self.encoder.encode(prompt_ids, prompt_mask).astype(jnp.float32)
        m = prompt_mask[..., None].astype(jnp.float32)
        pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return self.head(pooled)[:, 0]


def value_from_t5(t5: C.T5) -> ValueNet:
    """A value network whose encoder (embedding, blocks, final norm) is a copy of t5's."""
    spec = replace(t5.spec, num_decoder_layers=0, tied=True)  # no decoder, no lm_head
    encoder = nnx.eval_shape(lambda: C.T5(spec, rngs=nnx.Rngs(0)))  # shapes only, filled below
    state = nnx.state(t5)  # decoder_norm: common.T5 has one even without decoder layers (unused here)
    nnx.update(encoder, nnx.State({k: state[k] for k in ("shared", "encoder", "encoder_norm", "decoder_norm")}))
    return ValueNet(encoder, rngs=nnx.Rngs(0))


def save_value(value: ValueNet, tokenizer, path: str) -> None:
    """path/: the encoder as a Hugging Face T5 folder with no decoder layers (transformers'
    T5EncoderModel.from_pretrained loads it) + value_head.safetensors {"weight": [D], "bias": []}."""
    from safetensors.numpy import save_file

    C.save_t5(value.encoder, tokenizer, path)
    head = {"weight": np.asarray(value.head.kernel[...][:, 0]), "bias": np.asarray(value.head.bias[...][0])}
    tmp = os.path.join(path, ".value_head.tmp")
    save_file(head, tmp)
    os.replace(tmp, os.path.join(path, "value_head.safetensors"))


def load_value(path: str, dtype=jnp.float32) -> ValueNet:
    """Inverse of save_value."""
    from safetensors.numpy import load_file

    encoder, _ = C.load_t5(path, dtype)  # config.json says num_decoder_layers = 0: the encoder alone
    value = ValueNet(encoder, rngs=nnx.Rngs(0))
    head = load_file(os.path.join(path, "value_head.safetensors"))
    value.head.kernel.set_value(jnp.asarray(head["weight"][:, None]))
    value.head.bias.set_value(jnp.asarray(head["bias"][None]))
    return value


def losses(policy, value, batch, tau, single_value: bool):
    """Mean policy and value losses of a batch, and the per-example quantities they came from."""
    pi_y = C.sequence_logps(policy, batch["prompt_ids"], batch["prompt_mask"],
                            batch["completion_ids"], batch["completion_mask"])
    v = value(batch["prompt_ids"], batch["prompt_mask"])
    if single_value:  # the "single value" ablation: one number for the whole batch
        v = jnp.broadcast_to(v.mean(), v.shape)
    policy_loss, value_loss = dro_v_losses(pi_y, batch["ref_logps"], v, batch["reward"], tau)
    return policy_loss.mean(), value_loss.mean(), (pi_y, v)


@nnx.jit(static_argnames="single_value")
def train_step(policy, value, policy_optimizer, value_optimizer, batch, tau, single_value=False):
    # One backward pass through the sum: the stop-gradients in dro_v_losses send the
    # policy only the policy loss's gradient (V fixed) and V only the value loss's (pi fixed).
    def total(policy, value):
        policy_loss, value_loss, aux = losses(policy, value, batch, tau, single_value)
        return policy_loss + value_loss, (policy_loss, value_loss, aux)

    grad_fn = nnx.value_and_grad(total, argnums=(0, 1), has_aux=True)
    (_, (policy_loss, value_loss, (pi_y, v))), (policy_grads, value_grads) = grad_fn(policy, value)
    policy_optimizer.update(policy, policy_grads)
    value_optimizer.update(value, value_grads)
    log_ratio = pi_y - batch["ref_logps"]
    return {"loss/policy": policy_loss, "loss/value": value_loss,
            "loss/grad_norm_policy": optax.tree.norm(policy_grads),
            "loss/grad_norm_value": optax.tree.norm(value_grads),
            "value/mean": v.mean(), "value/residual": (batch["reward"] - v - tau * log_ratio).mean(),
            "logps/policy": pi_y.mean(), "logps/ref": batch["ref_logps"].mean(), "logps/log_ratio": log_ratio.mean()}


def load_triplets(args, ref, tokenizer, key):
    """Training triplets (numpy arrays, with pi_ref's log-probs) and evaluation prompts."""
    toy = args.dataset == "toy"
    # The toy task's mu is pi_ref itself: one sample per prompt, scored by the oracle.
    sample_fn = C.text_sampler(ref, tokenizer, key, args.max_prompt_len, args.max_completion_len) if toy else None
    records = C.load_data(args.dataset, "single", "train", args.num_examples, args.seed, sample_fn)
    if not records:
        C.fail(f"{args.dataset}: no (prompt, completion, reward) records to train on; "
               f"raise --num-examples or pass a non-empty dataset")
    # load_data has normalised the rewards to mean 0 / variance 1 (Sec. 4); constant
    # rewards cannot be normalised and carry no signal: V would absorb them all.
    r = np.array([d["reward"] for d in records], np.float64)
    if not np.isfinite(r).all():
        C.fail(f"{args.dataset}: reward of record {int(np.flatnonzero(~np.isfinite(r))[0]) + 1} "
               f"is NaN or infinite; every record needs a finite number")
    if r.max() == r.min():
        C.fail(f"{args.dataset}: all {len(r)} rewards are equal, so they cannot be normalised to "
               f"variance 1 and carry no learning signal; DRO-V needs rewards that vary")
    if toy:
        prompts = C.toy_split("validation", args.eval_prompts, args.seed)
    elif len(records) <= args.eval_prompts:
        C.fail(f"{args.dataset}: {len(records)} records leave none for training after holding out "
               f"--eval-prompts {args.eval_prompts}; lower --eval-prompts or add data")
    else:  # hold out the last records: their prompts are never trained on
        records, held = records[:-args.eval_prompts], records[-args.eval_prompts:]
        prompts = list(dict.fromkeys(d["prompt"] for d in held))
    if args.batch_size > len(records):
        C.fail(f"--batch-size {args.batch_size} is larger than the training set ({len(records)} records "
               f"of {args.dataset}); lower --batch-size or add data")
    data = {}
    for field, max_len in (("prompt", args.max_prompt_len), ("completion", args.max_completion_len)):
        ids, mask, cut = C.tokenize(tokenizer, [d[field] for d in records], max_len)
        if cut:
            print(f"truncated {cut} of {len(records)} {field}s to --max-{field}-len={max_len}")
        data[f"{field}_ids"], data[f"{field}_mask"] = ids, mask
    data["reward"] = np.array([d["reward"] for d in records], np.float32)
    # pi_ref is frozen, so its log-probs are a property of the dataset: computed once.
    data["ref_logps"] = C.batched_logps(ref, data["prompt_ids"], data["prompt_mask"],
                                        data["completion_ids"], data["completion_mask"])
    print(f"train: {len(records)} triplets; eval: {len(prompts)} prompts "
          f"({'toy validation split' if toy else 'held-out tail of ' + args.dataset})")
    return data, prompts


def main(args: Args):
    C.init_distributed(args.distributed)  # before any other JAX call
    if not args.tau > 0:
        C.fail(f"--tau {args.tau} must be > 0 (the KL-regularisation strength; the paper uses 1.0)")
    if args.eval_prompts < 1:
        C.fail(f"--eval-prompts {args.eval_prompts} must be >= 1 (the held-out prompts of every evaluation)")
    data_key, eval_key = jax.random.split(jax.random.key(args.seed))
    mesh = C.make_mesh(args.fsdp)
    print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices")
    policy, tokenizer = C.load_t5(args.model, jnp.dtype(args.dtype))
    ref = nnx.clone(policy)  # pi_ref: a frozen copy; it never meets an optimiser
    value = value_from_t5(policy)  # V_phi: a second network, from the same checkpoint's encoder
    for model in (policy, ref, value):
        C.shard_model(model, mesh)

    data, prompts = load_triplets(args, ref, tokenizer, data_key)
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

    def optimizer_for(model, lr):
        tx = C.make_optimizer(args.optimizer, lr, args.warmup_steps)
        return C.shard_model(nnx.Optimizer(model, tx, wrt=nnx.Param), mesh)

    policy_optimizer = optimizer_for(policy, args.learning_rate)
    value_optimizer = optimizer_for(value, args.value_learning_rate)
    state = lambda: {"policy": nnx.state(policy), "value": nnx.state(value),
                     "policy_optimizer": nnx.state(policy_optimizer), "value_optimizer": nnx.state(value_optimizer)}
    # Resume: both networks and both optimisers come back; the data order is a function of the step.
    start, restored = 0, C.restore_checkpoint(args.output_dir, state())
    if restored is not None:
        saved, start, _ = restored
        for obj, name in ((policy, "policy"), (value, "value"), (policy_optimizer, "policy_optimizer"),
                          (value_optimizer, "value_optimizer")):
            nnx.update(obj, saved[name])
        print(f"resumed from step {start} ({os.path.join(args.output_dir, C.CHECKPOINT)})")
    if start > args.steps:
        C.fail(f"{args.output_dir} holds a checkpoint at step {start}, past --steps {args.steps}; "
               "raise --steps or use another --output-dir")

    logger = C.Logger(args.output_dir, args, args.track)
    tau = jnp.float32(args.tau)
    sums, count, t0 = None, 0, time.perf_counter()
    # models bound once: nnx.jit does not re-walk their graphs each call (~2 ms of Python per step)
    step_fn = nnx.cached_partial(train_step, policy, value, policy_optimizer, value_optimizer)
    for step in C.progress(range(start, args.steps), "dro_v", initial=start, total=args.steps):
        idx = C.batch_indices(len(data["prompt_ids"]), args.batch_size, step, args.seed)
        batch = C.shard_batch({k: v[idx] for k, v in data.items()}, mesh)
        metrics = step_fn(batch, tau, args.single_value)
        # accumulate on device: the host waits only at log steps
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        count, done = count + 1, step + 1
        save = done % args.save_every == 0 or done == args.steps
        evaluate_now = done % args.eval_every == 0 and done < args.steps  # the final one comes below
        if done % args.log_every == 0 or save or evaluate_now:  # a NaN is caught before any save
            jax.block_until_ready(sums)
            rate = {"perf/examples_per_s": count * args.batch_size / (time.perf_counter() - t0)}
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
    save_value(value, tokenizer, os.path.join(args.output_dir, "value"))
    print(f"final (step {args.steps}): " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    print(f"saved {os.path.join(args.output_dir, 'model')} (policy) and {os.path.join(args.output_dir, 'value')} (value)")
    return final


if __name__ == "__main__":
    main(tyro.cli(Args))
