"""Chapter 13: LoRA layers, injection into the U-Net, merge/unmerge, and kohya-format files
that load the same in minisd as in diffusers."""
import gc

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from minisd import lora, weights
from minisd.unet import UNet, UNetConfig


def randomise_up(module, seed, std=0.1):
    """Stand-in for training: give every LoRA's `up` factor non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, lora.LoRALinear):
                m.up.weight.copy_(std * torch.randn(m.up.weight.shape, generator=g))


@pytest.fixture
def tiny_pair():
    """Our tiny U-Net and diffusers' on the same (randomised) weights."""
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**UNetConfig.tiny().to_diffusers()).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return fresh_copy(theirs), theirs


def fresh_copy(theirs):
    """Our U-Net on copies of diffusers' tensors (load_unet assigns tensors uncopied, and merge
    and the symmetric init change base weights in place)."""
    return weights.load_unet({k: v.clone() for k, v in theirs.state_dict().items()}, UNetConfig.tiny()).eval()


def unet_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g)


# --- LoRALinear ---------------------------------------------------------------------------

LAYERS = {
    "linear": (lambda: nn.Linear(24, 16), (5, 24)),
    "conv1x1": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 6, 6)),
    "conv3x3": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 6, 6)),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_zero_up_leaves_outputs_unchanged(kind):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    base, x = make(), torch.randn(shape)
    expected = base(x)
    layer = lora.LoRALinear(base, rank=4, alpha=8)
    assert layer.up.weight.abs().sum() == 0 and layer.down.weight.abs().sum() > 0
    assert torch.equal(layer(x), expected)


def test_update_is_alpha_over_rank_up_down():
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    w0 = base.weight.detach().clone()
    layer = lora.LoRALinear(base, rank=4, alpha=2)
    randomise_up(layer, seed=1)
    x = torch.randn(3, 24)
    w = w0 + (2 / 4) * layer.up.weight @ layer.down.weight        # W' = W0 + (alpha / r) B A
    torch.testing.assert_close(layer(x), F.linear(x, w, base.bias))
    layer.scale = 0.5                                              # a loader's strength multiplies the update
    w = w0 + 0.5 * (2 / 4) * layer.up.weight @ layer.down.weight
    torch.testing.assert_close(layer(x), F.linear(x, w, base.bias))


@pytest.mark.parametrize("kind", LAYERS)
def test_merge_then_unmerge_gives_back_w0(kind):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    base, x = make(), torch.randn(shape)
    w0 = base.weight.detach().clone()
    layer = lora.LoRALinear(base, rank=4, alpha=4)
    randomise_up(layer, seed=2, std=0.5)
    unmerged = layer(x)
    layer.merge()
    assert (base.weight - w0).abs().max() > 1e-2                   # the update is really in W now
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.merge()                                                  # merging twice does not add it twice
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert (base.weight - w0).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), unmerged)


@pytest.mark.parametrize("kind", LAYERS)
def test_symmetric_init_leaves_outputs_unchanged(kind):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    base, x = make(), torch.randn(shape)
    w0 = base.weight.detach().clone()
    expected = base(x)
    layer = lora.LoRALinear(base, rank=4, alpha=4, symmetric=True)
    assert layer.up.weight.abs().sum() > 0 and layer.down.weight.abs().sum() > 0   # both factors Gaussian
    assert (base.weight - w0).abs().max() > 1e-3                                     # W0 - A B stored in the base
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_bad_layers_are_refused():
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        lora.LoRALinear(nn.LayerNorm(4), rank=2)
    with pytest.raises(ValueError, match="rank"):
        lora.LoRALinear(nn.Linear(4, 4), rank=0)


# --- inject into the U-Net ------------------------------------------------------------------

def test_inject_wraps_attention_and_freezes_the_rest(tiny_pair):
    ours, _ = tiny_pair
    x, t, c = unet_inputs()
    with torch.no_grad():
        before = ours(x, t, c)
    added = lora.inject(ours, rank=4, alpha=4)
    # tiny: SpatialTransformers 2 down (1 per block), 1 mid, 4 up (2 per block); attn1 + attn2; q, k, v, out
    assert len(added) == 7 * 2 * 4
    assert all(p.rsplit(".", 1)[1] in ("to_q", "to_k", "to_v", "to_out") for p in added)
    with torch.no_grad():
        assert torch.equal(ours(x, t, c), before)                   # up = 0: same model
    trainable = {id(p) for p in ours.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora.trainable_parameters(ours)}
    assert len(trainable) == 2 * len(added)
    ours(x, t, c).square().mean().backward()
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in lora.trainable_parameters(ours))


