"""metrics.inception_features (chapter 12): FID with a user's local Inception-v3 FID network, the
TorchScript inception-2015-12-05.pt of the StyleGAN2-ADA metrics. Tested with random weights behind
the same calling convention: net(images (B, 3, H, W) with values 0..255, return_features=True)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minisd import data, metrics


class RandomInception(torch.nn.Module):
    """Not Inception-v3: a small random network with the TorchScript file's interface. It resizes
    to 299x299 and maps 0..255 to [-1, 1] itself, as the real file does, and returns 2048 features
    with return_features=True (class logits otherwise)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 7, stride=8)
        self.features = torch.nn.Linear(8 * 4 * 4, 2048)
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img, return_features: bool = False):
        x = img.to(torch.float32)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        x = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)       # (B, 8, 4, 4)
        features = self.features(x.flatten(1))                       # (B, 2048)
        if return_features:
            return features
        return self.output(features)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    net = RandomInception().eval()
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return net, path


def test_features_as_stylegan_calls_the_file(inception_file):
    net, path = inception_file
    feature_fn = metrics.inception_features(path)
    images, _ = data.sample(8, seed=0)                                 # uint8 (8, 32, 32, 3)
    with torch.no_grad():
        ours = feature_fn(images)
        # StyleGAN2-ADA's metric_utils: uint8 (B, 3, H, W) straight into the network
        theirs = net(torch.from_numpy(images).permute(0, 3, 1, 2), return_features=True)
        torch.testing.assert_close(ours, theirs)
        assert ours.shape == (8, 2048)
        # float (B, 3, H, W) in [0, 1] is the same picture
        as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        torch.testing.assert_close(feature_fn(as_float), theirs, rtol=1e-4, atol=1e-4)
        # and a wrong scale would not pass unnoticed
        assert (net(as_float, return_features=True) - theirs).abs().max() > 1e-2


def test_fid_with_the_file(inception_file):
    net, path = inception_file
    feature_fn = metrics.inception_features(path)
    a, _ = data.sample(40, seed=1)
    b, _ = data.sample(40, seed=2)
    assert metrics.fid(a, a, feature_fn, batch_size=16) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        fa = net(torch.from_numpy(a).permute(0, 3, 1, 2), return_features=True)
        fb = net(torch.from_numpy(b).permute(0, 3, 1, 2), return_features=True)
    score = metrics.fid(a, b, feature_fn, batch_size=16)
    assert score == pytest.approx(metrics.frechet_distance(fa, fb), rel=1e-6) and score > 0


def test_wrong_files_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        metrics.inception_features(tmp_path / "missing.pt")
    state_dict = tmp_path / "pt_inception.pth"
    torch.save(RandomInception().state_dict(), str(state_dict))
    with pytest.raises(ValueError, match="not a TorchScript file"):
        metrics.inception_features(state_dict)
