"""minisd.pipeline (chapter 11): the same images as diffusers' StableDiffusionPipeline on the
same weights and initial latents, every sampler; img2img; defaults; errors; the CLI."""
import gc
import json
import warnings

import numpy as np
import pytest
import torch

import minisd
from minisd import StableDiffusion, checkpoint, weights
from minisd.pipeline import main
from reference_sd import (SCHEDULER_CLASSES, SD15_SCHEDULER, SD15_TEXT, SD15_UNET, SD15_VAE, SD21_SCHEDULER, SD21_TEXT,
                          SD21_UNET, TINY2_TEXT, TINY2_UNET, reference_pipeline, use_scheduler)

PROMPTS = ["a red circle in the top left", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd") / "sd"
    ref = reference_pipeline(folder)
    return ref, StableDiffusion.from_pretrained(folder), folder


def initial_latents(n=2, size=8, seed=0):
    return torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "dpm++2m", "ddpm", "lcm"])
def test_each_scheduler_equals_diffusers(tiny, name):
    ref, ours, _ = tiny
    use_scheduler(ref, name)
    x = initial_latents()
    theirs = ref(PROMPTS, negative_prompt=["", "blurry"], height=16, width=16, num_inference_steps=4,
                 guidance_scale=7.5, latents=x, output_type="np", generator=torch.Generator().manual_seed(1)).images
    image = ours(PROMPTS, negative_prompt=["", "blurry"], height=16, width=16, steps=4, guidance=7.5,
                 scheduler=name, latents=x, output_type="np", seed=1, progress=False)
    assert image.shape == theirs.shape == (2, 16, 16, 3)
    assert theirs.std() > 0.05  # a real image-like spread, not a constant
    np.testing.assert_allclose(image, theirs, atol=1e-5, rtol=0)


def test_other_sizes_equal_diffusers(tiny):
    """A wide image at a size the model was not made for (24x40 px, latents 12x20); sizes whose
    latents the U-Net cannot halve evenly are checked in test_unet."""
    ref, ours, _ = tiny
    use_scheduler(ref, "ddim")
    x = torch.randn(1, 4, 12, 20, generator=torch.Generator().manual_seed(4))
    theirs = ref(PROMPTS[0], height=24, width=40, num_inference_steps=3, guidance_scale=7.5, latents=x,
                 output_type="np").images
    image = ours(PROMPTS[0], height=24, width=40, steps=3, guidance=7.5, scheduler="ddim", latents=x,
                 output_type="np", progress=False)
    assert image.shape == theirs.shape == (1, 24, 40, 3)
    np.testing.assert_allclose(image, theirs, atol=1e-5, rtol=0)


def test_seed_draws_the_same_noise_as_diffusers(tiny):
    ref, ours, _ = tiny
    use_scheduler(ref, "pndm")
    theirs = ref(PROMPTS[0], height=16, width=16, num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(7)).images
    image = ours(PROMPTS[0], height=16, width=16, steps=3, output_type="np", seed=7, progress=False)
    np.testing.assert_allclose(image, theirs, atol=1e-5, rtol=0)
    other = ours(PROMPTS[0], height=16, width=16, steps=3, output_type="np", seed=8, progress=False)
    assert np.abs(other - image).max() > 0.01


def test_no_guidance_runs_the_cond_branch_only(tiny):
    ref, ours, _ = tiny
    use_scheduler(ref, "ddim")
    x = initial_latents(1)
    theirs = ref(PROMPTS[0], height=16, width=16, num_inference_steps=3, guidance_scale=1.0, latents=x,
                 output_type="np").images
    image = ours(PROMPTS[0], height=16, width=16, steps=3, guidance=1.0, scheduler="ddim", latents=x,
                 output_type="np", progress=False)
    np.testing.assert_allclose(image, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["pndm", "euler"])
def test_img2img_equals_diffusers(tiny, name):
    import diffusers
    ref, ours, _ = tiny
    ref2 = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    use_scheduler(ref2, name)
    ref2.set_progress_bar_config(disable=True)
    init = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    theirs = ref2(PROMPTS[0], image=init, strength=0.6, num_inference_steps=5, output_type="np",
                  generator=torch.Generator().manual_seed(2)).images
    image = ours.img2img(PROMPTS[0], init, strength=0.6, steps=5, scheduler=name, seed=2, output_type="np",
                         progress=False)
    np.testing.assert_allclose(image, theirs, atol=1e-5, rtol=0)


