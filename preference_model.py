"""A learned judge for the online algorithms: a T5 pairwise preference model
p_phi(y > y' | x), trained on pairs (x, y_w, y_l) with the logistic loss, as
Calandriello et al. 2024 (Sec. 6) train theirs: the input holds the prompt and
both responses, the output is the probability that the first is preferred.
Each pair is shown in both orders (label 1 for (y_w, y_l), 0 for (y_l, y_w)),
so the model is antisymmetric in expectation; the papers assume
p(y > y') + p(y' > y) = 1 exactly, so we log how far the trained model is from
it (eval/symmetry_gap) and the saved judge averages both orders. `--kind
reward` trains a Bradley-Terry reward model r_phi(x, y) instead (Bradley &
Terry 1952; Stiennon et al. 2020, Eq. 1), with p = sigmoid(r(y) - r(y')).
Both start from the whole --model checkpoint (common.JudgeNet): the encoder
reads x, the decoder reads each response as the policy would, and a head reads
the decoder's pooled states and the response's log-likelihood; `--judge
<output_dir>` of online_ipo.py, ipo_md.py, nash_md.py and evaluate.py loads the result.

Default run (toy task: pairs sampled from pi_ref = assets/toy-t5, labelled by
the oracle; about 30 s on a quiet 2-core CPU; see docs/preference_model.md):

    python preference_model.py

Paper (Calandriello et al. 2024, Sec. 6): a T5-XL encoder-decoder preference
model trained on summarize_from_feedback pairs. Toy defaults below: 4000 pairs,
Adafactor at lr 1e-3 (the zero-initialised head has its own rate, 0.3), batch
32 pairs, 400 steps.
"""
import functools
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
    """seeds the toy pairs, the data order and the held-out pairs"""
    model: str = C.TOY_MODEL
    """the T5 checkpoint (and tokenizer) the judge starts from: a hub id or a local folder;
    use the policies' pi_ref (the SFT model) so that the tokenizers match"""
    dataset: str = "toy"
    """"toy": pairs of pi_ref samples labelled by the toy oracle; else a .jsonl file, a folder with
    train*.jsonl, or a hub name, of records {"prompt", "chosen", "rejected"} (or summarize_from_feedback's)"""
    output_dir: str = "runs/preference_model"
    """run folder: config.json, metrics.jsonl, TensorBoard events, checkpoint.npz, model/ (the judge)"""
    track: bool = False
    """also log to Weights & Biases"""
    steps: int = 400
    """number of optimiser updates"""
    batch_size: int = 32
    """pairs per update, each shown in both orders (global, split over all devices)"""
    learning_rate: float = 1e-3
    """peak learning rate of the T5 (for Adafactor a step size relative to each parameter's scale)"""
    head_learning_rate: float = 3e-1
    """peak learning rate of the head: Adafactor scales steps by max(RMS(param), 1e-3), so a
    zero-initialised head needs a larger rate to leave zero"""
    optimizer: Literal["adafactor", "adamw"] = "adafactor"
    """Adafactor with decay rate 0.8 as in the papers, or AdamW"""
    warmup_steps: int = 0
    """linear warm-up from 0, then constant"""
    num_examples: int | None = None
    """training pairs: toy samples this many (None: 4000); else the first n records (None: all)"""
    eval_pairs: int = 512
    """held-out pairs: toy's validation split (pairs the oracle ties are left out); else the
    last this-many records, held out of training"""
    max_prompt_len: int = 20
    """prompt tokens, including EOS; longer prompts are truncated (counts are printed)"""
    max_completion_len: int = 12
    """tokens of each response, including EOS; also the sampling length of toy pairs"""
    log_every: int = 50
    """log training metrics (averaged since the last log) every this many steps"""
    eval_every: int = 200
    """evaluate on the held-out pairs every this many steps (and at the end)"""
    save_every: int = 200
    """write the resumable checkpoint every this many steps (and at the end)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter dtype of the T5 (norms, log-probs, pooling and the head are float32)"""
    fsdp: int = 0
    """devices per parameter shard (0: all devices of one host); see common.make_mesh"""
    distributed: bool = False
    """multi-host (TPU pod, multi-node GPU): join the job with jax.distributed.initialize() first"""

    # Model
    kind: Literal["pairwise", "reward"] = "pairwise"
    """pairwise: p_phi(y > y'|x) from [x; y; y'] (Calandriello et al. 2024, Sec. 6); reward: a
    Bradley-Terry reward r_phi(x, y) from [x; y], p = sigmoid(r(y) - r(y'))"""


