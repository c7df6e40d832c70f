"""Side-by-side evaluation, as every paper of this project reports its results
(Calandriello et al. 2024, Sec. 6 and Table 2; Tang et al. 2024, Sec. 5;
Richemond et al. 2024, Sec. 4): sample one completion per prompt from each
policy and ask a judge which is better. Entry (row, column) of the matrix is
the mean over prompts of p(y_row > y_column | x), with its standard error;
(i, j) + (j, i) = 1. The diagonal pits each policy against a second,
independent sample of itself, so it is 0.5 up to sampling error (a check of
the judge's symmetry and of the sampling noise). Policies given as LABEL=PATH
with the same LABEL (seeds of one algorithm) are also reported as a group: mean
and standard deviation over all seed pairs (3 x 3 for two groups of 3 seeds).
Per policy it also reports the mean completion length, the rate of completions
that end with EOS and, given --ref, a sample estimate of KL(pi || pi_ref).

Example (toy task, the oracle as judge; policies from the training scripts):

    python evaluate.py assets/toy-t5 runs/online_ipo/model runs/dpo/model --ref assets/toy-t5

Writes <output_dir>/win_rates.csv, policies.csv and heatmap.png (if matplotlib
is installed); prints markdown tables. See docs/evaluate.md.
"""
import csv
import os
from dataclasses import dataclass
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import common as C


