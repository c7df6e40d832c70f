"""Each loss against a direct numpy evaluation of its paper's formula, and the
gradients the papers prescribe (stop-gradients included)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo import dpo_loss
from dro_v import dro_v_losses
from gpo import CONVEX_FUNCTIONS, gpo_loss
from ipo import ipo_loss
from ipo_md import ipo_md_loss
from nash_md import nash_md_loss
from online_ipo import online_loss
from slic import slic_loss

B = 64
TAUS = [0.1, 0.5, 1.0, 2.0]


def logps(seed):
    """(pi_a, pi_b, ref_a, ref_b): sequence log-probs [B] in fp32, policy a few nats from the reference."""
    rng = np.random.default_rng(seed)
    ref = -rng.uniform(5.0, 30.0, size=(2, B))
    pi = ref + rng.normal(scale=1.5, size=(2, B))
    return tuple(jnp.asarray(x, jnp.float32) for x in (pi[0], pi[1], ref[0], ref[1]))


def np_h(pi_w, pi_l, ref_w, ref_l):
    a = [np.asarray(x, np.float64) for x in (pi_w, pi_l, ref_w, ref_l)]
    return (a[0] - a[2]) - (a[1] - a[3])


# Reference formulas, written from the papers in numpy (float64).
NP_PAIRWISE = {
    "dpo": lambda h, tau: np.logaddexp(0.0, -tau * h),  # -log sigma(tau h), Calandriello Eq. (4)
    "ipo": lambda h, tau: (h - 1.0 / (2.0 * tau)) ** 2,  # Azar Eq. (17)
    "slic": lambda h, tau: np.maximum(0.0, 1.0 - tau * h),  # Calandriello Eq. (5)
}
NP_TABLE_1 = {  # Tang et al. 2024, Table 1, at x = beta rho
    "logistic": lambda x: np.log(1.0 + np.exp(-x)),
    "hinge": lambda x: np.maximum(0.0, 1.0 - x),
    "square": lambda x: (x - 1.0) ** 2,
    "exponential": lambda x: np.exp(-x),
    "truncated_quadratic": lambda x: np.maximum(0.0, 1.0 - x) ** 2,
    "savage": lambda x: 1.0 / (1.0 + np.exp(x)) ** 2,
}
SCRIPT_PAIRWISE = {"dpo": dpo_loss, "ipo": ipo_loss, "slic": slic_loss}


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("name", sorted(SCRIPT_PAIRWISE))
def test_pairwise_loss_matches_paper(name, tau):
    a = logps(0)
    got = jax.jit(SCRIPT_PAIRWISE[name])(*a, tau)
    assert got.shape == (B,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, NP_PAIRWISE[name](np_h(*a), tau), rtol=2e-5, atol=2e-5)


def test_losses_prefer_the_winner():
    """Raising log pi(y_w) lowers every loss near pi = pi_ref (catches a swapped w/l)."""
    z = jnp.zeros(B)
    for f in SCRIPT_PAIRWISE.values():
        assert np.all(np.asarray(jax.grad(lambda w: f(w, z, z, z, 1.0).sum())(z)) < 0)


def test_dpo_is_finite_far_out():
    """log_sigmoid keeps the loss finite and exact where log(sigmoid) underflows."""
    z = jnp.zeros(2)
    got = dpo_loss(jnp.array([-200.0, 200.0]), z, z, z, 1.0)
    np.testing.assert_allclose(got, [200.0, 0.0], atol=1e-6)


def test_ipo_expanded_form_of_calandriello_sec6():
    """Sec. 6: -log(pi(y)/pi(y')) + tau h^2 = tau ipo_loss - log(ref(y)/ref(y')) - 1/(4 tau)."""
    pi_w, pi_l, ref_w, ref_l = logps(1)
    for tau in TAUS:
        h = np_h(pi_w, pi_l, ref_w, ref_l)
        expanded = -(np.float64(pi_w) - np.float64(pi_l)) + tau * h**2
        ours = tau * np.asarray(ipo_loss(pi_w, pi_l, ref_w, ref_l, tau), np.float64)
        const = np.float64(ref_w) - np.float64(ref_l) + 1.0 / (4.0 * tau)
        np.testing.assert_allclose(expanded, ours - const, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- GPO


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.0])
@pytest.mark.parametrize("name", sorted(NP_TABLE_1))
def test_gpo_matches_table_1(name, beta):
    a = logps(2)
    got = jax.jit(gpo_loss, static_argnums=5)(*a, beta, CONVEX_FUNCTIONS[name])
    np.testing.assert_allclose(got, NP_TABLE_1[name](beta * np_h(*a)), rtol=2e-5, atol=2e-5)


def test_gpo_has_exactly_table_1():
    assert set(CONVEX_FUNCTIONS) == set(NP_TABLE_1)


@pytest.mark.parametrize("name", sorted(NP_TABLE_1))
def test_gpo_f_decreases_at_zero(name):
    """Tang et al. Sec. 4.1: every f in Table 1 has f'(0) < 0."""
    assert jax.grad(CONVEX_FUNCTIONS[name])(0.0) < 0


