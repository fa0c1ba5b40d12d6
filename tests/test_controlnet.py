"""Chapter 14: minisd.ControlNet equals diffusers' ControlNetModel on the same weights, the U-Net
takes its residuals as diffusers' does, and the files people have load (a diffusers folder, the
original 1.1 and 1.0 single files), with clear errors for the wrong ones."""
import copy
import gc
from dataclasses import replace

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from minisd import weights
from minisd.controlnet import (ControlNet, ControlNetConfig, controlnet_diffusers_key, controlnet_key, from_original,
                               original_key, to_original)
from minisd.unet import UNetConfig

# a tiny SD 1.x-style U-Net (8 heads, 32 groups), whose original-layout file carries every config number
SD1_STYLE = UNetConfig(block_channels=(32, 64), cross_attention=(True, False), heads=(8, 8), layers_per_block=1,
                       context_dim=64)


def perturbed(model, seed=0):
    """diffusers zero-inits the zero convs: give every weight a non-trivial value."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def ours_from(theirs, config):
    with torch.device("meta"):
        net = ControlNet(config)
    return weights.load_into(net, {controlnet_key(k): v for k, v in theirs.state_dict().items()}).eval()


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    theirs = perturbed(ControlNetModel(**ControlNetConfig.tiny().to_diffusers()))
    return ours_from(theirs, ControlNetConfig.tiny()), theirs


def inputs(config, B=2, size=8, factor=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, size, size, generator=g), torch.randn(B, 7, config.unet.context_dim, generator=g),
            torch.rand(B, 3, size * factor, size * factor, generator=g))


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_tiny_controlnet_matches_diffusers(tiny_pair, scale):
    ours, theirs = tiny_pair
    x, ctx, hint = inputs(ours.config)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        down, mid = ours(x, t, ctx, hint, scale)
        their_down, their_mid = theirs(x, t, encoder_hidden_states=ctx, controlnet_cond=hint,
                                       conditioning_scale=scale, return_dict=False)
    assert len(down) == len(their_down) == 6     # conv_in + (1 resnet + 1 downsample) x 2 + 1 resnet
    torch.testing.assert_close(tuple(down), tuple(their_down), rtol=0, atol=1e-5)
    torch.testing.assert_close(mid, their_mid, rtol=0, atol=1e-5)
    assert mid.abs().max() > 0.1                 # not a comparison of zeros


def test_key_map_round_trips(tiny_pair):
    ours, theirs = tiny_pair
    assert {controlnet_diffusers_key(k) for k in ours.state_dict()} == set(theirs.state_dict())
    assert controlnet_key("controlnet_cond_embedding.blocks.3.weight") == "hint_encoder.blocks.3.weight"
    assert controlnet_key("controlnet_mid_block.bias") == "mid_zero_conv.bias"


def test_from_unet_equals_diffusers_from_unet():
    """The trainable copy starts as the U-Net's encoder; hint conv_out and zero convs at zero."""
    torch.manual_seed(0)
    unet_theirs = perturbed(UNet2DConditionModel(**UNetConfig.tiny().to_diffusers()))
    unet = weights.load_unet(unet_theirs.state_dict(), UNetConfig.tiny())
    ours = ControlNet.from_unet(unet, hint_channels=(8, 8, 16, 16))
    theirs = ControlNetModel.from_unet(unet_theirs, conditioning_embedding_out_channels=(8, 8, 16, 16))
    sd = ours.state_dict()
    for key, tensor in theirs.state_dict().items():
        if not key.startswith("controlnet_cond_embedding.") or "conv_out" in key:   # the hint convs are random
            torch.testing.assert_close(sd[controlnet_key(key)], tensor, rtol=0, atol=0)
    assert all(float(p.detach().abs().max()) == 0 for n, p in ours.named_parameters() if "zero_conv" in n or "conv_out" in n)


def test_untrained_controlnet_leaves_the_unet_exactly_unchanged():
    torch.manual_seed(0)
    unet = weights.load_unet(perturbed(UNet2DConditionModel(**UNetConfig.tiny().to_diffusers())).state_dict(),
                             UNetConfig.tiny()).eval()
    net = ControlNet.from_unet(unet, hint_channels=(8, 8, 16, 16)).eval()
    x, ctx, hint = inputs(net.config)
    with torch.no_grad():
        down, mid = net(x, 500, ctx, hint)
        diff = (unet(x, 500, ctx, down, mid) - unet(x, 500, ctx)).abs().max()
    assert float(diff) == 0.0


