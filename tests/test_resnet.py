"""Chapter 2: GSC, Downsample, Upsample and ResNetBlock equal diffusers' blocks on the same weights."""
import pytest
import torch
from torch import nn
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from minisd.resnet import GSC, Downsample, ResNetBlock, Upsample
from minisd.weights import unet_key

PREFIX = "down_blocks.0.resnets.0."


def renamed(sd, prefix=PREFIX):
    """diffusers' block keys -> ours, through the U-Net key map."""
    return {unet_key(prefix + k)[len(prefix):]: v for k, v in sd.items()}


def conv_only(sd):
    """Downsample2D lists its conv twice (as `conv` and the alias `Conv2d_0`)."""
    return {k: v for k, v in sd.items() if k.startswith("conv.")}


@pytest.mark.parametrize("cin,cout", [(64, 64), (64, 128)])
def test_unet_resnet_block_matches_diffusers(cin, cout):
    torch.manual_seed(0)
    theirs = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=96, groups=32, eps=1e-5).eval()
    ours = ResNetBlock(cin, cout, temb_channels=96, groups=32, eps=1e-5).eval()
    ours.load_state_dict(renamed(theirs.state_dict()))
    x, temb = torch.randn(2, cin, 12, 10), torch.randn(2, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, temb), theirs(x, temb))


def test_vae_resnet_block_without_time_matches_diffusers():
    torch.manual_seed(0)
    theirs = ResnetBlock2D(in_channels=64, out_channels=32, temb_channels=None, groups=32, eps=1e-6).eval()
    ours = ResNetBlock(64, 32, temb_channels=None, groups=32, eps=1e-6).eval()
    assert ours.time_proj is None
    ours.load_state_dict(renamed(theirs.state_dict()))
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x, None))


def test_eps_matters_at_parity_tolerance():
    """1e-5 vs 1e-6: the VAE trap of REFERENCE.md, visible on a near-constant input."""
    torch.manual_seed(0)
    a, b = GSC(32, 32, eps=1e-5), GSC(32, 32, eps=1e-6)
    b.load_state_dict(a.state_dict())
    x = 1 + 1e-3 * torch.randn(1, 32, 8, 8)
    assert (a(x) - b(x)).abs().max() > 1e-4


def test_unet_downsample_matches_diffusers():
    torch.manual_seed(0)
    theirs = Downsample2D(32, use_conv=True, padding=1, name="conv")
    ours = Downsample(32)
    ours.load_state_dict(conv_only(theirs.state_dict()))
    x = torch.randn(2, 32, 16, 12)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours(x).shape == (2, 32, 8, 6)


def test_vae_downsample_matches_diffusers():
    torch.manual_seed(0)
    theirs = Downsample2D(32, use_conv=True, padding=0, name="conv")
    ours = Downsample(32, asymmetric=True)
    ours.load_state_dict(conv_only(theirs.state_dict()))
    x = torch.randn(2, 32, 16, 12)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours(x).shape == (2, 32, 8, 6)
    plain = Downsample(32)
    plain.load_state_dict(ours.state_dict())
    assert (plain(x) - ours(x)).abs().max() > 1e-2  # the two paddings really differ


def test_upsample_matches_diffusers():
    torch.manual_seed(0)
    theirs = Upsample2D(32, use_conv=True)
    ours = Upsample(32)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 5, 7)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours(x).shape == (2, 32, 10, 14)


def test_resnet_output_depends_on_time():
    torch.manual_seed(0)
    block = ResNetBlock(32, 32, temb_channels=16, groups=8)  # 1 channel per group would normalise the shift away
    x = torch.randn(1, 32, 4, 4)
    assert (block(x, torch.randn(1, 16)) - block(x, torch.randn(1, 16))).abs().max() > 1e-3


# --- Conv2d: the CPU inference paths that run a convolution as a matrix product ---------------

