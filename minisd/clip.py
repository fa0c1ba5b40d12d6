"""CLIP (chapters 7-8): the text encoder SD reads prompts with, and the small CLIP the course trains.

`CLIPTextEncoder` (chapter 7): token + position embeddings -> N pre-LayerNorm transformer
layers (causal self-attention, quick_gelu MLP) -> final LayerNorm, so (B, 77) token ids
become (B, 77, width) vectors, the context every cross-attention of the U-Net reads. At
`CLIPTextConfig.sd15()` it is the text half of OpenAI's CLIP ViT-L/14: 123,060,480 parameters;
at `CLIPTextConfig.sd2()` the 23 layers of OpenCLIP ViT-H/14's text tower that SD 2.x uses
(GELU instead of quick_gelu, 1024 wide; chapter 11).

`CLIP` (chapter 8): that text encoder plus a small image encoder, trained contrastively
(Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"):
both sides end in a normalised embedding and matching image/caption pairs are pulled together.
"""
import json
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CLIPTextConfig:
    """Sizes of a CLIP text encoder; `sd15()` is SD 1.x's (CLIP ViT-L/14's text tower)."""
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    positions: int = 77
    eps: float = 1e-5
    act: str = "quick_gelu"  # OpenAI's CLIP; OpenCLIP (SD 2.x) uses "gelu"

    def __repr__(self):
        """The dataclass repr, but the activation only where it is not OpenAI's quick_gelu."""
        shown = [f.name for f in fields(self) if f.name != "act" or self.act != "quick_gelu"]
        return f"CLIPTextConfig({', '.join(f'{name}={getattr(self, name)!r}' for name in shown)})"

    @classmethod
    def sd15(cls):
        """CLIP ViT-L/14's text encoder, as in SD 1.x: 12 layers of 768 wide, 12 heads."""
        return cls()

    @classmethod
    def sd2(cls):
        """OpenCLIP ViT-H/14's text encoder as SD 2.x uses it: 1024 wide, 16 heads, GELU, and only
        23 of its 24 layers (SD 2.x reads the penultimate layer, through the final LayerNorm)."""
        return cls(width=1024, layers=23, heads=16, mlp_width=4096, act="gelu")

    @classmethod
    def tiny(cls):
        """Two narrow layers with the real vocabulary, for fast tests."""
        return cls(width=32, layers=2, heads=4, mlp_width=64)

    @classmethod
    def course(cls):
        """The course's text encoder: 4 layers, 64 wide, one head of 64 (CLIP's head width, so
        `weights.text_config_from_weights` reads the config back from the shapes). The real
        vocabulary makes the token table 49408 x 64 (3.2M of its 3.4M parameters), so the width
        is what keeps the file small."""
        return cls(width=64, layers=4, heads=1, mlp_width=256)

    def to_json(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))


def quick_gelu(x):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: token i attends to tokens 0..i only."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} cannot be split into {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, C = x.shape
        # (B, N, C) -> (B, heads, N, C/heads)
        q, k, v = (proj(x).view(B, N, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))  # (B, heads, N, C/heads) -> (B, N, C)


class CLIPMLP(nn.Module):
    """Linear (width -> 4 width) -> quick_gelu (OpenAI) or gelu (OpenCLIP) -> Linear (back to width)."""

    def __init__(self, width, mlp_width, act="quick_gelu"):
        super().__init__()
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(f"act={act!r}: CLIP text encoders use 'quick_gelu' (OpenAI) or 'gelu' (OpenCLIP)")
        self.act = quick_gelu if act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """One pre-LayerNorm transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width, heads, mlp_width, eps, act="quick_gelu"):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = CLIPMLP(width, mlp_width, act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def _embedding(n, width):
    """nn.Embedding(n, width) with its usual N(0, 1) init, except on the meta device (weights
    about to be loaded), where nothing is drawn: normal_ on meta tensors is not a no-op in
    torch (its first call imports torch._dynamo, seconds)."""
    table = nn.Embedding(n, width, _weight=torch.empty(n, width))
    if not table.weight.is_meta:
        nn.init.normal_(table.weight)
    return table


class CLIPTextEmbeddings(nn.Module):
    """Token embedding + position embedding: (B, N) ids -> (B, N, width)."""

    def __init__(self, config):
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.width)
        self.position_embedding = _embedding(config.positions, config.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[:ids.shape[1]]


class CLIPEncoder(nn.Module):
    """The stack of CLIPEncoderLayers; `forward(x, n)` runs the first n of them."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config.width, config.heads, config.mlp_width, config.eps,
                                                     config.act) for _ in range(config.layers))

    def forward(self, x, n):
        for layer in self.layers[:n]:
            x = layer(x)
        return x


