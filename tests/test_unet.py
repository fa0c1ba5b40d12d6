"""Chapter 4: the U-Net and its blocks equal diffusers' UNet2DConditionModel on the same weights."""
import gc

import pytest
import torch
from diffusers import UNet2DConditionModel

from minisd import weights
from minisd.weights import random_weights
from minisd.unet import UNet, UNetConfig

# runwayml/stable-diffusion-v1-5 unet/config.json, as published
SD15_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


# stabilityai/stable-diffusion-2-1 unet/config.json, as published
SD21_CONFIG_JSON = dict(SD15_CONFIG_JSON, _diffusers_version="0.10.0.dev0", attention_head_dim=[5, 10, 20, 20],
                        cross_attention_dim=1024, dual_cross_attention=False, num_class_embeds=None,
                        only_cross_attention=False, sample_size=96, use_linear_projection=True,
                        upcast_attention=True)


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**UNetConfig.tiny().to_diffusers()).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every weight non-trivial anyway
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = weights.load_unet(theirs.state_dict(), UNetConfig.tiny()).eval()
    return ours, theirs


def test_sd15_config_json_reads_as_sd15():
    assert UNetConfig.from_diffusers(SD15_CONFIG_JSON) == UNetConfig.sd15()


def test_config_round_trips_through_diffusers(tmp_path):
    theirs = UNet2DConditionModel(**UNetConfig.tiny().to_diffusers())
    theirs.save_config(tmp_path)
    assert UNetConfig.from_diffusers(tmp_path / "config.json") == UNetConfig.tiny()
    assert UNetConfig.from_diffusers(dict(theirs.config)) == UNetConfig.tiny()


def test_other_sd1_style_config_reads():
    cfg = dict(SD15_CONFIG_JSON, block_out_channels=[64, 128], attention_head_dim=[2, 4], layers_per_block=1,
               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
               cross_attention_dim=256, sample_size=32)
    c = UNetConfig.from_diffusers(cfg)
    assert (c.block_channels, c.heads, c.cross_attention, c.context_dim) == ((64, 128), (2, 4), (True, False), 256)


@pytest.mark.parametrize("key,value,match", [
    ("mid_block_type", None, "mid_block_type"),
    ("class_embed_type", "timestep", "class_embed_type"),
    ("transformer_layers_per_block", 2, "transformer_layers_per_block"),
    ("some_new_option", 1, "unknown key"),
    ("up_block_types", ["UpBlock2D"] * 4, "mirrored"),
])
def test_unsupported_configs_are_refused(key, value, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_diffusers(dict(SD15_CONFIG_JSON, **{key: value}))


def test_sd21_config_json_reads_as_sd21():
    assert UNetConfig.from_diffusers(SD21_CONFIG_JSON) == UNetConfig.sd21()


def test_parameter_count_sd21_matches_diffusers_on_meta():
    with torch.device("meta"):
        ours = UNet(UNetConfig.sd21())
        theirs = UNet2DConditionModel(**UNetConfig.sd21().to_diffusers())
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == 865_910_724
    # the same keys, the same shapes: proj_in/proj_out are (C, C) Linear weights, not (C, C, 1, 1)
    mapped = weights.unet_from_diffusers(theirs.state_dict())
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours.state_dict()["down_blocks.0.attentions.0.proj_in.weight"].shape == (320, 320)


@pytest.mark.parametrize("upcast", [False, True])
def test_sd2_style_tiny_unet_matches_diffusers(upcast):
    """Per-block head counts, linear projections and upcast attention, at a small size."""
    config = UNetConfig(block_channels=(32, 64, 64), cross_attention=(True, True, False), heads=(1, 2, 2),
                        layers_per_block=1, context_dim=48, groups=8, sample_size=16, linear_projection=True,
                        upcast_attention=upcast)
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**config.to_diffusers()).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = weights.load_unet(theirs.state_dict(), config).eval()
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 48), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), theirs(x, t, encoder_hidden_states=ctx).sample, rtol=0, atol=1e-5)
    assert all(m.upcast == upcast for m in ours.modules() if hasattr(m, "upcast"))


def test_parameter_count_sd15_matches_diffusers_on_meta():
    with torch.device("meta"):
        ours = UNet(UNetConfig.sd15())
        theirs = UNet2DConditionModel(**UNetConfig.sd15().to_diffusers())
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == 859_520_964


