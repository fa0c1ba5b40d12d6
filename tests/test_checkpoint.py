"""The course checkpoint format (minisd.checkpoint) and the names tables of minisd.weights."""
import json

import pytest
import torch
from safetensors import safe_open

import minisd
from minisd import checkpoint, weights
from minisd.clip import CLIP, CLIPConfig, CLIPTextConfig
from minisd.unet import UNet, UNetConfig
from minisd.vae import AutoencoderKL, VAEConfig


@pytest.mark.parametrize("config", [UNetConfig.sd15(), UNetConfig.tiny(), VAEConfig.course(), CLIPTextConfig.sd15(),
                                    CLIPConfig.course(), CLIPConfig.tiny()])
def test_every_config_round_trips_through_json(config):
    assert type(config).from_json(config.to_json()) == config


@pytest.mark.parametrize("make", [lambda: UNet(UNetConfig.tiny()), lambda: AutoencoderKL(VAEConfig.tiny()),
                                  lambda: CLIP(CLIPConfig.tiny())])
def test_save_and_load_give_the_same_model(tmp_path, make):
    torch.manual_seed(0)
    model = make()
    path = tmp_path / "m.safetensors"
    checkpoint.save_checkpoint(path, model, metadata={"command": "test"})
    back = checkpoint.load_checkpoint(path)
    assert type(back) is type(model) and back.config == model.config and not back.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    meta = checkpoint.checkpoint_metadata(path)
    assert meta["model"] == type(model).__name__ and meta["command"] == "test"
    assert checkpoint.sampling_settings(path) is None


def test_sampling_settings_are_stored_once_in_the_unet_file(tmp_path):
    path = tmp_path / "u.safetensors"
    sampling = {"sampler": "euler", "steps": 12, "guidance": 3.0}
    checkpoint.save_checkpoint(path, UNet(UNetConfig.tiny()), sampling=sampling)
    assert checkpoint.sampling_settings(path) == sampling
    # the shipped course U-Net: today's recommended settings, read by course_model()
    shipped = minisd.DATA_DIR / "course_unet.safetensors"
    assert checkpoint.sampling_settings(shipped) == {"sampler": "ddim", "steps": 25, "guidance": 4.0}


def test_shipped_course_checkpoints_are_in_the_format():
    for part, name in checkpoint.COURSE_FILES.items():
        with safe_open(str(minisd.DATA_DIR / name), "pt") as f:
            meta = f.metadata()
        assert meta["model"] in checkpoint.MODELS and json.loads(meta["config"])
        assert meta["command"].startswith(f"python -m minisd train {part}")
        assert ("sampling" in meta) == (part == "unet")


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    checkpoint.save_checkpoint(path, UNet(UNetConfig.tiny()))
    before = path.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, UNet(UNetConfig.tiny()))
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]   # no temporary file left


def test_a_foreign_file_is_refused_by_name(tmp_path):
    weights.save_file({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(weights.WeightsError, match="not written by minisd.checkpoint.save_checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="train unet"):
        checkpoint.course_unet(tmp_path / "none.safetensors")


# --- one names table per format, read both ways ------------------------------------------------

@pytest.mark.parametrize("config", [UNetConfig.tiny(), UNetConfig.sd15()])
def test_unet_names_table_reads_both_ways(config):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = UNet(config).state_dict()
        theirs = diffusers.UNet2DConditionModel(**config.to_diffusers()).state_dict()
    assert {weights.unet_diffusers_key(k) for k in ours} == set(theirs)
    assert {weights.unet_key(k) for k in theirs} == set(ours)
    assert all(weights.unet_key(weights.unet_diffusers_key(k)) == k for k in ours)


@pytest.mark.parametrize("config", [VAEConfig.tiny(), VAEConfig.sd15()])
def test_vae_names_table_reads_both_ways(config):
    diffusers = pytest.importorskip("diffusers")
    n = len(config.block_out_channels)
    with torch.device("meta"):
        ours = AutoencoderKL(config).state_dict()
        theirs = diffusers.AutoencoderKL(block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
                                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                         norm_num_groups=config.norm_groups, latent_channels=config.latent_channels).state_dict()
    assert {weights.vae_diffusers_key(k) for k in ours} == set(theirs)
    assert {weights.vae_key(k) for k in theirs} == set(ours)


def test_kohya_names_come_from_the_same_table():
    from minisd import lora
    assert lora.diffusers_path("mid_block.resnet2.skip") == "mid_block.resnets.1.conv_shortcut"
    assert lora.diffusers_path("up_blocks.1.attentions.0.block.attn2.to_out") == \
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"
    assert not hasattr(lora, "UNET_PATH_TO_DIFFUSERS")


def test_set_sampling_rewrites_only_the_settings(tmp_path):
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny())
    path = tmp_path / "u.safetensors"
    checkpoint.save_checkpoint(path, unet, sampling={"sampler": "ddim", "steps": 25, "guidance": 4.0},
                               metadata={"command": "train"})
    checkpoint.set_sampling(path, {"sampler": "ddim", "steps": 25, "guidance": 2.0}, note="best fidelity")
    assert checkpoint.sampling_settings(path) == {"sampler": "ddim", "steps": 25, "guidance": 2.0}
    meta = checkpoint.checkpoint_metadata(path)
    assert meta["command"] == "train" and meta["sampling_criterion"] == "best fidelity"
    back = checkpoint.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), back.state_dict().values()))
    vae_path = tmp_path / "v.safetensors"
    checkpoint.save_checkpoint(vae_path, AutoencoderKL(VAEConfig.tiny()))
    with pytest.raises(weights.WeightsError, match="U-Net"):
        checkpoint.set_sampling(vae_path, {"sampler": "ddim", "steps": 25, "guidance": 2.0})


def test_the_default_guidance_criterion():
    from minisd.evaluate import choose_guidance
    row = lambda colour, shape, fid: {"colour": [colour], "shape": [shape], "position": [1.0], "fidelity": [fid]}  # noqa: E731
    rows = {"real": row(1, 1, 0.998), "model_guidance_1.5": row(0.98, 1, 0.97),   # best fidelity, colour too low
            "model_guidance_2": row(1, 1, 0.965), "model_guidance_3": row(1, 0.995, 0.965),
            "model_guidance_4": row(1, 1, 0.96)}
    assert choose_guidance(rows)[0] == 2.0          # a tie at 0.965 goes to the smaller scale
    with pytest.raises(ValueError, match="99"):
        choose_guidance({"model_guidance_4": row(0.5, 1, 0.99)})


def test_shipped_default_guidance_is_the_one_its_measurement_chose():
    """data/course_fidelity.json is the measurement `evaluate --set-default` made; the U-Net shipped
    beside it must carry the guidance that the criterion picks from it (a retrained U-Net without a
    new measurement fails here)."""
    from minisd.evaluate import choose_guidance
    table = json.loads((minisd.paths.DATA_DIR / "course_fidelity.json").read_text())
    sampling = checkpoint.sampling_settings(checkpoint.course_path("unet"))
    assert sampling["guidance"] == choose_guidance(table["rows"])[0]
    assert sampling == {k: table["chosen_default"][k] for k in ("sampler", "steps", "guidance")}
    meta = checkpoint.checkpoint_metadata(checkpoint.course_path("unet"))
    assert "highest mean fidelity" in meta["sampling_criterion"]
