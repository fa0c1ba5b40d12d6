"""The course data: small images of coloured shapes with captions, drawn from a seed.

No image data set can be downloaded, so every model in the course (VAE, CLIP, U-Net,
LoRA) is trained on pictures this module draws: one shape on a black background,
captioned "a {colour} {shape} {position}", e.g. "a red circle in the top left".
Drawing is deterministic (same seed, same bytes) and fast (10,000 images in seconds).
"""
import numpy as np

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
# Colours the data can draw but the course models never trained on (chapter 13 teaches one to
# the U-Net with a LoRA). Not in COLOURS, so combinations() and every default draw are unchanged.
NEW_COLOURS = {
    "orange": (255, 128, 0),
}
SHAPES = ("circle", "square", "triangle")
# Shapes the data can draw but the course models never trained on: chapter 13 teaches one to the
# U-Net with a LoRA. Like NEW_COLOURS, only `sample(only=concept_combinations(...))` draws them.
NEW_SHAPES = ("bar", "plus", "ring")
# where the shape's centre sits, as a fraction of the image (x, y), y pointing down
POSITIONS = {
    "in the top left": (0.25, 0.25),
    "in the top right": (0.75, 0.25),
    "in the bottom left": (0.25, 0.75),
    "in the bottom right": (0.75, 0.75),
    "in the center": (0.5, 0.5),
}
SIZE = 32          # the course's image size (pixels per side)
SUPERSAMPLE = 4    # anti-aliasing: draw at 4x, average 4x4 blocks
RADIUS = 0.17      # a shape's half-width, as a fraction of the image side
JITTER = 0.04      # random shift of the centre, fraction of the image side
SCALE_JITTER = 0.15  # random change of the size, relative


def caption(colour, shape, position):
    """The grammar every course model follows: "a {colour} {shape} {position}"."""
    return f"a {colour} {shape} {position}"


def _rgb(colour):
    """The RGB of a course colour or of a new one (NEW_COLOURS)."""
    return COLOURS[colour] if colour in COLOURS else NEW_COLOURS[colour]


def parse(text, new=False):
    """Inverse of `caption`: (colour, shape, position), or a ValueError naming the grammar.
    With `new=True` the new colours and shapes of chapter 13 (NEW_COLOURS, NEW_SHAPES) are
    accepted too."""
    colours = {**COLOURS, **NEW_COLOURS} if new else COLOURS
    shapes = SHAPES + NEW_SHAPES if new else SHAPES
    words = text.split(" ", 3)
    if len(words) == 4 and words[0] == "a" and words[1] in colours and words[2] in shapes \
            and words[3] in POSITIONS:
        return words[1], words[2], words[3]
    raise ValueError(f"{text!r} is not a course caption: expected 'a {{colour}} {{shape}} {{position}}' "
                     f"with colour in {list(colours)}, shape in {list(shapes)}, position in {list(POSITIONS)}")


