# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Making it fast
#
# **You will build** an account of where one SD 1.5 U-Net step spends its time on a CPU, and
# the changes that made minisd faster than diffusers on the same weights:
# `minisd.resnet.Conv2d`, which runs some convolutions as one matrix product,
# `minisd.resnet.Upsample`, which convolves the small map instead of the doubled one, and the
# chunked `minisd.attention.FeedForward`. You will count the step's FLOPs live with
# `torch.utils.flop_counter`, set them against what the machine can do (the roofline), read
# the profile before and after (`python -m minisd benchmark --profile`), and read the
# side-by-side tables that `python -m minisd benchmark` measures with
# `torch.utils.benchmark`. Two switches follow: `pipe.compile()` and fused q/k/v projections.
# The last section is about memory rather than speed: VAE tiling and attention slicing, for
# big images on small machines.
#
# The timings here were measured once each, by the commands named beside them, on the 2-core
# machine this book is built on; they are read from `data/speed/`, not re-measured when the
# page runs (each run takes minutes). What the page computes live is what does not depend on
# the machine: FLOP counts, and that the fast paths give the same numbers as the plain ones.

# %%
# %matplotlib inline
import dataclasses
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import minisd
from minisd import attention, benchmark, resnet

DATA = Path(minisd.__file__).resolve().parent.parent / "data"
SPEED = DATA / "speed"


def read(name):
    return json.loads((SPEED / name).read_text())


# %% [markdown]
# ## Counting the work
#
# A convolution with $C$ input and $O$ output channels and a $k \times k$ kernel makes each of
# its $B \cdot H' \cdot W'$ outputs from $C k^2$ multiply-adds, so it costs
#
# $$\text{FLOPs}_\text{conv} = 2 \, B \, H' W' \, O \, C \, k^2 ,$$
#
# a linear layer from $C$ to $O$ features on $N$ tokens costs $2NCO$, and attention over $N$
# queries and $M$ keys of width $d$ (all heads together) costs $2NMd$ for the scores
# $QK^\top$ and as much again for the weighted sum of the values: $4NMd$. Counting by hand
# over the U-Net's 98 convolutions and 224 linear layers is tedious; PyTorch's
# `FlopCounterMode` counts every matrix product and convolution that runs, and it runs on the
# `meta` device, where tensors have shapes but no data, so the count costs no arithmetic.

# %%
def conv_flops(B, H, W, O, C, k):
    return 2 * B * H * W * O * C * k * k


with torch.device("meta"):
    conv = nn.Conv2d(320, 320, 3, padding=1)
    with FlopCounterMode(display=False) as counter:
        conv(torch.randn(2, 320, 64, 64))
by_hand = conv_flops(2, 64, 64, 320, 320, 3)
print(f"one 3x3 convolution, 320 -> 320 channels on 2x64x64: {by_hand / 1e9:.2f} GFLOP by hand, "
      f"{counter.get_total_flops() / 1e9:.2f} GFLOP counted")
assert counter.get_total_flops() == by_hand

with torch.device("meta"):
    unet = minisd.UNet(minisd.UNetConfig.sd15()).eval()
    x, t, context = torch.randn(2, 4, 64, 64), torch.tensor([500, 500]), torch.randn(2, 77, 768)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, context)
step_flops = counter.get_total_flops()
kinds = {"convolutions": ["convolution"], "linear layers": ["addmm", "mm"], "attention": ["bmm"]}
per_kind = {kind: sum(n for op, n in counter.get_flop_counts()["Global"].items()
                      if str(op).split(".")[1] in names) for kind, names in kinds.items()}
print(f"\none SD 1.5 U-Net step, 2x4x64x64 latents (a 512x512 image under guidance): "
      f"{step_flops / 1e12:.3f} TFLOP")
for kind, n in per_kind.items():
    print(f"  {kind:14s} {n / 1e9:7.1f} GFLOP  {100 * n / step_flops:5.1f} %")
assert sum(per_kind.values()) == step_flops
assert 1.55e12 < step_flops < 1.65e12