def pairwise_loss(logit_wl, logit_lw):
    """Logistic loss of both orders: -log sigma(l(x, y_w, y_l)) - log(1 - sigma(l(x, y_l, y_w))), halved.
    Cross-entropy of p_phi against label 1 for (y_w, y_l) and 0 for (y_l, y_w)."""
    return 0.5 * (-jax.nn.log_sigmoid(logit_wl) - jax.nn.log_sigmoid(-logit_lw))


def bradley_terry_loss(r_w, r_l):
    """-log sigma(r(x, y_w) - r(x, y_l)): the reward-model loss (Stiennon et al. 2020, Eq. 1)."""
    return -jax.nn.log_sigmoid(r_w - r_l)


def scores(net, batch):
    """pairwise: logits of (y_w, y_l) and (y_l, y_w); reward: r(x, y_w) and r(x, y_l). Each prompt is
    encoded once and each response decoded once (one pass over the 2B responses), for both orders."""
    return net.both_orders(*(batch[f"{k}_{a}"] for k in ("prompt", "chosen", "rejected") for a in ("ids", "mask")))


@nnx.jit
def train_step(net, optimizer, batch):
    def loss_fn(net):
        s1, s2 = scores(net, batch)
        loss = pairwise_loss(s1, s2) if net.kind == "pairwise" else bradley_terry_loss(s1, s2)
        return loss.mean(), (s1, s2)

    (loss, (s1, s2)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(net)
    optimizer.update(net, grads)
    if net.kind == "pairwise":  # p(y_w > y_l) from each order; their sum is 1 for an antisymmetric model
        p, p_rev = jax.nn.sigmoid(s1), jax.nn.sigmoid(s2)
        acc, gap = ((p + 1 - p_rev) / 2 > 0.5).mean(), jnp.abs(p + p_rev - 1).mean()
    else:
        acc, gap = (s1 > s2).mean(), jnp.float32(0.0)
    return {"loss/logistic": loss, "loss/grad_norm": optax.tree.norm(grads), "train/accuracy": acc,
            "train/symmetry_gap": gap}


@functools.cache  # one object per setting, as common.make_optimizer: no recompiles across runs in a process
def make_tx(name, lr, head_lr, warmup_steps):
    """The optimiser: rate lr for the T5, head_lr for the head (see --head-learning-rate)."""
    label = lambda params: jax.tree.map_with_path(lambda path, _: "t5" if path[0].key == "t5" else "head", params)
    return optax.multi_transform({"t5": C.make_optimizer(name, lr, warmup_steps),
                                  "head": C.make_optimizer(name, head_lr, warmup_steps)}, label)


def load_pairs(args, ref, tokenizer, key):
    """Training pairs (numpy arrays) and held-out (prompt, preferred, other) triples."""
    toy = args.dataset == "toy"
    # The toy task's pairs are two pi_ref samples per prompt (as for TL;DR), labelled by the oracle.
    sample_fn = C.text_sampler(ref, tokenizer, key, args.max_prompt_len, args.max_completion_len) if toy else None
    n = 4000 if toy and args.num_examples is None else args.num_examples
    records = C.load_data(args.dataset, "pairwise", "train", n, args.seed, sample_fn)
    if toy:
        held = C.load_data("toy", "pairwise", "validation", args.eval_pairs, args.seed, sample_fn)
        # Toy labels are Bernoulli draws from the oracle's p: score against its argmax instead.
        r_c = C.toy_rewards([h["prompt"] for h in held], [h["chosen"] for h in held])
        r_r = C.toy_rewards([h["prompt"] for h in held], [h["rejected"] for h in held])
        held = [(h["prompt"], h["chosen"], h["rejected"]) if a > b else (h["prompt"], h["rejected"], h["chosen"])
                for h, a, b in zip(held, r_c, r_r) if a != b]
    elif len(records) <= args.eval_pairs:
        C.fail(f"{args.dataset}: {len(records)} pairs leave none for training after holding out "
               f"--eval-pairs {args.eval_pairs}; lower --eval-pairs or add data")
    else:  # hold out the last records
        records, tail = records[:-args.eval_pairs], records[-args.eval_pairs:]
        held = [(h["prompt"], h["chosen"], h["rejected"]) for h in tail]
    if args.batch_size > len(records):
        C.fail(f"--batch-size {args.batch_size} is larger than the training set ({len(records)} pairs "
               f"of {args.dataset}); lower --batch-size or add data")
    print(f"train: {len(records)} pairs; eval: {len(held)} held-out pairs "
          f"({'toy validation split, oracle ties left out' if toy else 'held-out tail of ' + args.dataset})")
    return C.pairwise_arrays(records, tokenizer, args.max_prompt_len, args.max_completion_len), held


def evaluate(net, tokenizer, held, args) -> dict[str, float]:
    """Agreement of the symmetrised judge with the preferred response of held-out pairs, and
    the distance of the raw model from p(y > y') + p(y' > y) = 1."""
    raw = C.judge_from_net(net, tokenizer, args.max_prompt_len, args.max_completion_len, 256, symmetrise=False)
    x, a, b = (list(t) for t in zip(*held))
    p, p_rev = raw(x, a, b), raw(x, b, a)
    p_sym = 0.5 * (p + 1.0 - p_rev)
    return {"eval/accuracy": float(((p_sym > 0.5) + 0.5 * (p_sym == 0.5)).mean()),
            "eval/symmetry_gap": float(np.abs(p + p_rev - 1.0).mean()),
            "eval/loss": float(-np.log(np.clip(p_sym, 1e-7, 1.0)).mean())}


def main(args: Args):
    C.init_distributed(args.distributed)  # before any other JAX call
    data_key = jax.random.key(args.seed)
    mesh = C.make_mesh(args.fsdp)
    print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} devices")
    t5, tokenizer = C.load_t5(args.model, jnp.dtype(args.dtype))
    if t5.spec.num_decoder_layers == 0:
        C.fail(f"--model {args.model}: an encoder alone (a saved value network?); pass a T5 policy checkpoint")
    data, held = load_pairs(args, t5, tokenizer, data_key)
    net = C.shard_model(C.JudgeNet(t5, args.kind, rngs=nnx.Rngs(args.seed)), mesh)  # t5 is now phi

    tx = make_tx(args.optimizer, args.learning_rate, args.head_learning_rate, args.warmup_steps)
    optimizer = C.shard_model(nnx.Optimizer(net, tx, wrt=nnx.Param), mesh)
    state = lambda: {"model": nnx.state(net), "optimizer": nnx.state(optimizer)}
    start, restored = 0, C.restore_checkpoint(args.output_dir, state())
    if restored is not None:
        saved, start, _ = restored
        nnx.update(net, saved["model"])
        nnx.update(optimizer, saved["optimizer"])
        print(f"resumed from step {start} ({os.path.join(args.output_dir, C.CHECKPOINT)})")
    if start > args.steps:
        C.fail(f"{args.output_dir} holds a checkpoint at step {start}, past --steps {args.steps}; "
               "raise --steps or use another --output-dir")

    logger = C.Logger(args.output_dir, args, args.track)
    sums, count, t0 = None, 0, time.perf_counter()
    # models bound once: nnx.jit does not re-walk their graphs each call (~2 ms of Python per step)
    step_fn = nnx.cached_partial(train_step, net, optimizer)
    for step in C.progress(range(start, args.steps), "preference_model", initial=start, total=args.steps):
        idx = C.batch_indices(len(data["prompt_ids"]), args.batch_size, step, args.seed)
        metrics = step_fn(C.shard_batch({k: v[idx] for k, v in data.items()}, mesh))
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        count, done = count + 1, step + 1
        save = done % args.save_every == 0 or done == args.steps
        evaluate_now = done % args.eval_every == 0 and done < args.steps  # the final one comes below
        if done % args.log_every == 0 or save or evaluate_now:
            jax.block_until_ready(sums)
            rate = {"perf/pairs_per_s": count * args.batch_size / (time.perf_counter() - t0)}
            values = logger.log({**{k: v / count for k, v in sums.items()}, **rate}, done)
            C.check_finite(values, done, args.output_dir)
            if evaluate_now:
                logger.log(evaluate(net, tokenizer, held, args), done)
            if save:
                C.save_checkpoint(args.output_dir, state(), done)
            sums, count, t0 = None, 0, time.perf_counter()

    final = logger.log(evaluate(net, tokenizer, held, args), args.steps)
    logger.close()
    C.save_judge(net, tokenizer, os.path.join(args.output_dir, "model"), args.max_prompt_len,
                 args.max_completion_len)
    print(f"final (step {args.steps}): " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    print(f"saved {os.path.join(args.output_dir, 'model')} (use it as --judge {args.output_dir})")
    return final


if __name__ == "__main__":
    main(tyro.cli(Args))
