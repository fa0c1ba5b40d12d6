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
# ---

# %% [markdown]
# # 8. Training CLIP: images and captions in one space
#
# **You will build** a course-sized {term}`CLIP`, `minisd.clip.CLIP` with `CLIPConfig` (the text
# encoder of chapter 7 and a small image encoder), train it with the symmetric
# {term}`contrastive loss` `minisd.losses.clip_loss` in `minisd.train.train_clip_model`, and use it
# for {term}`zero-shot classification` and the {term}`CLIP score` (`minisd.metrics.clip_score`).
#
# Chapter 7 used CLIP's text encoder as SD does: frozen, as released. This chapter shows where
# its knowledge comes from. CLIP {cite}`radford2021clip` trains **two** encoders at once, one
# for text and one for images, on 400 million image/caption pairs from the web, with one
# objective: the embedding of an image must be closer to the embedding of *its* caption than
# to the embeddings of all the other captions in the batch. Nothing tells it what a "horse" is;
# it learns it because "horse" captions keep appearing next to horse pictures.
#
# We do the same at course size: a small `CLIPTextEncoder` that reads SD's real tokenizer, a
# small image encoder, and the course images with their captions. The text encoder trained
# here is the one the course U-Net (chapter 9) reads its context from.

# %%
# %matplotlib inline
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import minisd
from minisd import data, losses, metrics
from minisd.clip import CLIP, CLIPConfig
from minisd.train import clip_test_sets, clip_zero_shot_accuracy, train_clip_model

_ = torch.manual_seed(0)  # (assigned: nbval shows a trailing-";" result)
tok = minisd.CLIPTokenizer.sd15()

# %% [markdown]
# ## The data: pictures and their captions
#
# `minisd.data` draws a coloured shape on black and says what it drew: 6 colours, 3 shapes,
# 5 positions, 90 captions in all. Nine (colour, shape, position) combinations are **held
# out**: no training image shows them and no training caption names them, so they test whether
# CLIP learned the three words separately or just memorised 81 pictures.

# %%
images, captions = data.sample(8, seed=3, exclude=data.HELD_OUT)
data.show(images, captions, ncols=8)
plt.show()
print("held out:", [data.caption(*c) for c in data.HELD_OUT[:3]], "...")

# %% [markdown]
# ## Two encoders, one space
#
# The text side is chapter 7's `CLIPTextEncoder` with `CLIPTextConfig.course()`: 4 layers, 64
# wide, one attention head of 64 (the head width of every OpenAI CLIP), and the real 49,408-token
# vocabulary. CLIP reads a caption's meaning at one position: the first `<|endoftext|>`, the
# only token whose causal attention has seen the whole caption. A linear map
# (`text_projection`) takes it to the shared space.
#
# The image side is ours to choose. CLIP's paper tried ResNets and Vision Transformers on
# $224 \times 224$ photos; for $32 \times 32$ shapes, three stride-2 convolutions (each
# followed by GroupNorm and GELU) take the image to a $128 \times 4 \times 4$ map, and one
# linear layer reads the *whole* map. It does not average over positions (as a ResNet's pooling
# would): the captions name a position, so *where* a feature fires must survive.

# %%
model = CLIP(CLIPConfig.course())
count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
print(CLIPConfig.course())
print(f"text encoder {count(model.text):,} (token table {count(model.text.embeddings.token_embedding):,}) "
      f"+ projection {count(model.text_projection):,}")
print(f"image encoder {count(model.image):,}")
print(model.image)