# %% [markdown]
# On the meta device our `Conv2d` takes nn.Conv2d's path (its matrix-product path is for the
# CPU only), so the count is the convolutions' own. More than half of the work is
# convolutions, under a third is linear layers (most of it in the feed-forward blocks), and
# attention, for all the attention it gets in explanations, is a sixth.
#
# ## The roofline
#
# A CPU core with AVX-512 and two fused multiply-add units does $2 \times 16 \times 2 = 64$
# float32 FLOPs per cycle; two cores at about 2.5 GHz make a peak of about 320 GFLOP/s. A
# matrix product of two large matrices reaches close to that, and the profile below shows
# what the U-Net's operators reach. The other limit is memory: an operation that reads $b$
# bytes to do $f$ FLOPs cannot run faster than $b$ divided by the memory bandwidth. Its
# *arithmetic intensity* $f / b$ says which limit it meets first: with ~20 GB/s from memory,
# the two limits cross at about 320 / 20 = 16 FLOPs per byte (the ridge of the roofline).
# A 3x3 convolution on the 8x8 maps at the bottom of the U-Net, 1280 channels in and out,
# reads a 59 MB weight to do 3.8 GFLOP: about 60 FLOPs per byte. At 64x64 with 320 channels
# it reads 3.7 MB of weight and 21 MB of activations for 15 GFLOP: about 600. Both sit above
# the ridge, so both could run near the peak; but the first has little room to spare, and
# anything that moves its weight once more (a re-layout on every call, say) costs it a large
# share of its time. That is what the profile below finds.

# %%
def intensity(B, H, W, O, C, k):
    weight_bytes = 4 * O * C * k * k
    activation_bytes = 4 * B * (C * H * W + O * H * W)
    return conv_flops(B, H, W, O, C, k) / (weight_bytes + activation_bytes), weight_bytes


for H, channels in [(8, 1280), (64, 320)]:
    ai, wb = intensity(2, H, H, channels, channels, 3)
    print(f"3x3 conv at {H}x{H}, {channels} channels: weight {wb / 1e6:5.1f} MB, "
          f"{ai:6.0f} FLOP per byte read")
limit_s = step_flops / 320e9
print(f"\nthe step's floor on 2 cores at 320 GFLOP/s: {limit_s:.1f} s")
assert 16 < intensity(2, 8, 8, 1280, 1280, 3)[0] < 100 < 500 < intensity(2, 64, 64, 320, 320, 3)[0]

# %% [markdown]
# On a GPU the same arithmetic sets the far limit: an H200 does 989 dense fp16 TFLOP/s, so one
# guided step at 512x512 could take as little as 1.6 ms and 30 of them 49 ms. The GPU numbers
# in the appendix "Engineering notes" (19 ms per step eager, 14 ms compiled) are more than
# eight times that floor: at this size a GPU step is bound by kernel launches and memory
# traffic, not by arithmetic. No GPU was available while this appendix was written, so the
# GPU part of the speed work is not measured here: `bash scripts/gpu_checks.sh 4 5 6` times
# the step eager, with fused q/k/v projections (below), and compiled with CUDA graphs
# (`torch.compile` mode `reduce-overhead`), each against diffusers given the same choice,
# and prints the model FLOP utilisation of each from the counted FLOPs. (The SD 1.5 VAE's
# config asks for `force_upcast`, so its decoder stays in float32 under a float16 pipeline,
# in minisd as in diffusers.)
#
# ## Where the time goes
#
# `python -m minisd benchmark --profile --sizes 64` runs one step under `torch.profiler` with
# each module of the kinds that make up the U-Net wrapped in a labelled range, so the table
# has a row per module kind as well as per operator; `--plain` runs the same step with the
# changes below switched off, which is minisd as it was before, and as diffusers computes it.
# The profiler's times are elapsed time on the calling thread (both threads work inside each
# operator), and the profiler itself adds a little.

# %%
before, after = read("profile_before.json"), read("profile_after.json")


def op_table(profile):
    return {row["op"]: row["self_cpu_s"] for row in profile["ops"]}