def test_inject_only_cross_attention(tiny_pair):
    ours, _ = tiny_pair
    added = lora.inject(ours, rank=2, only_cross=True)
    assert len(added) == 7 * 4 and all(".attn2." in p for p in added)


def test_inject_with_no_matching_target_raises(tiny_pair):
    ours, _ = tiny_pair
    with pytest.raises(ValueError, match="no nn.Linear/nn.Conv2d named"):
        lora.inject(ours, rank=2, targets=("q_proj",))


def test_rank4_lora_is_under_one_percent_of_sd15_unet():
    with torch.device("meta"):                                     # sizes only, no memory
        unet = UNet(UNetConfig.sd15())
        lora.inject(unet, rank=4)
    n_lora, n_base = lora.count_parameters(unet)
    # per SpatialTransformer of width C, rank r: attn1 q, k, v, out (C -> C) and attn2 q, out
    # take r (C + C) each, attn2 k, v r (768 + C); SD 1.5 has widths 320 x5, 640 x5, 1280 x6
    widths = [320] * 5 + [640] * 5 + [1280] * 6
    r = 4
    assert n_lora == sum(6 * r * 2 * c + 2 * r * (768 + c) for c in widths) == 797_184
    assert n_base == 859_520_964
    assert n_lora / n_base < 0.01


# --- kohya files ------------------------------------------------------------------------------

def test_our_paths_are_diffusers_paths(tiny_pair):
    ours, theirs = tiny_pair
    their_layers = dict(theirs.named_modules())
    n = 0
    for path, layer in ours.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            other = their_layers[lora.diffusers_path(path)]
            assert isinstance(layer, type(other)) and other.weight.shape == layer.weight.shape, path
            n += 1
    assert n == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in theirs.modules())


def kohya_file(theirs, path, seed=0, select=("attentions", "resnets.0.conv1", "time_emb_proj"), alpha=2.0):
    """A kohya-style file written straight from diffusers' module names (not through minisd):
    attention projections, proj_in/proj_out (1x1 convs), feed-forward Linears, some 3x3 convs;
    rank 4, the same alpha on every layer as kohya's trainer writes it, or none (alpha = rank).

    (diffusers 0.42 gives the attention layers of a file whose alphas differ from layer to
    layer the most common alpha instead of their own; kohya's format and minisd apply each.)"""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in ((n, m) for n, m in theirs.named_modules()
                                  if isinstance(m, (nn.Linear, nn.Conv2d)) and any(s in n for s in select)):
        key = "lora_unet_" + name.replace(".", "_")
        r = 4
        if isinstance(m, nn.Linear):
            sd[key + ".lora_down.weight"] = 0.2 * torch.randn(r, m.in_features, generator=g)
            sd[key + ".lora_up.weight"] = 0.2 * torch.randn(m.out_features, r, generator=g)
        else:
            sd[key + ".lora_down.weight"] = 0.2 * torch.randn(r, m.in_channels, *m.kernel_size, generator=g)
            sd[key + ".lora_up.weight"] = 0.2 * torch.randn(m.out_channels, r, 1, 1, generator=g)
        if alpha is not None:
            sd[key + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return sd


def load_in_diffusers(theirs, path):
    """What pipe.load_lora_weights does for the U-Net: convert the kohya keys, load with peft."""
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, theirs)


@pytest.mark.parametrize("scale,alpha", [(1.0, 2.0), (0.6, 2.0), (1.0, None)])
def test_kohya_file_loads_like_diffusers(tiny_pair, tmp_path, scale, alpha):
    ours, theirs = tiny_pair
    x, t, c = unet_inputs()
    with torch.no_grad():
        base = theirs(x, t, c).sample
    sd = kohya_file(theirs, tmp_path / "lora.safetensors", alpha=alpha)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in sd
    lora.load(ours, tmp_path / "lora.safetensors", scale=scale)
    load_in_diffusers(theirs, tmp_path / "lora.safetensors")
    with torch.no_grad():
        a = ours(x, t, c)
        b = theirs(x, t, c, cross_attention_kwargs={"scale": scale}).sample
    assert (b - base).abs().max() > 0.1                              # the LoRA changes the output
    assert (a - b).abs().max() <= 1e-4
    assert sum(isinstance(m, lora.LoRALinear) for m in ours.modules()) == sum(k.endswith("lora_down.weight") for k in sd)


