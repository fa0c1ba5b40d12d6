"""Chapter 5: minisd's AutoencoderKL equals diffusers' on the same weights, at a tiny config
and at SD 1.5's; DiagonalGaussian, the config presets and weight loading behave as documented."""
import pytest
import torch

from minisd import checkpoint, weights
from minisd.vae import AutoencoderKL, DiagonalGaussian, VAEConfig


def diffusers_vae(cfg):
    from diffusers import AutoencoderKL as Reference
    n = len(cfg.block_out_channels)
    return Reference(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                     down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                     block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                     latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_groups,
                     scaling_factor=cfg.scaling_factor, sample_size=cfg.sample_size).eval()


def check_parity(cfg, size):
    torch.manual_seed(0)
    ref = diffusers_vae(cfg)
    ours = weights.load_vae(ref.state_dict(), cfg)
    x = torch.rand(1, 3, size, size) * 2 - 1
    z = torch.randn(1, cfg.latent_channels, size // cfg.factor, size // cfg.factor)
    with torch.no_grad():
        theirs_post = ref.encode(x).latent_dist
        ours_post = ours.encode(x)
        torch.testing.assert_close(ours_post.mean, theirs_post.mean, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours_post.logvar, theirs_post.logvar, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=0, atol=1e-4)
        # the same generator gives the same sample
        torch.testing.assert_close(ours_post.sample(torch.Generator().manual_seed(1)),
                                   theirs_post.sample(torch.Generator().manual_seed(1)), rtol=0, atol=1e-4)
    return ref, ours


def test_tiny_matches_diffusers():
    ref, ours = check_parity(VAEConfig.tiny(), 16)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_course_config_matches_diffusers():
    check_parity(VAEConfig.course(), 32)


@pytest.mark.slow
def test_sd15_matches_diffusers_at_128():
    ref, ours = check_parity(VAEConfig.sd15(), 128)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 83_653_863
    # REFERENCE.md's split, from diffusers: encoder + quant_conv, decoder + post_quant_conv
    count = lambda *mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    assert count(ours.encoder, ours.quant_conv) == 34_163_664
    assert count(ours.decoder, ours.post_quant_conv) == 49_490_199
    del ref, ours


def test_sd15_shapes_on_meta_device():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.sd15())
        post = vae.encode(torch.empty(1, 3, 512, 512))
        assert post.mean.shape == (1, 4, 64, 64)               # f = 8, c = 4
        assert vae.decode(post.mean).shape == (1, 3, 512, 512)
    assert len(vae.encoder.down_blocks) == 4                   # 4 blocks, 3 of which downsample
    assert [b.downsample is not None for b in vae.encoder.down_blocks] == [True, True, True, False]
    assert vae.scaling_factor == 0.18215 and VAEConfig.sd15().factor == 8


def test_config_from_diffusers_dict():
    cfg = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
           "norm_num_groups": 32, "scaling_factor": 0.18215, "sample_size": 512, "in_channels": 3,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "act_fn": "silu"}
    assert VAEConfig.from_diffusers(cfg) == VAEConfig.sd15()
    with pytest.raises(ValueError, match="quant_conv"):
        VAEConfig.from_diffusers({**cfg, "use_quant_conv": False})


def test_diagonal_gaussian_clamps_logvar_and_samples_reparameterised():
    moments = torch.cat([torch.full((1, 2, 1, 1), 3.0), torch.tensor([-50.0, 50.0]).view(1, 2, 1, 1)], dim=1)
    g = DiagonalGaussian(moments)
    assert g.logvar.flatten().tolist() == [-30.0, 20.0]         # SD's clamp
    assert torch.equal(g.mode(), g.mean)
    eps = torch.randn(1, 2, 1, 1, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(g.sample(torch.Generator().manual_seed(5)), g.mean + torch.exp(0.5 * g.logvar) * eps)
    # samples of a wide Gaussian spread with its std
    wide = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 100, 100), torch.full((1, 1, 100, 100), 2 * 0.6931472)], 1))
    assert wide.sample(torch.Generator().manual_seed(0)).std().item() == pytest.approx(2.0, rel=0.03)


def test_wrong_input_shapes_say_what_was_expected():
    vae = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_loading_a_mismatched_state_dict_names_key_and_shapes():
    sd = diffusers_vae(VAEConfig.tiny()).state_dict()
    with pytest.raises(weights.WeightsError, match=r"has shape \(16, 8, 3, 3\) in the file but \(32, 8, 3, 3\)"):
        weights.load_vae(sd, VAEConfig(block_out_channels=(8, 32), layers_per_block=1, norm_groups=4))
    sd.pop("decoder.conv_out.bias")
    with pytest.raises(weights.WeightsError, match="missing"):
        weights.load_vae(sd, VAEConfig.tiny())


def test_train_command_writes_a_loadable_checkpoint_with_its_scaling_factor(tmp_path):
    from minisd.train import main
    out = tmp_path / "vae.safetensors"
    assert main(["vae", "--steps", "3", "--disc-start", "2", "--out", str(out)]) == 0
    vae = checkpoint.load_checkpoint(out)
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["command"] == f"python -m minisd train vae --steps 3 --disc-start 2 --out {out}"
    assert vae.scaling_factor == pytest.approx(float(meta["scaling_factor"]), rel=1e-4)
    assert vae.config.block_out_channels == VAEConfig.course().block_out_channels


def test_committed_course_vae_reconstructs_held_out_images():
    from minisd import losses
    from minisd.train import held_out_images
    vae = checkpoint.course_vae()
    x = held_out_images()
    with torch.no_grad():
        z = vae.encode(x).sample(torch.Generator().manual_seed(0)) * vae.scaling_factor
        rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    assert z.shape[1:] == (4, 8, 8)
    assert 0.9 <= z.std().item() <= 1.1                      # the seed's rescaling worked
    assert losses.psnr(x, rec).mean().item() >= 28.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_posterior_sample_with_a_cpu_generator_on_cuda():
    """A CPU generator samples a CUDA posterior (the noise is drawn on the generator's device,
    then moved): the same seed gives the same latents on CPU and GPU."""
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    on_cpu = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(1))
    on_gpu = DiagonalGaussian(moments.cuda()).sample(torch.Generator().manual_seed(1))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)


def test_saturated_l1_is_one_sided_on_black_and_full_pixels():
    from minisd.train.vae import saturated_l1
    x = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.2, 0.2])
    rec = torch.tensor([-1.5, -0.5, 1.4, 0.7, -0.3, 0.5])
    assert torch.allclose(saturated_l1(x, rec), torch.tensor([0.0, 0.5, 0.0, 0.3, 0.5, 0.3]))