def test_latent_output_replays_exactly(tiny):
    _, ours, _ = tiny
    x = initial_latents(1)
    a = ours(PROMPTS[0], steps=2, output_type="latent", latents=x, progress=False)
    b = ours(PROMPTS[0], steps=2, output_type="latent", latents=x, progress=False)
    assert a.shape == (1, 4, 8, 8) and torch.equal(a, b)


def test_defaults_come_from_the_model(tiny):
    _, ours, _ = tiny
    assert (ours.steps, ours.guidance, ours.scheduler) == (50, 7.5, "pndm")   # SD 1.5's
    images = ours(PROMPTS[0], steps=1, seed=0, progress=False)                  # size: 8 latents x factor 2
    assert len(images) == 1 and images[0].size == (16, 16) and images[0].mode == "RGB"
    images = ours(PROMPTS, steps=1, seed=0, progress=False)
    assert len(images) == 2


def test_progress_bar_is_shown(tiny, capsys):
    _, ours, _ = tiny
    ours(PROMPTS[0], steps=2, seed=0)
    assert "sampling" in capsys.readouterr().err


# --- bad input ------------------------------------------------------------------------------

def test_size_must_be_a_multiple(tiny):
    _, ours, _ = tiny
    # the tiny VAE halves the image once (SD's divides it by 8)
    with pytest.raises(ValueError, match=r"height=17 is not a positive multiple of 2.*use e\.g\. height=16"):
        ours(PROMPTS[0], height=17, steps=1)
    with pytest.raises(ValueError, match=r"width=0 is not a positive multiple of 2"):
        ours(PROMPTS[0], width=0, steps=1)


def test_steps_must_be_positive(tiny):
    _, ours, _ = tiny
    with pytest.raises(ValueError, match="steps=0.*>= 1"):
        ours(PROMPTS[0], steps=0)


def test_unknown_scheduler_lists_the_names(tiny):
    _, ours, _ = tiny
    with pytest.raises(ValueError, match=r"unknown scheduler 'k_lms'.*'ddpm', 'ddim', 'euler', 'dpm\+\+2m', 'pndm'"):
        ours(PROMPTS[0], scheduler="k_lms", steps=1)


def test_a_sampler_object_runs_like_its_name(tiny):
    from minisd.schedulers import PNDM
    _, ours, _ = tiny
    by_name = ours(PROMPTS[0], scheduler="pndm", steps=3, seed=1, output_type="np", progress=False)
    by_object = ours(PROMPTS[0], scheduler=PNDM(), steps=3, seed=1, output_type="np", progress=False)
    other = ours(PROMPTS[0], scheduler=PNDM(order=1), steps=6, seed=1, output_type="np", progress=False)
    plms = ours(PROMPTS[0], scheduler=PNDM(), steps=6, seed=1, output_type="np", progress=False)
    assert np.array_equal(by_name, by_object) and not np.array_equal(other, plms)


