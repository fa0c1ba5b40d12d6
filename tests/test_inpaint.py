"""pipe.inpaint (chapter 16): the same images as diffusers' StableDiffusionInpaintPipeline on the
same weights and seed, with a plain 4-channel U-Net (latent blending) and a 9-channel inpainting
U-Net; the original single-file layout of an inpainting U-Net; bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from minisd import StableDiffusion, weights
from reference_sd import TINY_UNET, reference_pipeline, use_scheduler

PROMPTS = ["a red circle in the top left", "an astronaut riding a horse"]


def inpaint_reference(ref):
    import diffusers
    pipe = diffusers.StableDiffusionInpaintPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd") / "sd"
    ref = reference_pipeline(folder)
    return inpaint_reference(ref), StableDiffusion.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def tiny9(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd9") / "sd"
    ref = reference_pipeline(folder, unet=dict(TINY_UNET, in_channels=9))
    return inpaint_reference(ref), StableDiffusion.from_pretrained(folder), folder


def image_and_mask(size=16, seed=3):
    """A random RGB image and a mask whose right half (and a bit more) is white, as PIL images."""
    g = np.random.default_rng(seed)
    image = Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8))
    m = np.zeros((size, size), np.uint8)
    m[:, size // 2 - 2:] = 255
    m[: size // 4] = 0
    return image, Image.fromarray(m)


def both(ref, ours, name, prompt, image, mask, strength=1.0, steps=4, guidance=7.5, seed=1, **kw):
    use_scheduler(ref, name)
    size = {k: kw.pop(k) for k in ("height", "width") if k in kw}
    h, w = size.get("height", image.height if hasattr(image, "height") else image.shape[-2]), \
        size.get("width", image.width if hasattr(image, "width") else image.shape[-1])
    theirs = ref(prompt, image=image, mask_image=mask, height=h, width=w, strength=strength,
                 num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                 generator=torch.Generator().manual_seed(seed), **kw).images
    mine = ours.inpaint(prompt, image, mask, strength=strength, steps=steps, guidance=guidance, scheduler=name,
                        seed=seed, output_type="np", progress=False, **size, **kw)
    return mine, theirs


@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "ddpm"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_latent_blending_equals_diffusers(tiny, name, strength):
    """A plain U-Net: diffusers' blending of the known region at every step, every sampler (DDPM
    draws its step noise from the same generator after the three draws of the set-up)."""
    ref, ours, _ = tiny
    image, mask = image_and_mask()
    mine, theirs = both(ref, ours, name, PROMPTS[0], image, mask, strength)
    assert mine.shape == theirs.shape == (1, 16, 16, 3) and theirs.std() > 0.05
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "ddpm"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_nine_channel_unet_equals_diffusers(tiny9, name, strength):
    ref, ours, _ = tiny9
    assert ours.unet.config.in_channels == 9
    image, mask = image_and_mask()
    mine, theirs = both(ref, ours, name, PROMPTS[0], image, mask, strength)
    assert theirs.std() > 0.05
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny", "tiny9"])
def test_two_prompts_one_image_tensors_and_resized_mask(request, fixture):
    """Two prompts and negative prompts share one image; the image a float tensor, the mask a
    tensor of another size (nearest-neighbour resize, as diffusers), no guidance."""
    ref, ours, _ = request.getfixturevalue(fixture)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:8] = 1.0
    mine, theirs = both(ref, ours, "ddim", PROMPTS, image, mask, negative_prompt=["", "blurry"])
    assert mine.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)
    mine, theirs = both(ref, ours, "ddim", PROMPTS[0], image, mask, guidance=1.0)
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny", "tiny9"])
def test_pil_inputs_of_other_sizes_are_resized_as_diffusers(request, fixture):
    """A 20x20 image and a 12x12 grey-level mask, both resized to 16x16 with Lanczos."""
    ref, ours, _ = request.getfixturevalue(fixture)
    image, _ = image_and_mask(20)
    _, mask = image_and_mask(12, seed=4)
    mine, theirs = both(ref, ours, "pndm", PROMPTS[0], image, mask.convert("RGB"), height=16, width=16)
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)


def test_blending_keeps_the_known_region(tiny):
    """With latent blending the last latents outside the mask ARE the image's latents (the
    blend after the last step uses no noise): the latents equal the encoded image there."""
    _, ours, _ = tiny
    image, mask = image_and_mask()
    out = ours.inpaint(PROMPTS[0], image, mask, steps=3, seed=0, output_type="latent", progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = 2 * torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 255 - 1
        known = ours.vae.encode(x).sample(g) * ours.vae.scaling_factor
    keep = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(mask) / 255.0)[None, None].float(),
                                           size=(8, 8)) < 0.5
    keep = keep.expand_as(out)
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(out[keep], known[keep])
    assert (out[~keep] - known[~keep]).abs().max() > 0.1


def test_single_file_of_an_inpainting_unet_loads(tiny9, tmp_path):
    """The original layout (model.diffusion_model.input_blocks.0.0.weight with 9 input channels):
    the config reads in_channels=9 from the weights, and the images are the folder's."""
    from safetensors.torch import save_file
    _, ours, _ = tiny9
    sd = weights.to_original(ours)
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "inpaint.safetensors"))
    single = StableDiffusion.from_pretrained(tmp_path / "inpaint.safetensors")
    assert single.unet.config.in_channels == 9
    image, mask = image_and_mask()
    a = ours.inpaint(PROMPTS[0], image, mask, steps=2, seed=0, output_type="np", progress=False)
    b = single.inpaint(PROMPTS[0], image, mask, steps=2, seed=0, output_type="np", progress=False)
    np.testing.assert_array_equal(a, b)