# %% [markdown]
# With $N$ pairs in a batch, the image encoder gives $u_1, \dots, u_N$ and the text encoder
# $v_1, \dots, v_N$, each normalised to length 1. Their dot products are cosine similarities;
# scaled by a learned {term}`temperature` they are the logits
#
# $$ L_{ij} = e^{t} \, \frac{u_i \cdot v_j}{\|u_i\| \|v_j\|}, \qquad e^{t} \le 100, $$
#
# an $N \times N$ matrix whose diagonal holds the $N$ true pairs and whose $N^2 - N$ other
# entries are the wrong ones. The loss, a symmetric {term}`InfoNCE` {cite}`vandenoord2018cpc`,
# asks each row to pick its diagonal entry among $N$ captions, and each column to pick it among
# $N$ images:
#
# $$ \mathcal{L} = \frac{1}{2N} \sum_{i=1}^{N} \Big[ -\log \frac{e^{L_{ii}}}{\sum_j e^{L_{ij}}}
#    \; - \log \frac{e^{L_{ii}}}{\sum_j e^{L_{ji}}} \Big]. $$
#
# $t$ starts at $\ln(1/0.07)$ (a temperature of 0.07) and is learned; CLIP caps $e^t$ at 100 so
# the logits cannot grow without bound. Here it is by hand on 6 pairs with different captions,
# then with `minisd.losses.clip_loss`:

# %%
combos = [("red", "circle", "in the top left"), ("green", "square", "in the center"),
          ("blue", "triangle", "in the bottom right"), ("yellow", "circle", "in the top right"),
          ("cyan", "square", "in the bottom left"), ("magenta", "triangle", "in the center")]
pair_images, pair_captions = data.sample(6, seed=7, only=combos)
x, ids = data.to_tensor(pair_images), tok(pair_captions)
with torch.no_grad():
    u, v = model.encode_image(x), model.encode_text(ids)              # (6, 64) each, unit length
    logits = model.scale() * u @ v.T                                  # (6 images, 6 captions)
    target = torch.arange(6)
    by_hand = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
print("embeddings:", tuple(u.shape), tuple(v.shape), "| scale e^t =", round(model.scale().item(), 2))
print("loss by hand:", round(by_hand.item(), 4), "| losses.clip_loss:", round(losses.clip_loss(logits).item(), 4),
      "| ln 6 =", round(np.log(6), 4))

# %% [markdown]
# ### What the loss can tell: $\ln N - \mathcal L$ as a bound
#
# Each half of $\mathcal L$ is the cross-entropy of picking the right one among $N$ candidates.
# Guessing uniformly costs exactly $\ln N$; a perfect guess costs 0; so $0 \le \mathcal L$ and a
# model that has learned nothing sits at $\ln N$. van den Oord et al. {cite}`vandenoord2018cpc`
# show more: for a batch of $N$ pairs drawn from $p(x, y)$,
#
# $$ I(X; Y) \;\ge\; \ln N - \mathbb E[\mathcal L_\text{InfoNCE}], $$
#
# the mutual information between images and captions is at least $\ln N$ minus the expected loss
# (the optimal logits are $\log p(y \mid x)/p(y)$ up to a constant per row, and at those the loss
# exceeds $\ln N - I$). Two consequences: the loss measures what the encoders share in *nats*,
# and the bound can never certify more than $\ln N$, however good the model. On the course data
# the caption is a function of the image, so $I = H(\text{caption}) = \ln 81$ for uniformly drawn
# training combinations, more than $\ln 64$: a batch of 64 cannot show it all. Evaluated on the
# trained course CLIP (loaded here, ahead of its section below) with a batch of 64 distinct
# training captions, and on the untrained model:

# %%
train_combos = [c for c in data.combinations() if c not in data.HELD_OUT]
pick = np.random.default_rng(0).choice(len(train_combos), 64, replace=False)
batch_images = np.stack([data.render(*train_combos[k], rng=np.random.default_rng(100 + i)) for i, k in enumerate(pick)])
batch_captions = [data.caption(*train_combos[k]) for k in pick]
trained_clip = minisd.checkpoint.course_clip()
bound = {}
with torch.no_grad():
    for name, m in (("untrained", model), ("course CLIP", trained_clip)):
        loss_64 = losses.clip_loss(m(data.to_tensor(batch_images), tok(batch_captions))).item()
        bound[name] = np.log(64) - loss_64
        print(f"{name:12s} loss {loss_64:.4f}   ln 64 - loss = {bound[name]:.3f} nats   "
              f"(ln 64 = {np.log(64):.3f}, I(X;Y) = ln 81 = {np.log(81):.3f})")