def test_fp16_on_cpu_says_what_to_use(tiny):
    _, _, folder = tiny
    with pytest.raises(ValueError, match="float16 on the CPU.*float32.*cuda"):
        StableDiffusion.from_pretrained(folder, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 on the CPU.*float32.*cuda"):
        StableDiffusion.course_model(dtype=torch.float16)


def test_long_prompt_warns_truncates_and_runs(tiny):
    ref, ours, _ = tiny
    use_scheduler(ref, "pndm")
    long = " ".join(["a red circle"] * 40)  # 120 tokens
    x = initial_latents(1)
    with pytest.warns(UserWarning, match="tokens were dropped"):
        image = ours(long, steps=2, latents=x, output_type="np", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ref(long, height=16, width=16, num_inference_steps=2, latents=x, output_type="np").images
    np.testing.assert_allclose(image, theirs, atol=1e-5, rtol=0)  # diffusers truncates the same way


def test_latents_of_the_wrong_shape(tiny):
    _, ours, _ = tiny
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 4, 4\).*need \(1, 4, 8, 8\)"):
        ours(PROMPTS[0], steps=1, latents=torch.zeros(1, 4, 4, 4))


def test_course_model_missing_checkpoint_names_the_command(monkeypatch, tmp_path):
    """The error path runs whatever data/ holds: DATA_DIR points at a folder with no checkpoints."""
    monkeypatch.setattr(minisd.paths, "DATA_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"course_vae\.safetensors.*python -m minisd train vae"):
        StableDiffusion.course_model()
    checkpoint.save_checkpoint(tmp_path / "course_vae.safetensors", minisd.AutoencoderKL(minisd.VAEConfig.course()))
    with pytest.raises(FileNotFoundError, match=r"course_clip\.safetensors.*python -m minisd train clip"):
        StableDiffusion.course_model()


def test_course_model_generates_from_the_shipped_checkpoints():
    pipe = StableDiffusion.course_model()
    stored = checkpoint.sampling_settings(checkpoint.course_path("unet"))        # course_unet's metadata
    assert (pipe.steps, pipe.guidance, pipe.scheduler) == (stored["steps"], stored["guidance"], stored["sampler"])
    images = pipe("a red circle in the top left", seed=0, progress=False)
    assert len(images) == 1 and images[0].size == (32, 32)


def test_course_model_loads_the_three_course_checkpoints(monkeypatch, tmp_path):
    """course_model() on random checkpoints written by the trainers' own save functions."""
    from minisd.clip import CLIP, CLIPConfig
    from minisd.train import course_unet_config
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig.course())
    checkpoint.save_checkpoint(tmp_path / "course_vae.safetensors", minisd.AutoencoderKL(minisd.VAEConfig.course()))
    checkpoint.save_checkpoint(tmp_path / "course_clip.safetensors", clip, dtype=torch.float16)
    unet = minisd.UNet(course_unet_config(clip.text.config.width))
    sampling = {"sampler": "euler", "steps": 3, "guidance": 2.5}       # the pipeline's defaults come from the file
    checkpoint.save_checkpoint(tmp_path / "course_unet.safetensors", unet, sampling=sampling)
    (tmp_path / "bpe_simple_vocab_16e6.txt.gz").write_bytes((minisd.DATA_DIR / "bpe_simple_vocab_16e6.txt.gz").read_bytes())
    monkeypatch.setattr(minisd.paths, "DATA_DIR", tmp_path)
    pipe = StableDiffusion.course_model()
    assert (pipe.steps, pipe.guidance, pipe.scheduler) == (3, 2.5, "euler")
    assert pipe.unet.config == unet.config
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), pipe.unet.state_dict().values()))
    images = pipe(["a red circle in the top left"] * 2, seed=0, output_type="np", progress=False)
    assert images.shape == (2, 32, 32, 3)


# --- the terminal ---------------------------------------------------------------------------

def test_generate_command_writes_a_png(tiny, tmp_path, capsys):
    _, _, folder = tiny
    out = tmp_path / "a.png"
    assert main([PROMPTS[0], "--weights", str(folder), "--steps", "2", "--scheduler", "ddim", "--seed", "3",
                 "--out", str(out)]) == 0
    from PIL import Image
    assert Image.open(out).size == (16, 16)
    assert main([PROMPTS[0], "--weights", str(folder), "--size", "17", "--out", str(out)]) == 1
    assert "multiple of 2" in capsys.readouterr().err


# --- the scheduler file configures every sampler (issue 17) -----------------------------------

