"""Chapter 6: the pieces of the VAE's training objective behave as the chapter says."""
import pytest
import torch

from minisd import losses
from minisd.vae import DiagonalGaussian


def test_l1_is_mean_absolute_error_and_foreground_weight_counts_shape_pixels():
    x = -torch.ones(1, 3, 4, 4)
    x[0, 0, 0, 0] = 1.0                     # one red pixel on black
    y = x.clone()
    y[0, 0, 0, 0] = 0.0                     # off by 1 on one of 48 numbers
    assert losses.l1_loss(x, y).item() == pytest.approx(1 / 48)
    w = losses.foreground_weight(x, boost=9.0)
    assert w.shape == (1, 1, 4, 4) and w[0, 0, 0, 0] == 10.0 and w.sum() == 10 + 15
    assert losses.l1_loss(x, y, w).item() == pytest.approx(10 / 48)


def test_kl_of_standard_normal_posterior_is_zero_and_positive_otherwise():
    zeros = torch.zeros(2, 8, 3, 3)         # mean 0, logvar 0: exactly N(0, I)
    assert losses.kl_loss(DiagonalGaussian(zeros)).item() == 0.0
    moments = torch.zeros(2, 8, 3, 3)
    moments[:, :4] = 1.0                    # mean 1 everywhere: KL = 0.5 * 1 per number
    assert losses.kl_loss(DiagonalGaussian(moments)).item() == pytest.approx(0.5 * 4 * 9)


def test_hinge_loss_on_known_logits():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-3.0, 1.0])
    # real: relu(1-2)=0, relu(1-0)=1 -> mean 0.5; fake: relu(1-3)=0, relu(1+1)=2 -> mean 1
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 1.0))
    assert losses.hinge_d_loss(torch.tensor([1.0]), torch.tensor([-1.0])).item() == 0.0
    assert losses.generator_adv_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_discriminator_gives_one_logit_per_patch():
    torch.manual_seed(0)
    d = losses.PatchDiscriminator(width=8, n_layers=3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)   # pix2pix's 70x70 PatchGAN grid
    d = losses.PatchDiscriminator(width=8, n_layers=1)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 14, 14)


def test_disc_factor_switches_on_at_start_step():
    assert losses.disc_factor(99, start=100) == 0.0
    assert losses.disc_factor(100, start=100) == 1.0


def test_adaptive_weight_is_ratio_of_gradient_norms():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (3.0 * w).sum()                   # grad (3, 3): norm 3*sqrt(2)
    adv = (w * torch.tensor([0.0, 1.0])).sum()   # grad (0, 1): norm 1
    got = losses.adaptive_weight(rec, adv, w, scale=0.5)
    assert got.item() == pytest.approx(0.5 * 3 * 2 ** 0.5 / (1 + 1e-4), rel=1e-6)
    assert not got.requires_grad


def test_perceptual_loss_zero_for_identical_images_positive_otherwise():
    torch.manual_seed(0)
    feats = losses.RandomFeatures(channels=(8, 16), seed=0)
    lp = losses.PerceptualLoss(feats, channels=(8, 16))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(lp(x, x), torch.zeros(2))
    d = lp(x, x.flip(-1))
    assert d.shape == (2,) and (d > 0).all()
    # negative lambdas count as 0: the distance can never go below 0
    for w in lp.weights:
        w.data.fill_(-1.0)
    assert torch.equal(lp(x, x.flip(-1)), torch.zeros(2))


def test_random_features_are_fixed_by_the_seed_and_frozen():
    a, b = losses.RandomFeatures(seed=3), losses.RandomFeatures(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not any(p.requires_grad for p in a.parameters())
    c = losses.RandomFeatures(seed=4)
    assert not torch.equal(a.stages[0][0].weight, c.stages[0][0].weight)


def test_vector_quantizer_snaps_to_nearest_code_with_straight_through_gradient():
    vq = losses.VectorQuantizer(num_codes=3, dim=2, beta=0.25)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    z = torch.tensor([[0.9, 0.8], [-0.8, 1.7]]).t().reshape(1, 2, 1, 2).requires_grad_(True)  # two latent pixels
    zq, loss, idx = vq(z)
    assert idx.tolist() == [[[1, 2]]]
    assert torch.equal(zq.detach(), torch.tensor([[1.0, -1.0], [1.0, 2.0]]).reshape(1, 2, 1, 2))
    # codebook + 0.25 * commitment, both the same mean squared distance here
    mse = ((torch.tensor([0.1, 0.2, 0.2, 0.3]) ** 2).mean()).item()
    assert loss.item() == pytest.approx(1.25 * mse)
    # straight-through: d(sum(zq * g))/dz == g, though argmin has no gradient
    g = torch.randn(1, 2, 1, 2)
    (zq * g).sum().backward()
    assert torch.equal(z.grad, g)


def test_vector_quantizer_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="channels"):
        losses.VectorQuantizer(num_codes=4, dim=4)(torch.zeros(1, 3, 2, 2))


def test_psnr_of_known_error():
    x = torch.zeros(1, 3, 2, 2)
    # error 0.02 everywhere on a [-1, 1] scale: mse 4e-4, PSNR = 10 log10(4 / 4e-4) = 40 dB
    assert losses.psnr(x, x + 0.02).item() == pytest.approx(40.0, abs=1e-3)