class CLIPTextEncoder(nn.Module):
    """CLIP's text transformer (chapter 7): (B, N <= 77) token ids -> (B, N, width).

    Each token sees only itself and the tokens before it (the causal mask, as in GPT). `skip`
    drops the last `skip` layers and applies the final LayerNorm to what is left, exactly as
    diffusers' `clip_skip` does: skip=1 is the "penultimate layer" some checkpoints prefer.
    Module names are transformers' CLIPTextModel's (as transformers 5.x saves them, without
    the `text_model.` level), so its weights load with no renaming.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.eps)

    def forward(self, ids, skip=0):
        if ids.shape[1] > self.config.positions:
            raise ValueError(f"{ids.shape[1]} tokens but the text encoder has {self.config.positions} positions: "
                             "tokenize with minisd.CLIPTokenizer, which truncates to 77")
        if not 0 <= skip < self.config.layers:
            raise ValueError(f"skip={skip}: expected 0 (last layer) to {self.config.layers - 1}")
        x = self.embeddings(ids)                                   # (B, N, width)
        x = self.encoder(x, self.config.layers - skip)
        return self.final_layer_norm(x)


# --- the course CLIP (chapter 8) ---------------------------------------------------------------

@dataclass(frozen=True)
class CLIPConfig:
    """A CLIP: a text encoder, a small convolutional image encoder, a shared embedding size."""
    text: CLIPTextConfig = CLIPTextConfig.course()
    image_size: int = 32
    image_channels: tuple = (32, 64, 128)
    embed_dim: int = 64

    @classmethod
    def course(cls):
        """The course CLIP: 32x32 course images and captions in a 64-dimensional shared space."""
        return cls()

    @classmethod
    def tiny(cls):
        """A few-second CLIP on course images, for tests."""
        return cls(text=CLIPTextConfig.tiny(), image_channels=(8, 16), embed_dim=16)

    def to_json(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        return cls(text=CLIPTextConfig(**d["text"]), image_size=d["image_size"],
                   image_channels=tuple(d["image_channels"]), embed_dim=d["embed_dim"])


class ImageEncoder(nn.Module):
    """The course's image tower: 3x3 convs of stride 2 (each halves the image; GroupNorm, GELU),
    then the whole small map flattened into one Linear.

    CLIP's own image towers are ResNets and ViTs that pool 224x224 images; pooling would throw
    away *where* the shape is, which the course captions name, so ours flattens the last
    (C, 4, 4) map instead and lets the Linear weigh each place separately.
    """

    def __init__(self, image_size, channels, embed_dim):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.GELU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.proj = nn.Linear(c_in * side * side, embed_dim)

    def forward(self, images):
        h = self.convs(images)                 # (B, 3, S, S) -> (B, C, S/8, S/8) with 3 convs
        return self.proj(h.flatten(1))         # (B, C, s, s) -> (B, C*s*s) -> (B, embed_dim)


class CLIP(nn.Module):
    """Text encoder + image encoder + a learned temperature (chapter 8).

    `forward(images, ids)` gives the (N, N) logits: cosine similarities of every image with
    every caption, times exp(logit_scale), capped at 100 as CLIP caps it. Row i's correct
    column is i; `minisd.losses.clip_loss` is the symmetric cross-entropy over rows and columns.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text = CLIPTextEncoder(config.text)
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self.image = ImageEncoder(config.image_size, config.image_channels, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07

    def encode_text(self, ids):
        """(B, 77) ids -> (B, embed_dim) unit vectors: the text encoder's output at the end token."""
        # the end token has the largest id (49407), so argmax finds its first occurrence; the
        # causal mask means nothing after it can change it, so the batch is cut there
        end = ids.argmax(dim=-1)
        h = self.text(ids[:, :int(end.max()) + 1])                 # (B, n, width)
        pooled = h[torch.arange(len(ids), device=ids.device), end]   # (B, width)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_image(self, images):
        """(B, 3, S, S) images in [-1, 1] -> (B, embed_dim) unit vectors."""
        return F.normalize(self.image(images), dim=-1)

    @torch.no_grad()
    def classify(self, images, ids):
        """Zero-shot classification: for each image, the index of the prompt (row of ids) it fits best."""
        return (self.encode_image(images) @ self.encode_text(ids).T).argmax(dim=-1)

    def scale(self):
        """exp(logit_scale), at most 100 (CLIP clamps logit_scale at ln 100)."""
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def forward(self, images, ids):
        """-> (N images, N captions) logits: scale x cosine similarity."""
        return self.scale() * self.encode_image(images) @ self.encode_text(ids).T
