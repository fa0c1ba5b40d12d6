"""minisd.weights (chapter 11): the original single-file layout and diffusers folders.

diffusers ships converters only from the original layout to its own
(`convert_ldm_unet_checkpoint` & co.), so our `to_original` is checked by a round trip:
fed to diffusers' converters, it must give back diffusers' state dicts exactly, and our
`from_original` must load it to the same model.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from safetensors.torch import load_file, save_file

import minisd
from minisd import StableDiffusion, weights
from minisd.weights import WeightsError
from reference_sd import (SD15_TEXT, SD15_UNET, SD15_VAE, SD21_SCHEDULER, TINY2_TEXT, TINY2_UNET, TINY_TEXT, TINY_UNET,
                          TINY_VAE, reference_pipeline)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny diffusers pipeline, saved as a folder, and ours loaded from that folder."""
    folder = tmp_path_factory.mktemp("tiny_sd") / "sd"
    ref = reference_pipeline(folder)
    return ref, StableDiffusion.from_pretrained(folder), folder


def assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def back_to_diffusers(original, ref_unet_config, ref_vae_config):
    """diffusers' own converters, original -> diffusers layout."""
    return (convert_ldm_unet_checkpoint(original, dict(ref_unet_config)),
            convert_ldm_vae_checkpoint(original, dict(ref_vae_config)),
            convert_ldm_clip_checkpoint(original))


def test_to_original_round_trips_through_diffusers_converters(tiny):
    ref, ours, _ = tiny
    original = weights.to_original(ours)
    unet, vae, text = back_to_diffusers(original, ref.unet.config, ref.vae.config)
    assert_same_state(unet, ref.unet.state_dict())
    assert_same_state(vae, ref.vae.state_dict())
    theirs = {k.removeprefix("text_model."): v for k, v in ref.text_encoder.state_dict().items()}
    text = {k.removeprefix("text_model."): v for k, v in text.items() if not k.endswith("position_ids")}
    assert_same_state(text, theirs)
    # the VAE attention is stored as 1x1 convs, as in the released files
    assert original["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in original  # decoder counted from the bottom


def test_from_original_loads_the_same_model(tiny):
    _, ours, _ = tiny
    again = weights.from_original(weights.to_original(ours))
    for part in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(again, part).state_dict(), getattr(ours, part).state_dict())
    # configs recovered from the shapes alone; the file does not store the training size: SD 1.x's
    assert again.unet.config == replace(ours.unet.config, sample_size=64)
    assert again.vae.config == replace(ours.vae.config, sample_size=512)
    assert again.text_encoder.config == ours.text_encoder.config


def test_known_original_names():
    """A few names checked against the released SD 1.5 file's, at SD 1.5's config."""
    from minisd.unet import UNetConfig
    from minisd.vae import VAEConfig
    u, v = UNetConfig.sd15(), VAEConfig.sd15()
    assert weights.unet_original_key("down_blocks.1.resnets.0.gsc1.conv.weight", u) == \
        "input_blocks.4.0.in_layers.2.weight"
    assert weights.unet_original_key("down_blocks.2.downsample.conv.bias", u) == "input_blocks.9.0.op.bias"
    assert weights.unet_original_key("up_blocks.1.upsample.conv.weight", u) == "output_blocks.5.2.conv.weight"
    assert weights.unet_original_key("up_blocks.0.upsample.conv.weight", u) == "output_blocks.2.1.conv.weight"
    assert weights.unet_original_key("up_blocks.3.attentions.2.block.ff.geglu.proj.weight", u) == \
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight"
    assert weights.unet_original_key("mid_block.attention.block.attn2.to_out.bias", u) == \
        "middle_block.1.transformer_blocks.0.attn2.to_out.0.bias"
    assert weights.unet_original_key("time_embedding.linear_2.weight", u) == "time_embed.2.weight"
    assert weights.vae_original_key("decoder.up_blocks.0.resnets.1.gsc1.conv.weight", v) == \
        "decoder.up.3.block.1.conv1.weight"
    assert weights.vae_original_key("encoder.mid_block.attention.to_out.weight", v) == \
        "encoder.mid.attn_1.proj_out.weight"
    assert weights.vae_original_key("encoder.down_blocks.1.resnets.0.skip.weight", v) == \
        "encoder.down.1.block.0.nin_shortcut.weight"