@pytest.mark.parametrize("c_in, c_out, k, stride, padding, size, bias", [
    (256, 256, 1, 1, 0, 24, True),  # 1x1: W @ x per image, at any map size
    (96, 96, 3, 1, 1, 16, True),    # 3x3 on a 16x16 map (256 pixels): unfold + one GEMM
    (96, 96, 3, 2, 1, 16, False),   # stride 2: an 8x8 output
    (96, 96, 3, 2, 0, 17, True),    # the VAE's Downsample: no padding, odd input
])
def test_conv2d_matrix_product_paths_equal_nn_conv2d(c_in, c_out, k, stride, padding, size, bias, monkeypatch):
    from minisd.resnet import Conv2d
    torch.manual_seed(0)
    ours = Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=bias)
    ref = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, c_in, size, size)
    with torch.no_grad():
        expected = ref(x)
        # the matrix-product path must not fall back to the convolution it replaces
        monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda *a: (_ for _ in ()).throw(AssertionError("fell back")))
        out = ours(x)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_conv2d_is_nn_conv2d_where_it_should_be():
    """Large maps, small weights, gradients, and non-float32 inputs take nn.Conv2d's own path,
    bit for bit."""
    from minisd.resnet import LARGE_WEIGHT, SMALL_MAP, Conv2d
    torch.manual_seed(0)
    tiny = Conv2d(4, 4, 1)
    assert tiny.weight.numel() < LARGE_WEIGHT
    with torch.no_grad():
        z = torch.randn(2, 4, 8, 8)
        assert torch.equal(tiny(z), nn.functional.conv2d(z, tiny.weight, tiny.bias))
    ours = Conv2d(96, 96, 3, padding=1)
    ref = nn.Conv2d(96, 96, 3, padding=1)
    ref.load_state_dict(ours.state_dict())
    big = torch.randn(1, 96, 17, 17)
    assert 17 * 17 > SMALL_MAP
    with torch.no_grad():
        assert torch.equal(ours(big), ref(big))
    small = torch.randn(1, 96, 8, 8, requires_grad=True)
    assert torch.equal(ours(small), ref(small))  # with gradients: the training path is untouched
    ours(small).sum().backward()
    assert small.grad is not None
    with torch.no_grad():  # float64: nn.Conv2d's path too
        assert torch.equal(ours.double()(small.double()), ref.double()(small.double()))


def test_conv2d_in_channels_last_memory():
    """A model moved to channels-last memory (`model.to(memory_format=torch.channels_last)`, a
    common GPU setting) runs nn.Conv2d's own path, which reads that layout, on the CPU too."""
    from minisd.resnet import Conv2d
    torch.manual_seed(0)
    for k, size in ((1, 24), (3, 8)):  # the 1x1 and the small-map 3x3 matrix-product cases
        ours = Conv2d(96 * 8 // k, 96 * 8 // k, k, padding=k // 2)
        ref = nn.Conv2d(96 * 8 // k, 96 * 8 // k, k, padding=k // 2)
        ref.load_state_dict(ours.state_dict())
        ours.to(memory_format=torch.channels_last)
        x = torch.randn(2, ours.in_channels, size, size)
        with torch.no_grad():
            for inp in (x, x.contiguous(memory_format=torch.channels_last)):
                torch.testing.assert_close(ours(inp), ref(x), rtol=0, atol=1e-5)


def test_models_in_channels_last_memory_match_the_default():
    import copy
    import minisd
    torch.manual_seed(0)
    unet = minisd.UNet(minisd.UNetConfig.sd15()).eval()  # SD 1.5 size: its big weights take the fast paths
    with torch.no_grad():  # only the first levels run, at 8x8: enough to reach every conv kind
        x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 77, 768)
        expected = unet(x, t, ctx)
        unet.to(memory_format=torch.channels_last)
        torch.testing.assert_close(unet(x.contiguous(memory_format=torch.channels_last), t, ctx), expected,
                                   rtol=0, atol=1e-4)
    vae = minisd.AutoencoderKL(minisd.VAEConfig.tiny()).eval()
    cl = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(cl.decode(z.contiguous(memory_format=torch.channels_last)), vae.decode(z),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels, size, bias", [(8, 17, True), (16, 24, False), (4, 20, True)])
def test_upsample_by_phases_equals_upsample_then_conv(channels, size, bias, monkeypatch):
    """Upsample.phases (four 2x2 convolutions of the small map) is conv(interpolate(x)), to rounding;
    it runs where the small map has more than SMALL_MAP pixels."""
    torch.manual_seed(0)
    up = Upsample(channels)
    if not bias:
        up.conv.bias = None
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        expected = nn.functional.conv2d(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"),
                                        up.conv.weight, up.conv.bias, padding=1)
        taken = []
        monkeypatch.setattr(Upsample, "phases", lambda self, x, f=Upsample.phases: taken.append(1) or f(self, x))
        out = up(x)
    assert taken == [1] and out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert torch.equal(up(x), expected)  # with gradients: the plain path, bit for bit
