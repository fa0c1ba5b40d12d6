"""Measuring generated images (chapter 12): FID's Fréchet distance, CLIP score, and the
automatic judge of course images (colour, shape, position)."""
import numpy as np
import torch

# --- CLIP score (chapter 8 / 12) -------------------------------------------------------------

def clip_score(image_embeds, text_embeds):
    """CLIP score (chapters 8 and 12): how well each image fits its own caption, as the mean over
    pairs of max(100 * cos(image_i, text_i), 0): torchmetrics' convention. Hessel et al.'s
    CLIP-S (2021, "CLIPScore") is the same clamped cosine scaled by w = 2.5 instead of 100.

    `image_embeds` and `text_embeds` are (N, D) CLIP embeddings of N matching pairs (they are
    normalised here). Higher is better; 0 to 100. This is the per-pair formula torchmetrics'
    CLIPScore documents; its code clamps the mean instead of each pair, which gives the same
    number unless some pair has a negative cosine.
    """
    image_embeds, text_embeds = torch.as_tensor(image_embeds), torch.as_tensor(text_embeds)
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"expected two (N, D) embeddings of matching pairs, got {tuple(image_embeds.shape)} "
                         f"and {tuple(text_embeds.shape)}; embed images with CLIP.encode_image and "
                         "their captions with CLIP.encode_text")
    cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)  # (N,)
    return (100 * cos).clamp(min=0).mean().item()


# --- Fréchet distance and FID (chapter 12) ---------------------------------------------------

def _as_float64(x, name):
    """(N, D) numpy array or torch tensor -> float64 numpy array, with a clear error otherwise."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} must be a 2-D (N, D) set of feature vectors with N >= 2, got shape "
                         f"{x.shape}; flatten or pool image features to one vector per image first")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf values: check the feature network's output")
    return x


def _sqrt_psd(m):
    """Square root of a symmetric positive semi-definite matrix through its eigenvalues; the tiny
    negative eigenvalues that rounding leaves on a singular matrix are clipped to 0."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(features_a, features_b):
    """FID's distance between two sets of features (chapter 12): fit a Gaussian (mean mu,
    covariance S) to each (N, D) set and return

        |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}),

    a float >= 0 (0 for identical sets; lower means the two sets look more alike).

    The usual code takes scipy's `sqrtm(S_a @ S_b)`, which is slow, and on a singular
    covariance (fewer images than feature dimensions, repeated images) returns complex numbers
    or NaN. Here everything is in float64 and only symmetric matrices are square-rooted:
    S_a S_b has the same eigenvalues as the symmetric M = S_a^{1/2} S_b S_a^{1/2}, so
    tr((S_a S_b)^{1/2}) = sum of sqrt(eigenvalues of M), with `eigh` for both square roots and
    rounding's tiny negative eigenvalues clipped to 0. The result is always a finite real number.
    """
    a = _as_float64(features_a, "features_a")
    b = _as_float64(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two feature sets have different widths ({a.shape[1]} vs {b.shape[1]}): "
                         "compute both with the same feature network")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    # (D, D) each, unbiased (N - 1); np.cov returns a 0-d array for D = 1, hence atleast_2d
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(cov_a)
    m = root_a @ cov_b @ root_a                                        # symmetric PSD, same eigenvalues as S_a S_b
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(w, 0, None)).sum()
    d = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt
    return float(max(d, 0.0))   # rounding can leave -1e-12 on identical sets


