import math

import pytest
import torch

from regretless.rl.loss import constant_groups, group_advantages, kl_k3, pg_loss


def test_group_advantages_hand_computed():
    rewards_P_G = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(rewards_P_G)
    assert torch.equal(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.75, -0.75, -0.75, 2.25]]))
    assert constant_groups(rewards_P_G).tolist() == [False, True, False]
    adv_std = group_advantages(rewards_P_G, normalize_std=True, eps=0.0)
    assert torch.allclose(adv_std[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    std = math.sqrt(3 * 0.75**2 + 2.25**2) / 2  # population std of (0, 0, 0, 3)
    assert torch.allclose(adv_std[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / std)
    assert torch.equal(adv_std[1], torch.zeros(4))


def test_pg_loss_on_policy_is_minus_mean_adv_per_token_and_grad():
    logp_B_T = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask_B_T = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv_B = torch.tensor([2.0, -1.0])
    loss, stats = pg_loss(logp_B_T, logp_B_T.detach(), adv_B, mask_B_T)
    # ratio = 1 everywhere: -(2 + 2 - 1) / 3 tokens
    assert loss.item() == pytest.approx(-1.0)
    assert float(stats["ratio_sum"] / stats["tokens"]) == pytest.approx(1.0) and float(stats["tokens"]) == 3.0
    assert {k: v.dim() for k, v in stats.items()} == dict.fromkeys(("ratio_sum", "clipped", "kl_sum", "tokens"), 0)
    loss.backward()
    # d/dlogp of -ratio*adv/N = -adv/N on masked tokens (ratio = 1)
    assert torch.allclose(logp_B_T.grad, torch.tensor([[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]]))


def test_pg_loss_importance_ratio_clipping_and_num_tokens():
    logp_old = torch.log(torch.tensor([[0.5, 0.5]]))
    logp_new = torch.log(torch.tensor([[0.75, 0.25]])).requires_grad_()
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([1.0])
    loss, stats = pg_loss(logp_new, logp_old, adv, mask)
    assert loss.item() == pytest.approx(-(1.5 + 0.5) / 2)
    assert float(stats["ratio_sum"]) == pytest.approx(1.5 + 0.5)
    loss, stats = pg_loss(logp_new, logp_old, adv, mask, clip_eps=0.2)
    # ratio 1.5 clipped to 1.2 (A > 0: the clipped term is smaller); ratio 0.5 is not clipped (min picks 0.5)
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert float(stats["clipped"]) == 1.0 and float(stats["tokens"]) == 2.0
    loss.backward()
    assert logp_new.grad[0, 0].item() == 0.0  # clipped token has no gradient
    assert logp_new.grad[0, 1].item() == pytest.approx(-0.5 / 2)
    loss10, _ = pg_loss(logp_new, logp_old, adv, mask, num_tokens=10)
    assert loss10.item() == pytest.approx(-(1.5 + 0.5) / 10)
    # negative advantage: ratio 0.5 < 0.8 is clipped up, ratio 1.5 is not
    loss, stats = pg_loss(logp_new, logp_old, -adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2) and float(stats["clipped"]) == 1.0


def test_kl_k3_and_penalty():
    logp_new = torch.tensor([[math.log(0.5), math.log(0.25)]])
    logp_ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    k3 = kl_k3(logp_new, logp_ref)
    assert torch.allclose(k3, torch.tensor([[0.5 - math.log(0.5) - 1, 0.0]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv0 = torch.zeros(1)
    loss, stats = pg_loss(logp_new, logp_new, adv0, mask, kl_coef=0.1, logp_ref_B_T=logp_ref)
    assert loss.item() == pytest.approx(0.1 * k3.sum().item() / 2)
    assert float(stats["kl_sum"]) == pytest.approx(k3.sum().item())


def test_constant_group_contributes_nothing():
    adv_B = group_advantages(torch.tensor([[1.0, 1.0]])).flatten()
    logp = torch.randn(2, 3, requires_grad=True)
    loss, _ = pg_loss(logp, logp.detach() - 0.3, adv_B, torch.ones(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logp.grad) == 0