def test_sd15_configs_are_inferred_from_shapes():
    """On the meta device (no memory): SD 1.5's original-layout shapes give back SD 1.5's configs."""
    from minisd.unet import UNet, UNetConfig
    from minisd.vae import AutoencoderKL, VAEConfig
    with torch.device("meta"):
        pipe = StableDiffusion(UNet(UNetConfig.sd15()), AutoencoderKL(VAEConfig.sd15()),
                               minisd.CLIPTextEncoder(minisd.CLIPTextConfig.sd15()))
    original = weights.to_original(pipe)
    unet, vae, text = weights.split_original(original)
    assert weights.unet_config_from_original(unet, "x") == UNetConfig.sd15()
    assert weights.vae_config_from_original(vae, "x") == VAEConfig.sd15()
    assert weights.text_config_from_weights(text) == minisd.CLIPTextConfig.sd15()
    assert len(original) == 686 + 248 + 197  # every tensor of a released SD 1.5 file but the ignored ones


@pytest.mark.slow
def test_sd15_round_trip_through_diffusers_converters():
    """The full-size key maps: random SD 1.5 tensors (bfloat16 views of one random pool, so the
    test needs little memory) under diffusers' and transformers' own names, through ours and back."""
    import diffusers
    import transformers
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD15_UNET)
        vae = diffusers.AutoencoderKL(**SD15_VAE)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act="quick_gelu", **SD15_TEXT))
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(40_000_000, generator=g, dtype=torch.bfloat16)  # larger than the largest tensor

    def random_like(module):  # each tensor a view of the pool at its own random offset: distinct, no memory
        out = {}
        for k, v in module.state_dict().items():
            start = int(torch.randint(0, len(pool) - v.numel(), (), generator=g))
            out[k] = pool[start:start + v.numel()].view(v.shape)
        return out

    unet_sd, vae_sd, text_sd = random_like(unet), random_like(vae), random_like(text)
    ours = weights.from_diffusers(unet_sd, vae_sd, text_sd, dtype=torch.bfloat16)
    original = weights.to_original(ours)
    assert len(original) == 686 + 248 + 197
    back_unet, back_vae, back_text = back_to_diffusers(original, unet.config, vae.config)
    assert_same_state(back_unet, unet_sd)
    assert_same_state(back_vae, vae_sd)
    back_text.pop("text_model.embeddings.position_ids")
    assert_same_state({k.removeprefix("text_model."): v for k, v in back_text.items()}, text_sd)
    del back_unet, back_vae, back_text
    again = weights.from_original(original, dtype=torch.bfloat16)
    assert again.unet.config == minisd.UNetConfig.sd15()
    assert_same_state(again.unet.state_dict(), ours.unet.state_dict())
    assert_same_state(again.vae.state_dict(), ours.vae.state_dict())


# --- files and folders ------------------------------------------------------------------

def test_single_file_safetensors_and_ckpt_load(tiny, tmp_path):
    _, ours, _ = tiny
    original = {k: v.contiguous() for k, v in weights.to_original(ours).items()}
    # what a released file holds besides the model: EMA copies and the noise schedule, ignored
    original["model_ema.decay"] = torch.tensor(0.9999)
    original["model_ema.diffusion_modelconv_inweight"] = torch.zeros(1)
    original["alphas_cumprod"] = torch.ones(1000)
    save_file(original, str(tmp_path / "sd.safetensors"))
    torch.save({"state_dict": original, "global_step": 1}, str(tmp_path / "sd.ckpt"))
    for name in ("sd.safetensors", "sd.ckpt"):
        pipe = StableDiffusion.from_pretrained(tmp_path / name)
        assert_same_state(pipe.unet.state_dict(), ours.unet.state_dict())
        assert_same_state(pipe.vae.state_dict(), ours.vae.state_dict())


