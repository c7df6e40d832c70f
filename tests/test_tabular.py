"""Offline claims on softmax bandits: Azar et al. 2023, Sec. 5.3-5.4 (IPO vs
DPO) and Richemond et al. 2024, Theorem 1 (DRO-V). The scripts' losses are
called unchanged on log_softmax(theta); expectations are exact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo import dpo_loss
from dro_v import dro_v_losses
from ipo import ipo_loss
from tabular import descend, expected_pair_loss

TAUS = jnp.array([0.1, 0.5, 1.0, 5.0])


def offline_population_loss(loss, tau, logp, logref, P, log_mu):
    """E_{y, y' ~ mu, (y_w, y_l) ~ lambda_p(y, y')} loss(y_w, y_l): Calandriello et al. Eq. (10)."""

    def pair(pi_y, pi_y2, ref_y, ref_y2, p):
        return p * loss(pi_y, pi_y2, ref_y, ref_y2, tau) + (1 - p) * loss(pi_y2, pi_y, ref_y2, ref_y, tau)

    return expected_pair_loss(pair, logp, logref, P, log_mu)


def test_ipo_two_actions_deterministic_preference():
    """Azar et al. Sec. 5.3.1: uniform pi_ref and mu, p(y1 > y2) = 1: IPO's optimum is pi(y1) = sigmoid(1/(2 tau))."""
    P = jnp.array([[0.5, 1.0], [0.0, 0.5]])
    uniform = jnp.log(jnp.full(2, 0.5))

    def final_policy(tau):
        loss = lambda th: offline_population_loss(ipo_loss, tau, jax.nn.log_softmax(th), uniform, P, uniform)
        return jax.nn.softmax(descend(loss, jnp.array([-0.3, 0.4]), 0.2, 300)[0])

    got = jax.jit(jax.vmap(final_policy))(TAUS)
    np.testing.assert_allclose(got[:, 0], jax.nn.sigmoid(1 / (2 * TAUS)), rtol=1e-5)


# Azar et al. Sec. 5.4: D1 = {(a, b), (b, c), (a, c)}, a total order, uniform pi_ref.
D1_W, D1_L = jnp.array([0, 1, 0]), jnp.array([1, 2, 2])
UNIFORM3 = jnp.log(jnp.full(3, 1 / 3))


def d1_trajectories(loss):
    """pi after each step of Azar et al.'s protocol (Adam, lr 0.01, 18000 steps; full batch), for each tau."""

    def trajectory(tau):
        def empirical_loss(theta):
            lp = jax.nn.log_softmax(theta)
            return jnp.mean(loss(lp[D1_W], lp[D1_L], UNIFORM3[D1_W], UNIFORM3[D1_L], tau))

        return jax.nn.softmax(descend(empirical_loss, jnp.zeros(3), 0.01, 18000, adam=True)[1])

    return jax.jit(jax.vmap(trajectory))(TAUS)  # [tau, step, action]


def d1_ipo_closed_form(tau):
    """Minimising (u - c)^2 + (v - c)^2 + (u + v - c)^2 over the log-ratio gaps
    u = log pi(a)/pi(b), v = log pi(b)/pi(c) (uniform pi_ref), c = 1/(2 tau),
    gives u = v = 2c/3: pi = softmax((1, 0, -1) / (3 tau))."""
    return jax.nn.softmax(jnp.array([1.0, 0.0, -1.0]) / (3 * tau))


def test_ipo_on_d1_converges_to_its_closed_form():
    final = d1_trajectories(ipo_loss)[:, -1]
    np.testing.assert_allclose(final, jax.vmap(d1_ipo_closed_form)(TAUS), atol=3e-4)


def test_dpo_on_d1_drifts_to_the_greedy_policy():
    """Azar et al. Fig. 1: whatever tau, DPO ignores pi_ref: pi(a) only grows, towards 1,
    even where IPO's optimum keeps pi(a) near uniform (0.36 at tau = 5)."""
    pa = np.asarray(d1_trajectories(dpo_loss)[:, :, 0])
    assert np.all(np.diff(pa, axis=1) >= 0)
    assert np.all(pa[:, -1] > 0.95)


# Richemond et al. 2024: one prompt, four actions, a behaviour mu that is not pi_ref.
RNG = np.random.default_rng(1)
K = 4
LOGREF = jax.nn.log_softmax(jnp.asarray(RNG.normal(size=K), jnp.float32))
MU = jax.nn.softmax(jnp.asarray(RNG.normal(size=K), jnp.float32))
R = jnp.asarray(RNG.normal(size=K), jnp.float32)


def dro_v_fit(policy_and_value_losses, tau):
    """Gradient descent on E_{y ~ mu} of the policy and value losses, from pi = uniform, V = 0."""

    def loss(params):
        theta, v = params
        policy_loss, value_loss = policy_and_value_losses(jax.nn.log_softmax(theta), LOGREF, v, R, tau)
        return jnp.sum(MU * (policy_loss + value_loss))  # each has gradient only in its own function

    theta, v = descend(loss, (jnp.zeros(K), jnp.zeros(())), 1.0, 2000)[0]
    return jax.nn.softmax(theta), v


@pytest.mark.parametrize("tau", [0.3, 1.0, 3.0])
def test_dro_v_converges_to_theorem_1_optimum(tau):
    """Theorem 1: pi* ~ pi_ref exp(r / tau), V* = tau log E_pi_ref exp(r / tau)."""
    pi, v = jax.jit(dro_v_fit, static_argnums=(0, 1))(dro_v_losses, tau)
    np.testing.assert_allclose(pi, jax.nn.softmax(LOGREF + R / tau), rtol=1e-4)
    np.testing.assert_allclose(v, tau * jax.nn.logsumexp(LOGREF + R / tau), rtol=1e-4, atol=1e-5)


def test_dro_v_algorithm_1_as_printed_misses_the_optimum():
    """Algorithm 1 drops the tau in front of the square term of Eq. (8); then the fixed point is not pi*."""

    def algorithm_1_as_printed(pi_y, ref_y, v, r, tau):
        _, value_loss = dro_v_losses(pi_y, ref_y, v, r, tau)
        policy_loss = -(r - jax.lax.stop_gradient(v)) * pi_y + 0.5 * (pi_y - ref_y) ** 2
        return policy_loss, value_loss

    tau = 0.3
    pi, _ = jax.jit(dro_v_fit, static_argnums=(0, 1))(algorithm_1_as_printed, tau)
    assert np.abs(np.asarray(pi - jax.nn.softmax(LOGREF + R / tau))).max() > 0.02
