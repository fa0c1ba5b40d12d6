"""Attention (chapter 3): SelfAttention, CrossAttention, FeedForward with GEGLU,
BasicTransformerBlock, SpatialTransformer, and the VAE's SpatialSelfAttention.

All attention goes through `F.scaled_dot_product_attention`, which never materialises the
(B, heads, N, N) matrix.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .resnet import Conv2d, cpu_inference


class CrossAttention(nn.Module):
    """Multi-head attention: queries from the image tokens x (B, N, dim), keys and values
    from a context (B, M, context_dim), in the U-Net the 77x768 CLIP text embedding.

    `upcast` (SD 2.1's `upcast_attention`) computes the attention itself in float32 when the
    model runs in float16, where SD 2.1's attention logits overflow (black images).
    `slice_size` (None: off) computes it for that many (image, head) pairs at a time, as
    diffusers' attention slicing: see `sliced_attention`."""

    def __init__(self, dim, context_dim, heads, bias=False, upcast=False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{dim} channels cannot be split into {heads} heads")
        self.heads, self.upcast = heads, upcast
        self.slice_size = None
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)
        self.fused_stamp = None  # set by fuse_projections

    # the projections that read the same input, which fuse_projections runs as one matrix product
    fuses = ("to_k", "to_v")

    def fuse_projections(self, fuse=True):
        """Run the projections that read the same input as one matrix product (diffusers'
        `fuse_qkv_projections`): k and v here, q, k and v in self-attention. The fused weight is
        a copy kept beside to_q, to_k and to_v, which stay the weights that load, save and take
        a LoRA; it is made again when their weights change, and not used while a LoRA wraps one
        of them or while they are being trained."""
        self.fused_stamp = None
        for name in ("fused_weight", "fused_bias"):
            self._buffers.pop(name, None)
        if fuse:
            self._fuse()

    def _fuse(self):
        layers = [getattr(self, name) for name in self.fuses]
        with torch.no_grad():
            self.register_buffer("fused_weight", torch.cat([l.weight for l in layers]), persistent=False)
            bias = None if layers[0].bias is None else torch.cat([l.bias for l in layers])
            self.register_buffer("fused_bias", bias, persistent=False)
        self.fused_stamp = self._stamp(layers)

    @staticmethod
    def _stamp(layers):
        """Where each weight lives and how often it was changed in place (a loaded state dict,
        a merged LoRA, .to(): each changes one of the two)."""
        return tuple((p.data_ptr(), p._version) for l in layers for p in (l.weight, l.bias) if p is not None)

    def _use_fused(self):
        if self.fused_stamp is None:
            return False
        layers = [getattr(self, name) for name in self.fuses]
        if not all(type(l) is nn.Linear for l in layers):
            return False  # a LoRA wraps one of them
        if torch.is_grad_enabled() and any(l.weight.requires_grad for l in layers):
            return False  # training: the gradients belong to to_q, to_k and to_v
        if torch.compiler.is_compiling():
            return True  # compile() cannot trace the stamp: fuse after loading weights, before compiling
        if self._stamp(layers) != self.fused_stamp:
            self._fuse()
        return True

    def _project(self, x, context):
        """q from x; k and v from the context (x itself in self-attention)."""
        if not self._use_fused():
            return self.to_q(x), self.to_k(context), self.to_v(context)
        if len(self.fuses) == 3:
            return F.linear(x, self.fused_weight, self.fused_bias).chunk(3, dim=-1)
        return (self.to_q(x), *F.linear(context, self.fused_weight, self.fused_bias).chunk(2, dim=-1))

    def forward(self, x, context):
        B, N, C = x.shape
        q, k, v = self._project(x, context)
        # (B, N, C) -> (B, heads, N, C/heads)
        q = q.view(B, N, self.heads, -1).transpose(1, 2)
        k = k.view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        v = v.view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        if self.slice_size is not None:
            out = sliced_attention(q, k, v, self.slice_size, self.upcast)
        elif self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, heads, N, C/heads) -> (B, N, C)
        return self.to_out(out)


def sliced_attention(q, k, v, slice_size, upcast=False):
    """Attention of q (B, heads, N, d) over k, v (B, heads, M, d), computed for `slice_size`
    of the B*heads (image, head) pairs at a time (diffusers' `SlicedAttnProcessor`): a kernel
    that builds the N x M weights holds slice_size of them at once instead of B*heads."""
    B, H, N, d = q.shape
    # (B, heads, N, d) -> (B*heads, 1, N, d): one attention problem per row
    q, k, v = (t.reshape(B * H, 1, t.shape[2], d) for t in (q, k, v))
    out = torch.empty_like(q)
    for i in range(0, B * H, slice_size):
        s = slice(i, i + slice_size)
        if upcast:
            out[s] = F.scaled_dot_product_attention(q[s].float(), k[s].float(), v[s].float())
        else:
            out[s] = F.scaled_dot_product_attention(q[s], k[s], v[s])
    return out.view(B, H, N, d)