assert bound["course CLIP"] > 0.95 * np.log(64) and bound["untrained"] < 0.5
assert all(b <= np.log(64) < np.log(81) for b in bound.values())

# %% [markdown]
# The trained model certifies almost all of $\ln 64$ nats, the most a batch of 64 can certify;
# the untrained one certifies nothing (a negative value is a valid, empty bound).
#
# ```{admonition} The notes describe CLIP's training with a batch of one / 笔记先讲 "Batch 为 1 时的情况"
# :class: warning
# With $N = 1$ there is nothing to contrast: the one caption is always "the right one among 1",
# the loss is $-\log(e^{L_{11}}/e^{L_{11}}) = \ln 1 = 0$ whatever the encoders output, and its
# gradient is zero. The contrastive loss needs $N > 1$ and can tell at most $\ln N$ nats; CLIP
# trained with $N = 32{,}768$ {cite}`radford2021clip`. The cell below evaluates the loss and its
# gradient for $N = 1$ and the $\ln N$ ceiling for a few $N$.
# ```

# %%
one_logit = torch.tensor([[3.7]], requires_grad=True)
one_loss = losses.clip_loss(one_logit)
one_loss.backward()
print(f"N = 1: loss {one_loss.item():.1f}, gradient {one_logit.grad.item():.1f}")
print("ceiling ln N:", {n: round(float(np.log(n)), 2) for n in (1, 2, 64, 32768)})
assert one_loss.item() == 0.0 and one_logit.grad.item() == 0.0

# %% [markdown]
# Untrained, the loss is about $\ln N$ or worse: no caption is favoured for the right reason,
# and random cosines times a scale of 14 even favour wrong ones. CLIP's loss
# assumes the $N$ captions of a batch are different (two identical captions would each be
# counted wrong for the other's image), so the course trainer draws each batch from distinct
# captions: 64 of the 81 training captions at a time.
#
# ## Before training: the similarity matrix
#
# Twelve images with twelve different captions; rows are images, columns captions. A trained
# CLIP should light up the diagonal.

# %%
grid_combos = [("red", "circle", "in the top left"), ("red", "square", "in the top left"),
               ("red", "triangle", "in the top left"), ("green", "circle", "in the top left"),
               ("blue", "circle", "in the top left"), ("red", "circle", "in the bottom right"),
               ("yellow", "square", "in the center"), ("cyan", "triangle", "in the bottom left"),
               ("magenta", "square", "in the top right"), ("blue", "triangle", "in the center"),
               ("green", "square", "in the bottom right"), ("yellow", "triangle", "in the top right")]
grid_images = np.stack([data.render(*c, rng=np.random.default_rng(i)) for i, c in enumerate(grid_combos)])
grid_captions = [data.caption(*c) for c in grid_combos]


def similarity_figure(clip, title):
    with torch.no_grad():
        sim = clip.encode_image(data.to_tensor(grid_images)) @ clip.encode_text(tok(grid_captions)).T
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    im = ax.imshow(sim, cmap="viridis", vmin=-1, vmax=1)
    ax.set_xticks(range(12), [c[2:] for c in grid_captions], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(12), [""] * 12)
    for i, img in enumerate(grid_images):  # the image itself as the row label
        ax.add_artist(plt.matplotlib.offsetbox.AnnotationBbox(
            plt.matplotlib.offsetbox.OffsetImage(img, zoom=0.55), (-1.2, i), frameon=False, annotation_clip=False))
    ax.set(title=title, xlabel="caption")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    plt.show()
    return sim


sim_before = similarity_figure(model, "untrained: cosine(image i, caption j)")
print("diagonal mean", round(sim_before.diag().mean().item(), 2), "| off-diagonal mean",
      round((sim_before.sum() - sim_before.diag().sum()).item() / 132, 2))

