"""The papers' tabular figures, redrawn from the scripts' own loss functions on
softmax bandits, and Tang et al.'s Figure 5 from gpo.py's toy runs.

    pip install matplotlib            # only this script needs it (not in requirements.txt)
    python docs/figures.py            # docs/figures/*.png (~2 min on 2 CPU cores; 20 s once runs/fig5/ exists)
    python docs/figures.py --only rps # one of: azar, gpo, rps, fig5; --force retrains the Figure 5 runs

| file | paper | what it shows |
|---|---|---|
| azar_fig1_d1.png | Azar et al. 2023, Sec. 5.4, Fig. 1 | IPO vs DPO on D1 = {(a,b), (b,c), (a,c)} for several tau |
| azar_fig2_d3.png | Azar et al. 2023, Sec. 5.4, Fig. 2 | D3 = {(a,b), (b,a)} as printed, and {(a,b), (b,c)} |
| gpo_fig3_bandit.png | Tang et al. 2024, Fig. 3, App. A.1 | D1 for the six f of Table 1 and several beta |
| ipo_md_fig9_rps.png | Calandriello et al. 2024, App. F, Fig. 9 | IPO-MD(beta) trajectories on rock-paper-scissors |
| gpo_fig5_kl_vs_square.png | Tang et al. 2024, Fig. 5 (right) | KL vs mu-weighted square loss along gpo.py's toy runs |

The numeric parts are plain functions (jax/numpy only) that tests/test_figures.py
checks on short runs; matplotlib is imported inside the plotting functions.
The offline bandits follow Azar et al. Sec. 5.4 exactly: theta in R^3 from 0
(pi = pi_ref = uniform), minibatches of 9 pairs drawn uniformly with
replacement from the dataset, Adam at lr 0.01, 18000 steps, 10 seeds; mean and
95% interval (Student t) over seeds. The rock-paper-scissors dynamics use exact
expected gradients (sums over all action pairs, tests/tabular.py), i.e. the
mean flow of Algorithm 3 that Appendix F describes.
"""
import argparse
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the scripts' losses and the bandit helpers

from dpo import dpo_loss  # noqa: E402
from gpo import CONVEX_FUNCTIONS, gpo_loss  # noqa: E402
from ipo import ipo_loss  # noqa: E402
from ipo_md import ipo_md_loss  # noqa: E402
from tabular import APPENDIX_F_P, expected_pair_loss, log_mixture, symmetrise  # noqa: E402

OUT = os.path.join(ROOT, "docs", "figures")
# Azar et al. Sec. 5.4; actions a, b, c are 0, 1, 2; (winner, loser) pairs.
D1 = ((0, 1), (1, 2), (0, 2))
D3 = ((0, 1), (1, 0))  # as printed
# D3 as printed cannot move pi(c): theta_c gets no gradient (h is invariant to the softmax normaliser)
# and the two pairs push theta_a, theta_b in exactly opposite directions. The text around it ("(a, c)
# completely unobserved", "one action does not have at least a victory") fits this reading better:
D3_READING = ((0, 1), (1, 2))
TAUS = (0.1, 0.5, 1.0, 5.0)
GPO_BETAS = (0.5, 1.0, 2.0)
RPS_TAU = 0.1  # Appendix F
RPS_BETAS = (1.0, 0.75, 0.5, 0.25, 0.0)
RPS_P = symmetrise(APPENDIX_F_P)  # as printed 0.8 + 0.1 != 1; see tests/tabular.py


# ------------------------------------------------------------ offline bandits


@functools.lru_cache(maxsize=None)
def _offline_runner(loss, steps, batch, lr, every):
    """jit(vmap over regularisations x seeds) of Azar et al.'s sampled protocol for one loss."""
    opt = optax.adam(lr)
    logref = jnp.log(jnp.full(3, 1 / 3))  # uniform pi_ref

    def run(reg, key, winners, losers):
        def step(carry, key):
            theta, state = carry
            i = jax.random.randint(key, (batch,), 0, winners.shape[0])  # uniform, with replacement
            w, l = winners[i], losers[i]

            def empirical_loss(theta):
                lp = jax.nn.log_softmax(theta)
                return jnp.mean(loss(lp[w], lp[l], logref[w], logref[l], reg))

            updates, state = opt.update(jax.grad(empirical_loss)(theta), state)
            theta = optax.apply_updates(theta, updates)
            return (theta, state), jax.nn.softmax(theta)

        theta = jnp.zeros(3)  # pi_theta = pi_ref at the start (Algorithm 1)
        _, pis = jax.lax.scan(step, (theta, opt.init(theta)), jax.random.split(key, steps))
        return pis[every - 1::every]

    return jax.jit(jax.vmap(jax.vmap(run, (None, 0, None, None)), (0, None, None, None)))


