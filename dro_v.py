"""Direct Reward Optimisation with a value function (DRO-V; Richemond et al.
2024, Sec. 3.3 and Algorithm 1): learn from single-trajectory data (x, y, r)
by fitting r(x, y) - V(x) = tau log(pi(y|x)/pi_ref(y|x)) in the square,
Eq. (4), whose unique minimiser is the KL-regularised optimum
pi* ~ pi_ref exp(r/tau) with V* = tau log E_pi_ref[exp(r/tau)] (Theorem 1).
The policy and the value are updated separately: the value by the gradient of
Eq. (4), Eq. (7); the policy by Eq. (8), the policy gradient of Eq. (4),
rescaled by 1/tau as the paper does in practice.
"""
import jax
import jax.numpy as jnp


def dro_v_losses(pi_y, ref_y, v, r, tau):
    """Per-example (policy_loss, value_loss) of DRO-V.

    value_loss = 1/2 (r - v - tau log(pi/pi_ref))^2 with the policy held fixed:
    gradient (v - r + tau log(pi/pi_ref)) grad v, Eq. (7).
    policy_loss = value_loss / tau with v held fixed: gradient
    -[(r - v) grad log pi - tau/2 grad (log(pi/pi_ref))^2], i.e. Eq. (8) times
    1/tau; w.r.t. pi_y = log pi(y) it is -(r - v - tau (pi_y - ref_y)).
    Algorithm 1 writes the square term without its tau; we follow Eq. (8),
    whose fixed point is pi* (with the tau dropped it is not, unless tau = 1).
    """
    log_ratio = pi_y - ref_y
    policy_loss = (r - jax.lax.stop_gradient(v) - tau * log_ratio) ** 2 / (2.0 * tau)
    value_loss = 0.5 * (r - v - tau * jax.lax.stop_gradient(log_ratio)) ** 2
    return policy_loss, value_loss
