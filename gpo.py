"""Generalised Preference Optimisation (GPO; Tang et al. 2024): any binary
classification loss f applied to beta * rho, where rho is the log-ratio gap
between the preferred and the dispreferred completion, gives an offline
preference optimisation algorithm, E[f(beta * rho)] (Eq. (4)). Table 1 lists
the losses implemented here; logistic, hinge and square recover DPO, SLiC and
IPO. Tang et al. use beta for the regularisation strength.
"""
import jax
import jax.numpy as jnp

# Tang et al. 2024, Table 1, f evaluated at x = beta * rho. The paper calls all
# six convex, but the Savage loss is bounded, hence not convex: it is convex
# only for x >= -log 2 (which includes 0, where Sec. 4.1 expands it).
CONVEX_FUNCTIONS = {
    "logistic": lambda x: jax.nn.softplus(-x),  # log(1 + exp(-x)), DPO
    "hinge": lambda x: jnp.maximum(0.0, 1.0 - x),  # SLiC
    "square": lambda x: (x - 1.0) ** 2,  # IPO, with beta = 2 tau (times 4 tau^2)
    "exponential": lambda x: jnp.exp(-x),
    "truncated_quadratic": lambda x: jnp.maximum(0.0, 1.0 - x) ** 2,
    "savage": lambda x: jax.nn.sigmoid(-x) ** 2,  # 1 / (1 + exp(x))^2
}


def gpo_loss(pi_w, pi_l, ref_w, ref_l, beta, f):
    """Per-example GPO loss f(beta * rho), Tang et al. 2024 Eq. (4); f from CONVEX_FUNCTIONS."""
    rho = (pi_w - ref_w) - (pi_l - ref_l)
    return f(beta * rho)
