import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, LCMScheduler, PNDMScheduler)

import minisd
from minisd.schedulers import DDIM, SCHEDULERS, make_scheduler

# SD 1.5's scheduler_config.json as the real file reads (diffusers 0.6.0 wrote it: no
# timestep_spacing, no prediction_type, so each class keeps its own default for those)
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}

THEIRS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
          "dpm++2m": DPMSolverMultistepScheduler, "pndm": PNDMScheduler, "lcm": LCMScheduler}
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
    with pytest.raises(ValueError, match="t=1000, past the last training step 999"):
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

@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "dpm++2m", "pndm", "lcm"])
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
    sched = DDIM(SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))  # DDPM's betas
    x0, noise = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    torch.testing.assert_close(sched.add_noise(x0, noise, 500), add_noise(x0, noise, 500, NoiseSchedule.ddpm()))
    assert not torch.allclose(sched.add_noise(x0, noise, 500), add_noise(x0, noise, 500))


# --- the scheduler file configures every sampler, as diffusers' from_config ------------------
from minisd.schedulers import SchedulerConfig  # noqa: E402

# SD 1.5's file as a current diffusers writes it (it names the spacing)
LEADING = {**SD15, "_diffusers_version": "0.42.1", "timestep_spacing": "leading", "prediction_type": "epsilon"}
# SD 2.1's (768-v) scheduler_config.json as the real file reads: DDIM, v-prediction, no spacing named
SD21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
# a zero-terminal-SNR fine-tune's file (Lin et al. 2024): "trailing" spacing, rescaled betas
ZERO_SNR = {**SD21, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
# the fields SD's files leave at one value: the cosine schedule, clipping, abar = 1 at the end
COSINE = {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "clip_sample": True,
          "set_alpha_to_one": True, "skip_prk_steps": True, "timestep_spacing": "linspace"}
FILES = {"sd15": SD15, "leading": LEADING, "sd21-v": SD21, "zero-snr": ZERO_SNR, "cosine": COSINE}
LOADED = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}


def reference_from(file, name):
    """What a diffusers user runs: the pipeline loads the file's class, then Cls.from_config(its config)."""
    loaded = LOADED[file["_class_name"]].from_config(file)
    return THEIRS[name].from_config(loaded.config)


def exact_model(x, t, abar, prediction_type, scale=1.0):
    """A stand-in U-Net: the exact E[eps | x_t] (or v) for data x0 ~ N(scale * MU, 0.5^2)."""
    a = abar[int(round(float(t)))]
    mu = scale * MU[: len(x)]
    eps = (1 - a) ** 0.5 * (x - a ** 0.5 * mu) / (a * 0.25 + 1 - a)
    if prediction_type == "epsilon":
        return eps
    x0 = mu + 0.25 * a ** 0.5 * (x - a ** 0.5 * mu) / (a * 0.25 + 1 - a)
    return a ** 0.5 * eps - (1 - a) ** 0.5 * x0


@pytest.mark.parametrize("file", list(FILES))
@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_honours_the_file_as_diffusers(name, file):
    if name == "lcm" and file == "zero-snr":
        pytest.skip("LCM starts at t = 999, where zero terminal SNR makes abar = 0 and x0 = x / 0 (nan in diffusers too)")
    config = SchedulerConfig.from_dict(FILES[file])
    ours, theirs = make_scheduler(name, config), reference_from(FILES[file], name)
    abar = config.alphas_cumprod(config.rescale_betas_zero_snr)
    scale = 3.0 if file == "cosine" else 1.0  # data beyond [-1, 1], so that clip_sample matters
    for n in (10, 25):
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert torch.equal(ours.timesteps, theirs.timesteps), (name, file, n)
        torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma, dtype=torch.float32),
                                   torch.as_tensor(theirs.init_noise_sigma, dtype=torch.float32))
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n))
        x_ours, x_theirs = noise * ours.init_noise_sigma, noise * theirs.init_noise_sigma
        g_ours, g_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        for t in theirs.timesteps:
            inp_ours, inp_theirs = ours.scale_model_input(x_ours, t), theirs.scale_model_input(x_theirs, t)
            torch.testing.assert_close(inp_ours, inp_theirs, rtol=1e-5, atol=1e-5)
            x_ours = ours.step(exact_model(inp_ours, t, abar, config.prediction_type, scale), t, x_ours,
                               generator=g_ours)
            kw = {} if name == "pndm" else {"generator": g_theirs}
            x_theirs = theirs.step(exact_model(inp_theirs, t, abar, config.prediction_type, scale), t, x_theirs,
                                   **kw).prev_sample
            torch.testing.assert_close(x_ours, x_theirs, rtol=1e-5, atol=1e-5, msg=f"{name}, {file}, t={t}")
        assert x_ours.abs().max() < 10 * scale


def test_sd_files_read_as_their_presets():
    assert SchedulerConfig.from_dict(SD15) == SchedulerConfig.sd15()
    assert SchedulerConfig.from_dict(SD21) == SchedulerConfig.sd21()
    assert SchedulerConfig.from_dict(LEADING).timestep_spacing == "leading"
    # a file that names nothing takes diffusers' defaults; spacing stays the sampler's own
    empty = SchedulerConfig.from_dict({})
    assert (empty.beta_schedule, empty.steps_offset, empty.clip_sample) == ("linear", 0, True)
    assert make_scheduler("ddim", empty).spacing == "leading" and make_scheduler("euler", empty).spacing == "linspace"