def fid(images_a, images_b, feature_fn, batch_size=64):
    """Fréchet Inception Distance with the feature network a parameter (chapter 12).

    `feature_fn` takes a slice `images[i:i + batch_size]` (whatever the image sets are: uint8
    numpy (N, H, W, 3), float tensors...) and returns (B, D) features; it runs under
    `torch.no_grad()`. The number is only comparable with other FIDs computed with the same
    feature network, image size and N: the published FIDs use Inception-v3's 2048-d pool
    features, which cannot be downloaded here, so the course uses its own CLIP image encoder.

    With a real CLIP (or any transformers vision model) in a local folder:

        from transformers import CLIPVisionModelWithProjection
        clip = CLIPVisionModelWithProjection.from_pretrained("path/to/clip-vit-base-patch16").eval()
        score = fid(images_a, images_b, clip_image_features(clip))

    With the Inception-v3 FID network as a local TorchScript file (`inception_features`):

        score = fid(images_a, images_b, inception_features("path/to/inception-2015-12-05.pt"))
    """
    def features(images):
        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {len(images)}")
        with torch.no_grad():
            out = [feature_fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        out = [o.detach().cpu().double() if isinstance(o, torch.Tensor) else torch.as_tensor(o).double()
               for o in out]
        return torch.cat(out).reshape(len(images), -1)                # (N, D)

    return frechet_distance(features(images_a), features(images_b))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # the image normalisation CLIP was trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_image_features(model):
    """A `feature_fn` for `fid` from a transformers CLIPVisionModelWithProjection: uint8
    (B, H, W, 3) images or float (B, 3, H, W) in [0, 1] -> resized (bicubic, antialiased) to
    the model's image size, CLIP-normalised -> image_embeds (B, projection_dim)."""
    size = model.config.image_size
    param = next(model.parameters())
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def feature_fn(images):
        if isinstance(images, np.ndarray) and images.dtype == np.uint8:
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (B, H, W, 3) -> (B, 3, H, W)
        else:
            x = torch.as_tensor(images).float()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"clip_image_features takes uint8 (B, H, W, 3) or float (B, 3, H, W) images, "
                             f"got shape {tuple(x.shape)}")
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                            align_corners=False).clamp(0, 1)
        x = ((x - mean) / std).contiguous()
        return model(pixel_values=x.to(param.device, param.dtype)).image_embeds

    return feature_fn


def inception_features(path, device="cpu"):
    """A `feature_fn` for `fid` from a local Inception-v3 FID network in TorchScript: the file
    `inception-2015-12-05.pt` of the StyleGAN2-ADA metrics (also what clean-fid loads), a direct
    translation of the TensorFlow network the published FIDs use. Nothing is downloaded, and no
    torchvision is needed. (pytorch-fid's `pt_inception-*.pth` is a state dict for a torchvision
    model: load that model yourself and pass a function of it instead.)

    The network resizes to 299x299 and normalises by itself; it takes (B, 3, H, W) images with
    values 0..255, as StyleGAN2-ADA calls it: `net(images, return_features=True)` -> (B, 2048).
    Here uint8 (B, H, W, 3) images or float (B, 3, H, W) in [0, 1] are turned into that.
    """
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Inception-v3 TorchScript file at {path}: pass the path of a local "
                                "inception-2015-12-05.pt (the StyleGAN2-ADA / clean-fid FID network)")
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise ValueError(f"{path} is not a TorchScript file ({e.__class__.__name__}); inception_features "
                         "takes the TorchScript inception-2015-12-05.pt, not a pickle (.pkl) or a state dict "
                         "(.pth)") from e

    def feature_fn(images):
        if isinstance(images, np.ndarray) and images.dtype == np.uint8:
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float()   # (B, H, W, 3) -> (B, 3, H, W), 0..255
        else:
            x = torch.as_tensor(images).float() * 255                  # (B, 3, H, W) in [0, 1] -> 0..255
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"inception_features takes uint8 (B, H, W, 3) or float (B, 3, H, W) images, "
                             f"got shape {tuple(x.shape)}")
        return net(x.to(device), return_features=True)

    return feature_fn

# --- the judge: colour, shape and position of a course image ----------------------------------
# Used by the U-Net, evaluation and LoRA chapters to score generated course images. Colour and
# position are read off the pixels (exact on the course data); shape, which pixel rules read
# poorly on blurry generated blobs, comes from a small CNN trained on real course images.
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import data as _data  # noqa: E402
from . import paths  # noqa: E402

