"""Chapter 14's trainer: the silhouette controls, the conflicting captions, the follow measure, and a
ControlNet checkpoint that round-trips through minisd.checkpoint."""
import numpy as np
import torch

from minisd import checkpoint, data
from minisd.controlnet import ControlNet, ControlNetConfig
from minisd.train.controlnet import conflicting_captions, follow_scores, held_out_controls, silhouettes


def test_silhouette_is_grey_and_where_the_shape_is():
    images, _ = data.sample(3, seed=0)
    s = silhouettes(images)
    assert s.shape == images.shape and s.dtype == np.uint8
    assert (s[..., 0] == s[..., 1]).all() and (s[..., 1] == s[..., 2]).all()
    assert ((s[..., 0] > 0) == (images.max(-1) > 0)).all()


def test_conflicting_captions_keep_colour_and_shape():
    truth = [("red", "circle", "in the top left")] * 400
    out = conflicting_captions(truth, 0.5, torch.Generator().manual_seed(0))
    parsed = [data.parse(c) for c in out]
    moved = np.mean([p[2] != "in the top left" for p in parsed])
    assert all(p[:2] == ("red", "circle") for p in parsed) and 0.4 < moved < 0.6
    assert conflicting_captions(truth[:5], 0.0, torch.Generator()) == [data.caption(*truth[0])] * 5


def test_held_out_prompts_name_another_position_and_follow_scores_are_perfect_on_the_data():
    controls, truth, prompts = held_out_controls(20, seed=1)
    assert all(data.parse(p)[2] != t[2] and data.parse(p)[1] == t[1] for p, t in zip(prompts, truth))
    images, captions = data.sample(20, seed=1)       # the images the controls were drawn from
    s = follow_scores(images, controls, truth, captions)
    assert s["iou"].min() == 1.0 and s["position"].all() and s["colour"].all()


def test_controlnet_checkpoint_round_trips(tmp_path):
    net = ControlNet(ControlNetConfig.tiny())
    checkpoint.save_checkpoint(tmp_path / "cn.safetensors", net)
    loaded = checkpoint.load_checkpoint(tmp_path / "cn.safetensors")
    assert loaded.config == net.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