ops_before, ops_after = op_table(before), op_table(after)
shown = ["aten::mkldnn_convolution", "aten::mm", "aten::addmm",
         "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::copy_", "aten::im2col", "aten::gelu"]
print(f"{'operator':52s} {'before s':>9s} {'after s':>9s}")
for op in shown:
    print(f"{op:52s} {ops_before.get(op, 0):9.3f} {ops_after.get(op, 0):9.3f}")
print(f"{'whole step (profiled)':52s} {before['total_cpu_s']:9.3f} {after['total_cpu_s']:9.3f}")

fig, ax = plt.subplots(figsize=(8, 3.2))
labels = [op.removeprefix("aten::").replace("_scaled_dot_product_flash_attention_for_cpu", "flash attention")
          for op in shown]
pos = range(len(shown))
ax.barh([p + 0.2 for p in pos], [ops_before.get(op, 0) for op in shown], height=0.4, label="before (--plain)")
ax.barh([p - 0.2 for p in pos], [ops_after.get(op, 0) for op in shown], height=0.4, label="after")
ax.set_yticks(list(pos), labels)
ax.invert_yaxis()
ax.set_xlabel("seconds in one U-Net step (2x4x64x64, 2 threads)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Before the change, oneDNN's convolution (`mkldnn_convolution`) took the largest share, then
# flash attention and the linear layers' matrix products (`addmm` with a bias, `mm` without).
# After it, part of the convolutions' time has moved into `mm` and the total is smaller. Two
# kinds of convolution were slower than they need be:
#
# * **1x1 convolutions** (the SpatialTransformer's `proj_in` and `proj_out`, the ResNet
#   blocks' channel-changing shortcuts) are matrix products, $W_{O \times C}\, x_{C \times HW}$
#   for each image; MKL's GEMM does the 320-channel one at 64x64 in about half the time of
#   oneDNN's convolution, which first converts the NCHW tensor to its own blocked layout.
# * **3x3 convolutions on small maps** (16x16 and 8x8, 1280 channels) spend about half their
#   time re-laying out their large weight (59 MB at 1280 channels) into oneDNN's blocked format,
#   on every call. Unfolding the input into columns (`F.unfold`, the "im2col" trick) turns the
#   convolution into one matrix product with the weight as it is stored, for both images of the
#   batch at once, so the weight is read once. At 32x32 and above the unfolded input grows nine
#   times larger than the map and oneDNN's direct convolution wins again, so `Conv2d` uses the
#   matrix product only up to 256 output pixels (`resnet.SMALL_MAP`).
#
# The third change removes arithmetic. An `Upsample` doubles the map by repeating each pixel
# into a 2x2 block, then runs a 3x3 convolution over the doubled map. Output pixel
# $(2i+a,\, 2j+b)$ of that convolution sees only four distinct input pixels, the 2x2 block
# starting at $(i-1+a,\, j-1+b)$, because the nine taps land on repeated copies; taps that land
# on the same input pixel can be added before the convolution instead of after. So each of
# the four *phases* $(a, b)$ is a 2x2 convolution of the small map, and one convolution with
# the four stacked computes all of them: $4 \times 4 = 16$ multiply-adds per output pixel and
# channel pair instead of 9 on a map four times larger, 36 ({term}`Upsample`'s `phases`). In the
# U-Net this applies to the two upsamplers that write 32x32 and 64x64 maps; in the VAE's
# decoder, to all three, which write maps up to 512x512 and are a large share of its work.
#
# The fourth change is about memory, not arithmetic. The feed-forward block makes a
# (tokens, 2560) tensor at 64x64: 84 MB. glibc's malloc hands out blocks that large as fresh
# `mmap`s (above a threshold of at most 32 MB) and returns them on free, so every step
# page-faults those 84 MB back in. Because the feed-forward treats each token alone,
# `FeedForward` runs it on chunks whose inner tensor stays under 24 MiB
# (`attention.FF_CHUNK_BYTES`): the same numbers, one reused buffer. diffusers offers the
# same idea as `enable_forward_chunking`; it is off by default. This one pays least: on a
# machine busy with other work, where page faults are dear, the profile showed the fresh
# buffers as `copy_` time (about 20 ms per block, in `addmm` copying its bias into the new
# output), but on the quiet machine of the profile above the difference is within the noise.
#
# All of these apply only on the CPU, in float32, without gradients (`resnet.cpu_inference`):
# training, CUDA and other dtypes take the plain path, bit for bit. They change the order of
# the sums, so the output moves by float32 rounding. The cell below checks that on the real
# sizes, with random weights: a 1x1 convolution at 64x64, a 3x3 one on 8x8 maps, a stride-2
# one, the U-Net's last upsampler by phases, and a feed-forward block split into chunks.

# %%
torch.manual_seed(0)
cases = [(320, 320, 1, 1, 0, 64), (1280, 1280, 3, 1, 1, 8), (1280, 1280, 3, 2, 1, 16)]
with torch.no_grad():
    for c_in, c_out, k, stride, pad, size in cases:
        fast = resnet.Conv2d(c_in, c_out, k, stride=stride, padding=pad)
        x = torch.randn(2, c_in, size, size)
        plain = F.conv2d(x, fast.weight, fast.bias, stride, pad)
        out = fast(x)
        rel = float((out - plain).abs().max() / plain.abs().max())
        print(f"Conv2d {c_in}->{c_out}, {k}x{k}, stride {stride}, on {size}x{size}: "
              f"max |difference| / max |output| = {rel:.1e}")
        assert rel < 1e-5
    up = resnet.Upsample(640)
    x = torch.randn(2, 640, 32, 32)
    plain = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
    rel = float((up(x) - plain).abs().max() / plain.abs().max())
    print(f"Upsample 640 channels, 32x32 -> 64x64, by phases: max |difference| / max |output| = {rel:.1e}")
    assert rel < 1e-5
    ff = attention.FeedForward(320)
    tokens = torch.randn(2, 4096, 320)
    chunked = ff(tokens)
    with torch.enable_grad():
        whole = ff(tokens).detach()
rel = float((chunked - whole).abs().max() / whole.abs().max())
print(f"FeedForward on 2x4096 tokens, in chunks of "
      f"{attention.FF_CHUNK_BYTES // (4 * ff.inner)} tokens vs all at once: {rel:.1e}")
assert rel < 1e-6

# %% [markdown]
# Tried and not kept, each measured the same way:
#
# * **channels-last memory** for the whole U-Net (diffusers' usual CPU advice): some
#   convolutions get faster, others slower, and on this machine the step got slower overall,
#   for diffusers too (the tables below include diffusers in channels-last).
# * **oneDNN's pre-packed weights** (what `torch.compile` with freezing, or Intel's extension,
#   does): as fast as the matrix product for the small maps, but it keeps a second, re-laid-out
#   copy of every packed weight in memory.
# * **padding the attention heads from 40 to 48 channels** so that they fill AVX-512 vectors,
#   and **making q, k, v contiguous** before `scaled_dot_product_attention`: no gain beyond the
#   noise (under 4 %).
# * **attention as two matrix products and a softmax** (the "math" kernel): 3.5x slower than
#   the flash kernel at 4096 tokens, which never writes the 4096x4096 weights to memory.
#
# ## Side by side with diffusers
#
# `python -m minisd benchmark --component unet | vae | pipeline --threads 2` builds one random
# SD 1.5 weight file, gives both libraries the very same tensors, and times them interleaved in
# one process with `torch.utils.benchmark.Timer` (its `blocked_autorange` warms up, fixes the
# thread count and repeats; a clock that also reads the process's CPU time gives both wall and
# CPU seconds). Each of 5 rounds measures every side once, in alternating order, and the table
# shows medians. diffusers runs twice: as users run it by default, and in channels-last memory,
# its one CPU speed switch. The run was made twice, as a 10 % difference needs on a machine
# whose speed drifts.

# %%
def rows(run):
    unet = read(f"{run}/unet.json")["steps"]["64"]
    vae = read(f"{run}/vae.json")["decode"]["64"]
    pipe = read(f"{run}/pipeline.json")
    return {"U-Net step, 2x4x64x64": unet["medians"], "VAE decode, 64x64 -> 512x512": vae["medians"],
            "text to image, 256x256, 4 steps": pipe["end_to_end"]}


def counted(fn):
    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops()


with torch.device("meta"):
    vae = minisd.AutoencoderKL(minisd.VAEConfig.sd15())
    text_encoder = minisd.CLIPTextEncoder(minisd.CLIPTextConfig.sd15())
decode_flops = counted(lambda: vae.decode(torch.randn(1, 4, 64, 64)))
pipeline_flops = (4 * counted(lambda: unet(torch.randn(2, 4, 32, 32), t, context))
                  + counted(lambda: vae.decode(torch.randn(1, 4, 32, 32)))
                  + counted(lambda: text_encoder(torch.zeros(2, 77, dtype=torch.long))))
floors = {"U-Net step, 2x4x64x64": step_flops, "VAE decode, 64x64 -> 512x512": decode_flops,
          "text to image, 256x256, 4 steps": pipeline_flops}
results = {run: rows(run) for run in ("run1", "run2")}
sides = ["minisd", "diffusers", "diffusers channels_last"]
for run, table in results.items():
    print(f"{run}: seconds per call, wall (CPU); ratio minisd / diffusers, wall (CPU)")
    for what, med in table.items():
        cells = "  ".join(f"{med[s]['wall']:6.2f} ({med[s]['cpu']:6.2f})" for s in sides)
        r = med["minisd"]["wall"] / med["diffusers"]["wall"]
        rc = med["minisd"]["cpu"] / med["diffusers"]["cpu"]
        rl = med["minisd"]["wall"] / med["diffusers channels_last"]["wall"]
        print(f"  {what:32s} {cells}   {r:.3f} ({rc:.3f}); vs channels_last {rl:.3f}")
    print()
print("the limit at 320 GFLOP/s, from the FLOPs counted on the meta device:")
for what, flops in floors.items():
    print(f"  {what:32s} {flops / 1e12:6.3f} TFLOP -> {flops / 320e9:5.2f} s")

# %% [markdown]
# The columns are minisd, diffusers, diffusers in channels-last; the last lines are the
# floors the FLOP count sets on this machine (for the plain computation: minisd's upsampling
# by phases does fewer FLOPs than the count). In the U-Net step all the
# changes act; in the VAE decoder, whose maps are 64x64 and larger, it is mostly the
# upsamplers by phases; text to image adds the text encoder and the VAE to four U-Net steps
# at 32x32.

# %% [markdown]
# ## Compiled mode
#
# `pipe.compile()` (or `python -m minisd generate --compile`) runs the U-Net and the VAE's
# decoder through `torch.compile`, in place, so the modules keep their names for weight loading
# and LoRA. On the CPU, TorchInductor writes C++ kernels that fuse the elementwise work (the
# GroupNorm, SiLU and residual additions) into fewer passes over memory; the first call at
# each new size pays for generating and compiling them. `python -m minisd benchmark --compile`
# measures that first call and the compiled step for both libraries.

# %%
compiled = read("run2/unet.json")["steps"]["64"]["compiled"]
med, first = compiled["medians"], compiled["first_call"]
for side in ("minisd", "diffusers"):
    print(f"{side:9s} compiled step {med[side]['wall']:6.2f} s (first call {first[side]:6.1f} s, compiling)")
print(f"ratio minisd / diffusers, compiled: {med['minisd']['wall'] / med['diffusers']['wall']:.3f}")

# %% [markdown]
# ## Fused q/k/v projections
#
# In self-attention, `to_q`, `to_k` and `to_v` read the same tokens; in cross-attention,
# `to_k` and `to_v` read the same text. `pipe.fuse_qkv_projections()` (as diffusers'
# method of that name) stacks their weights so that each layer makes one matrix product
# instead of three (or two) and splits the result. On a GPU that is fewer kernel launches
# and one larger, better-shaped GEMM. The fused weight is a copy kept beside the three layers,
# not in their place: the state dict keeps its `to_q` / `to_k` / `to_v` keys, so weight files
# and LoRA files load as before; the copy is made again when their weights change (a loaded
# file, a merged LoRA), and it is not used while a LoRA wraps a layer or while the layers
# train (their gradients belong to them). On a small model:

# %%
torch.manual_seed(0)
small = minisd.UNet(minisd.UNetConfig.tiny()).eval()
keys = list(small.state_dict())
xs, ts, cs = torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 77, 32)
with torch.no_grad():
    before = small(xs, ts, cs)
    attention.fuse_qkv_projections(small)
    after = small(xs, ts, cs)
