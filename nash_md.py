"""Nash-MD-PG(beta) (Munos et al. 2023, as summarised in Calandriello et al.
2024, Sec. 2.6): a regularised policy gradient towards the Nash equilibrium of
the preference game, Eq. (9). Draw y from the policy pi and y' from the
geometric mixture pi^(1-beta) pi_ref^beta, ask a preference model for
p = p(y > y'), and ascend grad log pi(y) (p - 1/2 - tau log(pi(y)/pi_ref(y))).
Non-contrastive and on-policy: only y carries a gradient.
"""
import jax
import jax.numpy as jnp


def nash_md_loss(pi_y, ref_y, p, tau):
    """Per-example surrogate whose gradient w.r.t. pi_y = log pi(y) is -(p - 1/2 - tau (pi_y - ref_y)).

    Calandriello et al. 2024, Sec. 2.6. The advantage is held fixed (a
    score-function surrogate): differentiating the KL term as well would add
    tau grad log pi(y), whose mean is zero on-policy; the paper's update omits it.
    """
    advantage = jax.lax.stop_gradient(p - 0.5 - tau * (pi_y - ref_y))
    return -advantage * pi_y
