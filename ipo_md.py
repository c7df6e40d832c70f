"""IPO-MD (Calandriello et al. 2024, Sec. 5 and Algorithm 3): online IPO whose
two completions are drawn from the geometric mixture pi^(1-beta) pi_ref^beta
(in practice the token-wise mixture of logits, Sec. 6) instead of from pi.
beta = 0 is online IPO (self-play), beta = 1 is IPO against samples of pi_ref.
Its fixed points are those of Nash-MD-PG(beta), Eq. (13). The loss is the
online IPO loss; only the sampling differs.
"""
import jax
import jax.numpy as jnp


def ipo_md_loss(pi_y, pi_y2, ref_y, ref_y2, p, tau):
    """Per-example p L(y, y') + (1 - p) L(y', y), L = IPO loss, Algorithm 3.

    y, y' come from the mixture and p = p(y > y'); the caller samples them.
    p is data: no gradient flows into it. The exact expected gradient for
    beta > 0 differs from Proposition 5.1 as printed (docs/ipo_md_note.md).
    """
    p = jax.lax.stop_gradient(p)
    h = (pi_y - ref_y) - (pi_y2 - ref_y2)
    # Azar et al. Eq. (17); duplicated from ipo.py so this script stands alone.
    ipo = lambda h: (h - 1.0 / (2.0 * tau)) ** 2
    return p * ipo(h) + (1.0 - p) * ipo(-h)
