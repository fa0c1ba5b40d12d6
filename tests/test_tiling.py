"""Issue 22, big images on small machines: VAE tiling equals diffusers' `enable_vae_tiling`,
attention slicing equals diffusers' `enable_attention_slicing`, on the same weights."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from minisd import StableDiffusion, weights
from minisd.attention import sliced_attention
from minisd.pipeline import set_attention_slice
from minisd.unet import UNetConfig
from minisd.vae import VAEConfig, tiled
from reference_sd import reference_pipeline
from test_vae import diffusers_vae

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def vae_pair():
    """The tiny VAE (f = 2, sample_size 16: tiles of 8x8 latents / 16x16 pixels), ours and diffusers'."""
    torch.manual_seed(0)
    ref = diffusers_vae(VAEConfig.tiny())
    return weights.load_vae(ref.state_dict(), VAEConfig.tiny()), ref


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@torch.no_grad()
def test_tiled_decode_matches_diffusers(vae_pair):
    ours, ref = vae_pair
    ours.use_tiling = True
    ref.enable_tiling()
    ours_calls, ref_calls = count_calls(ours.decoder), count_calls(ref.decoder)
    try:
        z = torch.randn(2, 4, 20, 27, generator=torch.Generator().manual_seed(1))  # not a whole number of tiles
        image, theirs = ours.decode(z), ref.decode(z).sample
    finally:
        ours.use_tiling = False
        ref.disable_tiling()
    # a tile every 6 latents: rows at 0, 6, 12, 18 and columns at 0, 6, ..., 24
    assert len(ours_calls) == len(ref_calls) == 4 * 5
    assert image.shape == theirs.shape == (2, 3, 40, 54)
    torch.testing.assert_close(image, theirs, rtol=0, atol=1e-5)
    # tiled is not untiled: each tile sees only its own part of the latents
    assert (image - ours.decode(z)).abs().max() > 0.1


@torch.no_grad()
def test_tiled_encode_matches_diffusers(vae_pair):
    ours, ref = vae_pair
    ours.use_tiling = True
    ref.enable_tiling()
    ours_calls, ref_calls = count_calls(ours.encoder), count_calls(ref.encoder)
    try:
        x = torch.rand(2, 3, 40, 53, generator=torch.Generator().manual_seed(2)) * 2 - 1
        posterior, theirs = ours.encode(x), ref.encode(x).latent_dist
    finally:
        ours.use_tiling = False
        ref.disable_tiling()
    assert len(ours_calls) == len(ref_calls) == 4 * 5  # a tile every 12 pixels
    assert posterior.mean.shape == theirs.mean.shape == (2, 4, 20, 26)
    torch.testing.assert_close(posterior.mean, theirs.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(posterior.logvar, theirs.logvar, rtol=0, atol=1e-5)
    assert (posterior.mean - ours.encode(x).mean).abs().max() > 0.01


@torch.no_grad()
def test_the_tiles_are_cut_and_faded_exactly_as_diffusers(vae_pair):
    """Our `tiled` around diffusers' own decoder gives diffusers' tiled_decode bit for bit: the
    remaining difference above is the two decoders' rounding, not the tiling."""
    _, ref = vae_pair
    z = torch.randn(1, 4, 21, 14, generator=torch.Generator().manual_seed(3))
    ours = tiled(lambda t: ref.decoder(ref.post_quant_conv(t)), z.clone(), 8, 16)
    torch.testing.assert_close(ours, ref.tiled_decode(z).sample, rtol=0, atol=0)


@torch.no_grad()
def test_tiling_leaves_images_of_one_tile_alone(vae_pair):
    ours, _ = vae_pair
    z = torch.randn(1, 4, 8, 8)            # exactly one tile: diffusers tiles only what is larger
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    untiled = ours.decode(z), ours.encode(x).mean
    ours.use_tiling = True
    try:
        calls = count_calls(ours.decoder)
        assert torch.equal(ours.decode(z), untiled[0]) and len(calls) == 1
        assert torch.equal(ours.encode(x).mean, untiled[1])
    finally:
        ours.use_tiling = False


@pytest.fixture(scope="module")
def unet_pair():
    """A tiny U-Net with 4, 4 and 2 heads (so that "auto" and a number slice differently)."""
    config = replace(UNetConfig.tiny(), heads=(4, 4, 2))
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**config.to_diffusers()).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return weights.load_unet(theirs.state_dict(), config).eval(), theirs


