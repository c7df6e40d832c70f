"""Online IPO (Calandriello et al. 2024, Sec. 4 and Algorithm 2): for each
prompt draw two completions y, y' from the current policy, ask a preference
model for p = p(y > y'), and minimise the p-weighted pairwise loss
p L(y, y') + (1 - p) L(y', y). With the IPO loss L its expected gradient is a
positive multiple of the self-play direction of the regularised preference
game, Eq. (9) (Proposition 4.2), so it converges to that game's Nash
equilibrium, Eq. (12) (Proposition 4.1). Online DPO and online SLiC (Sec. 6)
swap in their pairwise losses.
"""
import jax
import jax.numpy as jnp

# The pairwise losses L(y, y') of Calandriello et al. 2024, Sec. 6 (y preferred).
# They repeat dpo.py / ipo.py / slic.py so this script stands alone.
PAIRWISE_LOSSES = {
    # Eq. (8) = Azar et al. Eq. (17).
    "ipo": lambda h, tau: (h - 1.0 / (2.0 * tau)) ** 2,
    # Eq. (4); Sec. 6 prints sigma(tau h) without -log, a typo.
    "dpo": lambda h, tau: -jax.nn.log_sigmoid(tau * h),
    # Eq. (5).
    "slic": lambda h, tau: jnp.maximum(0.0, 1.0 - tau * h),
}


def online_loss(pi_y, pi_y2, ref_y, ref_y2, p, tau, loss="ipo"):
    """Per-example p L(y, y') + (1 - p) L(y', y), Algorithm 2, with p = p(y > y').

    Both orders of the pair are scored, so the update is contrastive: gradients
    flow through log pi(y) and log pi(y'). The judge's p is data, not a function
    of the policy: no gradient flows into it.
    """
    if loss not in PAIRWISE_LOSSES:
        raise ValueError(f"unknown loss {loss!r}: choose one of {sorted(PAIRWISE_LOSSES)}")
    L = PAIRWISE_LOSSES[loss]
    p = jax.lax.stop_gradient(p)
    h = (pi_y - ref_y) - (pi_y2 - ref_y2)
    return p * L(h, tau) + (1.0 - p) * L(-h, tau)