fused_layers = sum(m.fused_stamp is not None for m in small.modules() if isinstance(m, attention.CrossAttention))
print(f"{fused_layers} layers fused; same state dict keys: {list(small.state_dict()) == keys}; "
      f"max |fused - plain| = {(after - before).abs().max():.1e}")
assert list(small.state_dict()) == keys and 0 <= (after - before).abs().max() < 1e-5

fused = read("fused_qkv.json")
for r in fused["rows"]:
    print(f"  {r['kind']:5s} {r['channels']:4d} ch x {r['tokens']:4d} tokens, x{r['layers_per_step']}/step: "
          f"plain {r['plain_ms']:6.1f} ms, fused {r['fused_ms']:6.1f} ms")
per_step = fused["per_step_ms"]
print(f"one step's attention on this CPU: plain {per_step['plain']:.0f} ms, fused "
      f"{per_step['fused']:.0f} ms ({per_step['fused'] / per_step['plain'] - 1:+.1%})")

# %% [markdown]
# Fused and plain give the same numbers here (each output row of a matrix product is computed
# the same way either way). The time saved is a few percent of the attention layers' and about
# 1 % of a whole step: less than this machine drifts between runs (the same U-Net step took
# from 7 to 11 s over the runs behind this appendix, at the same ratio to diffusers). So fusing
# stays off by default, as in diffusers; what it is for is a GPU, where three small kernel
# launches become one.
#
# ## Big images on small machines
#
# Two switches trade time for memory, both equal to diffusers' on the same weights (tested):
# `pipe.enable_vae_tiling()` decodes (and encodes) in overlapping 64x64-latent tiles whose
# seams are cross-faded, so the VAE's memory stops growing with the image; and
# `pipe.enable_attention_slicing()` computes attention a few heads at a time. Measured by
# `scripts/measure_tiling_memory.py`, each case in a fresh process, at 1024x1024:

# %%
memory = json.loads((DATA / "tiling_memory.json").read_text())
for case in memory["cases"]:
    print(f"{case['what']:72s} extra memory {case['extra_mib']:5d} MiB, {case['wall_s']:5.1f} s")
extra = {c["case"]: c["extra_mib"] for c in memory["cases"]}
assert extra["vae_decode_tiled"] < extra["vae_decode"] / 2

# %% [markdown]
# Tiling cuts the decoder's extra memory about four times at 1024x1024, for about 1.5 times the
# time (the tiles overlap). Slicing saves nothing with PyTorch's flash attention kernel, which
# never holds the $N \times N$ weights; it pays only where that matrix is built, as with the
# "math" kernel in the last rows.
#
# ## Exercises
#
# **Exercise A.1 (★)** Count by hand the FLOPs of one SpatialTransformer's feed-forward block
# at 64x64 (320 channels, batch 2: a GEGLU projection to 2 x 1280, then 1280 -> 320) and check
# your count with `FlopCounterMode` on the meta device.

# %% tags=["solution", "hide-cell"]
N = 2 * 64 * 64
by_hand = 2 * N * 320 * 2560 + 2 * N * 1280 * 320
with torch.device("meta"):
    block = attention.FeedForward(320)
    with FlopCounterMode(display=False) as counter:
        block(torch.randn(2, 4096, 320))
