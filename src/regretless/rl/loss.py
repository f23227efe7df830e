"""Policy-gradient math as pure functions: group advantages and the importance-sampled PG loss.

The paper's objective is Σ_t (p_θ / p_sampler)·Adv_t with Adv = reward − mean reward of the problem's group
(no std division). `pg_loss` minimises its negative:

    loss = −Σ_{b,t} mask·ratio_{b,t}·adv_b / num_tokens,   ratio = exp(logp_new − logp_old)

with the gradient flowing through logp_new only (logp_old is the sampler's, a constant). Options beyond the
paper: PPO clipping (−min(ratio·A, clip(ratio, 1−ε, 1+ε)·A)), std-normalised advantages, and a KL penalty to a
reference policy, added per sampled token as kl_coef·k3 with k3 = exp(Δ) − Δ − 1 ≥ 0, Δ = logp_ref − logp_new
(Schulman's "k3", as in GRPO), differentiated through logp_new with the samples held fixed. What it is:
- its *value*, averaged over tokens sampled from π_new, is an unbiased estimate of KL(π_new ‖ π_ref) (logged
  as `kl`);
- its *gradient* is not that of KL(π_new ‖ π_ref): per token ∇k3 = (1 − π_ref/π_new)·∇logp_new, whose
  expectation under π_new is ∇ KL(π_ref ‖ π_new) (the forward KL, mass-covering towards the reference). Both
  divergences are 0 only at π_new = π_ref, so the penalty still pulls the policy back to the reference; the test
  `test_k3_gradient_is_that_of_the_forward_kl` checks this by exact enumeration.

Normalisation (a choice the paper does not state): the per-token sum is divided by `num_tokens`, by default
the number of masked tokens in the call. The RL loop passes the total completion tokens of the whole step
(all micro-batches, constant-reward groups included), so micro-batch losses add up exactly to the step's loss
and the gradient scale does not depend on how many groups happened to be informative.
"""

from __future__ import annotations

import torch


def constant_groups(rewards_P_G: torch.Tensor, atol: float = 1e-8) -> torch.Tensor:
    """(P,) bool: True where every sample of the problem got the same reward (no learning signal)."""
    return (rewards_P_G.max(dim=1).values - rewards_P_G.min(dim=1).values) <= atol


def group_advantages(rewards_P_G: torch.Tensor, normalize_std: bool = False, eps: float = 1e-6
                     ) -> torch.Tensor:
    """Adv = reward − group mean (÷ group std when `normalize_std`); exactly 0 for constant groups. (P, G)."""
    rewards_P_G = rewards_P_G.float()
    adv_P_G = rewards_P_G - rewards_P_G.mean(dim=1, keepdim=True)
    if normalize_std:
        adv_P_G = adv_P_G / (rewards_P_G.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv_P_G.masked_fill(constant_groups(rewards_P_G)[:, None], 0.0)


def kl_k3(logp_new_B_T: torch.Tensor, logp_ref_B_T: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = exp(Δ) − Δ − 1, Δ = logp_ref − logp_new: on samples from π_new its mean estimates
    KL(π_new ‖ π_ref) and its gradient (samples fixed) estimates ∇ KL(π_ref ‖ π_new); see the module docstring."""
    delta_B_T = logp_ref_B_T - logp_new_B_T
    return torch.exp(delta_B_T) - delta_B_T - 1.0


def pg_loss(logp_new_B_T: torch.Tensor, logp_old_B_T: torch.Tensor, adv_B: torch.Tensor,
            mask_B_T: torch.Tensor, clip_eps: float | None = None, kl_coef: float = 0.0,
            logp_ref_B_T: torch.Tensor | None = None, num_tokens: float | None = None
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance-sampled policy-gradient loss (see the module docstring) and stats.

    Returns (loss, {"ratio_sum", "clipped", "kl_sum", "tokens"}): sums over the masked tokens (the ratio, the
    tokens whose clipped term is active, k3, the tokens), 0-d tensors on the loss's device, so that a training
    step reads them back once (a GPU waits for nothing per micro-batch); divide by "tokens" for means.
    """
    mask_B_T = mask_B_T.to(logp_new_B_T.dtype)
    n_masked = mask_B_T.sum()
    denom = float(num_tokens) if num_tokens is not None else n_masked.clamp(min=1.0)
    ratio_B_T = torch.exp(logp_new_B_T - logp_old_B_T.detach())
    adv_B_1 = adv_B.detach().to(logp_new_B_T.dtype)[:, None]
    per_token_B_T = -ratio_B_T * adv_B_1
    clipped_B_T = torch.zeros_like(mask_B_T, dtype=torch.bool)
    if clip_eps is not None:
        clipped_ratio_B_T = ratio_B_T.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        clipped_loss_B_T = -clipped_ratio_B_T * adv_B_1
        clipped_B_T = clipped_loss_B_T > per_token_B_T  # the pessimistic (clipped) term is the active one
        per_token_B_T = torch.maximum(per_token_B_T, clipped_loss_B_T)
    kl_B_T = torch.zeros_like(per_token_B_T)
    if kl_coef and logp_ref_B_T is not None:
        kl_B_T = kl_k3(logp_new_B_T, logp_ref_B_T.detach())
        per_token_B_T = per_token_B_T + kl_coef * kl_B_T
    loss = (per_token_B_T * mask_B_T).sum() / denom
    with torch.no_grad():
        stats = {"ratio_sum": (ratio_B_T * mask_B_T).sum(),
                 "clipped": (clipped_B_T.to(mask_B_T.dtype) * mask_B_T).sum(),
                 "kl_sum": (kl_B_T * mask_B_T).sum(), "tokens": n_masked}
    return loss, stats