def test_saved_file_has_kohya_keys_and_loads_in_diffusers(tiny_pair, tmp_path):
    ours, theirs = tiny_pair
    lora.inject(ours, rank=4, alpha=2, targets=("to_q", "to_k", "to_v", "to_out", "proj_in"))
    randomise_up(ours, seed=3)
    lora.save(ours, tmp_path / "ours.safetensors")
    sd = load_file(str(tmp_path / "ours.safetensors"))
    assert len(sd) == 3 * (7 * 2 * 4 + 7)
    assert sd["lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0.alpha"].item() == 2.0
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    load_in_diffusers(theirs, tmp_path / "ours.safetensors")
    x, t, c = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, c), theirs(x, t, c).sample, atol=1e-4, rtol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_save_load_round_trip(tiny_pair, tmp_path, symmetric):
    ours, theirs = tiny_pair
    fresh = fresh_copy(theirs)
    lora.inject(ours, rank=4, alpha=8, only_cross=True, symmetric=symmetric)
    randomise_up(ours, seed=4)
    lora.save(ours, tmp_path / "concept.safetensors")
    lora.load(fresh, tmp_path / "concept.safetensors")
    x, t, c = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, c), ours(x, t, c), atol=1e-5, rtol=1e-5)
    ranks = {m.rank for m in fresh.modules() if isinstance(m, lora.LoRALinear)}
    assert ranks == ({8} if symmetric else {4})                      # symmetric: W0-relative update has rank 2r


def test_save_in_float16_halves_the_file_and_keeps_the_factors(tiny_pair, tmp_path):
    ours, _ = tiny_pair
    lora.inject(ours, rank=4, only_cross=True)
    randomise_up(ours, seed=5)
    lora.save(ours, tmp_path / "fp32.safetensors")
    lora.save(ours, tmp_path / "fp16.safetensors", dtype=torch.float16)
    full, half = (weights.load_state_dict(tmp_path / f) for f in ("fp32.safetensors", "fp16.safetensors"))
    assert full.keys() == half.keys()
    for k, v in half.items():
        if k.endswith(".alpha"):
            assert v.dtype == torch.float32 and torch.equal(v, full[k])   # alpha is a setting, kept exact
        else:
            assert v.dtype == torch.float16 and torch.equal(v, full[k].half())
    factors = sum(v.numel() for k, v in full.items() if not k.endswith(".alpha"))
    size = lambda f: (tmp_path / f).stat().st_size  # noqa: E731
    assert size("fp32.safetensors") - size("fp16.safetensors") >= 2 * factors - 1024   # 2 bytes saved per number


def test_load_then_merge_unmerge(tiny_pair, tmp_path):
    ours, theirs = tiny_pair
    kohya_file(theirs, tmp_path / "lora.safetensors", select=("attentions",))
    lora.load(ours, tmp_path / "lora.safetensors", scale=0.8)
    x, t, c = unet_inputs()
    with torch.no_grad():
        before = ours(x, t, c)
        lora.merge(ours)
        torch.testing.assert_close(ours(x, t, c), before, atol=1e-5, rtol=1e-5)
        lora.unmerge(ours)
        torch.testing.assert_close(ours(x, t, c), before)
    w0 = theirs.state_dict()
    for path, m in ours.named_modules():
        if isinstance(m, lora.LoRALinear):
            assert (m.base.weight - w0[lora.diffusers_path(path) + ".weight"]).abs().max() <= 1e-6


def edited(sd, key, value):
    return {**sd, key: value}