@pytest.mark.parametrize("name", sorted(set(NP_TABLE_1) - {"savage"}))
def test_gpo_f_is_convex(name):
    x = jnp.linspace(-6.0, 6.0, 1201)
    f = np.asarray(CONVEX_FUNCTIONS[name](x), np.float64)
    second_difference = f[2:] - 2 * f[1:-1] + f[:-2]
    assert second_difference.min() >= -1e-5


def test_savage_is_not_convex():
    """The paper calls Savage convex; 1/(1+e^x)^2 is bounded, so it cannot be.

    f'' = -2 s (1-s)^2 (1 - 3s), s = sigmoid(x): convex exactly for x >= -log 2.
    """
    f2 = jax.vmap(jax.grad(jax.grad(CONVEX_FUNCTIONS["savage"])))
    x_left = jnp.linspace(-6.0, -np.log(2.0) - 0.05, 50)
    x_right = jnp.linspace(-np.log(2.0) + 0.05, 6.0, 50)
    assert np.all(np.asarray(f2(x_left)) < 0) and np.all(np.asarray(f2(x_right)) > 0)


@pytest.mark.parametrize("tau", TAUS)
def test_gpo_recovers_ipo_dpo_slic(tau):
    """Square with beta = 2 tau is 4 tau^2 IPO; logistic and hinge with beta = tau are DPO and SLiC."""
    a = logps(3)
    F = CONVEX_FUNCTIONS
    np.testing.assert_allclose(gpo_loss(*a, 2 * tau, F["square"]), 4 * tau**2 * ipo_loss(*a, tau), rtol=1e-5)
    np.testing.assert_allclose(gpo_loss(*a, tau, F["logistic"]), dpo_loss(*a, tau), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gpo_loss(*a, tau, F["hinge"]), slic_loss(*a, tau), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- online


def online_args(seed):
    """(pi_y, pi_y2, ref_y, ref_y2, p) with p = p(y > y') uniform in [0, 1]."""
    p = jnp.asarray(np.random.default_rng(seed).uniform(size=B), jnp.float32)
    return (*logps(seed), p)


@pytest.mark.parametrize("tau", [0.1, 1.0, 2.0])
@pytest.mark.parametrize("name", sorted(NP_PAIRWISE))
def test_online_loss_matches_algorithm_2(name, tau):
    pi_y, pi_y2, ref_y, ref_y2, p = online_args(4)
    h, pn = np_h(pi_y, pi_y2, ref_y, ref_y2), np.float64(p)
    want = pn * NP_PAIRWISE[name](h, tau) + (1 - pn) * NP_PAIRWISE[name](-h, tau)
    got = jax.jit(online_loss, static_argnums=6)(pi_y, pi_y2, ref_y, ref_y2, p, tau, name)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(SCRIPT_PAIRWISE))