def combinations():
    """All 6 x 3 x 5 = 90 (colour, shape, position) triples, in a fixed order."""
    return [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def _held_out():
    # one in ten combinations, in a fixed interleaving: 9 of 90, and each colour, shape and
    # position still appears in training with other partners
    out = []
    for ci, c in enumerate(COLOURS):
        for si, s in enumerate(SHAPES):
            for pi, p in enumerate(POSITIONS):
                if (ci + 2 * si + 3 * pi) % 10 == 3:
                    out.append((c, s, p))
    return tuple(out)


def concept_combinations(concept):
    """The (colour, shape, position) triples of one new concept of chapter 13, in a fixed order:
    a new shape (NEW_SHAPES) in the 6 course colours x 5 positions = 30, e.g.
    concept_combinations("plus"), or a new colour (NEW_COLOURS) on the 3 course shapes x 5
    positions = 15, e.g. concept_combinations("orange")."""
    if concept in NEW_SHAPES:
        return [(c, concept, p) for c in COLOURS for p in POSITIONS]
    if concept in NEW_COLOURS:
        return [(concept, s, p) for s in SHAPES for p in POSITIONS]
    raise ValueError(f"{concept!r} is not a new concept: expected a shape of {list(NEW_SHAPES)} or a colour of "
                     f"{list(NEW_COLOURS)} (the course's own words are in combinations())")


# combinations the course U-Net never sees in training, to measure generalisation
HELD_OUT = _held_out()


def _shape_mask(shape, cx, cy, r, xs, ys):
    """Boolean mask of `shape` centred at (cx, cy) with half-width r, on the pixel grid."""
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        h = r * 0.886  # same area as the circle of radius r
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":
        # upright equilateral triangle with circumradius 1.2 r, centred on its bounding box
        # (so it stays inside the image in the corners)
        R = 1.2 * r
        top, base = cy - 0.75 * R, cy + 0.75 * R
        half = R * np.sqrt(3) / 2
        inside = (ys <= base) & (ys >= top)
        # the two slanted sides: |x - cx| <= half * (y - top) / (base - top)
        return inside & (np.abs(xs - cx) <= half * (ys - top) / (base - top))
    if shape == "bar":
        # a flat rectangle, 2 x 1.25 r wide and 2 x 0.62 r high (about the circle's area)
        return (np.abs(xs - cx) <= 1.25 * r) & (np.abs(ys - cy) <= 0.62 * r)
    if shape == "plus":
        # two bars crossing at the centre, each 2 x 1.1 r long and 2 x 0.38 r thick
        arm, bar = 1.1 * r, 0.38 * r
        dx, dy = np.abs(xs - cx), np.abs(ys - cy)
        return ((dx <= arm) & (dy <= bar)) | ((dx <= bar) & (dy <= arm))
    if shape == "ring":
        # a circle of radius 1.1 r with a hole of radius 0.55 r
        d2 = (xs - cx) ** 2 + (ys - cy) ** 2
        return (d2 <= (1.1 * r) ** 2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + NEW_SHAPES}")


def _grid(size):
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # sample points in pixel units
    return np.meshgrid(coords, coords)  # xs, ys, each (n, n)


def render(colour, shape, position, size=SIZE, rng=None):
    """Draw one anti-aliased image (size, size, 3) uint8; jitter comes from `rng` if given."""
    xs, ys = _grid(size)
    return _render(colour, shape, position, size, rng, xs, ys)


def _render(colour, shape, position, size, rng, xs, ys):
    fx, fy = POSITIONS[position]
    r = RADIUS * size
    cx, cy = fx * size, fy * size
    if rng is not None:
        cx += rng.uniform(-JITTER, JITTER) * size
        cy += rng.uniform(-JITTER, JITTER) * size
        r *= 1 + rng.uniform(-SCALE_JITTER, SCALE_JITTER)
    mask = _shape_mask(shape, cx, cy, r, xs, ys).astype(np.float32)
    # (S*size, S*size) -> (size, S, size, S) -> mean over the S x S block: coverage in [0, 1]
    cover = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    rgb = np.asarray(_rgb(colour), dtype=np.float32)
    return np.rint(cover[..., None] * rgb).astype(np.uint8)


def sample(n, seed=0, size=SIZE, exclude=(), only=None):
    """n random course images and their captions.

    Returns (uint8 array (n, size, size, 3), list of n captions). `exclude` removes
    (colour, shape, position) triples from the draw (e.g. `HELD_OUT` for training);
    `only` restricts it to the given triples (e.g. `HELD_OUT` for testing, or
    `concept_combinations("plus")` for a shape of NEW_SHAPES or a colour of NEW_COLOURS, which
    only `only` can draw).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = list(only) if only is not None else combinations()
    excluded = set(exclude)
    pool = [t for t in pool if t not in excluded]
    if not pool:
        raise ValueError("no (colour, shape, position) combination is left to draw from")
    for colour, shape, position in pool:
        if (colour not in COLOURS and colour not in NEW_COLOURS) or (shape not in SHAPES and shape not in NEW_SHAPES) \
                or position not in POSITIONS:
            raise ValueError(f"unknown combination {(colour, shape, position)!r}")
    rng = np.random.default_rng(seed)
    xs, ys = _grid(size)
    picks = rng.integers(len(pool), size=n)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions = []
    for i, k in enumerate(picks):
        colour, shape, position = pool[k]
        images[i] = _render(colour, shape, position, size, rng, xs, ys)
        captions.append(caption(colour, shape, position))
    return images, captions


def to_tensor(images):
    """uint8 (N, H, W, 3) -> float tensor (N, 3, H, W) in [-1, 1], as SD's VAE expects."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N,H,W,3) -> (N,3,H,W)
    return x.float() / 127.5 - 1.0


def to_uint8(x):
    """float tensor (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu")
    return x.permute(0, 2, 3, 1).numpy().astype(np.uint8)  # (N,3,H,W) -> (N,H,W,3)


def show(images, captions=None, ncols=8, scale=1.6, fontsize=8):
    """A grid of images with their captions underneath; returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale, nrows * (scale + 0.45)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            if captions is not None:
                # "a red circle in the top left" -> "a red circle\nin the top left"
                ax.set_title(captions[i].replace(" in the ", "\nin the "), fontsize=fontsize)
    fig.tight_layout()
    return fig
