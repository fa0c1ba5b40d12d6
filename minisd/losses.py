"""Training objectives: the VAE's (chapter 6), CLIP's contrastive loss (chapter 8)."""
import torch
import torch.nn.functional as F
from torch import nn

# --- VAE: reconstruction, perceptual, PatchGAN, KL, VQ (chapter 6) -------------------------


def l1_loss(x, x_rec, weight=None):
    """Mean absolute error per image, (B,). `weight` (B, 1, H, W) scales each pixel's error,
    e.g. to count the few foreground pixels of a course image more than the black background."""
    err = (x - x_rec).abs()
    if weight is not None:
        err = err * weight
    return err.mean(dim=(1, 2, 3))


def foreground_weight(x, boost):
    """1 on the black background, 1 + boost on pixels that hold a shape: (B, 1, H, W).

    Course images are ~90 % black; weighting the shape pixels stops a small VAE from
    spending its first thousand steps learning only the background (chapter 6)."""
    fg = (x > -0.9).any(dim=1, keepdim=True).to(x.dtype)  # any channel brighter than black
    return 1.0 + boost * fg


class RandomFeatures(nn.Module):
    """The perceptual loss's feature network in this course: a fixed, *untrained* conv net.

    Each stage is Conv3x3 + ReLU, halving the size after the first; its outputs at every
    stage are the features compared. The weights come from a seeded generator, so every
    run builds the same network, and nothing is downloaded (chapter 6 says why)."""

    def __init__(self, channels=(32, 64, 128), in_channels=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.channels = tuple(channels)
        self.stages = nn.ModuleList()
        c_in = in_channels
        for i, c in enumerate(self.channels):
            conv = nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():  # He init, from our own generator
                conv.weight.normal_(0.0, (2.0 / (c_in * 9)) ** 0.5, generator=g)
                conv.bias.zero_()
            self.stages.append(nn.Sequential(conv, nn.ReLU()))
            c_in = c
        self.requires_grad_(False)

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class PerceptualLoss(nn.Module):
    """LPIPS-form distance between two image batches, (B,) (chapter 6).

    `features` is any module mapping (B, 3, H, W) in [-1, 1] to a list of feature maps
    with `channels[l]` channels; it is frozen. Per layer: unit-normalise each pixel's
    feature vector, square the difference, weight each channel by a non-negative lambda,
    sum over channels, average over space; then sum over layers. With real LPIPS, pass
    VGG16's relu1_2..relu5_3 features and copy its `lin{l}.model.1.weight` into `weights[l]`.
    """

    def __init__(self, features, channels):
        super().__init__()
        self.features = features.eval().requires_grad_(False)
        # lambda per channel: LPIPS learns them from human judgements; we start uniform, 1/C
        self.weights = nn.ParameterList(nn.Parameter(torch.full((c,), 1.0 / c)) for c in channels)

    def train(self, mode=True):  # the feature network stays in eval mode
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, x, y):
        total = 0.0
        for fx, fy, w in zip(self.features(x), self.features(y), self.weights, strict=True):
            fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)  # unit length along channels
            fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            d = (fx - fy) ** 2 * w.clamp(min=0).view(1, -1, 1, 1)  # (B, C, H, W)
            total = total + d.sum(dim=1).mean(dim=(1, 2))  # -> (B,)
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix, as in the LDM/taming recipe): one realness logit per
    overlapping patch, output (B, 1, h, w) (chapter 6). Conv k4 s2 + LeakyReLU, then
    `n_layers - 1` more k4 s2 convs with BatchNorm, a k4 s1 one, and a k4 s1 conv to 1 logit."""

    def __init__(self, in_channels=3, width=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, n_layers + 1):
            c_out = width * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: push real patches above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake):
    """The autoencoder's adversarial term: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def disc_factor(step, start):
    """0 before the discriminator starts (step < start; SD's VAE used start = 50001), then 1."""
    return 0.0 if step < start else 1.0


def adaptive_weight(rec_loss, g_loss, last_layer, scale=0.5):
    """LDM's balance of the GAN term: |grad rec| / |grad g| at the decoder's last layer, x scale.

    The ratio makes the adversarial gradient as large as the reconstruction's there, whatever
    the two losses' magnitudes; clamped to [0, 1e4] and detached (no gradient flows through it)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach() * scale


def kl_loss(posterior):
    """KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch (weight ~1e-6)."""
    return posterior.kl().mean()


class VectorQuantizer(nn.Module):
    """VQ regularisation (VQ-GAN), the alternative to KL: snap each latent pixel to its
    nearest of `num_codes` codebook vectors (SD's VQ models: 8192) (chapter 6).

    Returns (quantised latents with a straight-through gradient, codebook + beta *
    commitment loss, code indices (B, h, w))."""

    def __init__(self, num_codes=8192, dim=4, beta=0.25):
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / num_codes, 1.0 / num_codes)

    def forward(self, z):
        B, C, H, W = z.shape
        if C != self.codebook.embedding_dim:
            raise ValueError(f"latents have {C} channels but the codebook holds {self.codebook.embedding_dim}-d "
                             "vectors: build VectorQuantizer(dim=latent channels)")
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B, C, H, W) -> (B*H*W, C)
        codes = self.codebook.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)  # (B*H*W, K)
        idx = dist.argmin(dim=1)
        zq = codes[idx].view(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # -> (B, C, H, W)
        codebook_loss = F.mse_loss(zq, z.detach())    # moves the codes towards the encoder
        commitment = F.mse_loss(z, zq.detach())       # keeps the encoder near its codes
        zq = z + (zq - z).detach()  # straight-through: forward uses zq, backward copies dL/dzq to z
        return zq, codebook_loss + self.beta * commitment, idx.view(B, H, W)


def psnr(x, y):
    """Peak signal-to-noise ratio in dB per image, (B,), for images in [-1, 1] (peak-to-peak 2)."""
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))


# --- CLIP: contrastive loss (chapter 8) -------------------------------------------------------

def clip_loss(logits):
    """CLIP's symmetric contrastive loss (chapter 8) on the (N images, N captions) logits.

    Pair i is image i with caption i, so the right answer of row i (which caption fits
    image i?) and of column i (which image fits caption i?) is i: the mean of the two
    cross-entropies. It assumes the N captions of a batch are all different.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"expected square (N, N) image-text logits, got shape {tuple(logits.shape)}")
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
