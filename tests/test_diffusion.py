import pytest
import torch
from diffusers import DDPMScheduler

from minisd import diffusion
from minisd.diffusion import NoiseSchedule, add_noise, drop_captions, training_loss

# SD 1.5's scheduler_config.json, as the real file reads
SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "clip_sample": False, "trained_betas": None}


def test_sd15_alphas_cumprod_endpoints():
    abar = NoiseSchedule.sd15().alphas_cumprod
    assert abar.shape == (1000,) and abar.dtype == torch.float32
    # the values REFERENCE.md records for SD 1.5
    assert abar[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert abar[-1].item() == pytest.approx(0.0046601, rel=1e-4)
    assert bool((abar[1:] < abar[:-1]).all())


@pytest.mark.parametrize("schedule,config", [
    (NoiseSchedule.sd15(), SD15),
    (NoiseSchedule.ddpm(), {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}),
])
def test_schedule_equals_diffusers(schedule, config):
    ref = DDPMScheduler.from_config(config)
    torch.testing.assert_close(schedule.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)


def test_add_noise_equals_diffusers():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ref = DDPMScheduler.from_config(SD15).add_noise(x0, noise, t)
    torch.testing.assert_close(add_noise(x0, noise, t), ref, rtol=0, atol=0)
    # an int t applies to the whole batch
    torch.testing.assert_close(add_noise(x0, noise, 500), add_noise(x0, noise, torch.full((6,), 500)))


def test_add_noise_keeps_unit_variance():
    # signal and noise variances add to 1 at every t: x_t stays ~N(0, 1) if x0 is
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 200_000, generator=g), torch.randn(2, 200_000, generator=g)
    x_t = add_noise(x0, noise, torch.tensor([10, 900]))
    assert x_t.std(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=0.01)


def test_add_noise_rejects_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        add_noise(x, torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        add_noise(x, x, 1000)
    with pytest.raises(TypeError, match="integer"):
        add_noise(x, x, torch.tensor([0.5, 0.5]))


def test_training_loss_is_mse_to_the_noise():
    # a model that returns exactly the noise it was given gets loss 0; the same draw of
    # (t, eps) for the same generator seed lets us rebuild x_t and check what the model saw
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    context = torch.zeros(3, 77, 16)
    seen = {}

    def model(x_t, t, c):
        seen.update(x_t=x_t, t=t, c=c)
        return torch.zeros_like(x_t)

    loss = training_loss(model, x0, context, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(seen["t"], t) and seen["c"] is context
    torch.testing.assert_close(seen["x_t"], DDPMScheduler.from_config(SD15).add_noise(x0, eps, t))
    torch.testing.assert_close(loss, (eps ** 2).mean())

    def oracle(x_t, t, c):
        return eps

    assert training_loss(oracle, x0, context, generator=torch.Generator().manual_seed(3)).item() == 0.0


def test_drop_captions_rate():
    captions = [f"caption {i}" for i in range(20_000)]
    out = drop_captions(captions, p=0.1, generator=torch.Generator().manual_seed(0))
    dropped = sum(o == "" for o in out)
    assert 0.09 < dropped / len(captions) < 0.11
    # the rest are untouched and in order
    assert all(o == c for o, c in zip(out, captions) if o != "")
    assert drop_captions(captions[:50], p=0.0) == captions[:50]
    assert drop_captions(captions[:50], p=1.0) == [""] * 50
    with pytest.raises(ValueError, match="probability"):
        drop_captions(captions, p=10)


def test_module_is_exported():
    import minisd
    assert minisd.diffusion is diffusion
