"""Chapter 1: the time embedding equals diffusers' get_timestep_embedding / TimestepEmbedding."""
import pytest
import torch
from diffusers.models.embeddings import TimestepEmbedding as TheirTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding

from minisd.embeddings import TimestepEmbedding, timestep_embedding


@pytest.mark.parametrize("dim", [32, 320])
def test_sinusoid_matches_diffusers_flip_sin_to_cos(dim):
    t = torch.tensor([0, 1, 10, 500, 999])
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, dim), theirs, rtol=0, atol=1e-6)


def test_cos_comes_first_and_t0_is_ones_then_zeros():
    e = timestep_embedding(torch.tensor([0]), 8)
    torch.testing.assert_close(e, torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]))


def test_float_timesteps_work():
    t = torch.tensor([999.0, 0.5])
    theirs = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 64), theirs, rtol=0, atol=1e-6)


def test_odd_dim_is_an_error():
    with pytest.raises(ValueError, match="even"):
        timestep_embedding(torch.tensor([1]), 7)


def test_mlp_matches_diffusers():
    torch.manual_seed(0)
    theirs = TheirTimestepEmbedding(320, 1280)
    ours = TimestepEmbedding(320, 1280)
    ours.load_state_dict(theirs.state_dict())
    x = timestep_embedding(torch.tensor([3, 700]), 320)
    torch.testing.assert_close(ours(x), theirs(x))
