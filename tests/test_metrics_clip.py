"""minisd.metrics.clip_score and minisd.losses.clip_loss against hand computations (chapter 8)."""
import math

import pytest
import torch

from minisd.losses import clip_loss
from minisd.metrics import clip_score


def test_clip_score_by_hand():
    # pair 0: same direction (cos 1 -> 100); pair 1: 60 degrees apart (cos 0.5 -> 50);
    # pair 2: opposite (cos -1 -> clamped to 0); lengths differ on purpose (only directions count)
    images = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[0.5, 0.0], [0.5, math.sqrt(3) / 2], [0.0, -7.0]])
    assert clip_score(images, texts) == pytest.approx((100 + 50 + 0) / 3, abs=1e-4)


def test_clip_score_orthogonal_and_errors():
    assert clip_score(torch.eye(3), torch.eye(3).roll(1, dims=1)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="matching pairs"):
        clip_score(torch.ones(3, 4), torch.ones(2, 4))


def test_clip_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    # rows (image -> captions): -log softmax picks the diagonal
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    row1 = -math.log(math.exp(3) / (math.exp(1) + math.exp(3)))
    # columns (caption -> images)
    col0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1)))
    col1 = -math.log(math.exp(3) / (math.exp(0) + math.exp(3)))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert clip_loss(logits).item() == pytest.approx(expected, abs=1e-6)


def test_clip_loss_perfect_and_uniform():
    n = 5
    assert clip_loss(torch.eye(n) * 100).item() == pytest.approx(0.0, abs=1e-6)
    assert clip_loss(torch.zeros(n, n)).item() == pytest.approx(math.log(n), abs=1e-6)
    with pytest.raises(ValueError, match="square"):
        clip_loss(torch.zeros(2, 3))