@pytest.mark.parametrize("case,match", [
    ("sd2_width", r"attn2_to_k\.lora_down\.weight.*\(4, 1024\).*made for SD 2\.x"),
    ("sdxl_path", r"lora_unet_input_blocks_4_1_proj_in\.lora_down\.weight.*another architecture"),
    ("loha", r"hada_w1_a.*not a plain LoRA"),
    ("missing_up", r"attn1_to_q\.lora_up\.weight is missing"),
    ("peft_format", r"'down_blocks\.0\.attentions\.0\.proj_in\.lora_A\.weight'.*without the 'unet\.'"),
    ("peft_sdxl_path", r"unet\.down_blocks\.2\.attentions\.0\.proj_in\.lora_A\.weight.*names no layer"),
    ("text_without_encoder", r"lora_te_text_model_encoder_layers_0_self_attn_q_proj.*text encoder"),
])
def test_mismatched_file_names_the_first_bad_key(tiny_pair, tmp_path, case, match):
    ours, theirs = tiny_pair
    sd = kohya_file(theirs, tmp_path / "ok.safetensors", select=("attentions",))
    prefix = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_"
    if case == "sd2_width":
        sd = edited(sd, prefix + "attn2_to_k.lora_down.weight", torch.zeros(4, 1024))
    elif case == "sdxl_path":
        sd = edited(sd, "lora_unet_input_blocks_4_1_proj_in.lora_down.weight", torch.zeros(4, 64, 1, 1))
    elif case == "loha":
        sd = edited(sd, prefix + "attn1_to_q.hada_w1_a", torch.zeros(4, 4))
    elif case == "peft_format":
        sd = edited(sd, "down_blocks.0.attentions.0.proj_in.lora_A.weight", torch.zeros(4, 32, 1, 1))
    elif case == "peft_sdxl_path":
        sd = edited(sd, "unet.down_blocks.2.attentions.0.proj_in.lora_A.weight", torch.zeros(4, 32, 1, 1))
    elif case == "missing_up":
        sd = {k: v for k, v in sd.items() if k != prefix + "attn1_to_q.lora_up.weight"}
    else:
        sd = edited(sd, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", torch.zeros(4, 32))
    save_file(sd, str(tmp_path / "bad.safetensors"))
    x, t, c = unet_inputs()
    with torch.no_grad():
        before = ours(x, t, c)
    with pytest.raises(weights.WeightsError, match=match):
        lora.load(ours, tmp_path / "bad.safetensors")
    assert not any(isinstance(m, lora.LoRALinear) for m in ours.modules())   # nothing half-loaded
    with torch.no_grad():
        assert torch.equal(ours(x, t, c), before)


# --- SD 2.x: linear proj_in/proj_out, 64-wide heads; a LoRA of one family in the other -------------

SD2_STYLE = UNetConfig(block_channels=(64, 128), cross_attention=(True, False), heads=(1, 2), layers_per_block=1,
                       context_dim=32, groups=32, sample_size=8, linear_projection=True, upcast_attention=True)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_sd2_kohya_file_loads_like_diffusers(tmp_path, scale):
    """An SD 2-style U-Net: proj_in/proj_out are Linear layers, and a kohya file's factors for them are 2-D."""
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**SD2_STYLE.to_diffusers()).eval()
    ours = weights.load_unet({k: v.clone() for k, v in theirs.state_dict().items()}, SD2_STYLE).eval()
    x, t, c = unet_inputs()
    x = x[:, :, :8, :8]
    with torch.no_grad():
        base = theirs(x, t, c).sample
    sd = kohya_file(theirs, tmp_path / "lora.safetensors")
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 64)
    lora.load(ours, tmp_path / "lora.safetensors", scale=scale)
    load_in_diffusers(theirs, tmp_path / "lora.safetensors")
    with torch.no_grad():
        a = ours(x, t, c)
        b = theirs(x, t, c, cross_attention_kwargs={"scale": scale}).sample
    assert (b - base).abs().max() > 0.1
    assert (a - b).abs().max() <= 1e-4


def test_lora_of_one_family_in_the_other_says_so(tmp_path):
    """An SD 2.x LoRA (1024-wide cross-attention keys) in an SD 1.x model, and the reverse: shapes only."""
    with torch.device("meta"):
        sd15, sd21 = UNet(UNetConfig.sd15()), UNet(UNetConfig.sd21())
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({key + ".lora_down.weight": torch.zeros(4, 1024), key + ".lora_up.weight": torch.zeros(320, 4)},
              str(tmp_path / "sd2.safetensors"))
    with pytest.raises(weights.WeightsError, match=r"\(4, 1024\).*made for SD 2\.x; load it into an SD 2\.x model"):
        lora.load(sd15, tmp_path / "sd2.safetensors")
    save_file({key + ".lora_down.weight": torch.zeros(4, 768), key + ".lora_up.weight": torch.zeros(320, 4)},
              str(tmp_path / "sd1.safetensors"))
    with pytest.raises(weights.WeightsError, match=r"\(4, 768\).*made for SD 1\.x; load it into an SD 1\.x model"):
        lora.load(sd21, tmp_path / "sd1.safetensors")


