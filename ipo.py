"""Offline Identity Preference Optimisation (IPO; Azar et al. 2023): regress
the log-ratio gap h between the preferred and the dispreferred completion of a
fixed preference dataset onto 1/(2 tau), i.e. minimise (h - 1/(2 tau))^2
(Azar et al., Eq. (17) and Algorithm 1; Calandriello et al. 2024, Eq. (8)).
Unlike DPO the square has a finite minimiser, so the policy stays close to
pi_ref even when the data are deterministic (Azar et al., Sec. 5.3-5.4).
"""
import jax
import jax.numpy as jnp


def ipo_loss(pi_w, pi_l, ref_w, ref_l, tau):
    """Per-example IPO loss (h - 1/(2 tau))^2, Azar et al. Eq. (17).

    Calandriello et al. 2024 (Sec. 6, Appendix B) train on the expanded form
    -log(pi(y_w)/pi(y_l)) + tau * h^2, which is exactly
    tau * ipo_loss - log(pi_ref(y_w)/pi_ref(y_l)) - 1/(4 tau): the same
    minimiser, but tau times our gradient (a learning-rate rescaling).
    """
    h = (pi_w - ref_w) - (pi_l - ref_l)
    return (h - 1.0 / (2.0 * tau)) ** 2