# %% [markdown]
# ## A short training run
#
# `minisd.train.train_clip_model` is the whole loop: draw 64 distinct captions and one image of
# each, compute the $64 \times 64$ logits, take an Adam step on the symmetric loss. The captions
# use 20 of the 49,408 token rows (17 words, one of them two tokens, and the two special tokens),
# so the token table gets a sparse gradient and
# `SparseAdam`, which updates only those rows. Here, 40 steps of it (`progress=True`, the
# default, shows a tqdm bar with the running loss):

# %%
short, log = train_clip_model(steps=40, n_train=4000, log_every=5, progress=False)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(log["step"], log["loss"], marker="o")
ax.axhline(np.log(64), color="grey", linestyle=":", label="ln 64 (chance)")
ax.set(xlabel="step", ylabel="contrastive loss", title="40 steps of CLIP training")
ax.legend()
plt.show()
print("loss every 5 steps:", [round(v, 2) for v in log["loss"]])

# %% [markdown]
# ## The course CLIP
#
# The full run, `python -m minisd train clip`, does the same for 300 steps and writes
# `data/course_clip.safetensors` (in float16: 7 MB, most of it the token table). The file records
# the command that made it:

# %%
from safetensors import safe_open  # noqa: E402

path = minisd.DATA_DIR / "course_clip.safetensors"
with safe_open(str(path), "pt") as f:
    meta = f.metadata()
print("command:", meta["command"])
print(f"file: {path.stat().st_size / 1e6:.1f} MB")
clip = minisd.checkpoint.course_clip()
print("learned scale e^t:", round(clip.scale().item(), 1))

# %%
sim_after = similarity_figure(clip, "trained: cosine(image i, caption j)")
print("diagonal mean", round(sim_after.diag().mean().item(), 2), "| off-diagonal mean",
      round((sim_after.sum() - sim_after.diag().sum()).item() / 132, 2))

# %% [markdown]
# The diagonal is bright and the rest is dark, but not uniformly: a red circle in the top left
# is still somewhat similar to "a red square in the top left", which shares two of its three
# words. The space has structure.
#
# ```{admonition} The notes say a trained CLIP gives cos ≈ 1 for matching pairs and ≈ 0 otherwise / 笔记说配对的余弦相似度"接近1"，不匹配的"接近0"
# :class: warning
# True of the course CLIP, measured in the cell below on 900 test images with their captions and
# with shuffled ones. Not true of the web-trained CLIPs SD uses: their matched image-caption pairs
# have cosines near 0.3, which is why the CLIP score of Hessel et al. rescales the
# cosine by $w = 2.5$ {cite}`hessel2021clipscore` (see also {cite}`radford2021clip`). No notebook
# here can compute it (their weights are not downloadable here). What training asks for is only that
# the right pair beat the wrong ones after scaling by $e^t$, not any particular cosine.
# ```

# %%
seen_images, seen_captions = clip_test_sets()["seen combinations"]
with torch.no_grad():
    u_seen = clip.encode_image(data.to_tensor(seen_images))
    cos_right = (u_seen * clip.encode_text(tok(seen_captions))).sum(-1)
    cos_shuffled = (u_seen * clip.encode_text(tok(seen_captions[1:] + seen_captions[:1]))).sum(-1)
same_caption = np.array([a == b for a, b in zip(seen_captions, seen_captions[1:] + seen_captions[:1])])
print(f"course CLIP on {len(seen_captions)} test images: matched cos {cos_right.mean():.3f} "
      f"(min {cos_right.min():.3f}); shuffled cos {cos_shuffled[~same_caption].mean():.3f}")
assert cos_right.mean() > 0.9 and abs(cos_shuffled[~same_caption].mean()) < 0.2
#
# ## Zero-shot classification
#
# "Zero-shot" means classifying with text instead of a trained classifier head: embed every
# candidate caption once, and give each image the caption closest to it. With the 90 course
# captions as candidates, one choice says the colour, the shape and the position at once. The
# test images are new drawings: of the 81 training combinations, and of the 9 held-out ones that
# neither encoder has ever seen.

