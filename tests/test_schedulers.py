import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)

import minisd
from minisd.schedulers import DDIM, SCHEDULERS, make_scheduler

# SD 1.5's scheduler_config.json as the real file reads (diffusers 0.6.0 wrote it: no
# timestep_spacing, no prediction_type, so each class keeps its own default for those)
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}

THEIRS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
          "dpm++2m": DPMSolverMultistepScheduler, "pndm": PNDMScheduler}
NAMES = list(THEIRS)


def reference(name):
    # the way a pipeline swaps samplers: from the config of the PNDM scheduler it loaded
    loaded = PNDMScheduler.from_config(SD15)
    return THEIRS[name].from_config(loaded.config)


def test_names_match_the_api():
    assert list(SCHEDULERS) == NAMES


@pytest.mark.parametrize("n", [10, 25, 50])
@pytest.mark.parametrize("name", NAMES)
def test_timesteps_equal_diffusers(name, n):
    ours, theirs = make_scheduler(name), reference(name)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    assert torch.equal(ours.timesteps, theirs.timesteps)
    torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma, dtype=torch.float32),
                               torch.as_tensor(theirs.init_noise_sigma, dtype=torch.float32))


def test_documented_timesteps():
    # the values REFERENCE.md records for 50 steps
    s = {name: make_scheduler(name) for name in NAMES}
    for x in s.values():
        x.set_timesteps(50)
    assert s["ddim"].timesteps[:3].tolist() == [981, 961, 941] and s["ddim"].timesteps[-1] == 1
    assert len(s["pndm"].timesteps) == 51 and s["pndm"].timesteps[:4].tolist() == [981, 961, 961, 941]
    assert s["euler"].timesteps[0] == 999.0 and s["euler"].timesteps[-1] == 0.0
    assert s["euler"].init_noise_sigma.item() == pytest.approx(14.6146, abs=1e-4)
    assert s["dpm++2m"].timesteps[:2].tolist() == [999, 979] and s["dpm++2m"].timesteps[-1] == 20


ABAR = minisd.diffusion.NoiseSchedule.sd15().alphas_cumprod
MU = torch.sin(torch.arange(2 * 4 * 8 * 8) * 0.37).view(2, 4, 8, 8)  # a fixed "image"


def fake_unet(x, t):
    """A fixed stand-in for the U-Net: the exact eps for data x0 ~ N(MU, 0.5^2), a smooth
    function of x and t that keeps the run at the scale of real latents."""
    a = ABAR[int(round(float(t)))]
    return (1 - a) ** 0.5 * (x - a ** 0.5 * MU[: len(x)]) / (a * 0.25 + 1 - a)


@pytest.mark.parametrize("n", [10, 25, 50])
@pytest.mark.parametrize("name", NAMES)
def test_whole_run_equals_diffusers(name, n):
    ours, theirs = make_scheduler(name), reference(name)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n))
    x_ours, x_theirs = noise * ours.init_noise_sigma, noise * theirs.init_noise_sigma
    # the stochastic samplers draw from generators seeded alike, so both see the same noise
    g_ours, g_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in theirs.timesteps:
        inp_ours, inp_theirs = ours.scale_model_input(x_ours, t), theirs.scale_model_input(x_theirs, t)
        torch.testing.assert_close(inp_ours, inp_theirs, rtol=0, atol=1e-5)
        x_ours = ours.step(fake_unet(inp_ours, t), t, x_ours, generator=g_ours)
        kw = {} if name == "pndm" else {"generator": g_theirs}  # diffusers' PNDM takes no generator
        out = theirs.step(fake_unet(inp_theirs, t), t, x_theirs, **kw)
        x_theirs = out.prev_sample
        torch.testing.assert_close(x_ours, x_theirs, rtol=0, atol=1e-5, msg=f"{name}, t={t}")
        if getattr(out, "pred_original_sample", None) is not None:
            torch.testing.assert_close(ours.pred_x0, out.pred_original_sample, rtol=0, atol=1e-5)
    assert x_ours.abs().max() < 5  # the run stayed at the data's scale on both sides