def test_folder_text_encoder_with_or_without_text_model_prefix(tiny, tmp_path):
    import shutil
    _, ours, folder = tiny
    copy = tmp_path / "sd"
    shutil.copytree(folder, copy)
    path = copy / "text_encoder" / "model.safetensors"
    sd = load_file(str(path))
    assert not any(k.startswith("text_model.") for k in sd)   # transformers 5.x saves without it
    prefixed = {"text_model." + k: v for k, v in sd.items()}
    prefixed["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as the real SD 1.5 folder
    save_file(prefixed, str(path))
    pipe = StableDiffusion.from_pretrained(copy)
    assert_same_state(pipe.text_encoder.state_dict(), ours.text_encoder.state_dict())


class NotATensor:
    """Any object a full unpickle would have to construct (and could run code to build)."""


def test_ckpt_is_read_with_weights_only(tmp_path):
    torch.save({"state_dict": {"x": NotATensor()}}, str(tmp_path / "evil.ckpt"))
    with pytest.raises(WeightsError, match="evil.ckpt"):
        StableDiffusion.from_pretrained(tmp_path / "evil.ckpt")


# --- bad files ----------------------------------------------------------------------------

def test_missing_path_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusers folder"):
        StableDiffusion.from_pretrained(tmp_path / "nowhere.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        StableDiffusion.from_pretrained(tmp_path / "empty")


def test_truncated_file_names_the_file(tiny, tmp_path):
    _, ours, _ = tiny
    path = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in weights.to_original(ours).items()}, str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="cut.safetensors.*truncated or corrupt"):
        StableDiffusion.from_pretrained(path)


def test_lora_file_is_recognised(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(path))
    with pytest.raises(WeightsError, match="style.safetensors.*looks like a LoRA file.*minisd.lora.load"):
        StableDiffusion.from_pretrained(path)


def test_mismatched_shape_names_key_and_both_shapes(tiny):
    _, ours, _ = tiny
    original = weights.to_original(ours)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    original[key] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(WeightsError, match=r"f\.safetensors: model\.diffusion_model\.input_blocks\.1\.0\.in_layers"
                                           r"\.2\.weight has shape \(32, 32, 1, 1\) in the file but \(32, 32, 3, 3\)"):
        weights.from_original(original, source="f.safetensors")


