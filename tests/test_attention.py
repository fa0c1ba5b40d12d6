"""Chapter 3: the attention modules equal diffusers' Attention, FeedForward,
BasicTransformerBlock and Transformer2DModel on the same weights."""
import torch
from diffusers.models.attention import BasicTransformerBlock as TheirBlock
from diffusers.models.attention import FeedForward as TheirFeedForward
from diffusers.models.attention_processor import Attention
from diffusers import Transformer2DModel

from minisd.attention import (BasicTransformerBlock, CrossAttention, FeedForward, SelfAttention,
                              SpatialSelfAttention, SpatialTransformer)
from minisd.weights import unet_key

TRANSFORMER = "down_blocks.0.attentions.0."
BLOCK = TRANSFORMER + "transformer_blocks.0."


def renamed(sd, prefix):
    """diffusers' keys -> ours, through the U-Net key map."""
    ours_prefix = unet_key(prefix + "x")[:-1]
    return {unet_key(prefix + k)[len(ours_prefix):]: v for k, v in sd.items()}


def test_self_attention_matches_diffusers():
    torch.manual_seed(0)
    theirs = Attention(64, heads=4, dim_head=16).eval()
    ours = SelfAttention(64, heads=4).eval()
    ours.load_state_dict(renamed(theirs.state_dict(), BLOCK + "attn1."))
    x = torch.randn(2, 30, 64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_cross_attention_matches_diffusers():
    torch.manual_seed(0)
    theirs = Attention(64, cross_attention_dim=48, heads=8, dim_head=8).eval()
    ours = CrossAttention(64, 48, heads=8).eval()
    ours.load_state_dict(renamed(theirs.state_dict(), BLOCK + "attn2."))
    x, context = torch.randn(2, 30, 64), torch.randn(2, 77, 48)
    out = ours(x, context)
    assert out.shape == x.shape
    torch.testing.assert_close(out, theirs(x, encoder_hidden_states=context))


def test_cross_attention_output_follows_context():
    torch.manual_seed(0)
    attn = CrossAttention(32, 16, heads=2)
    x = torch.randn(1, 10, 32)
    assert (attn(x, torch.randn(1, 7, 16)) - attn(x, torch.randn(1, 7, 16))).abs().max() > 1e-3


def test_vae_spatial_self_attention_matches_diffusers():
    torch.manual_seed(0)
    theirs = Attention(64, heads=1, dim_head=64, eps=1e-6, norm_num_groups=32, residual_connection=True,
                       bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    ours = SpatialSelfAttention(64).eval()
    sd = {k.replace("group_norm.", "norm.").replace("to_out.0.", "to_out."): v
          for k, v in theirs.state_dict().items()}
    ours.load_state_dict(sd)
    x = torch.randn(2, 64, 6, 5)
    torch.testing.assert_close(ours(x), theirs(x))


def test_feed_forward_matches_diffusers():
    torch.manual_seed(0)
    theirs = TheirFeedForward(64, activation_fn="geglu").eval()
    ours = FeedForward(64).eval()
    ours.load_state_dict(renamed(theirs.state_dict(), BLOCK + "ff."))
    x = torch.randn(2, 30, 64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_basic_transformer_block_matches_diffusers():
    torch.manual_seed(0)
    theirs = TheirBlock(64, 4, 16, cross_attention_dim=48, activation_fn="geglu").eval()
    ours = BasicTransformerBlock(64, 48, heads=4).eval()
    ours.load_state_dict(renamed(theirs.state_dict(), BLOCK))
    x, context = torch.randn(2, 30, 64), torch.randn(2, 77, 48)
    torch.testing.assert_close(ours(x, context), theirs(x, encoder_hidden_states=context))


def test_spatial_transformer_matches_diffusers_transformer2d():
    torch.manual_seed(0)
    theirs = Transformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=64,
                                cross_attention_dim=48, norm_num_groups=32).eval()
    ours = SpatialTransformer(64, 48, heads=4).eval()
    ours.load_state_dict(renamed(theirs.state_dict(), TRANSFORMER))
    x, context = torch.randn(2, 64, 6, 4), torch.randn(2, 77, 48)
    out = ours(x, context)
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, theirs(x, encoder_hidden_states=context).sample)



def test_feedforward_in_chunks_equals_all_at_once(monkeypatch):
    """CPU inference runs the feed-forward a chunk of tokens at a time; every token is on its own,
    so the chunks give the same numbers as one pass (which runs when gradients are on)."""
    import minisd.attention as attention
    torch.manual_seed(0)
    ff = attention.FeedForward(16).eval()
    x = torch.randn(2, 50, 16)
    # GEGLU makes 2 x 64 floats per token: 32 tokens of it are 32 * 128 * 4 bytes -> 100 tokens in 4 chunks
    monkeypatch.setattr(attention, "FF_CHUNK_BYTES", 32 * 128 * 4)
    calls = []
    ff.geglu.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    whole = ff(x)  # gradients on: one pass
    assert calls == [2]
    with torch.no_grad():
        chunked = ff(x)
    assert calls[1:] == [32, 32, 32, 4]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