print(f"{by_hand / 1e9:.1f} GFLOP by hand, {counter.get_total_flops() / 1e9:.1f} counted")
assert counter.get_total_flops() == by_hand

# %% [markdown]
# **Exercise A.2 (★★)** The U-Net's bottom runs 3x3 convolutions at 8x8 with 1280 channels.
# Using the step's FLOP count, what fraction of the step's arithmetic do the convolutions on
# maps of at most 256 pixels (16x16 and 8x8) make? Count them with a forward hook on every
# `Conv2d`, on the meta device.

# %% tags=["solution", "hide-cell"]
small = []


def note(module, inputs, output):
    if output.shape[-1] * output.shape[-2] <= resnet.SMALL_MAP:
        o, c, kh, kw = module.weight.shape
        small.append(conv_flops(output.shape[0], output.shape[-2], output.shape[-1], o, c, kh))


with torch.device("meta"):
    hooks = [m.register_forward_hook(note) for m in unet.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        unet(torch.randn(2, 4, 64, 64), t, context)
for h in hooks:
    h.remove()
share = sum(small) / step_flops
print(f"{len(small)} convolutions on maps of <= {resnet.SMALL_MAP} pixels: {sum(small) / 1e9:.0f} GFLOP, "
      f"{100 * share:.0f} % of the step")
assert 0.1 < share < 0.4

# %% [markdown]
# **Exercise A.3 (★★, break it and watch)** Switch the fast paths off with
# `benchmark.plain_kernels()` and run a small U-Net step with and without them: the outputs
# should agree to float32 rounding and not bit for bit. Then turn gradients on and check that
# the fast path is not taken at all (the outputs are then identical).

# %% tags=["solution", "hide-cell"]
torch.manual_seed(0)
# the tiny test config's weights are under resnet.LARGE_WEIGHT (oneDNN's convolution stays faster
# there), so take one four times wider, with 3x3 weights of 147k-590k numbers
wider = dataclasses.replace(minisd.UNetConfig.tiny(), block_channels=(128, 256, 256))
small_unet = minisd.UNet(wider).eval()
xs, ts, cs = torch.randn(2, 4, 16, 16), torch.tensor([10, 10]), torch.randn(2, 77, 32)
with torch.no_grad():
    fast_out = small_unet(xs, ts, cs)
    with benchmark.plain_kernels():
        plain_out = small_unet(xs, ts, cs)
grad_fast = small_unet(xs, ts, cs)
with benchmark.plain_kernels():
    grad_plain = small_unet(xs, ts, cs)
diff = float((fast_out - plain_out).abs().max())
print(f"no gradients: max |fast - plain| = {diff:.1e}; with gradients: "
      f"{float((grad_fast - grad_plain).detach().abs().max()):.1e}")
assert 0 < diff < 1e-4 and torch.equal(grad_fast, grad_plain)

# %% [markdown]
# ## What you built
#
# A measured account of one SD 1.5 U-Net step on a CPU: 1.6 TFLOP, more than half of it in
# convolutions, against a floor of about 5 s on two cores; a profile that shows where the
# rest goes; and three changes that pay: `minisd.resnet.Conv2d` (1x1 and small-map convolutions
# as matrix products), `minisd.resnet.Upsample.phases` (the upsampling convolution on the
# small map: 16 multiply-adds where there were 36) and the chunked
# `minisd.attention.FeedForward`. `python -m minisd
# benchmark` measures minisd against diffusers side by side with `torch.utils.benchmark`, and
# `--profile` shows where the time goes on your own machine. `pipe.compile()` adds
# TorchInductor's fused kernels, `pipe.fuse_qkv_projections()` one matrix product per
# attention input (for GPUs; a wash on this CPU), and `enable_vae_tiling()` / `enable_attention_slicing()` trade
# time for memory when an image is too big. What is left on a CPU is mostly the flash
# attention kernel at 40 channels per head and the convolutions at 32x32 and above, which
# already run near the machine's peak. On a GPU, the far larger gap to the floor is the next
# place to look.
