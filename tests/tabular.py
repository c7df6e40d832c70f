"""Softmax bandits: the tabular setting in which the papers state their claims.

A policy over K actions is log_softmax(theta); the "sequence log-prob" of
action y is its entry y. The loss functions of the scripts are called unchanged
on these arrays, and expectations over actions are exact sums weighted by the
(stop-gradient) sampling probabilities. Shared by the tests and by figures.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

# Calandriello et al. 2024, Appendix F, as printed: p(y > y') with rows y.
APPENDIX_F_P = np.array([[0.5, 0.8, 0.1], [0.1, 0.5, 0.8], [0.9, 0.1, 0.5]])


def symmetrise(P):
    """(P + 1 - P^T) / 2, the nearest matrix with p(y > y') + p(y' > y) = 1 (Sec. 2.1).

    Appendix F's matrix breaks that condition (0.8 + 0.1 = 0.9); every result
    of the paper assumes it, so we restore it before using the matrix.
    """
    P = np.asarray(P, dtype=np.float64)
    return (P + 1.0 - P.T) / 2.0


def random_preference(rng, k):
    """A random K x K preference matrix with P + P^T = 1 (diagonal 1/2)."""
    return symmetrise(rng.uniform(size=(k, k)))


def log_mixture(logp, logref, beta):
    """log of the normalised geometric mixture pi^(1-beta) pi_ref^beta (Sec. 5.1)."""
    return jax.nn.log_softmax((1.0 - beta) * logp + beta * logref)


def expected_pair_loss(pair_loss, logp, logref, P, log_sampler):
    """E_{y, y' ~ sg(sampler)} pair_loss(logp[y], logp[y'], logref[y], logref[y'], P[y, y']).

    Exact: a sum over all K^2 ordered pairs. The sampler is held fixed, as in
    the papers' SG[.]: one does not differentiate through data generation.
    """
    k = logp.shape[0]
    y, y2 = (a.reshape(-1) for a in jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing="ij"))
    w = jax.lax.stop_gradient(jnp.exp(log_sampler[y] + log_sampler[y2]))
    losses = pair_loss(logp[y], logp[y2], logref[y], logref[y2], jnp.asarray(P)[y, y2])
    return jnp.sum(w * losses)


def expected_single_loss(single_loss, logp, logref, P, log_sampler, log_opponent):
    """E_{y ~ sg(sampler), y' ~ sg(opponent)} single_loss(logp[y], logref[y], P[y, y'])."""
    k = logp.shape[0]
    y, y2 = (a.reshape(-1) for a in jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing="ij"))
    w = jax.lax.stop_gradient(jnp.exp(log_sampler[y] + log_opponent[y2]))
    return jnp.sum(w * single_loss(logp[y], logref[y], jnp.asarray(P)[y, y2]))


def descend(loss_fn, params, lr, steps, adam=False):
    """Minimise loss_fn(params) by `steps` full-batch steps of gradient descent
    (or Adam, as in Azar et al. Sec. 5.4), jitted with lax.scan.

    Returns (final params, trajectory of params after every step).
    """
    opt = optax.adam(lr) if adam else optax.sgd(lr)

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            updates, state = opt.update(jax.grad(loss_fn)(params), state)
            params = optax.apply_updates(params, updates)
            return (params, state), params

        (params, _), trajectory = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        return params, trajectory

    return run(params)