# --- the text encoder -----------------------------------------------------------------------

def text_pair():
    """Our tiny CLIPTextEncoder and transformers' CLIPTextModel on the same weights."""
    import transformers
    from minisd.clip import CLIPTextConfig
    cfg = CLIPTextConfig.tiny()
    torch.manual_seed(0)
    theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_width, max_position_embeddings=cfg.positions,
        hidden_act="quick_gelu", layer_norm_eps=cfg.eps, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)).eval()
    ours = weights.load_text_encoder({k: v.clone() for k, v in theirs.state_dict().items()}, cfg).eval()
    return ours, theirs


def tiny_pipeline(unet, text_encoder):
    from minisd import StableDiffusion
    from minisd.vae import AutoencoderKL, VAEConfig
    return StableDiffusion(unet, AutoencoderKL(VAEConfig.tiny()), text_encoder)


def test_pipeline_file_with_unet_and_text_encoder_loads_like_diffusers(tiny_pair, tmp_path):
    ours_unet, theirs_unet = tiny_pair
    ours_text, theirs_text = text_pair()
    sd = kohya_file(theirs_unet, tmp_path / "unet.safetensors", select=("attentions",))
    g = torch.Generator().manual_seed(5)
    for name, m in theirs_text.named_modules():                  # transformers 5.x: no text_model. level
        if isinstance(m, nn.Linear):
            key = "lora_te_text_model_" + name.replace(".", "_")
            sd[key + ".lora_down.weight"] = 0.2 * torch.randn(4, m.in_features, generator=g)
            sd[key + ".lora_up.weight"] = 0.2 * torch.randn(m.out_features, 4, generator=g)
            sd[key + ".alpha"] = torch.tensor(2.0)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    save_file(sd, str(tmp_path / "both.safetensors"))
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        text_before = theirs_text(ids).last_hidden_state
    pipe = tiny_pipeline(ours_unet, ours_text)
    lora.load(pipe, tmp_path / "both.safetensors")
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "both.safetensors"))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, theirs_unet)
    StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, alphas, theirs_text)
    x, t, c = unet_inputs()
    with torch.no_grad():
        text_after = theirs_text(ids).last_hidden_state
        assert (text_after - text_before).abs().max() > 0.1
        assert (pipe.text_encoder(ids) - text_after).abs().max() <= 1e-4
        assert (pipe.unet(x, t, c) - theirs_unet(x, t, c).sample).abs().max() <= 1e-4


def test_pipeline_save_load_round_trip_with_text_encoder(tiny_pair, tmp_path):
    ours_unet, theirs_unet = tiny_pair
    ours_text, _ = text_pair()
    lora.inject(ours_unet, rank=2, only_cross=True)
    lora.inject(ours_text, rank=2, alpha=1, targets=("q_proj", "k_proj", "v_proj", "out_proj"))
    randomise_up(ours_unet, seed=6)
    randomise_up(ours_text, seed=7)
    pipe = tiny_pipeline(ours_unet, ours_text)
    lora.save(pipe, tmp_path / "pipe.safetensors")
    keys = load_file(str(tmp_path / "pipe.safetensors")).keys()
    assert sum(k.startswith("lora_te_") for k in keys) == 3 * 2 * 4
    assert sum(k.startswith("lora_unet_") for k in keys) == 3 * 7 * 4
    fresh = tiny_pipeline(fresh_copy(theirs_unet), text_pair()[0])
    lora.load(fresh, tmp_path / "pipe.safetensors")
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(8))
    x, t, c = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh.text_encoder(ids), pipe.text_encoder(ids))
        torch.testing.assert_close(fresh.unet(x, t, c), pipe.unet(x, t, c))


# --- at the real SD 1.5 size ----------------------------------------------------------------------