def test_the_spacings_as_lin_et_al_table_2():
    def steps(spacing, name="ddim"):
        s = make_scheduler(name, SchedulerConfig(**{**vars(SchedulerConfig.sd15()), "timestep_spacing": spacing}))
        s.set_timesteps(10)
        return s.timesteps.tolist()
    assert steps("leading") == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert steps("linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert steps("trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


def test_zero_terminal_snr_reaches_pure_noise():
    abar = SchedulerConfig.from_dict(ZERO_SNR).alphas_cumprod(rescale=True)
    assert abar[-1] == 0 and abs(abar[0] - SchedulerConfig.sd15().alphas_cumprod(False)[0]) < 1e-6
    assert make_scheduler("euler", SchedulerConfig.from_dict(ZERO_SNR)).alphas_cumprod[-1] == 2 ** -24


@pytest.mark.parametrize("key, value", [("use_karras_sigmas", True), ("thresholding", True),
                                        ("prediction_type", "sample"), ("timestep_spacing", "karras"),
                                        ("beta_schedule", "sigmoid"), ("shift", 3.0)])
def test_unsupported_fields_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=f"{key}={value!r}".replace("(", r"\(")):
        SchedulerConfig.from_dict({**SD15, key: value})


def test_default_valued_extras_pass_and_prk_is_refused():
    theirs = DPMSolverMultistepScheduler.from_config(SD15)
    SchedulerConfig.from_dict(dict(theirs.config))  # every key diffusers writes, at its default
    SchedulerConfig.from_dict(dict(EulerDiscreteScheduler.from_config(SD15).config))
    no_prk = SchedulerConfig.from_dict({**SD15, "skip_prk_steps": False})
    make_scheduler("ddim", no_prk)
    with pytest.raises(ValueError, match="skip_prk_steps=False"):
        make_scheduler("pndm", no_prk)


# --- LCM (chapter 15): few steps from the distillation schedule --------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_lcm_few_steps_equal_diffusers(n):
    """1-8 steps, the ones LCM is made for: the same timesteps, and the same run step by step
    (the re-noising between steps draws from generators seeded alike)."""
    ours, theirs = make_scheduler("lcm"), reference("lcm")
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x_ours = x_theirs = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n))
    g_ours, g_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in theirs.timesteps:
        x_ours = ours.step(fake_unet(x_ours, t), t, x_ours, generator=g_ours)
        out = theirs.step(fake_unet(x_theirs, t), t, x_theirs, generator=g_theirs)
        x_theirs = out.prev_sample
        torch.testing.assert_close(x_ours, x_theirs, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.pred_x0, out.denoised, rtol=0, atol=1e-5)
    assert torch.equal(x_ours, ours.pred_x0)                      # the last step returns the clean guess


def test_lcm_timesteps_and_boundary_condition():
    s = make_scheduler("lcm")
    steps = {}
    for n in (1, 2, 4, 8):
        s.set_timesteps(n)
        steps[n] = s.timesteps.tolist()
    assert steps == {1: [999], 2: [999, 499], 4: [999, 759, 499, 259], 8: [999, 879, 759, 639, 499, 379, 259, 139]}
    assert s.origin_timesteps()[:3].tolist() == [19, 39, 59]      # k = 1000 // 50 = 20
    c_skip, c_out = s.boundary(0)
    assert (c_skip.item(), c_out.item()) == (1.0, 0.0)            # f(x, 0) = x
    c_skip, c_out = s.boundary(19)
    assert c_skip < 1e-5 and c_out > 0.99999                      # elsewhere f is the x0 guess
    with pytest.raises(ValueError, match="1 to 50 steps"):
        s.set_timesteps(51)


def test_lcm_is_stochastic_between_steps_only():
    def run(n, seed):
        s = make_scheduler("lcm")
        s.set_timesteps(n)
        x = torch.ones(1, 4, 8, 8)
        g = torch.Generator().manual_seed(seed)
        for t in s.timesteps:
            x = s.step(fake_unet(x, t), t, x, generator=g)
        return x
    assert torch.equal(run(1, 0), run(1, 1))                      # one step draws no noise
    assert not torch.allclose(run(4, 0), run(4, 1))


def test_an_lcm_scheduler_file_reads_and_names_lcm(tmp_path):
    """An LCM model's folder (its scheduler file is LCMScheduler's): every key diffusers writes is read,
    and the pipeline's default sampler becomes "lcm"; a distillation schedule other than 50 points is refused."""
    import json
    from minisd.pipeline import folder_scheduler
    written = {"_class_name": "LCMScheduler", **dict(LCMScheduler.from_config(SD15).config)}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(written))
    config, name, _ = folder_scheduler(tmp_path)
    assert name == "lcm" and (config.beta_schedule, config.beta_end, config.steps_offset) == ("scaled_linear", 0.012, 1)
    with pytest.raises(ValueError, match="original_inference_steps=25"):
        SchedulerConfig.from_dict({**written, "original_inference_steps": 25})
