"""The course data (minisd.data) and the files in data/."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from minisd import DATA_DIR, data

ROOT = Path(__file__).resolve().parent.parent


def test_same_seed_same_bytes():
    a, ca = data.sample(64, seed=7)
    b, cb = data.sample(64, seed=7)
    assert a.dtype == np.uint8 and a.shape == (64, 32, 32, 3)
    assert a.tobytes() == b.tobytes() and ca == cb


def test_different_seeds_differ():
    a, ca = data.sample(64, seed=1)
    b, cb = data.sample(64, seed=2)
    assert a.tobytes() != b.tobytes() and ca != cb


def test_captions_follow_the_grammar():
    _, captions = data.sample(500, seed=3)
    assert {data.parse(c) for c in captions} <= set(data.combinations())
    # 500 draws from 90 combinations cover most of them
    assert len(set(captions)) > 80
    with pytest.raises(ValueError, match="not a course caption"):
        data.parse("a purple circle in the top left")


def _foreground(img):
    return img.max(axis=-1) > 128  # the shape's pixels; the background is black


def test_pixels_have_the_caption_colour_and_position():
    images, captions = data.sample(900, seed=4)
    centres = {"left": 0.25, "right": 0.75, "top": 0.25, "bottom": 0.75, "center": 0.5}
    for img, text in zip(images, captions):
        colour, shape, position = data.parse(text)
        fg = _foreground(img)
        assert fg.sum() > 20, text
        # dominant foreground colour: each channel is on (~255) or off (~0) as named
        mean = img[fg].mean(axis=0)
        expected = np.array(data.COLOURS[colour])
        assert np.all(np.abs(mean - expected) < 60), (text, mean)
        # centroid, as a fraction of the image side
        ys, xs = np.nonzero(fg)
        cx, cy = (xs.mean() + 0.5) / 32, (ys.mean() + 0.5) / 32
        words = position.split()
        want_x = centres[words[-1]] if words[-1] in ("left", "right") else 0.5
        want_y = centres[words[-2]] if words[-1] in ("left", "right") else 0.5
        assert abs(cx - want_x) < 0.12 and abs(cy - want_y) < 0.12, (text, cx, cy)


def test_shapes_fill_their_expected_share_of_the_box():
    # circle ~ pi/4 of its bounding box, square ~ 1, triangle ~ 1/2
    rng = np.random.default_rng(0)
    fill = {}
    for shape in data.SHAPES:
        img = data.render("red", shape, "in the center", rng=None)
        fg = _foreground(img)
        ys, xs = np.nonzero(fg)
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        fill[shape] = fg.sum() / box
    assert 0.70 < fill["circle"] < 0.92
    assert fill["square"] > 0.95
    assert 0.4 < fill["triangle"] < 0.65


def test_anti_aliased_edges():
    img = data.render("red", "circle", "in the center")
    red = img[..., 0]
    assert ((red > 0) & (red < 255)).sum() > 10  # partial coverage at the rim


def test_held_out_and_only():
    assert len(data.HELD_OUT) >= 9  # at least 10 % of the 90 combinations
    _, captions = data.sample(400, seed=5, exclude=data.HELD_OUT)
    assert not {data.parse(c) for c in captions} & set(data.HELD_OUT)
    _, captions = data.sample(100, seed=5, only=data.HELD_OUT)
    assert {data.parse(c) for c in captions} <= set(data.HELD_OUT)
    # every colour, shape and position still appears in training
    train = [t for t in data.combinations() if t not in data.HELD_OUT]
    for i, names in enumerate((data.COLOURS, data.SHAPES, data.POSITIONS)):
        assert {t[i] for t in train} == set(names)


def test_tensor_round_trip():
    images, _ = data.sample(4, seed=6)
    x = data.to_tensor(images)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(data.to_uint8(x), images)


def test_clip_vocabulary_is_the_real_one():
    path = DATA_DIR / "bpe_simple_vocab_16e6.txt.gz"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.stat().st_size == 1_356_917
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_intro_figure_is_current(tmp_path):
    import importlib.util
    from PIL import Image
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts" / "make_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path)
    for name in mod.FIGURES:
        new = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        old = np.asarray(Image.open(ROOT / "book" / "images" / name).convert("RGB"))
        assert new.shape == old.shape and np.array_equal(new, old), \
            f"book/images/{name} is stale: run python scripts/make_figures.py"
