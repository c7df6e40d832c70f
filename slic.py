"""Offline Sequence Likelihood Calibration (SLiC; Zhao et al. 2023) with the
reference-normalised log-ratio of Liu et al. 2023: a hinge loss
max(0, 1 - tau * h) on pairs (x, y_w, y_l) of a fixed preference dataset
(Calandriello et al. 2024, Eq. (5); the hinge row of Tang et al. 2024, Table 1).
"""
import jax
import jax.numpy as jnp


def slic_loss(pi_w, pi_l, ref_w, ref_l, tau):
    """Per-example SLiC loss max(0, 1 - tau * h), Calandriello et al. 2024 Eq. (5)."""
    h = (pi_w - ref_w) - (pi_l - ref_l)
    return jnp.maximum(0.0, 1.0 - tau * h)