def test_sd15_paths_are_diffusers_paths():
    with torch.device("meta"):                                     # module names and shapes only
        ours = UNet(UNetConfig.sd15())
        theirs = UNet2DConditionModel(**UNetConfig.sd15().to_diffusers())
    names = lora._unet_names(ours)
    kohya = {"lora_unet_" + n.replace(".", "_"): m for n, m in theirs.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert names.keys() == kohya.keys()
    for name, path in names.items():
        assert ours.get_submodule(path).weight.shape == kohya[name].weight.shape, name
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0" in names
    assert "lora_unet_mid_block_attentions_0_proj_in" in names


@pytest.mark.slow
def test_sd15_community_style_lora_loads_like_diffusers(tmp_path):
    """A file shaped like a typical SD 1.5 community LoRA (kohya's default targets: every Linear
    and 1x1 conv of the 16 SpatialTransformers, rank 4, alpha 1), on the real U-Net."""
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**UNetConfig.sd15().to_diffusers())
    # 860M random numbers take long on 2 cores: every weight is a view into one random buffer
    # (at its own offset); both models get the same tensors, which is all parity needs
    buf = 0.02 * torch.randn(32_000_000, generator=torch.Generator().manual_seed(0))
    sd = {k: buf[(i * 7919) % (len(buf) - v.numel()):][:v.numel()].view(v.shape)
          for i, (k, v) in enumerate(theirs.state_dict().items())}
    theirs.load_state_dict(sd, assign=True)
    theirs.eval()
    ours = weights.load_unet(sd, UNetConfig.sd15()).eval()         # shares the tensors; load does not write them
    del sd
    lora_sd = kohya_file(theirs, tmp_path / "sd15.safetensors", select=("attentions",), alpha=1.0)
    assert len(lora_sd) == 3 * 16 * (8 + 2 + 2)
    lora.load(ours, tmp_path / "sd15.safetensors", scale=0.8)
    load_in_diffusers(theirs, tmp_path / "sd15.safetensors")
    torch.manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 768)
    with torch.no_grad():
        expected = theirs(x, t, ctx, cross_attention_kwargs={"scale": 0.8}).sample
        out = ours(x, t, ctx)
    del ours, theirs
    gc.collect()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)



# --- every format diffusers' load_lora_weights reads, on every layer type LCM-LoRA wraps (chapter 15) --

# The layers LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) was trained on: the target_modules of
# diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# and the layers no LoRA above names, which a kohya file may still address
EXTRA_TARGETS = ("time_embedding.linear_1", "time_embedding.linear_2", "conv_in", "conv_out")
FORMATS = ("kohya", "peft", "peft_alpha", "diffusers_old", "attn_processor")


