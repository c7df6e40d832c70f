"""Offline Direct Preference Optimisation (DPO; Rafailov et al. 2023) in the
notation of Calandriello et al. 2024, Sec. 2.3: minimise -log sigma(tau * h) on
pairs (x, y_w, y_l) of a fixed preference dataset, where h is the difference of
the policy-to-reference log-ratios of the preferred and dispreferred
completions. This is Eq. (4) of that paper with the sign flipped to a loss, and
the logistic row of Tang et al. 2024, Table 1.
"""
import jax
import jax.numpy as jnp


def dpo_loss(pi_w, pi_l, ref_w, ref_l, tau):
    """Per-example DPO loss -log sigma(tau * h), h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l).

    Calandriello et al. 2024, Eq. (4). Sec. 6 and Appendix B print the loss as
    sigma(tau * h) without the -log: a typo (minimising it would push y_w down).
    """
    h = (pi_w - ref_w) - (pi_l - ref_l)
    # log_sigmoid stays finite where log(sigmoid(.)) would underflow to -inf.
    return -jax.nn.log_sigmoid(tau * h)
