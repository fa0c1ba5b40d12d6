"""Fused q/k/v projections (appendix "Making it fast"): equal to diffusers' fuse_qkv_projections
on the same weights, and the to_q / to_k / to_v layers stay the ones that load, save, train and
take a LoRA."""
import torch
from diffusers import UNet2DConditionModel

from minisd import lora, weights
from minisd.attention import CrossAttention, SelfAttention, fuse_qkv_projections
from minisd.unet import UNetConfig
from minisd.vae import VAEConfig

from test_vae import diffusers_vae


def tiny_unets():
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**UNetConfig.tiny().to_diffusers()).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return weights.load_unet(theirs.state_dict(), UNetConfig.tiny()).eval(), theirs


def unet_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    c = UNetConfig.tiny()
    return (torch.randn(2, c.in_channels, 16, 16, generator=g), torch.tensor(500),
            torch.randn(2, 77, c.context_dim, generator=g))


def attention_layers(model):
    return [m for m in model.modules() if isinstance(m, CrossAttention)]


@torch.no_grad()
def test_unet_fused_equals_diffusers_fused():
    ours, theirs = tiny_unets()
    x, t, ctx = unet_inputs()
    plain = ours(x, t, ctx)
    fuse_qkv_projections(ours)
    theirs.fuse_qkv_projections()
    assert all(m.fused_stamp is not None for m in attention_layers(ours))
    fused = ours(x, t, ctx)
    torch.testing.assert_close(fused, theirs(x, t, encoder_hidden_states=ctx).sample, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)


@torch.no_grad()
def test_vae_fused_equals_diffusers_fused():
    cfg = VAEConfig.tiny()
    torch.manual_seed(0)
    ref = diffusers_vae(cfg)
    ours = weights.load_vae(ref.state_dict(), cfg)
    z = torch.randn(1, cfg.latent_channels, 4, 4)
    fuse_qkv_projections(ours)
    ref.fuse_qkv_projections()
    assert attention_layers(ours) and all(m.fused_stamp is not None for m in attention_layers(ours))
    torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=0, atol=1e-5)


def test_fused_path_is_one_matrix_product_per_layer(monkeypatch):
    """The fused layer really takes the fused path: its to_k / to_v (and to_q in self-attention)
    are not called."""
    torch.manual_seed(0)
    for attn in (SelfAttention(16, 2), CrossAttention(16, 8, 2)):
        calls = []
        for name in ("to_q", "to_k", "to_v"):
            getattr(attn, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
        x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
        args = (x,) if isinstance(attn, SelfAttention) else (x, ctx)
        with torch.no_grad():
            plain = attn(*args)
            assert sorted(calls) == ["to_k", "to_q", "to_v"]
            calls.clear()
            attn.fuse_projections()
            fused = attn(*args)
        assert calls == ([] if isinstance(attn, SelfAttention) else ["to_q"])
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
        attn.fuse_projections(False)
        assert "fused_weight" not in dict(attn.named_buffers())


def test_state_dict_keys_unchanged_and_new_weights_are_used():
    ours, _ = tiny_unets()
    keys = list(ours.state_dict())
    fuse_qkv_projections(ours)
    assert list(ours.state_dict()) == keys  # the fused copy is not saved: files keep diffusers' layout
    # load other weights after fusing: the fused copy follows them
    other, _ = tiny_unets()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        want = other(x, t, ctx)
        ours.load_state_dict(other.state_dict())
        torch.testing.assert_close(ours(x, t, ctx), want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_lora_on_a_fused_model_matches_the_unfused_one():
    """A LoRA injected, loaded or merged after fusing acts exactly as on an unfused model."""
    x, t, ctx = unet_inputs()
    outs = {}
    for fuse in (False, True):
        ours, _ = tiny_unets()
        if fuse:
            fuse_qkv_projections(ours)
        torch.manual_seed(3)
        layers = lora.inject(ours, rank=2)
        for layer in layers.values():
            layer.up.weight.normal_(0, 0.1)
        wrapped = ours(x, t, ctx)
        lora.merge(ours)
        outs[fuse] = (wrapped, ours(x, t, ctx))
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=0, atol=1e-5)
    assert (outs[True][0] - outs[True][1]).abs().max() < 1e-4  # merged == wrapped, and the LoRA did act:
    plain, _ = tiny_unets()
    assert (outs[True][1] - plain(x, t, ctx)).abs().max() > 1e-3


def test_training_a_fused_model_gives_gradients_to_the_named_layers():
    torch.manual_seed(0)
    attn = SelfAttention(16, 2)
    attn.fuse_projections()
    attn(torch.randn(2, 5, 16)).square().mean().backward()
    for name in ("to_q", "to_k", "to_v"):
        assert getattr(attn, name).weight.grad is not None and getattr(attn, name).weight.grad.abs().sum() > 0


def test_inside_compile_training_and_lora_still_take_the_plain_path(monkeypatch):
    """Inside torch.compile the stamp is not checked, but gradients and LoRA are, as in eager mode."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    attn = SelfAttention(16, 2)
    attn.fuse_projections()
    attn(torch.randn(2, 5, 16)).square().mean().backward()
    assert all(getattr(attn, n).weight.grad is not None for n in ("to_q", "to_k", "to_v"))
    lora.inject(attn, rank=2)
    assert not attn._use_fused()
    with torch.no_grad():
        plain = SelfAttention(16, 2)
        plain.fuse_projections()
        assert plain._use_fused()  # inference: the fused path


def test_fused_copy_follows_to():
    dtype = torch.float64
    torch.manual_seed(0)
    attn = SelfAttention(16, 2).eval()
    attn.fuse_projections()
    attn.to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    with torch.no_grad():
        fused = attn(x)
        attn.fuse_projections(False)
        torch.testing.assert_close(fused, attn(x), rtol=0, atol=1e-12)