def test_key_map_is_total_at_sd15():
    """Every key of diffusers' SD 1.5 U-Net maps to exactly one of ours, with the same shape."""
    with torch.device("meta"):
        ours = UNet(UNetConfig.sd15()).state_dict()
        theirs = UNet2DConditionModel(**UNetConfig.sd15().to_diffusers()).state_dict()
    mapped = weights.unet_from_diffusers(theirs)
    assert len(mapped) == len(theirs) == len(ours) == 686
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_load_is_on_meta_first_and_holds_the_given_tensors(tiny_pair):
    ours, theirs = tiny_pair
    sd = theirs.state_dict()
    assert ours.conv_in.weight.data_ptr() == sd["conv_in.weight"].data_ptr()  # assigned, not copied
    assert not any(p.is_meta for p in ours.parameters())


def test_blocks_match_diffusers(tiny_pair):
    """Each down, mid and up block gives diffusers' output on the inputs a full forward feeds it."""
    ours, theirs = tiny_pair
    outputs = {}

    def record(name):
        def hook(module, args, output):
            outputs[name] = output
        return hook

    for side, model in (("ours", ours), ("theirs", theirs)):
        blocks = [*model.down_blocks, model.mid_block, *model.up_blocks]
        for i, block in enumerate(blocks):
            block.register_forward_hook(record((side, i)))
    torch.manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32), torch.tensor([3, 400])
    with torch.no_grad():
        ours(x, t, ctx)
        theirs(x, t, encoder_hidden_states=ctx)
    for model in (ours, theirs):
        for block in [*model.down_blocks, model.mid_block, *model.up_blocks]:
            block._forward_hooks.clear()
    assert len(outputs) == 2 * 7
    for i in range(7):
        a, b = outputs["ours", i], outputs["theirs", i]
        if i < 3:  # down blocks: (x, skips)
            torch.testing.assert_close(a[0], b[0])
            torch.testing.assert_close(tuple(a[1]), tuple(b[1]))
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size", [(16, 16), (8, 24)])
def test_tiny_unet_matches_diffusers(tiny_pair, size):
    ours, theirs = tiny_pair
    torch.manual_seed(2)
    x, ctx = torch.randn(2, 4, *size), torch.randn(2, 7, 32)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        out = ours(x, t, ctx)
        torch.testing.assert_close(out, theirs(x, t, encoder_hidden_states=ctx).sample)
        torch.testing.assert_close(ours(x, 500, ctx), theirs(x, 500, encoder_hidden_states=ctx).sample)
    assert out.shape == x.shape


def test_scalar_and_batch_timesteps_agree(tiny_pair):
    ours, _ = tiny_pair
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 250, ctx), ours(x, torch.tensor([250, 250]), ctx))
        torch.testing.assert_close(ours(x, torch.tensor(250.0), ctx), ours(x, 250, ctx))


@pytest.mark.parametrize("h,w", [(10, 8), (9, 13), (5, 6)])
def test_sizes_that_do_not_halve_evenly_equal_diffusers(tiny_pair, h, w):
    """The tiny U-Net halves twice: 9 -> 5 -> 3 going down, so each Upsample must land on 5 and 9
    (not 6 and 10) going up; diffusers forwards the skip sizes to its Upsamples for this."""
    ours, theirs = tiny_pair
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, h, w, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        a, b = ours(x, 250, ctx), theirs(x, 250, encoder_hidden_states=ctx).sample
    assert a.shape == b.shape == x.shape
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_sd15_takes_latents_of_any_size():
    with torch.device("meta"):
        sd15 = UNet(UNetConfig.sd15())
        out = sd15(torch.randn(1, 4, 65, 60), 1, torch.randn(1, 77, 768))   # 520x480 pixels
    assert out.shape == (1, 4, 65, 60)


def test_shape_errors_name_key_and_likely_cause(tiny_pair):
    _, theirs = tiny_pair
    sd = dict(theirs.state_dict())
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    sd[key] = torch.zeros(32, 1024)  # an SD 2.x-wide text context
    with pytest.raises(weights.WeightsError, match=r"attn2\.to_k\.weight.*\(32, 1024\).*\(32, 32\).*SD 2\.x"):
        weights.load_unet(sd, UNetConfig.tiny())
    sd = dict(theirs.state_dict(), **{"lora_unet_x.lora_down.weight": torch.zeros(1)})
    with pytest.raises(weights.WeightsError, match="LoRA"):
        weights.load_unet(sd, UNetConfig.tiny())
    sd = dict(theirs.state_dict())
    del sd["conv_out.bias"]
    with pytest.raises(weights.WeightsError, match="missing.*out.conv.bias"):
        weights.load_unet(sd, UNetConfig.tiny())