def offline_bandit(loss, dataset, regs, seeds=10, steps=18000, batch=9, lr=0.01, every=50):
    """pi_theta every `every` steps: array [reg, seed, step // every, action].

    `loss(pi_w, pi_l, ref_w, ref_l, reg)` is a script's loss (dpo_loss, ipo_loss, ...)."""
    winners, losers = (jnp.asarray(a) for a in zip(*dataset))
    keys = jax.random.split(jax.random.key(0), seeds)
    run = _offline_runner(loss, steps, batch, lr, every)
    return np.asarray(run(jnp.asarray(regs, jnp.float32), keys, winners, losers))


@functools.lru_cache(maxsize=None)
def gpo(name):
    """gpo_loss with f = CONVEX_FUNCTIONS[name], in the (pi_w, pi_l, ref_w, ref_l, beta) form (one per name,
    so the jitted runner is cached)."""
    return lambda pi_w, pi_l, ref_w, ref_l, beta: gpo_loss(pi_w, pi_l, ref_w, ref_l, beta, CONVEX_FUNCTIONS[name])


def d1_ipo_optimum(tau):
    """IPO's minimiser on D1 with uniform pi_ref: pi = softmax((1, 0, -1) / (3 tau)) (tests/test_tabular.py)."""
    z = np.array([1.0, 0.0, -1.0]) / (3 * tau)
    return np.exp(z) / np.exp(z).sum()


def mean_and_interval(x, axis=0):
    """Mean and half-width of the 95% Student-t interval over `axis` (Azar et al.: 10 seeds)."""
    from math import sqrt

    n = x.shape[axis]
    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.262}.get(n - 1, 1.96)
    return x.mean(axis), t * x.std(axis, ddof=1) / sqrt(n) if n > 1 else 0 * x.mean(axis)


# ------------------------------------------------------------ rock-paper-scissors


@functools.lru_cache(maxsize=None)
def _rps_runner(steps, lr, tau):
    P = jnp.asarray(RPS_P, jnp.float32)
    logref = jnp.log(jnp.full(3, 1 / 3))

    def objective(theta, beta):
        """Sec. 5.1's population loss of Algorithm 3: y, y' ~ SG[pi^(1-beta) pi_ref^beta], exact."""
        logp = jax.nn.log_softmax(theta)
        loss = lambda *a: ipo_md_loss(*a, tau)
        return expected_pair_loss(loss, logp, logref, P, log_mixture(logp, logref, beta))

    def run(beta, pi0):
        def step(theta, _):
            theta = theta - lr * jax.grad(objective)(theta, beta)
            return theta, jax.nn.softmax(theta)

        theta0 = jnp.log(pi0)
        _, pis = jax.lax.scan(step, theta0, None, length=steps)
        return jnp.concatenate([pi0[None], pis])

    return jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))


def rps_trajectories(betas=RPS_BETAS, starts=None, tau=RPS_TAU, steps=3000, lr=None):
    """IPO-MD(beta) expected-gradient descent on Appendix F's game: array [beta, start, step, action].

    lr defaults to tau / 40: at beta = 0 the expected gradient is 4 / tau times the self-play
    direction (Prop. 4.2), so this is a step of 0.1 along it."""
    starts = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]) if starts is None else starts
    run = _rps_runner(steps, tau / 40 if lr is None else lr, tau)
    return np.asarray(run(jnp.asarray(betas, jnp.float32), jnp.asarray(starts, jnp.float32)))


def eq_13_fixed_point(beta, tau=RPS_TAU, iters=20000, damping=0.02):
    """pi = pi_ref exp(p(y > pi') / tau) / Z with pi' = pi^(1-beta) pi_ref^beta (Eq. 13), uniform pi_ref,
    by damped fixed-point iteration (float64). beta = 1: the regularised best response to pi_ref
    (Offline IPO, Azar et al. Eq. 9); beta = 0: the regularised Nash equilibrium (Eq. 12)."""
    pi = np.full(3, 1 / 3)
    for _ in range(iters):
        mix = pi ** (1 - beta) * (1 / 3) ** beta
        z = RPS_P @ (mix / mix.sum()) / tau
        target = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        pi = (1 - damping) * pi + damping * target
    return pi


