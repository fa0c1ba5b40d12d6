"""The U-Net trainer of chapter 9 (`python -m minisd train unet`), at tiny sizes: seconds, not minutes."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from minisd import data, train
from minisd.diffusion import add_noise
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet, UNetConfig
from minisd.vae import AutoencoderKL, VAEConfig
from minisd.checkpoint import course_unet, load_checkpoint, save_checkpoint
from minisd.weights import WeightsError

D = 16  # width of the stand-in text context


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(UNetConfig(block_channels=(16, 32), cross_attention=(True, True), heads=(2, 2),
                           layers_per_block=1, context_dim=D, groups=8, sample_size=8))


def course_like_latents(n=64, seed=0):
    """(n, 4, 8, 8) latents that carry the course images (a 4x4 average pool, 3 colour channels
    + brightness) and their labels, with random but fixed contexts for the 91 prompts."""
    images, captions = data.sample(n, seed=seed, exclude=data.HELD_OUT)
    x = F.avg_pool2d(data.to_tensor(images), 4)                              # (n, 3, 8, 8)
    latents = torch.cat([x, x.amax(dim=1, keepdim=True)], dim=1)             # (n, 4, 8, 8)
    prompts = train.course_prompts()
    labels = torch.tensor([prompts.index(c) for c in captions])
    contexts = torch.randn(len(prompts), 77, D, generator=torch.Generator().manual_seed(seed))
    return latents, labels, contexts, prompts


def fixed_loss(unet, latents, contexts):
    """The training objective with t and the noise held fixed, so two models can be compared."""
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (len(latents),), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    with torch.no_grad():
        return F.mse_loss(unet(add_noise(latents, noise, t), t, contexts), noise).item()


def test_course_prompts_are_the_90_captions_and_the_empty_one():
    prompts = train.course_prompts()
    assert len(prompts) == 91 and len(set(prompts)) == 91 and prompts[-1] == ""
    assert all(data.parse(p) for p in prompts[:-1])


def test_training_lowers_the_loss():
    latents, labels, contexts, prompts = course_like_latents()
    unet = tiny_unet()
    cond = contexts[labels]
    before = fixed_loss(unet, latents, cond)
    unet, ema, log = train.train_unet_model(unet, latents, labels, contexts, prompts, steps=40, batch_size=32,
                                            lr=2e-3, seed=0, progress=False)
    after = fixed_loss(unet, latents, cond)
    assert len(log["loss"]) == 40
    assert after < 0.7 * before, (before, after)
    # the moving average stays a usable model: its loss also fell below the untrained one
    assert fixed_loss(ema, latents, cond) < before


def test_training_is_reproducible_from_the_seed():
    latents, labels, contexts, prompts = course_like_latents(32)
    logs = [train.train_unet_model(tiny_unet(), latents, labels, contexts, prompts, steps=3, batch_size=8,
                                   seed=5, progress=False)[2]["loss"] for _ in range(2)]
    assert logs[0] == logs[1]


def test_caption_dropout_feeds_the_empty_prompt():
    latents, labels, contexts, prompts = course_like_latents(32)
    seen = []

    class Spy(torch.nn.Module):
        """Wraps the U-Net and records which prompt each context row belongs to."""
        def __init__(self, unet):
            super().__init__()
            self.unet, self.config = unet, unet.config

        def forward(self, x, t, context):
            # (B, 77, D) vs (91, 77, D): which prompt's context is each row?
            seen.extend((context[:, None] == contexts[None]).flatten(2).all(-1).float().argmax(1).tolist())
            return self.unet(x, t, context)

    train.train_unet_model(Spy(tiny_unet()), latents, labels, contexts, prompts, steps=20, batch_size=32,
                           drop=0.1, seed=0, progress=False)
    empty = sum(prompts[i] == "" for i in seen) / len(seen)
    assert 0.04 < empty < 0.18, empty   # 640 draws at p = 0.1
    assert all(prompts[i] == "" or data.parse(prompts[i]) not in data.HELD_OUT for i in seen)


def test_encode_course_data_uses_the_frozen_models_and_leaves_out_held_out():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    vae.config = dataclasses.replace(vae.config, scaling_factor=0.5)

    def text_encoder(ids):                                         # stand-in: (B, 77) -> (B, 77, D)
        return F.one_hot(ids % D, D).float()

    latents, labels, contexts, prompts = train.encode_course_data(vae, text_encoder, CLIPTokenizer.sd15(), n=40,
                                                                  batch_size=16)
    images, captions = data.sample(40, seed=0, exclude=data.HELD_OUT)
    with torch.no_grad():
        expected = vae.encode(data.to_tensor(images)).mean * 0.5
    torch.testing.assert_close(latents, expected)
    assert contexts.shape == (91, 77, D)
    assert [prompts[i] for i in labels] == captions
    assert not any(data.parse(prompts[i]) in data.HELD_OUT for i in labels)


def test_checkpoint_round_trip(tmp_path):
    unet = tiny_unet()
    path = tmp_path / "unet.safetensors"
    save_checkpoint(path, unet, sampling=train.COURSE_SAMPLING, metadata={"command": "python -m minisd train unet --steps 3"})
    loaded = load_checkpoint(path)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["command"] == "python -m minisd train unet --steps 3"
    assert loaded.config == unet.config
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 10, c), unet(x, 10, c), rtol=0, atol=0)


def test_loading_a_missing_or_foreign_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train unet"):
        course_unet(tmp_path / "nothing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="no 'model' and 'config'"):
        course_unet(tmp_path / "other.safetensors")


def test_guided_sampling_gives_latents_of_the_unet_size():
    unet = tiny_unet().eval()
    contexts = torch.randn(3, 77, D)
    x = train.sample_course_latents(unet, contexts[:2], contexts[2:], steps=3, guidance=4.0)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    again = train.sample_course_latents(unet, contexts[:2], contexts[2:], steps=3, guidance=4.0)
    torch.testing.assert_close(x, again, rtol=0, atol=0)
    # guidance 0 keeps only the unconditional branch: the prompts no longer matter
    a = train.sample_course_latents(unet, contexts[:1], contexts[2:], steps=3, guidance=0.0)
    b = train.sample_course_latents(unet, contexts[1:2], contexts[2:], steps=3, guidance=0.0)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(x[0], x[1])


def test_min_snr_loss_with_a_huge_gamma_is_the_plain_loss():
    from minisd.diffusion import training_loss
    unet = tiny_unet()
    x0, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, 77, D)
    with torch.no_grad():
        plain = training_loss(unet, x0, ctx, generator=torch.Generator().manual_seed(3))
        same = training_loss(unet, x0, ctx, generator=torch.Generator().manual_seed(3), min_snr_gamma=1e9)
        low = training_loss(unet, x0, ctx, generator=torch.Generator().manual_seed(3), min_snr_gamma=1.0)
    assert torch.allclose(plain, same, rtol=1e-5)
    assert low < plain   # the weights min(SNR, gamma) / SNR are <= 1, < 1 where SNR > gamma


def test_min_snr_and_clipped_training_runs():
    latents = torch.randn(16, 4, 8, 8)
    labels = torch.randint(0, 91, (16,))
    prompts = train.unet.course_prompts()
    contexts = torch.randn(91, 77, D)
    unet, ema, log = train.unet.train_unet_model(tiny_unet(), latents, labels, contexts, prompts, steps=3,
                                                 batch_size=4, min_snr=5.0, clip_grad=1.0, progress=False)
    assert len(log["loss"]) == 3 and all(v == v for v in log["loss"])