@torch.no_grad()
@pytest.mark.parametrize("slice_size", ["auto", "max", 2])
def test_sliced_unet_matches_diffusers(unet_pair, slice_size, monkeypatch):
    ours, theirs = unet_pair
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, ours.config.context_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500])
    unsliced = ours(x, t, context)
    set_attention_slice(ours, slice_size)
    theirs.set_attention_slice(slice_size)
    sizes = []  # the batch of every attention kernel call: one per slice
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: sizes.append(len(q)) or sdpa(q, *a, **k))
    try:
        out = ours(x, t, context)
        monkeypatch.undo()
        reference = theirs(x, t, context).sample
    finally:
        set_attention_slice(ours, None)
        theirs.set_attention_slice(None)
    # "auto" = half the heads of each layer: 2 in the 4-head blocks, 1 in the 2-head mid block
    expected = {"auto": {1, 2}, "max": {1}, 2: {2}}[slice_size]
    assert set(sizes) == expected and len(sizes) > 2 * 6
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, unsliced, rtol=0, atol=1e-5)  # the same attention, to rounding
    assert all(m.slice_size is None for m in ours.modules() if hasattr(m, "slice_size"))


def test_sliced_attention_equals_attention_to_rounding():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 5, 40, 8, generator=g), torch.randn(3, 5, 9, 8, generator=g), torch.randn(3, 5, 9, 8, generator=g)
    full = F.scaled_dot_product_attention(q, k, v)
    for size in (1, 2, 4, 15):  # 4 does not divide 15 pairs: the last slice is short, as in diffusers
        torch.testing.assert_close(sliced_attention(q, k, v, size), full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("slice_size, words", [(3, "slice_size=3 does not divide every attention layer's number of heads (2, 4)"),
                                               (4, "(2, 4)"), (0, "slice_size=0"),
                                               (-2, "slice_size=-2"), (1.5, "slice_size=1.5"),
                                               ("half", "'auto'"), (True, "slice_size=True")])
def test_a_bad_slice_size_says_what_to_give(unet_pair, slice_size, words):
    ours, _ = unet_pair
    with pytest.raises(ValueError) as error:
        set_attention_slice(ours, slice_size)
    assert words in str(error.value)
    assert all(m.slice_size is None for m in ours.modules() if hasattr(m, "slice_size"))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd") / "sd"
    ref = reference_pipeline(folder)  # VAE sample_size 16 px: tiles of 8x8 latents; U-Net: 8 heads
    return ref, StableDiffusion.from_pretrained(folder)


def test_pipeline_with_tiling_and_slicing_matches_diffusers(tiny_sd):
    ref, ours = tiny_sd
    x = torch.randn(2, 4, 20, 28, generator=torch.Generator().manual_seed(0))  # 40x56 px: 4 x 5 tiles
    args = dict(negative_prompt=["", "blurry"], height=40, width=56, guidance_scale=7.5, latents=x, output_type="np")
    plain = ours(PROMPTS, steps=3, progress=False, **{k.replace("_scale", ""): v for k, v in args.items()})
    ref.vae.enable_tiling()  # diffusers 0.42: the pipeline method is gone
    ref.enable_attention_slicing()
    ours.enable_vae_tiling()
    ours.enable_attention_slicing()
    try:
        theirs = ref(PROMPTS, num_inference_steps=3, **args).images
        image = ours(PROMPTS, steps=3, progress=False, **{k.replace("_scale", ""): v for k, v in args.items()})
    finally:
        ref.vae.disable_tiling()
        ref.disable_attention_slicing()
        ours.disable_vae_tiling()
        ours.disable_attention_slicing()
    assert {m.slice_size for m in ours.unet.modules() if hasattr(m, "slice_size")} == {None}
    assert not ours.vae.use_tiling
    assert image.shape == theirs.shape == (2, 40, 56, 3)
    np.testing.assert_allclose(image, theirs, atol=1e-5, rtol=0)
    assert np.abs(image - plain).max() > 0.01  # the tiles show; slicing alone would not move a pixel


def test_img2img_with_tiling_matches_diffusers(tiny_sd):
    import diffusers
    ref, ours = tiny_sd
    ref2 = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    ref2.set_progress_bar_config(disable=True)
    init = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))  # encoded in 4 x 5 tiles
    ref2.vae.enable_tiling()
    ours.enable_vae_tiling()
    try:
        theirs = ref2(PROMPTS[0], image=init, strength=0.6, num_inference_steps=5, output_type="np",
                      generator=torch.Generator().manual_seed(2)).images
        image = ours.img2img(PROMPTS[0], init, strength=0.6, steps=5, seed=2, output_type="np", progress=False)
    finally:
        ref2.vae.disable_tiling()
        ours.disable_vae_tiling()
    np.testing.assert_allclose(image, theirs, atol=1e-5, rtol=0)