# SD 1.5's original file; as a current diffusers writes it (naming "leading"); SD 2.1's v file;
# a zero-terminal-SNR fine-tune's "trailing" + rescaled betas (all as in test_schedulers)
SCHEDULER_FILES = {
    "sd15": {"_class_name": "PNDMScheduler", **SD15_SCHEDULER},
    "leading": {"_class_name": "PNDMScheduler", **SD15_SCHEDULER, "timestep_spacing": "leading",
                "prediction_type": "epsilon"},
    "sd21-v": {"_class_name": "DDIMScheduler", **SD15_SCHEDULER, "prediction_type": "v_prediction"},
    "zero-snr": {"_class_name": "DDIMScheduler", **SD15_SCHEDULER, "prediction_type": "v_prediction",
                 "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
}


@pytest.fixture(scope="module")
def scheduler_folders(tiny, tmp_path_factory):
    """The tiny folder once per scheduler file (the weights linked, not copied)."""
    _, _, folder = tiny
    out = {}
    for key, file in SCHEDULER_FILES.items():
        copy = tmp_path_factory.mktemp(key) / "sd"
        copy.mkdir()
        for part in folder.iterdir():
            if part.name != "scheduler":
                (copy / part.name).symlink_to(part)
        (copy / "scheduler").mkdir()
        (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(file))
        out[key] = copy
    return out


@pytest.mark.parametrize("file", list(SCHEDULER_FILES))
@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "dpm++2m", "ddpm"])
def test_each_sampler_under_each_scheduler_file_equals_diffusers(tiny, scheduler_folders, name, file):
    """As a diffusers user runs it: the pipeline loads the folder's scheduler class, then
    Cls.from_config(pipe.scheduler.config) swaps the sampler; ours reads the same file."""
    import diffusers
    ref, _, _ = tiny
    folder = scheduler_folders[file]
    loaded = getattr(diffusers, SCHEDULER_FILES[file]["_class_name"]).from_pretrained(folder, subfolder="scheduler")
    ref.scheduler = getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(loaded.config)
    ours = StableDiffusion.from_pretrained(folder)
    assert ours.scheduler == SCHEDULER_FILES[file]["_class_name"].removesuffix("Scheduler").lower()
    x = initial_latents()
    theirs = ref(PROMPTS, height=16, width=16, num_inference_steps=4, guidance_scale=7.5, latents=x,
                 output_type="np", generator=torch.Generator().manual_seed(1)).images
    image = ours(PROMPTS, height=16, width=16, steps=4, guidance=7.5, scheduler=name, latents=x,
                 output_type="np", seed=1, progress=False)
    assert theirs.std() > 0.05
    d = np.abs(image - theirs).max()
    print(f"{name} under {file}: max |diff| = {d:.1e}")
    assert d <= 1e-3, f"{name} under {file}: max |diff| = {d:.1e}"


def test_the_scheduler_files_change_the_images(scheduler_folders):
    """The four files give four different runs (the parity above is not the same run four times)."""
    x = initial_latents(1)

    def image(file, name):
        return StableDiffusion.from_pretrained(scheduler_folders[file])(
            PROMPTS[0], steps=4, scheduler=name, latents=x, output_type="np", progress=False)

    assert np.abs(image("sd15", "euler") - image("leading", "euler")).max() > 0.01      # linspace vs leading
    assert np.abs(image("sd15", "ddim") - image("sd21-v", "ddim")).max() > 0.01        # epsilon vs v
    assert np.abs(image("sd21-v", "ddim") - image("zero-snr", "ddim")).max() > 0.01    # leading vs trailing, betas


def test_scheduler_file_with_an_unsupported_field_is_refused(tiny, tmp_path):
    _, _, folder = tiny
    copy = tmp_path / "sd"
    copy.mkdir()
    for part in folder.iterdir():
        if part.name != "scheduler":
            (copy / part.name).symlink_to(part)
    (copy / "scheduler").mkdir()
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SD15_SCHEDULER, "use_karras_sigmas": True}))
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        StableDiffusion.from_pretrained(copy)


def test_prediction_type_overrides_the_file(tiny):
    _, _, folder = tiny
    pipe = StableDiffusion.from_pretrained(folder, prediction_type="v_prediction")
    assert pipe.scheduler_config.prediction_type == "v_prediction" and pipe.scheduler_config.steps_offset == 1
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        StableDiffusion.from_pretrained(folder, prediction_type="sample")


# --- SD 2.x ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd2") / "sd"
    ref = reference_pipeline(folder, unet=TINY2_UNET, text=TINY2_TEXT, scheduler=("DDIMScheduler", SD21_SCHEDULER),
                             pad_token="!")
    return ref, StableDiffusion.from_pretrained(folder), folder


def test_sd2_folder_reads_as_sd2(tiny2):
    _, ours, _ = tiny2
    assert ours.unet.config.linear_projection and ours.unet.config.upcast_attention
    assert ours.unet.config.heads == (1, 2) and ours.text_encoder.config.act == "gelu"
    assert ours.tokenizer.pad_id == 0 and ours.scheduler == "ddim"
    assert ours.scheduler_config.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "dpm++2m"])