@dataclass
class Args:
    policies: Annotated[tuple[str, ...], tyro.conf.Positional]
    """the policies: local T5 folders or hub ids, each PATH or LABEL=PATH (the same LABEL
    groups seeds of one algorithm)"""
    judge: str = "toy"
    """"toy" (the embedded task's exact oracle) or the output folder of preference_model.py
    (a pairwise preference model or a reward model)"""
    dataset: str = "toy"
    """prompts: "toy" (the embedded task), a .jsonl file, a folder with <split>*.jsonl, or a hub
    name, of records {"prompt"} (or xsum's {"document"})"""
    split: str = "test"
    """which split of the dataset (toy: train, validation or test)"""
    num_prompts: int = 256
    """prompts to evaluate on (the first this-many records)"""
    ref: str | None = None
    """pi_ref, for the KL(pi || pi_ref) column (a local folder or hub id; None: no KL)"""
    output_dir: str = "runs/evaluate"
    """where win_rates.csv, policies.csv and heatmap.png go"""
    seed: int = 0
    """seeds the samples (policy i uses the key fold_in(seed, i))"""
    max_prompt_len: int = 20
    """prompt tokens, including EOS; longer prompts are truncated"""
    max_completion_len: int = 12
    """completion tokens, including EOS: the sampling length"""
    temperature: float = 1.0
    """sampling temperature (1: samples from pi itself; the KL estimate assumes it)"""
    batch_size: int = 64
    """prompts per sampler call"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """parameter dtype of the policies"""


def parse(policies):
    """[(label or None, path, name)]: names are unique, for tables and files."""
    out, seen = [], {}
    for p in policies:
        label, path = p.split("=", 1) if "=" in p and not os.path.exists(p) else (None, p)
        base = os.path.basename(os.path.normpath(path))
        base = os.path.basename(os.path.dirname(os.path.normpath(path))) if base == "model" else base
        name = label or base
        seen[name] = seen.get(name, 0) + 1
        out.append((label, path, name if seen[name] == 1 else f"{name}#{seen[name]}"))
    return out


def same_vocab(tok, other, what: str, where: str):
    if tok.get_vocab() != other.get_vocab():
        C.fail(f"{where}: its tokenizer ({len(tok)} tokens) differs from {what}'s ({len(other)} tokens); "
               f"compare policies that share one tokenizer")


def draw(model, ref, x, xm, key, args):
    """Two independent completions per prompt, and per-policy statistics of the first."""
    ys, lens, eos, kls = ([], []), [], [], []
    for i in range(0, len(x), args.batch_size):
        n = len(x[i:i + args.batch_size])
        xb, xmb = (C._pad_rows(a[i:i + args.batch_size], args.batch_size) for a in (x, xm))
        key, k1, k2 = jax.random.split(key, 3)
        for out, k in zip(ys, (k1, k2)):
            out.append(C.sample(model, xb, xmb, k, args.max_completion_len, args.temperature))
        y, ym, lp = ys[0][-1]
        lens.append(np.asarray(ym.sum(-1))[:n])
        eos.append(np.asarray((y == model.spec.eos_id).any(-1))[:n])
        if ref is not None:  # KL(pi || pi_ref) ~= E_{y ~ pi} log pi(y|x) - log pi_ref(y|x)
            kls.append(np.asarray(lp.sum(-1) - C.sequence_logps(ref, xb, xmb, y, ym))[:n])
    stats = {"length": np.concatenate(lens).mean(), "eos_rate": np.concatenate(eos).mean()}
    if ref is not None:
        stats["kl"] = np.concatenate(kls).mean()
    return ys, stats


def main(args: Args):
    if not args.policies:
        C.fail("no policies: pass one or more T5 folders or hub ids (LABEL=PATH to group seeds)")
    policies = parse(args.policies)
    prompts = [r["prompt"] for r in C.load_data(args.dataset, "prompts", args.split, args.num_prompts)]
    if args.judge == "toy" and args.dataset != "toy":
        print("note: --judge toy scores any text by the toy task's rule; on other prompts it means little")
    ref = tokenizer = judge = None
    if args.ref:
        ref, tokenizer = C.load_t5(args.ref, jnp.dtype(args.dtype))
    texts, stats = [], []
    for i, (_, path, name) in enumerate(policies):
        model, tok = C.load_t5(path, jnp.dtype(args.dtype))
        if model.spec.num_decoder_layers == 0 or os.path.exists(os.path.join(path, "judge.json")):
            C.fail(f"{path}: a preference model or value network, not a policy; pass a policy's model/ folder")
        if tokenizer is None:
            tokenizer = tok
        same_vocab(tok, tokenizer, "pi_ref" if args.ref else "the first policy", path)
        if judge is None:  # the judge's tokenizer must be the policies'
            judge = C.toy_judge() if args.judge == "toy" else C.load_judge(args.judge, tokenizer)
            x, xm, _ = C.tokenize(tokenizer, prompts, args.max_prompt_len)
        ys, s = draw(model, ref, x, xm, jax.random.fold_in(jax.random.key(args.seed), i), args)
        texts.append([[t for y, ym, _ in chunks for t in C.decode(tok, y, ym)][:len(prompts)] for chunks in ys])
        stats.append(s)
        del model

    # p(row > column) per prompt; the lower triangle is 1 - the upper (the judge's own symmetry is
    # checked by the diagonal: two samples of the same policy).
    n = len(policies)
    P = np.zeros((n, n, len(prompts)))
    for i in range(n):
        P[i, i] = C.check_preferences(judge(prompts, texts[i][0], texts[i][1]), f"--judge {args.judge}")
        for j in range(i + 1, n):
            P[i, j] = C.check_preferences(judge(prompts, texts[i][0], texts[j][0]), f"--judge {args.judge}")
            P[j, i] = 1.0 - P[i, j]
    mean, se = P.mean(-1), P.std(-1) / np.sqrt(len(prompts))
    names = [name for _, _, name in policies]
    print(f"\np(row > column | x), mean ± standard error over {len(prompts)} prompts "
          f"of {args.dataset} ({args.split}); judge {args.judge}\n")
    print("| | " + " | ".join(names) + " |\n|---|" + "---|" * n)
    for i in range(n):
        print(f"| {names[i]} | " + " | ".join(f"{mean[i, j]:.3f} ± {se[i, j]:.3f}" for j in range(n)) + " |")
    cols = list(stats[0])
    print("\n| policy | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, s in zip(names, stats):
        print(f"| {name} | " + " | ".join(f"{s[c]:.3f}" for c in cols) + " |")

    groups = {}
    for i, (label, _, _) in enumerate(policies):
        if label is not None:
            groups.setdefault(label, []).append(i)
    if any(len(g) > 1 for g in groups.values()):
        print("\ngroups: mean ± standard deviation over seed pairs (i != j within a group)\n")
        print("| | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups))
        for a, ia in groups.items():
            cells = [np.array([mean[i, j] for i in ia for j in ib if i != j]) for ib in groups.values()]
            print(f"| {a} | " + " | ".join(f"{c.mean():.3f} ± {c.std():.3f}" if c.size else "-" for c in cells) + " |")

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "win_rates.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "opponent", "p_policy_beats_opponent", "standard_error"])
        w.writerows([names[i], names[j], f"{mean[i, j]:.6f}", f"{se[i, j]:.6f}"] for i in range(n) for j in range(n))
    with open(os.path.join(args.output_dir, "policies.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "path"] + cols)
        w.writerows([name, path] + [f"{s[c]:.6f}" for c in cols] for (_, path, name), s in zip(policies, stats))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nnote: matplotlib is not installed; no heatmap (pip install matplotlib). "
              f"Wrote {args.output_dir}/win_rates.csv and policies.csv")
    else:
        fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.0 * n + 1.5))
        im = ax.imshow(mean, vmin=0, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(n), names, rotation=45, ha="right"), ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center")
        ax.set_title("p(row > column)"), fig.colorbar(im), fig.tight_layout()
        fig.savefig(os.path.join(args.output_dir, "heatmap.png"), dpi=120)
        print(f"\nwrote {args.output_dir}/win_rates.csv, policies.csv and heatmap.png")
    return {"names": names, "mean": mean, "se": se, "stats": stats}


if __name__ == "__main__":
    main(tyro.cli(Args))
