"""Measuring generated images (chapter 12): FID's Fréchet distance, CLIP score, and the
automatic judge of course images (colour, shape, position)."""
import numpy as np
import torch

# --- CLIP score (chapter 8 / 12) -------------------------------------------------------------

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
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)   # (D, D) each, unbiased (N - 1)
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

    For Inception-v3 FID weights, wrap the network the same way: a function from a batch of
    images to its (B, 2048) pooled features.
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

# --- the judge: colour, shape and position of a course image ----------------------------------