def test_missing_and_unknown_keys(tiny):
    _, ours, _ = tiny
    original = weights.to_original(ours)
    del original["first_stage_model.decoder.mid.attn_1.k.bias"]
    with pytest.raises(WeightsError, match=r"missing.*first_stage_model\.decoder\.mid\.attn_1\.k\.bias"):
        weights.from_original(original)
    original = weights.to_original(ours)
    original["something_else.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="something_else.weight"):
        weights.from_original(original)


def test_diffusers_component_file_is_not_a_single_file(tiny):
    ref, _, folder = tiny
    with pytest.raises(WeightsError, match="diffusers' layout.*folder"):
        StableDiffusion.from_pretrained(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_sharded_folder_loads(tiny, tmp_path):
    """Large parts are saved in shards with an index (`*.safetensors.index.json`)."""
    _, ours, _ = tiny
    reference_pipeline(tmp_path / "sharded", max_shard_size="300KB")
    assert (tmp_path / "sharded" / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    pipe = StableDiffusion.from_pretrained(tmp_path / "sharded")
    for part in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(pipe, part).state_dict(), getattr(ours, part).state_dict())


# --- SD 2.x: folders, single files with OpenCLIP's text tower, and telling the families apart ------

@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    """A random tiny SD 2-style diffusers pipeline (linear projections, GELU text encoder, "!"
    padding, SD 2.1's scheduler file), saved as a folder, and ours loaded from it."""
    folder = tmp_path_factory.mktemp("tiny_sd2") / "sd"
    ref = reference_pipeline(folder, unet=TINY2_UNET, text=TINY2_TEXT, scheduler=("DDIMScheduler", SD21_SCHEDULER),
                             pad_token="!")
    return ref, StableDiffusion.from_pretrained(folder), folder


def openclip_layout(text_state, seed=0):
    """transformers CLIPTextModel tensors -> the keys an SD 2.x original file holds under
    `cond_stage_model.model.` (the reference side, written out by hand): OpenCLIP's names, q/k/v
    fused into in_proj, plus what SD 2.x does not use: a last layer, text_projection, logit_scale."""
    sd, qkv = {}, {}
    names = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    outside = {"embeddings.token_embedding.weight": "token_embedding.weight",
               "embeddings.position_embedding.weight": "positional_embedding",
               "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    layers = 0
    for key, tensor in text_state.items():
        key = key.removeprefix("text_model.")
        if key in outside:
            sd[outside[key]] = tensor
            continue
        _, _, i, rest = key.split(".", 3)
        layers = max(layers, int(i) + 1)
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            qkv[(int(i), rest.split(".")[1][0], rest.split(".")[2])] = tensor
            continue
        for ours, theirs in names:
            rest = rest.replace(ours, theirs)
        sd[f"transformer.resblocks.{i}.{rest}"] = tensor
    for i in range(layers):
        for p in ("weight", "bias"):
            sd[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat([qkv[(i, c, p)] for c in "qkv"])
    g = torch.Generator().manual_seed(seed)
    for key in [k for k in sd if k.startswith("transformer.resblocks.0.")]:   # the 24th layer, unused by SD 2.x
        sd[key.replace("resblocks.0.", f"resblocks.{layers}.")] = torch.randn(sd[key].shape, generator=g)
    width = sd["token_embedding.weight"].shape[1]
    sd["text_projection"] = torch.randn(width, width, generator=g)
    sd["logit_scale"] = torch.tensor(4.6052)
    return {weights.OPENCLIP_PREFIX + k: v for k, v in sd.items()}


def sd2_original(ref, ours):
    """An SD 2.x original single file of the tiny SD 2 model: U-Net and VAE in the original layout
    (to_original, given an SD 1-style text encoder only so that it writes them), OpenCLIP's text tower."""
    stand_in = minisd.CLIPTextEncoder(minisd.CLIPTextConfig.tiny())
    original = {k: v for k, v in weights.to_original(StableDiffusion(ours.unet, ours.vae, stand_in)).items()
                if not k.startswith(weights.TEXT_PREFIX)}
    return {**original, **openclip_layout(ref.text_encoder.state_dict())}


def test_openclip_layout_is_what_diffusers_converts(tiny2):
    """The hand-written reference layout is SD 2.x's: diffusers' own converter reads it back."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    ref, _, _ = tiny2
    back = convert_open_clip_checkpoint(ref.text_encoder, openclip_layout(ref.text_encoder.state_dict()))
    n = ref.text_encoder.config.num_hidden_layers   # diffusers drops the last layer only by name, at SD 2's 24
    back = {k.removeprefix("text_model."): v for k, v in back.items()
            if k != "text_projection.weight" and f"layers.{n}." not in k}
    theirs = {k.removeprefix("text_model."): v for k, v in ref.text_encoder.state_dict().items()}
    assert sorted(back) == sorted(theirs)
    for key in theirs:
        assert torch.equal(back[key], theirs[key]), key


def test_sd2_single_file_loads_as_the_folder(tiny2, tmp_path):
    ref, ours, _ = tiny2
    save_file(sd2_original(ref, ours), str(tmp_path / "v2-tiny.safetensors"))
    single = StableDiffusion.from_pretrained(tmp_path / "v2-tiny.safetensors")
    for part in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(single, part).state_dict(), getattr(ours, part).state_dict())
    # configs from the shapes: 64-wide heads, linear projections, upcast, GELU, 23 of 24 layers used
    assert single.unet.config == replace(ours.unet.config, sample_size=96)
    assert single.text_encoder.config == ours.text_encoder.config
    assert (single.scheduler, single.scheduler_config) == ("ddim", minisd.schedulers.SchedulerConfig.sd21())
    assert single.tokenizer.pad_id == 0
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = single("a red circle", height=16, width=16, steps=2, latents=x, output_type="np", progress=False)
    b = ours("a red circle", height=16, width=16, steps=2, latents=x, output_type="np", progress=False)
    assert np.array_equal(a, b)


def test_sd2_single_file_prediction_type_as_diffusers_decides(tiny2, tmp_path):
    """v_prediction unless the file records SD 2.0-base's training step; prediction_type= overrides."""
    ref, ours, _ = tiny2
    original = sd2_original(ref, ours)
    torch.save({**original, "global_step": 875000}, str(tmp_path / "base.ckpt"))
    base = StableDiffusion.from_pretrained(tmp_path / "base.ckpt")
    assert base.scheduler_config.prediction_type == "epsilon" and base.unet.config.sample_size == 64
    save_file(original, str(tmp_path / "v.safetensors"))
    forced = StableDiffusion.from_pretrained(tmp_path / "v.safetensors", prediction_type="epsilon")
    assert forced.scheduler_config.prediction_type == "epsilon" and forced.unet.config.sample_size == 64


def test_sd2_text_encoder_file_is_checked_key_by_key(tiny2):
    ref, ours, _ = tiny2
    original = sd2_original(ref, ours)
    extra = {**original, weights.OPENCLIP_PREFIX + "transformer.resblocks.0.attn.extra": torch.zeros(1)}
    with pytest.raises(WeightsError, match="resblocks.0.attn.extra"):
        weights.from_original(extra, source="v2.safetensors")
    missing = {k: v for k, v in original.items() if not k.endswith("resblocks.0.attn.in_proj_weight")}
    with pytest.raises(WeightsError, match=r"in_proj_weight is missing"):
        weights.from_original(missing, source="v2.safetensors")
    mixed = {**original, weights.TEXT_PREFIX + "text_model.final_layer_norm.weight": torch.ones(64)}
    with pytest.raises(WeightsError, match="mixing two models"):
        weights.from_original(mixed, source="v2.safetensors")
    with pytest.raises(WeightsError, match="to_original writes SD 1.x"):
        weights.to_original(ours)


def meta_state(model_cls, **kwargs):
    """A model's state dict on the meta device: shapes, no memory."""
    with torch.device("meta"):
        return model_cls(**kwargs).state_dict()


def zeros_like_state(state):
    """CPU stand-ins of every tensor that take no memory (one zero, expanded to each shape)."""
    return {k: torch.zeros(()).expand(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("file, config, match", [
    ("sd21", "sd15", r"proj_in\.weight has shape \(320, 320\) in the file but \(320, 320, 1, 1\).*an SD 2\.x file "
                     r"for an SD 1\.x config; use UNetConfig\.sd21\(\)"),
    ("sd15", "sd21", r"proj_in\.weight has shape \(320, 320, 1, 1\) in the file but \(320, 320\).*an SD 1\.x file "
                     r"for an SD 2\.x config; use UNetConfig\.sd15\(\)"),
])
def test_unet_of_one_family_with_the_others_config(file, config, match):
    """Shapes only (meta tensors): the check runs before any tensor is touched."""
    from diffusers import UNet2DConditionModel
    theirs = meta_state(UNet2DConditionModel, **getattr(minisd.UNetConfig, file)().to_diffusers())
    with pytest.raises(WeightsError, match=match):
        weights.load_unet(theirs, getattr(minisd.UNetConfig, config)())


def test_text_encoder_of_one_family_with_the_others_config():
    ours = zeros_like_state(meta_state(minisd.CLIPTextEncoder, config=minisd.CLIPTextConfig.sd2()))
    with pytest.raises(WeightsError, match=r"token_embedding\.weight has shape \(49408, 1024\).*the file is SD 2\.x "
                                           r"\(OpenCLIP ViT-H/14, 1024 wide\) but the config is SD 1\.x"):
        weights.load_text_encoder(ours, minisd.CLIPTextConfig.sd15())
    ours = zeros_like_state(meta_state(minisd.CLIPTextEncoder, config=minisd.CLIPTextConfig.sd15()))
    with pytest.raises(WeightsError, match=r"the file is SD 1\.x .* but the config is SD 2\.x.*CLIPTextConfig\.sd15"):
        weights.load_text_encoder(ours, minisd.CLIPTextConfig.sd2())


def test_sdxl_files_and_folders_are_refused_by_name(tiny, tmp_path):
    _, ours, folder = tiny
    original = weights.to_original(ours)
    sdxl = {**original, "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(4)}
    with pytest.raises(WeightsError, match="xl.safetensors: this is an SDXL file"):
        weights.from_original(sdxl, source="xl.safetensors")
    copy = tmp_path / "sdxl"
    copy.mkdir()
    for part in folder.iterdir():
        (copy / part.name).symlink_to(part)
    (copy / "text_encoder_2").symlink_to(folder / "text_encoder")
    with pytest.raises(WeightsError, match="SDXL"):
        StableDiffusion.from_pretrained(copy)


def test_sd21_configs_are_inferred_from_shapes():
    """On the meta device: SD 2.1's original-layout U-Net shapes give back UNetConfig.sd21()."""
    with torch.device("meta"):
        pipe = StableDiffusion(minisd.UNet(minisd.UNetConfig.sd21()), minisd.AutoencoderKL(minisd.VAEConfig.sd15()),
                               minisd.CLIPTextEncoder(minisd.CLIPTextConfig.sd15()))
    unet = {k[len(weights.UNET_PREFIX):]: v for k, v in weights.to_original(pipe).items()
            if k.startswith(weights.UNET_PREFIX)}
    assert weights.unet_config_from_original(unet, "v2-1") == minisd.UNetConfig.sd21()
