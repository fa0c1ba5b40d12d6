"""Chapter 12: FID's Fréchet distance against a scipy sqrtm reference, its edge cases, and
FID with a user's own feature network (a transformers CLIP vision model from a local folder)."""
import numpy as np
import pytest
import scipy.linalg
import torch

from minisd import data, metrics


def reference_frechet(a, b):
    """The textbook formula as pytorch-fid writes it: scipy's sqrtm of the product S_a S_b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)


def random_features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)          # correlated features, like a network's
    return rng.normal(size=(n, d)) @ mix + shift


@pytest.mark.parametrize("n,d", [(200, 16), (500, 64), (300, 128)])
def test_equals_scipy_sqrtm_reference(n, d):
    a = random_features(n, d, seed=1)
    b = random_features(n, d, seed=2, shift=0.3) * 1.5
    ours = metrics.frechet_distance(a, b)
    ref = reference_frechet(a, b)
    assert ours == pytest.approx(ref, rel=1e-5)
    assert ours > 1.0   # a real difference, not two zeros agreeing


def test_torch_tensors_and_float32_accepted():
    a, b = random_features(100, 8, 3), random_features(100, 8, 4)
    ref = reference_frechet(a, b)
    ours = metrics.frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert ours == pytest.approx(ref, rel=1e-5)


def test_identical_sets_give_zero():
    a = random_features(300, 32, seed=5)
    assert metrics.frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("d_norm", [0.5, 3.0])
def test_mean_shift_adds_squared_norm(d_norm):
    a = random_features(400, 16, seed=6)
    shift = np.random.default_rng(7).normal(size=16)
    shift *= d_norm / np.linalg.norm(shift)
    # same covariance, mean moved by `shift`: the covariance terms cancel, |d|^2 is left
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(d_norm ** 2, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("case", ["fewer_samples_than_dims", "duplicated_features", "constant_feature"])
def test_near_singular_covariances_give_finite_real(case):
    rng = np.random.default_rng(8)
    if case == "fewer_samples_than_dims":      # N < D: both covariances have rank N - 1
        a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.1
    elif case == "duplicated_features":        # repeated images and repeated columns
        base = rng.normal(size=(10, 32))
        a = np.repeat(base, 5, axis=0)
        a[:, 16:] = a[:, :16]
        b = rng.normal(size=(50, 32))
    else:                                      # a dead feature: zero variance
        a, b = rng.normal(size=(100, 16)), rng.normal(size=(100, 16))
        a[:, 0] = b[:, 0] = 1.0
    d = metrics.frechet_distance(a, b)
    assert isinstance(d, float) and np.isfinite(d) and d >= 0
    ref = reference_frechet(a, b)              # where sqrtm still gives an answer, agree with it
    if np.isfinite(ref):
        assert d == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_one_feature_gives_the_1d_closed_form():
    """D = 1 (np.cov returns a 0-d array there): (m1 - m2)^2 + (s1 - s2)^2, chapter 12's 1-D case."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(1.0, 2.0, (100_000, 1)), rng.normal(-0.5, 0.5, (100_000, 1))
    assert metrics.frechet_distance(x, y) == pytest.approx(1.5 ** 2 + 1.5 ** 2, rel=0.01)


def test_symmetric_in_its_arguments():
    a = random_features(150, 24, seed=9)
    b = random_features(150, 24, seed=10, shift=0.2) * 0.7
    assert metrics.frechet_distance(a, b) == pytest.approx(metrics.frechet_distance(b, a), rel=1e-9)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="different widths"):
        metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"2-D \(N, D\)"):
        metrics.frechet_distance(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


def test_fid_batches_feature_fn_and_equals_frechet_of_features():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(37, 3, 8, 8), torch.rand(29, 3, 8, 8) * 0.8
    calls = []

    def feature_fn(batch):
        calls.append(len(batch))
        return net(batch)

    score = metrics.fid(x, y, feature_fn, batch_size=16)
    assert calls == [16, 16, 5, 16, 13]
    with torch.no_grad():
        ref = reference_frechet(net(x).double().numpy(), net(y).double().numpy())
    assert score == pytest.approx(ref, rel=1e-5)


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A randomly initialised CLIP vision tower with projection, saved as a local folder the way
    a user's downloaded checkpoint would be (no network)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8)
    folder = tmp_path_factory.mktemp("clip-vision")
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder)
    return folder


def test_fid_with_local_clip_vision_model(tiny_clip_folder):
    from transformers import CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    clip = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_folder).eval()
    feature_fn = metrics.clip_image_features(clip)
    real, _ = data.sample(64, seed=0)
    other, _ = data.sample(64, seed=1)

    # the preprocessing equals CLIP's own image processor at the model's size
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = proc(images=list(real[:8]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(feature_fn(real[:8]), clip(pixel_values=pixels).image_embeds)
        assert feature_fn(real[:8]).shape == (8, 16)

    same = metrics.fid(real, real, feature_fn, batch_size=20)
    assert same == pytest.approx(0.0, abs=1e-6)
    diff = metrics.fid(real, other, feature_fn, batch_size=20)
    with torch.no_grad():
        ref = reference_frechet(feature_fn(real).double().numpy(), feature_fn(other).double().numpy())
    assert diff == pytest.approx(ref, rel=1e-5) and diff > 0
    # float (B, 3, H, W) images in [0, 1] give the same features as uint8 (B, H, W, 3)
    as_float = torch.from_numpy(real[:4]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(feature_fn(as_float), feature_fn(real[:4]))
