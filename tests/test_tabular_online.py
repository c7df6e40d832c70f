"""Calandriello et al. 2024 on softmax bandits: Propositions 4.2, 5.1, 5.2,
the fixed points Eq. (12)-(13) (Appendix F's game) and the variance toy of
Appendix E.1. The scripts' losses are called unchanged on log_softmax(theta);
expectations over actions are exact sums."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipo_md import ipo_md_loss
from nash_md import nash_md_loss
from online_ipo import online_loss
from tabular import (
    APPENDIX_F_P,
    descend,
    expected_pair_loss,
    expected_single_loss,
    log_mixture,
    random_preference,
    symmetrise,
)

K = 5


def bandit(seed):
    """Random logits theta, reference log-probs and preference matrix (P + P^T = 1)."""
    rng = np.random.default_rng(seed)
    theta = jnp.asarray(rng.normal(size=K), jnp.float32)
    logref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=K), jnp.float32))
    return theta, logref, jnp.asarray(random_preference(rng, K), jnp.float32)


def ipo_md_objective(theta, logref, P, tau, beta):
    """Population loss of Sec. 5.1: Algorithm 3's loss, y, y' ~ SG[pi^(1-beta) pi_ref^beta].
    beta = 0 is online IPO, Eq. (11)."""
    logp = jax.nn.log_softmax(theta)
    loss = lambda *a: ipo_md_loss(*a, tau)
    return expected_pair_loss(loss, logp, logref, P, log_mixture(logp, logref, beta))


def nash_md_objective(theta, logref, P, tau, beta):
    """Nash-MD-PG(beta) surrogate, y ~ SG[pi], y' ~ SG[pi^(1-beta) pi_ref^beta] (Sec. 2.6)."""
    logp = jax.nn.log_softmax(theta)
    loss = lambda *a: nash_md_loss(*a, tau)
    return expected_single_loss(loss, logp, logref, P, logp, log_mixture(logp, logref, beta))


def paper_quantities(theta, logref, P, beta):
    """float64 pi, pi' = pi^(1-beta) pi_ref^beta, scores S[y] = grad_theta log pi(y) = e_y - pi,
    a(y) = log pi(y)/pi_ref(y), and p(y > pi')."""
    t = np.asarray(theta, np.float64)
    logp = t - t.max() - np.log(np.exp(t - t.max()).sum())
    pi, ref = np.exp(logp), np.exp(np.asarray(logref, np.float64))
    mix = pi ** (1 - beta) * ref**beta
    mix /= mix.sum()
    S = np.eye(len(pi)) - pi[None, :]
    return pi, mix, S, np.log(pi / ref), np.asarray(P, np.float64) @ mix


# ---------------------------------------------------------------- Prop. 4.2


@jax.jit
def self_play_direction(theta, logref, P, tau):
    """grad_theta [E_{y ~ pi, y' ~ SG[pi]} p(y > y') - tau KL(pi || pi_ref)], written from Sec. 4.2."""

    def payoff(theta):
        pi = jax.nn.softmax(theta)
        return pi @ P @ jax.lax.stop_gradient(pi) - tau * jnp.sum(pi * (jnp.log(pi) - logref))

    return jax.grad(payoff)(theta)


@functools.partial(jax.jit, static_argnums=4)
def online_gradient(theta, logref, P, tau, loss):
    """grad of Algorithm 2's population loss, y, y' ~ SG[pi]."""

    def population_loss(theta):
        logp = jax.nn.log_softmax(theta)
        return expected_pair_loss(lambda *a: online_loss(*a, tau, loss), logp, logref, P, logp)

    return jax.grad(population_loss)(theta)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_online_ipo_expected_gradient_is_self_play(seed, tau):
    """Prop. 4.2: -grad of the online IPO population loss is a positive multiple,
    4 / tau (the same for every component), of the self-play direction."""
    theta, logref, P = bandit(seed)
    direction = np.asarray(self_play_direction(theta, logref, P, tau), np.float64)
    update = -np.asarray(online_gradient(theta, logref, P, tau, "ipo"), np.float64)
    np.testing.assert_allclose(update, 4 / tau * direction, rtol=1e-4, atol=1e-5 / tau)
    # The check can fail: online DPO's expected update is not along self-play (Appendix G).
    dpo = -np.asarray(online_gradient(theta, logref, P, tau, "dpo"), np.float64)
    cosine = dpo @ direction / np.linalg.norm(dpo) / np.linalg.norm(direction)
    assert cosine < 0.999