# %%
prompts = [data.caption(*c) for c in data.combinations()]
tests = clip_test_sets()
rows = {name: clip_zero_shot_accuracy(clip, imgs, caps) for name, (imgs, caps) in tests.items()}
print(f"{'test images (900 each)':24} {'colour':>8} {'shape':>8} {'position':>9} {'caption':>8}")
for name, acc in rows.items():
    print(f"{name:24} {acc['colour']:8.1%} {acc['shape']:8.1%} {acc['position']:9.1%} {acc['caption']:8.1%}")

# %%
held_images, held_captions = tests["held-out combinations"]
with torch.no_grad():
    guess = clip.classify(data.to_tensor(held_images[:16]), tok(prompts))
labels = [f"{'✓' if prompts[g] == c else '✗'} {prompts[g]}" for g, c in zip(guess.tolist(), held_captions[:16])]
data.show(held_images[:16], labels, ncols=8)
plt.suptitle("held-out combinations, labelled by the course CLIP", y=1.02)
plt.show()

# %% [markdown]
# ## CLIP score
#
# The same cosine similarity measures how well an image fits its text, which is how chapter 12
# scores generated images. Two scales are in use. Hessel et al.'s CLIP-S
# {cite}`hessel2021clipscore` is $w \cdot \max(\cos(u_i, v_i), 0)$ with $w = 2.5$; torchmetrics'
# `CLIPScore`, which `minisd.metrics.clip_score` follows, is $\max(100 \cos(u_i, v_i), 0)$, so the
# two differ by a factor of 40 (both averaged over pairs). Right captions against shuffled ones,
# on torchmetrics' scale:

# %%
imgs, caps = tests["seen combinations"]
with torch.no_grad():
    u = clip.encode_image(data.to_tensor(imgs[:200]))
    v_right = clip.encode_text(tok(caps[:200]))
    v_wrong = clip.encode_text(tok(caps[1:201]))
print("CLIP score, right captions:   ", round(metrics.clip_score(u, v_right), 1))
print("CLIP score, shuffled captions:", round(metrics.clip_score(u, v_wrong), 1))

# %% [markdown]
# ## Ours == transformers
#
# The course text encoder is an ordinary CLIP text model: its weights load into transformers'
# `CLIPTextModel` (configured 64 wide, 4 layers, one 64-wide head) and give the same context, and the
# loss equals transformers' own CLIP loss on the same logits.

# %%
import transformers  # noqa: E402
from transformers.models.clip.modeling_clip import image_text_contrastive_loss  # noqa: E402

c = clip.text.config
theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig(
    vocab_size=c.vocab_size, hidden_size=c.width, num_hidden_layers=c.layers, num_attention_heads=c.heads,
    intermediate_size=c.mlp_width, max_position_embeddings=c.positions, hidden_act="quick_gelu")).eval()
theirs.load_state_dict(clip.text.state_dict())
ids = tok(grid_captions)
with torch.no_grad():
    d = (clip.text(ids) - theirs(ids).last_hidden_state).abs().max().item()
    logits = clip(data.to_tensor(grid_images), ids)
    d_loss = abs(losses.clip_loss(logits).item() - image_text_contrastive_loss(logits.T).item())
print(f"course text encoder vs transformers: max |diff| = {d:.1e}")
print(f"clip_loss vs transformers' image_text_contrastive_loss: max |diff| = {d_loss:.1e}")
assert d < 1e-5 and d_loss < 1e-5

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 8.1 (★)** Show that logits that are all equal give $\mathcal L = \ln N$ exactly. Then
# take a CLIP whose matched cosines are all 1 and unmatched all 0, at the course CLIP's learned
# scale $e^t$: what is its loss for $N = 64$ (by formula, $\ln(1 + (N-1)e^{-e^t})$, and by
# `clip_loss`)? Compare with the course CLIP's measured loss on the batch above.