# ------------------------------------------------------------ plots


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("docs/figures.py needs matplotlib: pip install matplotlib (it is not a requirement of the scripts)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_azar(rows, name, title):
    """Azar et al. Fig. 1 / 2: one row per (label, loss, dataset), one panel per action: pi(y)
    against steps, one colour per tau."""
    plt = _pyplot()
    every = 50
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 3.2 * len(rows) + 0.4), sharex=True, sharey=True)
    for row, (label, loss, dataset) in enumerate(rows):
        pis = offline_bandit(loss, dataset, TAUS, every=every)
        steps = every * np.arange(1, pis.shape[2] + 1) / 1000  # in thousands: readable ticks
        for k, tau in enumerate(TAUS):
            mean, half = mean_and_interval(pis[k], axis=0)
            for a in range(3):
                ax = axes[row, a]
                ax.plot(steps, mean[:, a], color=f"C{k}", label=f"tau = {tau:g}")
                ax.fill_between(steps, mean[:, a] - half[:, a], mean[:, a] + half[:, a], color=f"C{k}", alpha=0.25)
                if loss is ipo_loss and dataset == D1:  # the closed-form optimum of the population loss
                    ax.axhline(d1_ipo_optimum(tau)[a], color=f"C{k}", ls=":", lw=1)
        for a in range(3):
            axes[row, a].set_title(f"{label}: pi(y_{'abc'[a]})", fontsize=9)
            axes[row, a].axhline(1 / 3, color="grey", lw=0.5)
    for ax in axes[-1]:
        ax.set_xlabel("thousand steps (Adam, lr 0.01, batch 9)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, name), dpi=110)
    plt.close(fig)


def plot_gpo():
    """Tang et al. Fig. 3: pi(y_1) on D1 for the six f of Table 1, one colour per beta."""
    plt = _pyplot()
    every = 50
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True, sharey=True)
    for ax, name in zip(axes.flat, CONVEX_FUNCTIONS):
        pis = offline_bandit(gpo(name), D1, GPO_BETAS, every=every)
        steps = every * np.arange(1, pis.shape[2] + 1) / 1000  # in thousands: readable ticks
        for k, beta in enumerate(GPO_BETAS):
            mean, half = mean_and_interval(pis[k, :, :, 0], axis=0)
            ax.plot(steps, mean, color=f"C{k}", label=f"beta = {beta:g}")
            ax.fill_between(steps, mean - half, mean + half, color=f"C{k}", alpha=0.25)
        ax.axhline(1 / 3, color="grey", lw=0.5)
        ax.set_title(f"{name}: pi(y_1)")
        ax.set_ylim(0.3, 1.02)
    for ax in axes[1]:
        ax.set_xlabel("thousand steps (Adam, lr 0.01, batch 9)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Tang et al. 2024, Fig. 3: GPO on Azar et al.'s D1 = {(y1,y2), (y2,y3), (y1,y3)}, "
                 "uniform pi_ref (mean and 95% interval over 10 seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "gpo_fig3_bandit.png"), dpi=110)
    plt.close(fig)


def _simplex_xy(pi):
    """Barycentric -> 2-D: rock (0, 0), paper (1, 0), scissors (1/2, sqrt(3)/2)."""
    pi = np.asarray(pi)
    return pi[..., 1] + 0.5 * pi[..., 2], np.sqrt(3) / 2 * pi[..., 2]


def plot_rps():
    """Calandriello et al. Fig. 9: IPO-MD(beta) trajectories on the simplex, full and zoomed."""
    plt = _pyplot()
    traj = rps_trajectories()
    fixed = {beta: eq_13_fixed_point(beta) for beta in RPS_BETAS}
    br, nash = eq_13_fixed_point(1.0), eq_13_fixed_point(0.0)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, zoom in zip(axes, (False, True)):
        corners = np.eye(3)
        ax.plot(*_simplex_xy(np.vstack([corners, corners[:1]])), color="black", lw=0.8)
        for k, beta in enumerate(RPS_BETAS):
            for s in range(traj.shape[1]):
                ax.plot(*_simplex_xy(traj[k, s]), color=f"C{k}", lw=1, label=f"beta = {beta:g}" if s == 0 else None)
            ax.plot(*_simplex_xy(fixed[beta]), "o", color=f"C{k}", ms=5)
        ax.plot(*_simplex_xy(br), "k^", ms=9, mfc="none", label="regularised best response to pi_ref")
        ax.plot(*_simplex_xy(nash), "ks", ms=9, mfc="none", label="regularised Nash equilibrium")
        ax.set_aspect("equal")
        ax.axis("off")
        if zoom:
            cx, cy = _simplex_xy(np.full(3, 1 / 3))
            ax.set_xlim(cx - 0.07, cx + 0.07), ax.set_ylim(cy - 0.07, cy + 0.07)
            ax.set_title("zoom on the centre (dots: Eq. 13's fixed point per beta)")
        else:
            for name, c in zip(("rock", "paper", "scissors"), corners):
                ax.annotate(name, _simplex_xy(c), ha="center", va="top" if c[2] == 0 else "bottom")
            ax.set_title(f"IPO-MD(beta), tau = {RPS_TAU:g}, uniform pi_ref, from three starts")
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Calandriello et al. 2024, App. F, Fig. 9 (symmetrised matrix; exact expected gradients)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "ipo_md_fig9_rps.png"), dpi=110)
    plt.close(fig)