# ---------------------------------------------------------------- Prop. 5.1

BETAS = [0.0, 0.3, 0.7]
TAU = 0.3


@pytest.mark.parametrize("beta", BETAS)
def test_nash_md_pg_expected_gradient_is_prop_5_1(beta):
    """g_Nash-MD-PG(beta) = -E_{y ~ pi}[g(y)], g(y) = grad log pi(y) (p(y > pi') - tau log pi(y)/pi_ref(y))."""
    theta, logref, P = bandit(3)
    pi, mix, S, a, p_mix = paper_quantities(theta, logref, P, beta)
    paper = -(pi[:, None] * S * (p_mix - TAU * a)[:, None]).sum(0)
    got = jax.grad(nash_md_objective)(theta, logref, P, TAU, beta)
    np.testing.assert_allclose(got, paper, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_ipo_md_expected_gradient(beta):
    """Prop. 5.1 says g_IPO-MD(beta) = -(2/tau) E_{y ~ pi'}[g(y)]. Its proof drops
    -2 E_pi'[a] E_pi'[grad log pi] using E_pi'[grad log pi] = 0, which holds only at
    beta = 0. The exact gradient is a covariance under pi' (docs/ipo_md.md, "A note for readers of the paper"):
        -(2/tau) Cov_{y ~ pi'}(grad log pi(y), p(y > pi') - tau a(y)).
    Algorithm 3 scores both orders of each pair, so its loss is twice the one
    differentiated in the proof: the gradient is twice these expressions."""
    theta, logref, P = bandit(4)
    pi, mix, S, a, p_mix = paper_quantities(theta, logref, P, beta)
    exact = np.asarray(jax.grad(ipo_md_objective)(theta, logref, P, TAU, beta), np.float64) / 2

    f = p_mix - TAU * a
    covariance = -(2 / TAU) * (mix[:, None] * S * (f - mix @ f)[:, None]).sum(0)
    np.testing.assert_allclose(exact, covariance, rtol=1e-4, atol=1e-5)

    statement = -(2 / TAU) * (mix[:, None] * S * f[:, None]).sum(0)  # g(y) as in Prop. 5.1
    proof = -(2 / TAU) * (mix[:, None] * S * (f - 0.5)[:, None]).sum(0)  # g(y) as in its proof
    mean_score = mix @ S  # E_pi'[grad log pi] = pi' - pi
    np.testing.assert_allclose(exact - proof, -2 * (mix @ a) * mean_score, rtol=1e-4, atol=1e-5)
    if beta == 0:
        np.testing.assert_allclose(mean_score, 0, atol=1e-6)
        np.testing.assert_allclose(exact, statement, rtol=1e-4, atol=1e-5)
    else:
        assert np.abs(mean_score).max() > 1e-2
        assert np.abs(exact - statement).max() > 0.1 * np.abs(exact).max()


# ---------------------------------------------------------------- fixed points

F_TAU = 0.1  # Appendix F
F_P = jnp.asarray(symmetrise(APPENDIX_F_P), jnp.float32)  # as printed, 0.8 + 0.1 != 1
UNIFORM = jnp.log(jnp.full(3, 1 / 3))


def eq_13_residual(logp, beta, tau):
    """max |log pi - log of pi_ref exp(p(y > pi') / tau), normalised| (Eq. (13); Eq. (12) at beta = 0)."""
    mix = jnp.exp(log_mixture(logp, UNIFORM, beta))
    return jnp.max(jnp.abs(logp - jax.nn.log_softmax(UNIFORM + F_P @ mix / tau)))


def test_appendix_f_needs_symmetrising():
    P = np.asarray(APPENDIX_F_P)
    assert not np.allclose(P + P.T, 1.0)
    np.testing.assert_allclose(np.asarray(F_P) + np.asarray(F_P).T, 1.0)


def test_ipo_md_and_nash_md_pg_share_the_fixed_point_of_eq_13():
    """From the same start, the expected-gradient dynamics of IPO-MD(beta) and
    Nash-MD-PG(beta) (different vector fields when beta > 0) reach the same
    policy, and it solves Eq. (13); Prop. 5.2: pi' is the Nash equilibrium for
    regularisation tau / (1 - beta)."""
    betas = jnp.array([0.0, 0.25, 0.5])
    theta0 = jnp.array([1.0, -0.5, 0.2])

    def fixed_points(beta):
        # IPO-MD's gradient is 4/tau times larger at beta = 0 (Prop. 4.2): scale its step down.
        ipo = descend(lambda th: ipo_md_objective(th, UNIFORM, F_P, F_TAU, beta), theta0, F_TAU / 4, 500)[0]
        nash = descend(lambda th: nash_md_objective(th, UNIFORM, F_P, F_TAU, beta), theta0, 1.0, 500)[0]
        return jax.nn.log_softmax(ipo), jax.nn.log_softmax(nash)

    ipo, nash = jax.jit(jax.vmap(fixed_points))(betas)
    np.testing.assert_allclose(jnp.exp(ipo), jnp.exp(nash), atol=1e-5)
    for i, beta in enumerate(betas):
        assert eq_13_residual(ipo[i], beta, F_TAU) < 1e-5
        assert eq_13_residual(nash[i], beta, F_TAU) < 1e-5
        # Prop. 5.2: pi' = pi_ref exp(p(y > pi') (1 - beta) / tau), normalised.
        log_mix = log_mixture(ipo[i], UNIFORM, beta)
        nash_eq = jax.nn.log_softmax(UNIFORM + F_P @ jnp.exp(log_mix) * (1 - beta) / F_TAU)
        np.testing.assert_allclose(log_mix, nash_eq, atol=1e-5)
    # beta moves the fixed point (so the checks above are not about one policy).
    assert jnp.abs(jnp.exp(ipo[0]) - jnp.exp(ipo[-1])).max() > 1e-2


# ---------------------------------------------------------------- Appendix E.1


def test_appendix_e1_second_moments():
    """pi_theta = N(theta, 1), p(y > y') = 1{y >= y'}, no regularisation (pi_ref = SG[pi],
    so log pi/pi_ref = 0 where the gradient is taken). Non-contrastive (Nash-MD-PG
    surrogate) E[g^2] = 1/4, contrastive (online IPO, rescaled by tau/4) E[g^2] = 1/8;
    both have mean -E[z Phi(z)] = -1/(2 sqrt(pi))."""
    n, theta, tau = 400_000, 0.7, 0.5
    y, y2 = theta + jax.random.normal(jax.random.key(0), (2, n))
    p = (y >= y2).astype(jnp.float32)

    def log_pi(theta, y):
        return -0.5 * (y - theta) ** 2 - 0.5 * jnp.log(2 * jnp.pi)

    def non_contrastive(theta, y, y2, p):
        lp = log_pi(theta, y)
        return nash_md_loss(lp, jax.lax.stop_gradient(lp), p, tau)

    def contrastive(theta, y, y2, p):
        lp, lp2 = log_pi(theta, y), log_pi(theta, y2)
        sg = jax.lax.stop_gradient
        return tau / 4 * online_loss(lp, lp2, sg(lp), sg(lp2), p, tau, "ipo")

    per_sample = lambda f: jax.jit(jax.vmap(jax.grad(f), in_axes=(None, 0, 0, 0)))(theta, y, y2, p)
    g_nc, g_c = per_sample(non_contrastive), per_sample(contrastive)
    np.testing.assert_allclose(jnp.mean(g_nc**2), 1 / 4, atol=4e-3)
    np.testing.assert_allclose(jnp.mean(g_c**2), 1 / 8, atol=2e-3)
    for g in (g_nc, g_c):
        np.testing.assert_allclose(jnp.mean(g), -1 / (2 * np.sqrt(np.pi)), atol=3e-3)