# %% tags=["solution", "hide-cell"]
flat = losses.clip_loss(torch.full((64, 64), 2.0)).item()
s_learned = trained_clip.scale().item()
ideal_logits = s_learned * torch.eye(64)
ideal_formula = float(np.log1p(63 * np.exp(-s_learned)))
print(f"equal logits: {flat:.6f} = ln 64 = {np.log(64):.6f}")
print(f"ideal cosines at scale {s_learned:.1f}: formula {ideal_formula:.2e}, clip_loss {losses.clip_loss(ideal_logits).item():.2e}; "
      f"course CLIP measured {np.log(64) - bound['course CLIP']:.4f}")
# the course CLIP's cosines are not exactly 1 and 0, so its loss sits well above the ideal one
assert abs(flat - np.log(64)) < 1e-6 and abs(losses.clip_loss(ideal_logits).item() - ideal_formula) < 1e-6

# %% [markdown]
# **Exercise 8.2 (★★, break it and watch)** The trainer draws each batch from *distinct*
# captions. Break that: draw 64 training combinations **with** replacement, as a naive loader
# would, and evaluate the trained course CLIP's loss on that batch. What is the smallest loss any
# model could reach on it (hint: an image whose caption appears $m$ times in the batch can at best
# split its probability over the $m$ equal captions)?

# %% tags=["solution", "hide-cell"]
naive = np.random.default_rng(1).choice(len(train_combos), 64, replace=True)
naive_images = np.stack([data.render(*train_combos[k], rng=np.random.default_rng(300 + i)) for i, k in enumerate(naive)])
naive_captions = [data.caption(*train_combos[k]) for k in naive]
multiplicity = np.array([naive_captions.count(c) for c in naive_captions])
floor = float(np.log(multiplicity).mean())                # per row (and per column): ln m at best
with torch.no_grad():
    naive_loss = losses.clip_loss(trained_clip(data.to_tensor(naive_images), tok(naive_captions))).item()
print(f"{len(set(naive_captions))} distinct captions among 64; loss {naive_loss:.3f} "
      f"(distinct batch: {np.log(64) - bound['course CLIP']:.3f}); floor for a perfect model {floor:.3f}")
# duplicates are counted as wrong answers: the loss can no longer reach 0, and its gradient pushes
# apart pairs that are in fact the same
assert naive_loss > floor > 0.1 and naive_loss > 5 * (np.log(64) - bound["course CLIP"])

# %% [markdown]
# **Exercise 8.3 (★★)** Compute both CLIP scores, Hessel et al.'s CLIP-S ($w = 2.5$) and
# torchmetrics' ($100$), for the course CLIP on the 200 right and the 200 shuffled pairs above.
# Check that `metrics.clip_score` is torchmetrics' and that the two differ by exactly 40.

# %% tags=["solution", "hide-cell"]
scores = {}
for name, v_ in (("right", v_right), ("shuffled", v_wrong)):
    cos_ = F.cosine_similarity(u, v_, dim=-1)
    scores[name] = (2.5 * cos_.clamp(min=0)).mean().item(), (100 * cos_).clamp(min=0).mean().item()
    print(f"{name:8s} CLIP-S (w = 2.5) {scores[name][0]:.3f}   torchmetrics (100) {scores[name][1]:.1f}   "
          f"metrics.clip_score {metrics.clip_score(u, v_):.1f}")
assert all(abs(b - 40 * a) < 1e-3 for a, b in scores.values())
assert abs(scores["right"][1] - metrics.clip_score(u, v_right)) < 1e-4

# %% [markdown]
# ## What you built
#
# `minisd.clip.CLIP` and `CLIPConfig` (chapter 7's text encoder plus a small image encoder, a
# learned temperature), its symmetric InfoNCE loss `minisd.losses.clip_loss` (equal to
# transformers'), the training loop `minisd.train.train_clip_model`, zero-shot classification
# and the CLIP score. You evaluated $\ln N - \mathcal L$ as a bound in nats and saw why a batch
# needs $N > 1$ distinct captions. The course text encoder trained here is what the course
# U-Net reads in chapter 9, where diffusion itself begins.
