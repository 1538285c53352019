"""VQ bottleneck: nearest-neighbour assignment, straight-through gradients, losses, usage counting."""
import pytest
import torch
import torch.nn.functional as F

from vfmtok.tokenizer.layers import VectorQuantizer, entropy_loss


def make_quantizer(size=16, dim=4, **kwargs) -> VectorQuantizer:
    torch.manual_seed(0)
    vq = VectorQuantizer(size, dim, **kwargs)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    return vq


def test_assigns_the_nearest_normalised_code():
    vq = make_quantizer()
    z = torch.randn(3, 5, 4)
    z_q, indices, _ = vq(z)
    codes = F.normalize(vq.embedding.weight, dim=-1)
    brute = torch.cdist(F.normalize(z, dim=-1).reshape(-1, 4), codes).argmin(-1).view(3, 5)
    assert torch.equal(indices, brute)
    torch.testing.assert_close(z_q, codes[brute])
    torch.testing.assert_close(vq.lookup(indices), codes[brute])


def test_straight_through_gradient_is_the_gradient_of_the_normalisation():
    vq = make_quantizer()
    z = torch.randn(2, 6, 4, requires_grad=True)
    upstream = torch.randn(2, 6, 4)
    z_q, _, _ = vq(z)
    (z_q * upstream).sum().backward()
    z_ref = z.detach().clone().requires_grad_()
    (F.normalize(z_ref, dim=-1) * upstream).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    # The output path gives the codebook no gradient: only the codebook loss trains it.
    assert vq.embedding.weight.grad is None or torch.all(vq.embedding.weight.grad == 0)


def test_losses_match_closed_form_and_train_only_their_side():
    vq = make_quantizer(commitment_beta=0.25)
    z = torch.randn(2, 6, 4, requires_grad=True)
    _, indices, losses = vq(z)
    zn = F.normalize(z.detach(), dim=-1)
    codes = F.normalize(vq.embedding.weight.detach(), dim=-1)[indices]
    expected = ((codes - zn) ** 2).mean()
    torch.testing.assert_close(losses["codebook"], expected)
    torch.testing.assert_close(losses["commitment"], 0.25 * expected)
    losses["codebook"].backward()
    assert z.grad is None and vq.embedding.weight.grad is not None
    vq.embedding.weight.grad = None
    losses["commitment"].backward()
    assert z.grad is not None and vq.embedding.weight.grad is None


def test_entropy_loss_matches_hand_computation():
    affinity = torch.tensor([[0.02, 0.0], [0.0, 0.01]])
    p = torch.softmax(affinity / 0.01, -1)
    avg = p.mean(0)
    expected = -(p * torch.log(p)).sum(-1).mean() + (avg * torch.log(avg + 1e-5)).sum()
    torch.testing.assert_close(entropy_loss(affinity, 0.01), expected)
    vq = make_quantizer(entropy_weight=0.1)
    assert "entropy" in vq(torch.randn(1, 3, 4))[2]


def test_usage_counts_codes_in_a_rolling_window():
    vq = make_quantizer(size=8, dim=4, usage_window=6)
    vq.train()
    codes = F.normalize(vq.embedding.weight.detach(), dim=-1)
    assert vq.usage() == 0.0  # an empty window counts no code (not "code 0")
    vq(codes[[1, 1, 2]][None])
    assert vq.usage() == pytest.approx(2 / 8)
    vq(codes[[3, 4, 5, 6]][None])  # window of 6 keeps [1, 2, 3, 4, 5, 6]: code 1 once, the first 1 fell out
    assert sorted(vq.recent_indices.tolist()) == [1, 2, 3, 4, 5, 6]
    assert vq.usage() == pytest.approx(6 / 8)
    vq.eval()
    vq(codes[[7]][None])  # evaluation does not count
    assert vq.usage() == pytest.approx(6 / 8)


def test_lookup_rejects_out_of_range_indices():
    vq = make_quantizer(size=8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        vq.lookup(torch.tensor([[0, 8]]))
    with pytest.raises(TypeError, match="integers"):
        vq.lookup(torch.tensor([[0.5]]))