def test_from_diffusers_folder(tmp_path, tiny_pair):
    ours, theirs = tiny_pair
    theirs.save_pretrained(tmp_path / "unet")
    loaded = weights.load_unet_folder(tmp_path)
    assert loaded.config == UNetConfig.tiny()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 3, ctx), ours(x, 3, ctx))


@pytest.mark.slow
def test_sd15_unet_matches_diffusers():
    with torch.device("meta"):  # no random init: both models get the same random tensors, shared
        theirs = UNet2DConditionModel(**UNetConfig.sd15().to_diffusers())
    sd = random_weights(theirs, seed=0)
    theirs.load_state_dict(sd, assign=True)
    theirs.eval()
    ours = weights.load_unet(sd, UNetConfig.sd15()).eval()
    del sd
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768)
    t = torch.tensor([981, 1])
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=ctx).sample
        out = ours(x, t, ctx)
    del ours, theirs
    gc.collect()
    assert out.shape == (2, 4, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_sd21_unet_matches_diffusers():
    """SD 2.1's U-Net at its real size on random weights (about 3.5 GB per model in float32: the
    two share their tensors, and both are freed before the assertion)."""
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**UNetConfig.sd21().to_diffusers())
    sd = random_weights(theirs, seed=0)
    theirs.load_state_dict(sd, assign=True)
    theirs.eval()
    ours = weights.load_unet(sd, UNetConfig.sd21()).eval()
    del sd
    torch.manual_seed(0)
    x, ctx = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 1024)
    t = torch.tensor([981])
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=ctx).sample
        out = ours(x, t, ctx)
    del ours, theirs
    gc.collect()
    assert out.shape == (1, 4, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_training_gradients_match_diffusers():
    """The in-place adds and SiLUs of the forward pass leave autograd's gradients intact."""
    torch.manual_seed(3)
    theirs = UNet2DConditionModel(**UNetConfig.tiny().to_diffusers())
    ours = UNet(UNetConfig.tiny())
    ours.load_state_dict(weights.unet_from_diffusers(theirs.state_dict()))
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32), torch.tensor([5, 600])
    target = torch.randn(2, 4, 8, 8)
    ((ours(x, t, ctx) - target) ** 2).mean().backward()
    ((theirs(x, t, encoder_hidden_states=ctx).sample - target) ** 2).mean().backward()
    grads = {k: p.grad for k, p in ours.named_parameters()}
    for key, p in theirs.named_parameters():
        torch.testing.assert_close(grads[weights.unet_key(key)], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [UNetConfig.sd15(), UNetConfig.sd21()], ids=["sd15", "sd21"])
def test_unet_in_float16_on_cuda_matches_diffusers(config):
    """The real-size U-Net in float16 on a GPU (SDPA attention; SD 2.1 with upcast_attention, as it
    sets it) against diffusers' on the very same fp16 tensors: both round differently, so the
    bound is relative to the output's spread."""
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config.to_diffusers())
    theirs.load_state_dict(random_weights(theirs), assign=True)
    theirs = theirs.to("cuda", torch.float16).eval()
    ours = weights.load_unet(theirs.state_dict(), config).eval()
    assert next(ours.parameters()).dtype == torch.float16 and next(ours.parameters()).is_cuda
    g = torch.Generator().manual_seed(0)
    size = config.sample_size
    x = torch.randn(2, 4, size, size, generator=g).to("cuda", torch.float16)
    ctx = torch.randn(2, 77, config.context_dim, generator=g).to("cuda", torch.float16)
    t = torch.tensor([999, 10], device="cuda")
    with torch.no_grad():
        a, b = ours(x, t, ctx).float(), theirs(x, t, encoder_hidden_states=ctx).sample.float()
        exact = theirs.float()(x.float(), t, encoder_hidden_states=ctx.float()).sample
    assert torch.isfinite(a).all()
    # ours is as close to the float32 answer as diffusers' own float16 run is (and close to it)
    assert (a - exact).abs().max() <= 1.5 * (b - exact).abs().max() + 1e-3
    assert (a - b).abs().max() / b.std() < 2e-2