def test_online_loss_at_certain_preferences(name):
    """p = 1 scores (y, y') as (winner, loser); p = 0 the reverse; same formula as the offline script."""
    pi_y, pi_y2, ref_y, ref_y2, _ = online_args(5)
    L = SCRIPT_PAIRWISE[name]
    one, zero = jnp.ones(B), jnp.zeros(B)
    np.testing.assert_allclose(
        online_loss(pi_y, pi_y2, ref_y, ref_y2, one, 0.7, name), L(pi_y, pi_y2, ref_y, ref_y2, 0.7), rtol=1e-6
    )
    np.testing.assert_allclose(
        online_loss(pi_y, pi_y2, ref_y, ref_y2, zero, 0.7, name), L(pi_y2, pi_y, ref_y2, ref_y, 0.7), rtol=1e-6
    )


@pytest.mark.parametrize("name", sorted(SCRIPT_PAIRWISE))
def test_online_loss_does_not_differentiate_the_judge(name):
    a = online_args(6)
    dp = jax.grad(lambda p: online_loss(*a[:4], p, 0.5, name).sum())(a[4])
    assert np.all(np.asarray(dp) == 0)


def test_online_loss_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"'dpo'.*'ipo'.*'slic'"):
        online_loss(*online_args(7), 1.0, loss="kto")


def test_ipo_md_loss_is_online_ipo():
    a = online_args(8)
    for tau in TAUS:
        np.testing.assert_allclose(ipo_md_loss(*a, tau), online_loss(*a, tau, "ipo"), rtol=1e-6)
    dp = jax.grad(lambda p: ipo_md_loss(*a[:4], p, 0.5).sum())(a[4])
    assert np.all(np.asarray(dp) == 0)


# ---------------------------------------------------------------- Nash-MD-PG


@pytest.mark.parametrize("tau", [0.0, 0.1, 1.0])
def test_nash_md_gradient_is_the_policy_gradient(tau):
    """Sec. 2.6: d loss / d log pi(y) = -(p - 1/2 - tau log(pi(y)/pi_ref(y))); p and pi_ref get none."""
    pi_y, _, ref_y, _, p = online_args(9)
    d_pi, d_ref, d_p = jax.grad(lambda *a: nash_md_loss(*a, tau).sum(), argnums=(0, 1, 2))(pi_y, ref_y, p)
    want = -(np.float64(p) - 0.5 - tau * (np.float64(pi_y) - np.float64(ref_y)))
    np.testing.assert_allclose(d_pi, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(d_ref) == 0) and np.all(np.asarray(d_p) == 0)


# ---------------------------------------------------------------- DRO-V


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_dro_v_gradients_are_eq_7_and_eq_8(tau):
    pi_y, _, ref_y, _, r = online_args(10)
    v = jnp.asarray(np.random.default_rng(10).normal(size=B), jnp.float32)
    n = [np.asarray(x, np.float64) for x in (pi_y, ref_y, v, r)]
    log_ratio = n[0] - n[1]

    def total(i):  # sum of policy (i=0) or value (i=1) losses
        return lambda pi_y, v: dro_v_losses(pi_y, ref_y, v, r, tau)[i].sum()

    (dpol_pi, dpol_v), (dval_pi, dval_v) = (jax.grad(total(i), argnums=(0, 1))(pi_y, v) for i in (0, 1))
    # Eq. (7): (V - r + tau log(pi/pi_ref)) grad V.
    np.testing.assert_allclose(dval_v, n[2] - n[3] + tau * log_ratio, rtol=1e-4, atol=1e-4)
    # Eq. (8): -tau [(r - V) grad log pi - tau/2 grad log(pi/pi_ref)^2], times 1/tau.
    eq8 = -tau * ((n[3] - n[2]) - tau / 2 * 2 * log_ratio)
    np.testing.assert_allclose(dpol_pi, eq8 / tau, rtol=1e-4, atol=1e-4)
    # Each loss moves only its own function.
    assert np.all(np.asarray(dpol_v) == 0) and np.all(np.asarray(dval_pi) == 0)


def test_dro_v_loss_values_are_eq_4():
    pi_y, v, ref_y, r = logps(11)
    pol, val = dro_v_losses(pi_y, ref_y, v, r, 0.5)
    t = np.float64(r) - np.float64(v) - 0.5 * (np.float64(pi_y) - np.float64(ref_y))
    np.testing.assert_allclose(val, 0.5 * t**2, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(pol, t**2, rtol=1e-4, atol=1e-3)  # Eq. (4) / tau