def test_unet_with_residuals_matches_diffusers(tiny_pair):
    ours_cn, theirs_cn = tiny_pair
    torch.manual_seed(3)
    unet_theirs = perturbed(UNet2DConditionModel(**UNetConfig.tiny().to_diffusers()))
    unet = weights.load_unet(unet_theirs.state_dict(), UNetConfig.tiny()).eval()
    x, ctx, hint = inputs(ours_cn.config)
    t = torch.tensor([5, 700])
    with torch.no_grad():
        down, mid = theirs_cn(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        expected = unet_theirs(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid).sample
        out = unet(x, t, ctx, down_residuals=list(down), mid_residual=mid)
        plain = unet(x, t, ctx)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert (out - plain).abs().max() > 1e-2       # the residuals did something
    with pytest.raises(ValueError, match="5 down residuals for 6 skips"):
        unet(x, t, ctx, down_residuals=list(down)[:5], mid_residual=mid)


def test_config_reads_diffusers_config_json(tiny_pair, tmp_path):
    _, theirs = tiny_pair
    theirs.save_config(tmp_path)
    read = ControlNetConfig.from_diffusers(tmp_path / "config.json")  # a ControlNet config has no sample_size
    assert read == replace(ControlNetConfig.tiny(), unet=replace(UNetConfig.tiny(), sample_size=64))
    assert ControlNetConfig.from_json(ControlNetConfig.tiny().to_json()) == ControlNetConfig.tiny()
    with torch.device("meta"):
        theirs_sd15 = ControlNetModel(**ControlNetConfig.sd15().to_diffusers())
    assert ControlNetConfig.from_diffusers(dict(theirs_sd15.config)) == ControlNetConfig.sd15()


def test_parameter_count_sd15_matches_diffusers_on_meta():
    with torch.device("meta"):
        ours = ControlNet(ControlNetConfig.sd15())
        theirs = ControlNetModel(**ControlNetConfig.sd15().to_diffusers())
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == 361_279_120
    mapped = {controlnet_key(k): tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.mark.slow
def test_sd15_controlnet_matches_diffusers():
    with torch.device("meta"):
        theirs = ControlNetModel(**ControlNetConfig.sd15().to_diffusers())
    sd = weights.random_weights(theirs, seed=0)
    theirs.load_state_dict(sd, assign=True)
    theirs.eval()
    with torch.device("meta"):
        ours = ControlNet(ControlNetConfig.sd15())
    ours = weights.load_into(ours, {controlnet_key(k): v for k, v in sd.items()}).eval()
    del sd
    g = torch.Generator().manual_seed(0)
    x, ctx, hint = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g), \
        torch.rand(1, 3, 256, 256, generator=g)
    with torch.no_grad():
        their_down, their_mid = theirs(x, 981, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        down, mid = ours(x, 981, ctx, hint)
    del ours, theirs
    gc.collect()
    assert len(down) == 12
    torch.testing.assert_close(tuple(down), tuple(their_down), rtol=0, atol=1e-4)
    torch.testing.assert_close(mid, their_mid, rtol=0, atol=1e-4)


# --- files --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1_pair():
    config = ControlNetConfig(unet=SD1_STYLE)
    torch.manual_seed(0)
    theirs = perturbed(ControlNetModel(**config.to_diffusers()))
    return ours_from(theirs, config), theirs


def same_outputs(a, b):
    x, ctx, hint = inputs(a.config, B=1)
    with torch.no_grad():
        (da, ma), (db, mb) = a(x, 300, ctx, hint), b(x, 300, ctx, hint)
    torch.testing.assert_close((*da, ma), (*db, mb), rtol=0, atol=0)


def test_diffusers_folder_loads(sd1_pair, tmp_path):
    ours, theirs = sd1_pair
    theirs.save_pretrained(tmp_path / "cn")
    loaded = ControlNet.from_pretrained(tmp_path / "cn")
    assert loaded.config == ours.config
    same_outputs(loaded, ours)
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    same_outputs(ControlNet.from_pretrained(tmp_path / "bin"), ours)


def test_original_layout_equals_diffusers_converter(sd1_pair):
    """Our inverse map writes what diffusers' own single-file converter reads back to its keys."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    ours, theirs = sd1_pair
    original = to_original(ours)
    assert "input_hint_block.14.weight" in original and "middle_block_out.0.weight" in original
    assert "zero_convs.3.0.weight" in original and "input_blocks.2.0.op.weight" in original
    converted = convert_controlnet_checkpoint({"control_model." + k: v for k, v in original.items()},
                                              {"layers_per_block": 1})
    expected = theirs.state_dict()
    assert set(converted) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_11_file_loads(sd1_pair, tmp_path, suffix):
    ours, _ = sd1_pair
    path = tmp_path / f"control_v11p_sd15_test{suffix}"
    original = {k: v.contiguous() for k, v in to_original(ours).items()}
    if suffix == ".pth":
        torch.save(original, path)
    else:
        weights.save_file(original, path)
    loaded = ControlNet.from_pretrained(path)
    assert loaded.config == ours.config
    same_outputs(loaded, ours)


def sd_checkpoint_keys():
    """A stand-in for the whole SD checkpoint bundled in a 1.0 file (a few keys of each part)."""
    return {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
            "betas": torch.zeros(1000), "alphas_cumprod": torch.zeros(1000)}


def test_original_10_file_loads_and_ignores_the_sd_part(sd1_pair, tmp_path):
    ours, _ = sd1_pair
    bundle = {"control_model." + k: v for k, v in to_original(ours).items()} | sd_checkpoint_keys()
    path = tmp_path / "control_sd15_test.pth"
    torch.save(bundle, path)
    same_outputs(ControlNet.from_pretrained(path), ours)
    with pytest.raises(weights.WeightsError, match="ControlNet file.*ControlNet.from_pretrained"):
        weights.from_original(bundle, source=str(path))


# --- bad input ----------------------------------------------------------------------------------

def test_a_controlnet_file_as_an_sd_checkpoint_is_named(sd1_pair, tmp_path):
    from minisd import StableDiffusion
    ours, theirs = sd1_pair
    path = tmp_path / "control_v11p_sd15_canny.safetensors"
    weights.save_file({k: v.contiguous() for k, v in to_original(ours).items()}, path)
    with pytest.raises(weights.WeightsError, match="control_v11p_sd15_canny.safetensors: this is a ControlNet file"):
        StableDiffusion.from_pretrained(path)
    theirs.save_pretrained(tmp_path / "cn")
    with pytest.raises(weights.WeightsError, match="ControlNet folder.*ControlNet.from_pretrained"):
        StableDiffusion.from_pretrained(tmp_path / "cn")


def test_an_sd_checkpoint_as_a_controlnet_is_named(tmp_path):
    path = tmp_path / "v1-5-pruned.safetensors"
    weights.save_file(sd_checkpoint_keys(), path)
    with pytest.raises(weights.WeightsError, match="v1-5-pruned.safetensors is a Stable Diffusion checkpoint, "
                                                   "not a ControlNet.*StableDiffusion.from_pretrained"):
        ControlNet.from_pretrained(path)
    with pytest.raises(weights.WeightsError, match="LoRA"):
        from_original({"lora_unet_down.lora_down.weight": torch.zeros(1)})
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(weights.WeightsError, match="not a ControlNet"):
        ControlNet.from_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="no ControlNet at"):
        ControlNet.from_pretrained(tmp_path / "nothing.pth")


def test_original_key_names():
    c = ControlNetConfig.sd15()
    assert original_key("hint_encoder.conv_in.weight", c) == "input_hint_block.0.weight"
    assert original_key("hint_encoder.blocks.5.bias", c) == "input_hint_block.12.bias"
    assert original_key("hint_encoder.conv_out.weight", c) == "input_hint_block.14.weight"
    assert original_key("zero_convs.11.weight", c) == "zero_convs.11.0.weight"
    assert original_key("down_blocks.1.attentions.0.proj_in.weight", c) == "input_blocks.4.1.proj_in.weight"


# --- the pipeline ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """diffusers' tiny random SD (tests/reference_sd.py), two random ControlNets made from its U-Net
    (hint encoder with one halving: the tiny VAE's factor 2), and ours loaded from their folders."""
    from minisd import StableDiffusion
    from reference_sd import reference_pipeline
    folder = tmp_path_factory.mktemp("tiny_sd_cn")
    ref = reference_pipeline(folder / "sd")
    theirs, ours = [], []
    for i in range(2):
        cn = perturbed(ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(8, 16)), seed=i)
        cn.save_pretrained(folder / f"cn{i}")
        theirs.append(cn)
        ours.append(ControlNet.from_pretrained(folder / f"cn{i}"))
    return ref, theirs, StableDiffusion.from_pretrained(folder / "sd"), ours


def control_images(seed=5):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    pil = Image.fromarray((torch.rand(20, 24, 3, generator=g) * 255).byte().numpy())     # resized to 16x16
    return pil, torch.rand(2, 3, 12, 12, generator=g)


@pytest.mark.parametrize("kind", ["pil", "tensor", "multi"])
def test_pipeline_equals_diffusers_controlnet_pipeline(tiny_sd, kind):
    import diffusers
    import numpy as np
    ref, theirs, pipe, ours = tiny_sd
    pil, tensor = control_images()
    image, their_cn, our_cn, scale = {
        "pil": (pil, theirs[0], ours[0], 0.8), "tensor": (tensor, theirs[0], ours[0], 1.0),
        "multi": ([pil, tensor], theirs, ours, [1.0, 0.5])}[kind]
    ref_cn = diffusers.StableDiffusionControlNetPipeline(**{**ref.components, "controlnet": their_cn})
    ref_cn.set_progress_bar_config(disable=True)
    prompts = ["a red circle in the top left", "an astronaut"]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = ref_cn(prompts, image=image, height=16, width=16, num_inference_steps=4, guidance_scale=7.5,
                      latents=x, output_type="np", controlnet_conditioning_scale=scale).images
    out = pipe(prompts, height=16, width=16, steps=4, guidance=7.5, latents=x, output_type="np", progress=False,
               controlnet=our_cn, control_image=image, controlnet_scale=scale)
    plain = pipe(prompts, height=16, width=16, steps=4, guidance=7.5, latents=x, output_type="np", progress=False)
    np.testing.assert_allclose(out, expected, atol=2e-3, rtol=0)
    assert np.abs(out - plain).max() > 1e-2


def test_img2img_equals_diffusers_controlnet_img2img(tiny_sd):
    import diffusers
    import numpy as np
    ref, theirs, pipe, ours = tiny_sd
    ref_cn = diffusers.StableDiffusionControlNetImg2ImgPipeline(**{**ref.components, "controlnet": theirs[0]})
    ref_cn.set_progress_bar_config(disable=True)
    init = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    hint = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    expected = ref_cn("a red circle", image=init, control_image=hint, strength=0.6, num_inference_steps=5,
                      output_type="np", generator=torch.Generator().manual_seed(2),
                      controlnet_conditioning_scale=0.7).images   # (its default is 0.8, the text-to-image one's 1.0)
    out = pipe.img2img("a red circle", init, strength=0.6, steps=5, seed=2, output_type="np", progress=False,
                       controlnet=ours[0], control_image=hint, controlnet_scale=0.7)
    np.testing.assert_allclose(out, expected, atol=2e-3, rtol=0)


def test_control_image_errors_name_the_argument(tiny_sd):
    import numpy as np
    _, _, pipe, ours = tiny_sd
    run = dict(steps=1, height=16, width=16, progress=False, controlnet=ours[0])
    with pytest.raises(ValueError, match=r"control_image: a tensor must be float \(B, 3, H, W\).*\(1, 4, 16, 16\)"):
        pipe("a", control_image=torch.rand(1, 4, 16, 16), **run)
    with pytest.raises(ValueError, match="control_image: a tensor must be float.*torch.uint8"):
        pipe("a", control_image=torch.zeros(1, 3, 16, 16, dtype=torch.uint8), **run)
    with pytest.raises(ValueError, match=r"control_image: an array must be uint8 \(H, W, 3\).*float64"):
        pipe("a", control_image=np.zeros((16, 16, 3)), **run)
    with pytest.raises(ValueError, match=r"control_image holds 3 images for 2 prompt\(s\)"):
        pipe(["a", "b"], control_image=torch.rand(3, 3, 16, 16), **run)
    with pytest.raises(ValueError, match="without controlnet="):
        pipe("a", steps=1, control_image=torch.rand(1, 3, 16, 16), progress=False)
    with pytest.raises(ValueError, match=r"controlnet is torch.bfloat16 on cpu but the pipeline is torch.float32"):
        pipe("a", control_image=torch.rand(1, 3, 16, 16), **{**run, "controlnet": copy.deepcopy(ours[0]).bfloat16()})
    with pytest.raises(ValueError, match=r"2 ControlNets need one control_image and one controlnet_scale each"):
        pipe("a", **{**run, "controlnet": ours}, control_image=[torch.rand(1, 3, 16, 16)])


def test_an_sd2_controlnet_on_sd1_is_refused_before_any_work(tiny_sd):
    _, _, pipe, ours = tiny_sd
    c = ours[0].config
    with torch.device("meta"):
        sd2 = ControlNet(replace(c, unet=replace(c.unet, context_dim=1024, linear_projection=True)))
    with pytest.raises(ValueError, match=r"made for SD 2.x \(1024-wide text\).*a ControlNet trained for this model"):
        pipe("a", steps=1, controlnet=sd2, control_image=torch.rand(1, 3, 16, 16), progress=False)