def fig5_runs(force=False):
    """python gpo.py --loss <f> --eval-every 25 --output-dir runs/fig5/<f>, for the six f (~20 s each)."""
    for name in CONVEX_FUNCTIONS:
        out = os.path.join("runs", "fig5", name)
        if os.path.exists(os.path.join(ROOT, out, "model", "config.json")) and not force:
            continue
        subprocess.run(["rm", "-rf", os.path.join(ROOT, out)], check=True)  # no resume: a clean trace
        subprocess.run([sys.executable, "gpo.py", "--loss", name, "--eval-every", "25", "--output-dir", out],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        print(f"trained {out}", flush=True)


def read_trace(run_dir):
    """(square loss, KL) pairs at every evaluation step of a gpo.py run: loss/square_regulariser is the
    training-batch average over the preceding --log-every steps, eval/kl the evaluation at that step."""
    rows = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows.setdefault(r["step"], {}).update(r)
    steps = sorted(s for s, r in rows.items() if "eval/kl" in r and "loss/square_regulariser" in r)
    return np.array([[rows[s]["loss/square_regulariser"], rows[s]["eval/kl"]] for s in steps])


def plot_fig5(force=False):
    """Tang et al. Fig. 5 (right): KL vs mu-weighted square loss traced along training, per f, log-log."""
    plt = _pyplot()
    fig5_runs(force)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for k, name in enumerate(CONVEX_FUNCTIONS):
        trace = read_trace(os.path.join(ROOT, "runs", "fig5", name))
        ax.plot(trace[:, 0], trace[:, 1], "o-", color=f"C{k}", ms=4, label=name)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("mu-weighted square loss E_mu[rho^2 / 2] (training batches)")
    ax.set_ylabel("KL(pi_theta || pi_ref) (on-policy samples)")
    ax.set_title("Tang et al. 2024, Fig. 5: gpo.py on the toy task, beta = 0.5,\n"
                 "every 25 of 200 steps (pi_theta = pi_ref at step 0 is off the log scale)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "gpo_fig5_kl_vs_square.png"), dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description="Redraw the papers' tabular figures into docs/figures/.")
    parser.add_argument("--only", choices=["azar", "gpo", "rps", "fig5"], help="draw one figure (default: all)")
    parser.add_argument("--force", action="store_true", help="retrain the Figure 5 runs in runs/fig5/")
    args = parser.parse_args()
    _pyplot()  # fail early, before minutes of computing
    os.makedirs(OUT, exist_ok=True)
    seeds = "mean and 95% interval over 10 seeds, uniform pi_ref"
    fig1 = [("IPO", ipo_loss, D1), ("DPO", dpo_loss, D1)]
    fig2 = [("IPO, D3 as printed", ipo_loss, D3), ("DPO, D3 as printed", dpo_loss, D3),
            ("IPO, {(a,b), (b,c)}", ipo_loss, D3_READING), ("DPO, {(a,b), (b,c)}", dpo_loss, D3_READING)]
    todo = {
        "azar": lambda: (
            plot_azar(fig1, "azar_fig1_d1.png", f"Azar et al. 2023, Fig. 1: IPO vs DPO on D1 = {{(a,b), (b,c), "
                      f"(a,c)}} ({seeds}; dotted: IPO's closed-form optimum)"),
            plot_azar(fig2, "azar_fig2_d3.png", f"Azar et al. 2023, Fig. 2: D3 = {{(a,b), (b,a)}} as printed "
                      f"(nothing can move), and {{(a,b), (b,c)}}, where c never wins ({seeds})")),
        "gpo": plot_gpo,
        "rps": plot_rps,
        "fig5": lambda: plot_fig5(args.force),
    }
    for name, draw in todo.items():
        if args.only in (None, name):
            draw()
            print(f"drew {name}", flush=True)


if __name__ == "__main__":
    main()