def lora_factors(theirs, targets, seed=0, rank=4):
    """{diffusers module name: (down, up)} for every Linear/Conv2d whose name ends with a target."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in theirs.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, nn.Linear):
            down, up = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        else:
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        out[name] = (0.2 * down, 0.2 * up)
    return out


def write_lora(factors, fmt, path, alpha=2.0):
    """A LoRA file in one of the formats diffusers reads, written from diffusers' names (not through minisd).
    kohya: lora_unet_<_-joined>.lora_down/lora_up/alpha; peft: unet.<name>.lora_A/lora_B (alpha = rank),
    peft_alpha: the same with peft's lora_alpha in the "lora_adapter_metadata" diffusers writes;
    diffusers_old: unet.<name>.lora.down/lora.up; attn_processor: attention layers as
    unet.<...>.attn1.processor.to_q_lora.down (the rest as diffusers_old)."""
    import json
    sd, metadata = {}, None
    old_attention = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    for name, (down, up) in factors.items():
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
            sd[key + ".alpha"] = torch.tensor(alpha)
        elif fmt in ("peft", "peft_alpha"):
            sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = down, up
        else:
            attn = next((k for k in old_attention if name.endswith(k) and ".attn" in name), None)
            if fmt == "attn_processor" and attn is not None:
                stem = name[:-len(attn) - 1] + ".processor." + old_attention[attn]
                sd[f"unet.{stem}.down.weight"], sd[f"unet.{stem}.up.weight"] = down, up
            else:
                sd[f"unet.{name}.lora.down.weight"], sd[f"unet.{name}.lora.up.weight"] = down, up
    if fmt == "peft_alpha":
        metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": alpha,
                                                         "unet.target_modules": sorted(factors)})}
    save_file(sd, str(path), metadata=metadata)
    return sd


def load_file_in_diffusers(theirs, path):
    """pipe.load_lora_weights for the U-Net: the state dict and its alphas (kohya) or peft config (metadata)."""
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, theirs, metadata=metadata)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_on_every_lcm_lora_layer_loads_like_diffusers(tiny_pair, tmp_path, fmt, fuse):
    ours, theirs = tiny_pair
    x, t, c = unet_inputs()
    with torch.no_grad():
        base = theirs(x, t, c).sample
    factors = lora_factors(theirs, LCM_LORA_TARGETS)
    kinds = {n.rsplit(".", 1)[-1] for n in factors}
    assert {"to_q", "proj_in", "conv1", "conv_shortcut", "time_emb_proj", "conv"} <= kinds   # every layer type
    assert any("downsamplers" in n for n in factors) and any("upsamplers" in n for n in factors)
    write_lora(factors, fmt, tmp_path / "lora.safetensors")
    lora.load(ours, tmp_path / "lora.safetensors")
    load_file_in_diffusers(theirs, tmp_path / "lora.safetensors")
    assert sum(isinstance(m, lora.LoRALinear) for m in ours.modules()) == len(factors)
    if fuse:
        lora.merge(ours)
        theirs.fuse_lora()
    with torch.no_grad():
        a, b = ours(x, t, c), theirs(x, t, c).sample
    assert (b - base).abs().max() > 0.1                              # the LoRA changes the output
    assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()


def test_kohya_file_on_the_time_embedding_and_conv_in_out(tiny_pair, tmp_path):
    """The layers outside the blocks, which a kohya file can name too (diffusers' converter maps them)."""
    ours, theirs = tiny_pair
    factors = lora_factors(theirs, EXTRA_TARGETS)
    assert len(factors) == 4
    write_lora(factors, "kohya", tmp_path / "lora.safetensors")
    lora.load(ours, tmp_path / "lora.safetensors", scale=0.7)
    load_file_in_diffusers(theirs, tmp_path / "lora.safetensors")
    x, t, c = unet_inputs()
    with torch.no_grad():
        b = theirs(x, t, c, cross_attention_kwargs={"scale": 0.7}).sample
        assert (ours(x, t, c) - b).abs().max() <= 1e-4


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lcm_lora_pipeline_equals_diffusers(tmp_path, fmt):
    """What a user of LCM-LoRA runs: load_lora_weights, LCMScheduler, 4 steps, guidance 1 (no CFG);
    ours: lora.load into the pipeline, scheduler="lcm". Tiny random weights."""
    import numpy as np
    from diffusers import LCMScheduler
    from minisd import StableDiffusion
    from reference_sd import reference_pipeline
    ref = reference_pipeline(tmp_path / "sd")
    ours = StableDiffusion.from_pretrained(tmp_path / "sd")
    write_lora(lora_factors(ref.unet, LCM_LORA_TARGETS, seed=3), fmt, tmp_path / "lcm_lora.safetensors")
    ref.load_lora_weights(str(tmp_path / "lcm_lora.safetensors"))
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    lora.load(ours, tmp_path / "lcm_lora.safetensors")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle in the top left", "an astronaut riding a horse"]
    theirs = ref(prompts, height=16, width=16, num_inference_steps=4, guidance_scale=1.0, latents=x,
                 output_type="np", generator=torch.Generator().manual_seed(1)).images
    image = ours(prompts, height=16, width=16, steps=4, guidance=1.0, scheduler="lcm", latents=x, output_type="np",
                 seed=1, progress=False)
    assert theirs.std() > 0.05
    np.testing.assert_allclose(image, theirs, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lcm_lora_on_sd15_unet_equals_diffusers(tmp_path, fmt):
    """The real SD 1.5 U-Net's shapes (random weights, 860M parameters, ~10 GB of RAM on the way)."""
    from reference_sd import SD15_UNET
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**SD15_UNET).eval()
    ours = weights.load_unet({k: v.clone() for k, v in theirs.state_dict().items()}, UNetConfig.sd15()).eval()
    factors = lora_factors(theirs, LCM_LORA_TARGETS, rank=8)
    write_lora(factors, fmt, tmp_path / "lcm_lora.safetensors", alpha=8.0)
    lora.load(ours, tmp_path / "lcm_lora.safetensors")
    load_file_in_diffusers(theirs, tmp_path / "lcm_lora.safetensors")
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        a, b = ours(x, torch.tensor([499]), c), theirs(x, torch.tensor([499]), c).sample
    assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    del ours, theirs
    gc.collect()