def test_array_mask_and_uint8_image(tiny):
    """A uint8 (H, W) mask and a uint8 (H, W, 3) image give what the PIL images give."""
    _, ours, _ = tiny
    image, mask = image_and_mask()
    a = ours.inpaint(PROMPTS[0], image, mask, steps=2, seed=0, output_type="np", progress=False)
    b = ours.inpaint(PROMPTS[0], np.asarray(image), np.asarray(mask), steps=2, seed=0, output_type="np",
                     progress=False)
    c = ours.inpaint(PROMPTS[0], np.asarray(image), np.asarray(mask) > 127, steps=2, seed=0, output_type="np",
                     progress=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


# --- bad input ------------------------------------------------------------------------------

def test_mask_that_is_not_an_image(tiny):
    _, ours, _ = tiny
    image, _ = image_and_mask()
    with pytest.raises(TypeError, match=r"mask must be an image.*got str"):
        ours.inpaint(PROMPTS[0], image, "mask.png", steps=1)
    with pytest.raises(ValueError, match=r"mask: an array mask must be \(H, W\)"):
        ours.inpaint(PROMPTS[0], image, np.zeros((16, 16, 3), np.int64), steps=1)
    with pytest.raises(ValueError, match=r"mask: a tensor mask must be float"):
        ours.inpaint(PROMPTS[0], image, torch.zeros(1, 3, 16, 16), steps=1)
    with pytest.raises(TypeError, match=r"image must be a PIL image.*got str"):
        ours.inpaint(PROMPTS[0], "image.png", image_and_mask()[1], steps=1)


def test_counts_must_match(tiny):
    _, ours, _ = tiny
    image, mask = image_and_mask()
    three = torch.rand(3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"3 images for 2 prompt\(s\)"):
        ours.inpaint(PROMPTS, three, mask, steps=1)
    with pytest.raises(ValueError, match=r"2 masks for 1 prompt\(s\)"):
        ours.inpaint(PROMPTS[0], image, torch.zeros(2, 1, 16, 16), steps=1)
    with pytest.raises(ValueError, match=r"2 negative prompts for 1 prompts"):
        ours.inpaint(PROMPTS[0], image, mask, negative_prompt=["", ""], steps=1)


def test_size_must_be_a_multiple(tiny):
    _, ours, _ = tiny
    image, mask = image_and_mask(17)
    with pytest.raises(ValueError, match=r"the image is 17x17 px: height=17 is not a positive multiple of 2.*"
                                         r"pass height= and width="):
        ours.inpaint(PROMPTS[0], image, mask, steps=1)
    with pytest.raises(ValueError, match=r"width=15 is not a positive multiple of 2"):
        ours.inpaint(PROMPTS[0], image, mask, height=16, width=15, steps=1)
    ours.inpaint(PROMPTS[0], image, mask, height=16, width=16, steps=1, progress=False)   # resized: fine


def test_strength_and_unet_channels(tiny, tiny9):
    _, ours, _ = tiny
    image, mask = image_and_mask()
    with pytest.raises(ValueError, match=r"strength=0: it must be in \(0, 1\]"):
        ours.inpaint(PROMPTS[0], image, mask, strength=0, steps=1)
    with pytest.raises(ValueError, match=r"strength=0.1 with steps=4 leaves no sampling step"):
        ours.inpaint(PROMPTS[0], image, mask, strength=0.1, steps=4)
    _, nine, _ = tiny9
    with pytest.raises(ValueError, match=r"takes 9 input channels.*pipe.inpaint"):
        nine(PROMPTS[0], steps=1)
    with pytest.raises(ValueError, match=r"img2img: this U-Net takes 9 input channels"):
        nine.img2img(PROMPTS[0], image, steps=1)