FOREGROUND = 0.4   # foreground: brightest channel above 40 % of full scale and above half the image's peak
MIN_PIXELS = 10    # fewer foreground pixels than this: a blank canvas, judged (None, None, None)
CROP = 16          # ShapeNet sees a CROP x CROP window centred on the shape
JUDGE_FILE = "course_judge.safetensors"
NEW_SHAPES_JUDGE_FILE = "course_judge_new_shapes.safetensors"  # knows data.SHAPES + data.NEW_SHAPES (chapter 13)


class ShapeNet(nn.Module):
    """The judge's shape classifier: a (N, 1, 16, 16) brightness window centred on the shape
    -> logits over the judge's shapes (N, n_shapes; data.SHAPES, 3, by default).
    Colour-blind and position-blind by construction: it can only learn the outline."""

    def __init__(self, n_shapes=len(_data.SHAPES)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * (CROP // 4) ** 2, n_shapes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 8, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 16, 4, 4)
        return self.head(x.flatten(1))              # (N, 16, 4, 4) -> (N, 256) -> (N, 3)


def _look(images):
    """What the judge measures on uint8 images (N, H, W, 3): brightness (N, H, W) in [0, 1]
    (the brightest channel), the foreground mask, and the brightness-weighted foreground
    centroid (N, 2) as (x, y) in pixels."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"the judge takes uint8 images (N, H, W, 3), got {images.dtype} {images.shape}; "
                         "convert float tensors in [-1, 1] with minisd.data.to_uint8")
    light = torch.from_numpy(images.max(axis=-1)).float() / 255
    peak = light.amax(dim=(1, 2), keepdim=True) if len(light) else light
    fg = (light > FOREGROUND) & (light > 0.5 * peak)  # a hazy background below the shape is not foreground
    wgt = light * fg
    n, h, w = light.shape
    mass = wgt.sum(dim=(1, 2)).clamp(min=1e-6)
    cx = (wgt * (torch.arange(w) + 0.5)).sum(dim=(1, 2)) / mass
    cy = (wgt * (torch.arange(h) + 0.5)[:, None]).sum(dim=(1, 2)) / mass
    return light, fg, torch.stack([cx, cy], dim=1)


def _crops(light, centroids):
    """CROP x CROP windows of light (N, H, W) centred on each centroid -> (N, 1, CROP, CROP),
    stretched so the image's background (its median) is 0 and its peak 1: a hazy or dim
    sample looks like the clean drawings ShapeNet learned from (which it leaves unchanged)."""
    background = light.flatten(1).median(dim=1).values[:, None, None]
    peak = light.amax(dim=(1, 2), keepdim=True)
    light = ((light - background) / (peak - background).clamp(min=1e-3)).clamp(0, 1)
    pad = CROP // 2
    padded = F.pad(light, (pad, pad, pad, pad))  # original pixel i sits at i + pad
    corners = centroids.round().long()           # window [c - pad, c + pad) -> padded [c, c + CROP)
    return torch.stack([padded[i, y:y + CROP, x:x + CROP] for i, (x, y) in enumerate(corners.tolist())])[:, None]


class Judge:
    """The automatic judge of course images: (colour, shape, position) for each image.

    judge = Judge.load(); judge(images) -> [(colour, shape, position), ...] with names from
    minisd.data; a blank canvas gives (None, None, None).
    - colour: each foreground pixel votes for the nearest of the six course colours
      (after scaling its brightest channel to 1); the most votes win;
    - position: the brightness-weighted centroid of the foreground, nearest position centre;
    - shape: ShapeNet on a window around that centroid, trained on real course images by
      `train_judge`.

    `colours` ({name: (r, g, b)}, default data.COLOURS) is the palette the colour vote chooses
    from; chapter 13 judges a new colour with `Judge.load(colours={**data.COLOURS,
    **data.NEW_COLOURS})`. `shapes` names ShapeNet's outputs in order (default data.SHAPES);
    a judge file records its own, so chapter 13's judge of new shapes
    (`Judge.load(NEW_SHAPES_JUDGE_FILE)`) knows data.SHAPES + data.NEW_SHAPES.
    """

    def __init__(self, net, colours=None, shapes=None):
        self.net = net.eval()
        self.colours = dict(_data.COLOURS if colours is None else colours)
        self.shapes = tuple(_data.SHAPES if shapes is None else shapes)
        if not self.colours:
            raise ValueError("the judge needs at least one colour to choose from")
        if net.head.out_features != len(self.shapes):
            raise ValueError(f"the ShapeNet has {net.head.out_features} outputs but {len(self.shapes)} shape names "
                             f"were given ({self.shapes})")

    @classmethod
    def load(cls, path=None, colours=None):
        """The judge in `path` (default data/course_judge.safetensors); its shapes are read from
        the file's metadata (files without it know data.SHAPES)."""
        import json
        from safetensors import safe_open
        path = paths.DATA_DIR / JUDGE_FILE if path is None else path
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        shapes = tuple(json.loads(meta["shapes"])) if "shapes" in meta else _data.SHAPES
        net = ShapeNet(len(shapes))
        net.load_state_dict(state)
        return cls(net, colours, shapes)

    def save(self, path):
        import json
        from safetensors.torch import save_file
        tensors = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        paths.write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"shapes": json.dumps(list(self.shapes))}))

    def __call__(self, images):
        rgb = np.asarray(images)
        light, fg, centroids = _look(rgb)
        if len(rgb) == 0:
            return []
        with torch.no_grad():
            shapes = self.net(_crops(light, centroids)).argmax(dim=1).tolist()
        palette = np.array(list(self.colours.values()), dtype=np.float32) / 255       # (6, 3) by default
        centres = torch.tensor(list(_data.POSITIONS.values())) * torch.tensor(light.shape[2:0:-1])  # (5, 2) px
        out = []
        for i in range(len(rgb)):
            mask = fg[i].numpy()
            if mask.sum() < MIN_PIXELS:
                out.append((None, None, None))
                continue
            pix = rgb[i][mask].astype(np.float32)                                     # (P, 3)
            pix /= pix.max(axis=1, keepdims=True)
            votes = ((pix[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)        # (P,)
            colour = list(self.colours)[np.bincount(votes, minlength=len(palette)).argmax()]
            position = list(_data.POSITIONS)[int(((centres - centroids[i]) ** 2).sum(1).argmin())]
            out.append((colour, self.shapes[shapes[i]], position))
        return out

    def accuracy(self, images, captions):
        """Fraction right per attribute, and for all three at once, against course captions."""
        truth = [_data.parse(c, new=True) for c in captions]
        if len(truth) != len(images):
            raise ValueError(f"{len(images)} images but {len(truth)} captions")
        guess = self(images)
        right = np.array([[g[k] == t[k] for k in range(3)] for g, t in zip(guess, truth)], dtype=bool)
        right = right.reshape(-1, 3)
        return {"colour": float(right[:, 0].mean()), "shape": float(right[:, 1].mean()),
                "position": float(right[:, 2].mean()), "all": float(right.all(axis=1).mean())}


def _augment(x, g):
    """Make clean windows (N, 1, h, w) look more like decoded samples: dimmer or brighter,
    a little blurred, a faint background and pixel noise."""
    n = len(x)
    x = x * (0.6 + 0.5 * torch.rand(n, 1, 1, 1, generator=g))
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    k = torch.rand(n, 1, 1, 1, generator=g)
    x = (1 - k) * x + k * blur
    x = x + 0.1 * torch.rand(n, 1, 1, 1, generator=g)
    x = x + 0.08 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def train_judge(n=10_000, steps=600, batch=128, seed=0, path=None, progress=True, shapes=None):
    """Train the judge's ShapeNet on real course images (chapters 9 and 12); minutes on 2 CPU cores.

    The images come from data.sample(n, seed) with data.HELD_OUT left out, so the judge has
    never seen the combinations used to measure generalisation. Saves to `path` if given
    (`data/course_judge.safetensors` ships the result of the defaults). Returns a Judge.
    `shapes` (default data.SHAPES) may add shapes of data.NEW_SHAPES, drawn in all their
    combinations as often as each course shape (chapter 13's judge, NEW_SHAPES_JUDGE_FILE).
    """
    from tqdm import tqdm
    torch.manual_seed(seed)
    shapes = tuple(_data.SHAPES if shapes is None else shapes)
    pool = [c for c in _data.combinations() if c not in _data.HELD_OUT and c[1] in shapes]
    pool += [c for s in shapes if s not in _data.SHAPES for c in _data.concept_combinations(s)]
    images, captions = _data.sample(n, seed=seed, only=pool)
    light, _, centroids = _look(images)
    x = _crops(light, centroids)                                                   # (n, 1, 16, 16)
    y = torch.tensor([shapes.index(_data.parse(c, new=True)[1]) for c in captions])
    net = ShapeNet(len(shapes))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    for step in bar:
        idx = torch.randint(0, n, (batch,), generator=g)
        loss = F.cross_entropy(net(_augment(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    judge = Judge(net.eval(), shapes=shapes)
    if path is not None:
        judge.save(path)
    return judge


# --- shape fidelity, background cleanliness and the pixel judge (issue 16) --------------------
# Not learned: every course image is drawn by data._shape_mask at a known centre and size, so a
# generated image can be compared with the ideal drawing of its shape at the centre and size that
# fit it best. Definitions (all on uint8 (H, W, 3) images):
#   brightness  L = brightest channel / 255 (on a real course image: exactly the anti-aliased
#               coverage of each pixel, rounded to 1/255)
#   soft mask   m = ramp(L) = clip((L - 0.25) / 0.5, 0, 1): 0 below 64/255 (a faint haze is not
#               foreground), 1 above 191/255 (a slightly dim shape still counts in full)
#   ideal       d(shape, cx, cy, r) = ramp(coverage), the coverage drawn by the data's own code
#               (4x4 supersampling, data._shape_mask) at centre (cx, cy) px and half-width r px
#   fidelity    soft IoU(m, d) = sum min(m, d) / sum max(m, d), maximised over (cx, cy, r) by a
#               pattern search from the moments of m (down to 1/32 px and 0.3 % of r; see fit_shape); with the
#               shape the caption asks for, this is `fidelity`; over data.SHAPES, the best one is
#               the pixel judge's shape
#   background  pixels farther than 2 px (Chebyshev) from every pixel the fitted ideal shape
#               touches (coverage > 0); `background` = their mean brightness L, and `corners` =
#               the mean L of the four corner pixels, both in units of 1/255 (0 on real images)
# An image whose mask holds less than FIDELITY_MIN_MASS pixels of mass is blank: fidelity 0,
# shape/colour/position None, background measured over the whole image.
RAMP = (0.25, 0.75)
FIDELITY_MIN_MASS = 4.0
BACKGROUND_MARGIN = 2
HUES = {"red": 0.0, "orange": 30.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0,
        "magenta": 300.0}  # hue in degrees of each course colour's RGB (data.COLOURS, data.NEW_COLOURS)


def soft_mask(images):
    """uint8 images (N, H, W, 3) or one (H, W, 3) -> the soft foreground mask m in [0, 1], float64."""
    return _ramp(brightness(images))


def _ramp(x):
    lo, hi = RAMP
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


_GRIDS = {}


def _ideal_cover(shape, cx, cy, r, size):
    """The data's own anti-aliased coverage (size, size) of `shape` at (cx, cy), half-width r (px)."""
    if size not in _GRIDS:
        _GRIDS[size] = _data._grid(size)
    xs, ys = _GRIDS[size]
    s = _data.SUPERSAMPLE
    mask = _data._shape_mask(shape, cx, cy, r, xs, ys)
    return mask.reshape(size, s, size, s).mean(axis=(1, 3))


def _signed_distance(shape, cx, cy, r, xs, ys):
    """Signed distance (px; < 0 inside) from the points (xs, ys) to the outline data._shape_mask
    draws (exact on straight sides, approximate at corners)."""
    dx, dy = np.abs(xs - cx), ys - cy
    if shape == "circle":
        return np.sqrt(dx ** 2 + dy ** 2) - r
    if shape == "square":
        h = r * 0.886
        return np.maximum(dx - h, np.abs(dy) - h)
    if shape == "triangle":
        R = 1.2 * r
        height, half = 1.5 * R, R * np.sqrt(3) / 2
        top = cy - 0.75 * R
        slant = (dx - half * (ys - top) / height) / np.sqrt(1 + (half / height) ** 2)
        return np.maximum(np.maximum(ys - (top + height), top - ys), slant)
    if shape == "bar":
        return np.maximum(dx - 1.25 * r, np.abs(dy) - 0.62 * r)
    if shape == "plus":
        arm, bar = 1.1 * r, 0.38 * r
        return np.minimum(np.maximum(dx - arm, np.abs(dy) - bar), np.maximum(dx - bar, np.abs(dy) - arm))
    if shape == "ring":
        d = np.sqrt(dx ** 2 + dy ** 2)
        return np.maximum(d - 1.1 * r, 0.55 * r - d)
    raise ValueError(f"unknown shape {shape!r}; expected one of {_data.SHAPES + _data.NEW_SHAPES}")


def _smooth_cover(shape, cx, cy, r, size):
    """A coverage that moves smoothly with (cx, cy, r): clip(0.5 - signed distance, 0, 1) at each
    pixel centre (the fit's first, coarse stage; the data's 4x supersampled drawing is flat
    between its sample points)."""
    coords = np.arange(size) + 0.5
    xs, ys = np.meshgrid(coords, coords)
    return np.clip(0.5 - _signed_distance(shape, cx, cy, r, xs, ys), 0.0, 1.0)


_MOMENTS = {}


def _shape_moments(shape):
    """(area / r^2, centroid offset (dx, dy) / r) of a shape's ideal mask, measured once on a fine grid."""
    if shape not in _MOMENTS:
        n, r = 512, 100.0
        coords = np.arange(n) + 0.5
        xs, ys = np.meshgrid(coords, coords)
        mask = _data._shape_mask(shape, n / 2, n / 2, r, xs, ys)
        area = mask.sum()
        _MOMENTS[shape] = (area / r ** 2, ((xs[mask].mean() - n / 2) / r, (ys[mask].mean() - n / 2) / r))
    return _MOMENTS[shape]


def _soft_iou(m, d):
    return float(np.minimum(m, d).sum() / max(np.maximum(m, d).sum(), 1e-12))


def brightness(images):
    """uint8 images (..., H, W, 3) -> L = brightest channel / 255, float64 in [0, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (..., H, W, 3), got {images.dtype} {images.shape}; "
                         "convert float tensors in [-1, 1] with minisd.data.to_uint8")
    return images.max(axis=-1).astype(np.float64) / 255


def _pattern_search(score, p, steps, smallest):
    """Maximise score(p) over 3 parameters: take the first of the 26 moves (one, two or three
    parameters at once, one step each) that raises it; halve the steps when none does."""
    best = score(p)
    moves = [np.array(d, dtype=float) - 1 for d in np.ndindex(3, 3, 3)]
    moves = sorted((d for d in moves if d.any()), key=lambda d: np.abs(d).sum())  # axes first
    steps = np.asarray(steps, dtype=float)
    while steps[0] >= smallest:
        for d in moves:
            q = p + d * steps
            s = score(q)
            if s > best + 1e-9:
                p, best = q, s
                break
        else:
            steps = steps / 2
    return best, p


def fit_shape(light, shape):
    """Fit the ideal `shape` to a brightness map `light` (H, W) in [0, 1] (see `brightness`):
    returns (fidelity, (cx, cy, r)), or (0.0, None) on a blank image.

    Two pattern searches over (cx, cy, log r) (`_pattern_search`): the first maximises the soft
    IoU of the raw brightness with a smooth coverage of the shape (`_smooth_cover`, from its
    signed distance), from the moments of the soft mask (mass -> r, centroid -> centre), steps
    from 1 px and 10 % of r down to 1/32 px; the second refines it on the quantity reported, the
    soft IoU of the ramped masks (`soft_mask`, RAMP) with the data's own drawing, steps from 1/8
    px and 1.25 % of r. (The data's 4x supersampled drawing, and more so its ramp, is flat while
    an edge moves between sample points: a search on it alone stalls far from the optimum.)"""
    light = np.asarray(light, dtype=np.float64)
    size = light.shape[0]
    if light.shape != (size, size):
        raise ValueError(f"expected a square brightness map (H, W), got {light.shape}")
    mask = _ramp(light)
    mass = mask.sum()
    if mass < FIDELITY_MIN_MASS:
        return 0.0, None
    area, (ox, oy) = _shape_moments(shape)
    coords = np.arange(size) + 0.5
    mx, my = (mask.sum(axis=0) * coords).sum() / mass, (mask.sum(axis=1) * coords).sum() / mass
    r = float(np.sqrt(mass / area))
    p = np.array([mx - ox * r, my - oy * r, np.log(r)])
    _, p = _pattern_search(lambda q: _soft_iou(light, _smooth_cover(shape, q[0], q[1], np.exp(q[2]), size)),
                           p, [1.0, 1.0, 0.1], 1 / 32)
    best, p = _pattern_search(
        lambda q: _soft_iou(mask, _ramp(_ideal_cover(shape, q[0], q[1], np.exp(q[2]), size))),
        p, [0.125, 0.125, 0.0125], 1 / 32)
    return best, (float(p[0]), float(p[1]), float(np.exp(p[2])))


def background_figures(image, shape=None, fit=None):
    """(background, corners) of one uint8 image (H, W, 3), in units of 1/255: the mean brightness
    (brightest channel) of the pixels more than BACKGROUND_MARGIN px from every pixel the fitted
    ideal shape touches, and the mean brightness of the four corner pixels. Without a fit
    (a blank image) the background is the whole image."""
    light = np.asarray(image).max(axis=-1).astype(np.float64)   # 0..255
    size = light.shape[0]
    if fit is None:
        far = np.ones_like(light, dtype=bool)
    else:
        touched = _ideal_cover(shape, *fit, size) > 0
        k = BACKGROUND_MARGIN
        padded = np.pad(touched, k)
        near = np.zeros_like(touched)
        for dy in range(2 * k + 1):        # dilation by a (2k+1) x (2k+1) square
            for dx in range(2 * k + 1):
                near |= padded[dy:dy + size, dx:dx + size]
        far = ~near
    corners = light[[0, 0, -1, -1], [0, -1, 0, -1]].mean()
    return float(light[far].mean()) if far.any() else 0.0, float(corners)


def _hue(rgb):
    """Hue in degrees (N,) of float RGB rows (N, 3)."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    return np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360


def pixel_judge(images, shapes=None, colours=None):
    """The pixel judge, written from its definition (not learned; independent of `Judge`): for
    each uint8 image (N, H, W, 3) a dict with
    - colour: the course colour whose hue (HUES) is nearest the mean hue of the foreground (the
      circular mean of each pixel's hue, weighted by its soft mask m times its saturation);
    - position: the data.POSITIONS centre nearest the centroid of m;
    - shape: the shape of `shapes` (default data.SHAPES) whose fitted ideal has the highest soft
      IoU with m (`fit_shape`); `ious` holds each shape's IoU and `fits` each fit (cx, cy, r);
    a blank image (mass of m < FIDELITY_MIN_MASS) gets None for all three.
    `colours` (default data.COLOURS) are the names the colour is chosen from."""
    shapes = tuple(_data.SHAPES if shapes is None else shapes)
    colours = tuple(_data.COLOURS if colours is None else colours)
    images = np.asarray(images)
    masks = soft_mask(images)
    out = []
    for image, m in zip(images, masks):
        size = m.shape[0]
        mass = m.sum()
        if mass < FIDELITY_MIN_MASS:
            out.append({"colour": None, "shape": None, "position": None, "ious": {}, "fits": {}})
            continue
        rgb = image.reshape(-1, 3).astype(np.float64) / 255
        w = m.reshape(-1) * (rgb.max(1) - rgb.min(1))                  # mask x saturation
        h = np.radians(_hue(rgb))
        mean_hue = np.degrees(np.arctan2((w * np.sin(h)).sum(), (w * np.cos(h)).sum())) % 360
        dist = {c: min(abs(mean_hue - HUES[c]), 360 - abs(mean_hue - HUES[c])) for c in colours}
        coords = np.arange(size) + 0.5
        cx, cy = (m.sum(0) * coords).sum() / mass, (m.sum(1) * coords).sum() / mass
        position = min(_data.POSITIONS, key=lambda p: (_data.POSITIONS[p][0] * size - cx) ** 2
                       + (_data.POSITIONS[p][1] * size - cy) ** 2)
        light = image.max(axis=-1).astype(np.float64) / 255
        fits = {s: fit_shape(light, s) for s in shapes}
        out.append({"colour": min(dist, key=dist.get), "shape": max(fits, key=lambda s: fits[s][0]),
                    "position": position, "ious": {s: f[0] for s, f in fits.items()},
                    "fits": {s: f[1] for s, f in fits.items()}})
    return out


def fidelity(images, captions, shapes=None, colours=None):
    """Per image: the pixel judge's reading against the caption, the fidelity (soft IoU with the
    caption's own shape, fitted) and the background figures. Returns a dict of arrays (N,):
    colour, shape, position (bool: judged right), fidelity (float), background, corners (1/255).
    The judge chooses among `shapes` and `colours`; by default the course's (data.SHAPES,
    data.COLOURS) plus chapter 13's new ones (data.NEW_SHAPES, data.NEW_COLOURS) that the
    captions use, so that "a red bar ..." is judged among circle, square, triangle and bar."""
    truth = [_data.parse(c, new=True) for c in captions]
    if len(truth) != len(images):
        raise ValueError(f"{len(images)} images but {len(truth)} captions")
    if shapes is None:
        shapes = _data.SHAPES + tuple(s for s in _data.NEW_SHAPES if any(t[1] == s for t in truth))
    if colours is None:
        colours = tuple(_data.COLOURS) + tuple(c for c in _data.NEW_COLOURS if any(t[0] == c for t in truth))
    shapes = tuple(shapes)
    images = np.asarray(images)
    judged = pixel_judge(images, shapes, colours)
    out = {k: [] for k in ("colour", "shape", "position", "fidelity", "background", "corners")}
    for image, j, (colour, shape, position) in zip(images, judged, truth):
        if shape in j["ious"]:
            iou, fit = j["ious"][shape], j["fits"][shape]
        else:
            iou, fit = fit_shape(brightness(image), shape)
        bg, corners = background_figures(image, shape, fit)
        for k, v in (("colour", j["colour"] == colour), ("shape", j["shape"] == shape),
                     ("position", j["position"] == position), ("fidelity", iou), ("background", bg),
                     ("corners", corners)):
            out[k].append(v)
    return {k: np.array(v) for k, v in out.items()}


def wilson_interval(successes, n, z=1.96):
    """The Wilson score interval (lo, hi) of a proportion successes / n (95 % for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


def mean_interval(values, z=1.96):
    """(mean, lo, hi): the mean and its normal-approximation 95 % interval, mean -+ z s / sqrt(n)."""
    v = np.asarray(values, dtype=np.float64)
    half = z * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def summarise_fidelity(per_image):
    """`fidelity`'s per-image dict -> the table row: each rate with its Wilson interval, each mean
    with its normal interval, and n."""
    n = len(per_image["fidelity"])
    row = {"n": n}
    for k in ("colour", "shape", "position"):
        s = int(per_image[k].sum())
        row[k] = [s / n, *wilson_interval(s, n)]
    for k in ("fidelity", "background", "corners"):
        row[k] = list(mean_interval(per_image[k]))
    return row
