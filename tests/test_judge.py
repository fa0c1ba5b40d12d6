import numpy as np
import pytest
import torch

import minisd
from minisd import data
from minisd.metrics import Judge


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


def test_checkpoint_is_small():
    assert (minisd.DATA_DIR / "course_judge.safetensors").stat().st_size < 1_000_000


def test_accuracy_on_fresh_real_images(judge):
    # a seed the judge was not trained on (it trained on seed 0)
    images, captions = data.sample(3000, seed=2024)
    acc = judge.accuracy(images, captions)
    assert acc["colour"] >= 0.99 and acc["shape"] >= 0.99 and acc["position"] >= 0.99, acc
    assert acc["all"] >= 0.98, acc


def test_accuracy_on_held_out_combinations(judge):
    # the judge never saw these combinations in training
    images, captions = data.sample(900, seed=7, only=data.HELD_OUT)
    acc = judge.accuracy(images, captions)
    assert min(acc.values()) >= 0.99, acc


def test_judges_each_attribute_from_the_image(judge):
    images = np.stack([data.render("red", "circle", "in the top left"),
                       data.render("cyan", "triangle", "in the bottom right"),
                       data.render("yellow", "square", "in the center")])
    assert judge(images) == [("red", "circle", "in the top left"),
                             ("cyan", "triangle", "in the bottom right"),
                             ("yellow", "square", "in the center")]


def test_blank_canvas_is_flagged_not_guessed(judge):
    black = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    black[1] += 20  # a dim grey haze is still blank
    black[1, 5, 5] = 255  # and so is one stray pixel
    assert judge(black) == [(None, None, None), (None, None, None)]
    acc = judge.accuracy(black, ["a red circle in the center"] * 2)
    assert acc == {"colour": 0.0, "shape": 0.0, "position": 0.0, "all": 0.0}


def test_robust_to_mild_noise_and_dimming(judge):
    # decoded samples are never the crisp drawings: dim them and add noise
    images, captions = data.sample(500, seed=99)
    rng = np.random.default_rng(0)
    noisy = images.astype(np.float32) * 0.8 + rng.normal(0, 12, images.shape)
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    acc = judge.accuracy(noisy, captions)
    assert min(acc.values()) >= 0.97, acc


def test_rejects_float_images(judge):
    with pytest.raises(ValueError, match="to_uint8"):
        judge(data.to_tensor(data.sample(2)[0]).numpy())


def test_train_save_load_round_trip(tmp_path):
    # a few steps only: this checks the plumbing, not the accuracy (the tests above do that)
    from minisd.metrics import train_judge
    path = tmp_path / "judge.safetensors"
    trained = train_judge(n=256, steps=5, batch=32, path=path, progress=False)
    images, _ = data.sample(20, seed=5)
    with torch.no_grad():
        from minisd.metrics import _crops, _look
        light, _, centroids = _look(images)
        before = trained.net(_crops(light, centroids))
        after = Judge.load(path).net(_crops(light, centroids))
    assert before.shape == (20, 3)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_hazy_background_is_not_foreground(judge):
    # a decoded sample may have a grey haze brighter than the fixed threshold: the shape still wins
    images, captions = data.sample(300, seed=11)
    hazy = np.maximum(images, 115).astype(np.uint8)  # every channel at least 45 % grey
    acc = judge.accuracy(hazy, captions)
    assert min(acc.values()) >= 0.97, acc