def test_sd2_folder_equals_diffusers(tiny2, name):
    """A tiny SD 2-style folder (linear projections, GELU text encoder, "!" padding, v-prediction)."""
    ref, ours, _ = tiny2
    use_scheduler(ref, name)
    x = initial_latents()
    theirs = ref(PROMPTS, negative_prompt=["", "blurry"], height=16, width=16, num_inference_steps=4,
                 guidance_scale=7.5, latents=x, output_type="np").images
    image = ours(PROMPTS, negative_prompt=["", "blurry"], height=16, width=16, steps=4, guidance=7.5,
                 scheduler=name, latents=x, output_type="np", progress=False)
    assert theirs.std() > 0.05
    np.testing.assert_allclose(image, theirs, atol=1e-5, rtol=0)


# --- SD 1.5 size ----------------------------------------------------------------------------

@pytest.mark.slow
def test_sd15_folder_and_single_file_equal_diffusers(tmp_path):
    """Random SD 1.5 weights (seeded), 256x256, PNDM, guidance 7.5, 3 steps: diffusers' pipeline
    and ours from the diffusers folder give the same image; ours from one original file (.ckpt,
    which torch.save streams to disk) holds exactly the folder's tensors, so it gives that image
    too. One model in memory at a time; the folder is saved in 500 MB shards."""
    from safetensors import safe_open
    ref = reference_pipeline(tmp_path / "sd15", unet=SD15_UNET, vae=SD15_VAE, text=SD15_TEXT,
                             max_shard_size="500MB")
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    prompt = "a photograph of an astronaut riding a horse"
    theirs = ref(prompt, height=256, width=256, num_inference_steps=3, guidance_scale=7.5, latents=x,
                 output_type="np").images
    del ref
    gc.collect()
    ours = StableDiffusion.from_pretrained(tmp_path / "sd15")
    image = ours(prompt, height=256, width=256, steps=3, guidance=7.5, scheduler="pndm", latents=x,
                 output_type="np", progress=False)
    assert theirs.std() > 0.05
    d = np.abs(image - theirs).max()
    assert d <= 2e-3, f"max |diff| vs diffusers = {d:.1e}"
    torch.save({"state_dict": weights.to_original(ours)}, str(tmp_path / "sd15.ckpt"))
    del ours
    gc.collect()
    single = StableDiffusion.from_pretrained(tmp_path / "sd15.ckpt")
    folder_files = [("unet", weights.unet_key, f) for f in (tmp_path / "sd15" / "unet").glob("*.safetensors")]
    folder_files += [("vae", weights.vae_key, f) for f in (tmp_path / "sd15" / "vae").glob("*.safetensors")]
    folder_files += [("text_encoder", lambda k: k.removeprefix("text_model."), f)
                     for f in (tmp_path / "sd15" / "text_encoder").glob("*.safetensors")]
    seen = 0
    for part, rename, path in folder_files:
        state = getattr(single, part).state_dict()
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if not key.endswith("position_ids"):
                    assert torch.equal(state[rename(key)], f.get_tensor(key)), key
                    seen += 1
    assert seen == 686 + 248 + 196


@pytest.mark.slow
def test_sd21_folder_equals_diffusers(tmp_path):
    """Random SD 2.1 weights (seeded) at SD 2.1's configuration, saved by diffusers with SD 2.1's
    scheduler file (DDIM, v-prediction) and tokenizer ("!" padding); 256x256, 3 steps at guidance
    7.5. One pipeline in memory at a time."""
    ref = reference_pipeline(tmp_path / "sd21", unet=SD21_UNET, vae=SD15_VAE, text=SD21_TEXT,
                             scheduler=("DDIMScheduler", SD21_SCHEDULER), pad_token="!", max_shard_size="500MB")
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    prompt = "a photograph of an astronaut riding a horse"
    theirs = ref(prompt, height=256, width=256, num_inference_steps=3, guidance_scale=7.5, latents=x,
                 output_type="np").images
    del ref
    gc.collect()
    ours = StableDiffusion.from_pretrained(tmp_path / "sd21")
    assert ours.unet.config == minisd.UNetConfig.sd21() and ours.text_encoder.config == minisd.CLIPTextConfig.sd2()
    assert (ours.scheduler, ours.scheduler_config.prediction_type, ours.tokenizer.pad_id) == ("ddim", "v_prediction", 0)
    image = ours(prompt, height=256, width=256, steps=3, guidance=7.5, latents=x, output_type="np", progress=False)
    del ours
    gc.collect()
    assert theirs.std() > 0.05
    d = np.abs(image - theirs).max()
    print(f"SD 2.1 size, 256x256, 3 DDIM steps: max |diff| vs diffusers = {d:.1e}")
    assert d <= 2e-3, f"max |diff| vs diffusers = {d:.1e}"