def test_pndm_order_caps_the_blend():
    from minisd.schedulers import PNDM
    n = 10
    # order 1: after the warm-up (the first three calls) every PLMS step is DDIM's step
    plms1, ddim = PNDM(order=1), DDIM()
    plms1.set_timesteps(n)
    ddim.set_timesteps(n)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(plms1.timesteps):
        eps = fake_unet(x, t)
        x_next = plms1.step(eps, t, x)
        if k >= 3:
            torch.testing.assert_close(x_next, ddim.step(eps, t, x), rtol=0, atol=1e-6)
        x = x_next
    # the default is PLMS's order 4 (what diffusers runs); lower orders give other runs
    finals = {}
    for order in (2, 3, 4):
        s = PNDM(order=order)
        s.set_timesteps(n)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in s.timesteps:
            x = s.step(fake_unet(x, t), t, x)
        finals[order] = x
    assert PNDM().order == 4
    assert not torch.equal(finals[2], finals[4]) and not torch.equal(finals[3], finals[4])
    with pytest.raises(ValueError, match="order must be 1, 2, 3 or 4"):
        PNDM(order=5)


def test_ddim_with_eta_equals_diffusers():
    ours, theirs = DDIM(eta=1.0), reference("ddim")
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    x_ours = x_theirs = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g_ours, g_theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for t in theirs.timesteps:
        x_ours = ours.step(fake_unet(x_ours, t), t, x_ours, generator=g_ours)
        x_theirs = theirs.step(fake_unet(x_theirs, t), t, x_theirs, eta=1.0, generator=g_theirs).prev_sample
        torch.testing.assert_close(x_ours, x_theirs, rtol=0, atol=1e-5)


def test_ddpm_is_stochastic_and_ddim_is_not():
    def run(name, seed):
        s = make_scheduler(name)
        s.set_timesteps(10)
        x = torch.ones(1, 4, 8, 8)
        g = torch.Generator().manual_seed(seed)
        for t in s.timesteps:
            x = s.step(fake_unet(x, t), t, x, generator=g)
        return x

    assert not torch.allclose(run("ddpm", 0), run("ddpm", 1))
    assert torch.equal(run("ddim", 0), run("ddim", 1))


def test_pred_x0_with_the_true_noise_is_x0():
    # if the model's eps is the noise that was really added, every sampler's x0 guess is exact
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for name in ["ddpm", "ddim", "euler", "dpm++2m"]:
        s = make_scheduler(name)
        s.set_timesteps(10)
        t = s.timesteps[3]
        abar = s.alphas_cumprod[int(round(float(t)))]
        x_t = abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps
        if name == "euler":
            x_t = x_t / abar ** 0.5  # Euler's sample lives at scale x0 + sigma * eps
        s.step(eps, t, x_t, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(s.pred_x0, x0, rtol=0, atol=1e-4, msg=name)


def test_bad_use_raises_clear_errors():
    with pytest.raises(ValueError, match="ddpm.*ddim.*euler.*dpm\\+\\+2m.*pndm"):
        make_scheduler("k_lms")
    s = make_scheduler("ddim")
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1), 981, torch.zeros(1))
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="at most 999 steps"):
        s.set_timesteps(1000)  # "leading" + steps_offset=1 would start at t=1000
    euler = make_scheduler("euler")
    euler.set_timesteps(1000)  # "linspace" has no such limit
    assert euler.timesteps[0] == 999.0
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of"):
        s.step(torch.zeros(1), 500, torch.zeros(1))


def test_module_is_exported():
    assert minisd.schedulers.make_scheduler is make_scheduler


# --- noising (img2img's start) belongs to the sampler ----------------------------------------

@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "dpm++2m", "pndm"])
def test_add_noise_equals_diffusers(name):
    """Each sampler noises x0 to a timestep of its own chain as its diffusers class does
    (Euler: x0 + sigma noise; the others: sqrt(abar) x0 + sqrt(1 - abar) noise)."""
    ours, theirs = make_scheduler(name), reference(name)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = ours.timesteps[3]
    if name == "euler":
        theirs.set_begin_index(3)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t[None].repeat(2)),
                               rtol=1e-5, atol=1e-5)


def test_add_noise_uses_the_samplers_own_schedule():
    from minisd.diffusion import NoiseSchedule, add_noise
    sched = DDIM(NoiseSchedule.ddpm())
    x0, noise = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    torch.testing.assert_close(sched.add_noise(x0, noise, 500), add_noise(x0, noise, 500, NoiseSchedule.ddpm()))
    assert not torch.allclose(sched.add_noise(x0, noise, 500), add_noise(x0, noise, 500))