def fuse_qkv_projections(module, fuse=True):
    """`fuse_projections` for every attention layer in a module (U-Net, VAE, ControlNet)."""
    for m in module.modules():
        if isinstance(m, CrossAttention):
            m.fuse_projections(fuse)
    return module


class SelfAttention(CrossAttention):
    """Attention where queries, keys and values all come from the image tokens x (B, N, dim)."""

    fuses = ("to_q", "to_k", "to_v")

    def __init__(self, dim, heads, bias=False, upcast=False):
        super().__init__(dim, dim, heads, bias, upcast)

    def forward(self, x):
        return super().forward(x, x)


class SpatialSelfAttention(SelfAttention):
    """The VAE's attention block: GroupNorm -> single-head SelfAttention over the H*W pixels
    of a (B, C, H, W) map -> + residual; shape in == shape out.

    The VAE (chapter 5) puts one in each mid block as `SpatialSelfAttention(512)` between
    two ResNetBlocks (GroupNorm eps 1e-6, q/k/v with biases). Its diffusers keys are
    `group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`; ours are `norm`, `to_q`, `to_k`,
    `to_v`, `to_out`.
    """

    def __init__(self, channels, groups=32, eps=1e-6):
        super().__init__(channels, heads=1, bias=True)
        self.norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).view(B, C, H * W).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        h = super().forward(h)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W), a strided view
        return x + h  # x first: the sum comes out contiguous NCHW, not in h's channels-last strides


class GEGLU(nn.Module):
    """A GELU-gated linear unit: one Linear makes 2x the width, one half gates the other."""

    def __init__(self, dim, inner_dim):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(h)  # = h * gelu(gate), in place: one (B, N, 4*dim) buffer fewer


FF_CHUNK_BYTES = 24 * 2**20  # the largest inner buffer when FeedForward runs on the CPU without gradients


class FeedForward(nn.Module):
    """GEGLU -> Dropout -> Linear, applied to every token on its own (width 4x inside).

    Because each token is on its own, CPU inference runs it a chunk of tokens at a time, so
    that the (tokens, 8*dim) inside stays under FF_CHUNK_BYTES: small enough for malloc to
    reuse one buffer, where the whole (8192, 2560) of a 64x64 latent (84 MB) is a fresh mmap,
    page-faulted in on every call (appendix "Making it fast"; diffusers'
    enable_forward_chunking is the same idea)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.geglu = GEGLU(dim, mult * dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(mult * dim, dim)
        self.inner = 2 * mult * dim  # GEGLU's output width (its layers may be LoRA-wrapped: no .out_features)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])  # (B, N, dim) -> (B*N, dim)
        rows = max(1, FF_CHUNK_BYTES // (tokens.element_size() * self.inner))
        if not cpu_inference(x) or len(tokens) <= rows:
            return self.out(self.dropout(self.geglu(x)))
        out = torch.empty_like(tokens)
        for i in range(0, len(tokens), rows):
            out[i:i + rows] = self.out(self.dropout(self.geglu(tokens[i:i + rows])))
        return out.view(x.shape)


class BasicTransformerBlock(nn.Module):
    """LayerNorm + SelfAttention, LayerNorm + CrossAttention, LayerNorm + FeedForward, each residual."""

    def __init__(self, dim, context_dim, heads, upcast=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        # each residual is added in place into the sublayer's fresh output (same sums, fewer buffers)
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """GroupNorm -> Conv1x1 -> BasicTransformerBlock over the H*W tokens -> Conv1x1 -> + residual.

    Shape in == shape out: (B, C, H, W), with the text context (B, 77, context_dim) mixed in.
    SD 2.x (`linear=True`) makes proj_in and proj_out Linear layers applied to the tokens
    instead of 1x1 convolutions applied to the map: the same map, with weights (C, C) instead
    of (C, C, 1, 1), taken on the other side of the reshape.
    """

    def __init__(self, channels, context_dim, heads, groups=32, linear=False, upcast=False):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else Conv2d(channels, channels, 1)
        self.block = BasicTransformerBlock(channels, context_dim, heads, upcast)
        self.proj_out = nn.Linear(channels, channels) if linear else Conv2d(channels, channels, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, C, H, W) -> (B, H*W, C)
        if self.linear:
            h = self.proj_in(h)
        h = self.block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # (B, H*W, C) -> (B, C, H, W), NCHW memory
        return (h if self.linear else self.proj_out(h)).add_(x)