# --- GPU ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(tiny, dtype):
    ref, _, folder = tiny
    use_scheduler(ref, "pndm")
    ours = StableDiffusion.from_pretrained(folder, device="cuda", dtype=dtype)
    assert ours.dtype == dtype and ours.device.type == "cuda"
    # SD's VAE overflows in float16: it stays in float32 (diffusers' force_upcast); bf16 needs no upcast
    assert next(ours.vae.parameters()).dtype == (torch.float32 if dtype == torch.float16 else dtype)
    x = initial_latents(1)
    image = ours(PROMPTS[0], steps=3, latents=x, output_type="np", progress=False)
    theirs = ref(PROMPTS[0], height=16, width=16, num_inference_steps=3, latents=x, output_type="np").images
    assert np.isfinite(image).all()
    assert np.abs(image - theirs).max() < 0.05  # half precision against the float32 reference


@pytest.mark.gpu
def test_seed_gives_the_same_noise_on_cuda(tiny):
    _, cpu, folder = tiny
    gpu = StableDiffusion.from_pretrained(folder, device="cuda")
    a = cpu(PROMPTS[0], steps=2, seed=5, output_type="np", progress=False)
    b = gpu(PROMPTS[0], steps=2, seed=5, output_type="np", progress=False)
    assert np.abs(a - b).max() < 1e-2  # TF32 convolutions on the GPU; other noise would differ by ~0.3


def test_img2img_noises_through_the_samplers_own_add_noise(tiny):
    """img2img's starting latents come from the sampler object it is given (its schedule, its
    way of noising), not from the default schedule or a special case per class."""
    from minisd.schedulers import DDIM, SchedulerConfig
    ddpm_betas = SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    _, ours, _ = tiny
    calls = []

    class Recording(DDIM):
        def add_noise(self, x0, noise, t):
            calls.append(int(t))
            return super().add_noise(x0, noise, t)

    init = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ours.img2img(PROMPTS[0], init, strength=0.6, steps=5, scheduler=Recording(), seed=2, progress=False)
    assert calls == [401]                 # DDIM's 5 steps 801 601 401 201 1; strength 0.6 runs the last 3
    # a sampler on another noise schedule starts from latents noised on that schedule
    a = ours.img2img(PROMPTS[0], init, strength=0.6, steps=5, scheduler=DDIM(ddpm_betas), seed=2,
                     guidance=1.0, output_type="latent", progress=False)
    sched = DDIM(ddpm_betas)
    sched.set_timesteps(5)
    with torch.no_grad():
        x0 = ours.vae.encode(2 * init - 1).sample(torch.Generator().manual_seed(2)) * ours.vae.scaling_factor
        g = torch.Generator().manual_seed(2)
        torch.randn(x0.shape, generator=g)            # the draw that sampled the posterior
        start = sched.add_noise(x0, torch.randn(x0.shape, generator=g), sched.timesteps[2])
        expected = minisd.pipeline.denoise(ours.unet, start, ours.encode_prompt([PROMPTS[0]]), sched,
                                           sched.timesteps[2:])
    torch.testing.assert_close(a, expected)


@pytest.mark.gpu
def test_real_sd21_on_cuda():
    """Real SD 2.1 weights (MINISD_SD21: a diffusers folder or the original single file) in float16:
    the model's own size, sampler and prediction type, and an image that is neither NaN nor black
    (SD 2.1's attention overflows float16 without upcast_attention)."""
    import os
    path = os.environ.get("MINISD_SD21")
    if not torch.cuda.is_available() or not path:
        pytest.skip("needs CUDA and MINISD_SD21 (a local SD 2.1 folder or .safetensors)")
    pipe = StableDiffusion.from_pretrained(path, device="cuda", dtype=torch.float16)
    assert pipe.unet.config.upcast_attention and pipe.text_encoder.config.act == "gelu"
    assert pipe.scheduler_config.prediction_type == "v_prediction" and pipe.scheduler == "ddim"
    image = pipe("a photograph of an astronaut riding a horse", steps=20, seed=0, output_type="np",
                 progress=False)
    assert image.shape == (1, 768, 768, 3) and np.isfinite(image).all()
    assert image.std() > 0.05, "a flat (black) image: attention overflowed in float16?"
