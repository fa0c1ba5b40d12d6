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
# # 16. Textual inversion and inpainting
#
# **You will build** two things SD users do every day. First, {term}`textual inversion`: a new
# *word* for a frozen model, learned as one row of the text encoder's token table
# (`CLIPTokenizer.add_tokens`, `textual_inversion.add_tokens` / `load` / `save` for the A1111 and
# diffusers files people share, the trainer `train.train_ti`, `python -m minisd train ti`), measured
# against chapter 13's LoRA on the same concepts. Second, {term}`inpainting`: repainting the masked
# part of an image, by latent blending on any model and with a 9-channel inpainting U-Net
# (`StableDiffusion.inpaint`).
#
# Chapter 13 taught the course model the shape "bar" by changing the U-Net. Textual inversion
# (Gal et al. {cite:p}`gal2023textualinversion`) changes nothing in the model at all. It adds a new
# token, say `<bar>`, to the vocabulary, gives it a vector $v \in \mathbb R^{D}$ in the token
# table, and looks for the $v$ that makes the frozen model draw the concept when a prompt contains
# the token:
#
# $$v^\ast = \arg\min_v \; \mathbb E_{x_0, y, t, \epsilon}\,\bigl\lVert \epsilon - \epsilon_\theta\bigl(x_t, t, c_\phi(y; v)\bigr)\bigr\rVert^2 ,$$
#
# SD's own loss (chapter 9), with the U-Net $\epsilon_\theta$, the text encoder $c_\phi$ and the VAE
# frozen; $y$ is a caption in which the concept's word is replaced by the token ("a red `<bar>`
# in the top left"). The result is one vector, $D$ numbers: 768 for SD 1.x, 64 for the course
# text encoder. The question this chapter measures is what so small a thing can carry.

# %%
# %matplotlib inline
import json
import types
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import minisd
from minisd import DATA_DIR, CLIPTokenizer, StableDiffusion, data, lora, textual_inversion, train
from minisd.checkpoint import course_unet
from minisd.diffusion import training_loss

_ = torch.manual_seed(0)

# %% [markdown]
# ## A new word in the tokenizer
#
# Chapter 7's tokenizer splits any text into the 49,408 tokens CLIP learned. A string such as
# `<bar>` is no token: BPE cuts it into pieces the text encoder already has vectors for.
# `add_tokens` appends it after the vocabulary as token 49,408, the way transformers' *added
# tokens* work: the tokenizer finds an added token in the normalised text (lowercased, so `<BAR>`
# is the same word) before BPE sees anything, anywhere in the text, longest name first.

# %%
tokenizer = CLIPTokenizer.sd15()
prompt = "a red <bar> in the top left"
print("before:", tokenizer.encode(prompt), [tokenizer.decoder[i] for i in tokenizer.encode(prompt)])
new_ids = tokenizer.add_tokens(["<bar>"])
print("after: ", tokenizer.encode(prompt), "; vocabulary", tokenizer.vocab_size)
print("the same word:", tokenizer.encode("A RED <BAR> in the top left") == tokenizer.encode(prompt))
assert new_ids == [49408] and tokenizer.encode(prompt)[2] == 49408 and tokenizer.vocab_size == 49409

# %% [markdown]
# The text encoder needs a row for the new id: `textual_inversion.add_tokens(tokenizer,
# text_encoder, token, vectors)` does both halves at once, appending the row(s) to
# `text_encoder.embeddings.token_embedding`. An embedding of $n > 1$ vectors becomes the tokens
# `<t>`, `<t>_1`, ..., `<t>_{n-1}`, and `<t>` in a prompt stands for all of them (diffusers'
# convention): the word then takes $n$ of the 75 places of the prompt.

# %%
pipe = StableDiffusion.course_model()          # its sampling settings from the checkpoint
te, tok = pipe.text_encoder, pipe.tokenizer
print("course token table:", tuple(te.embeddings.token_embedding.weight.shape))
demo = types.SimpleNamespace(tokenizer=CLIPTokenizer.sd15(), text_encoder=minisd.checkpoint.course_text_encoder())
ids = textual_inversion.add_tokens(demo.tokenizer, demo.text_encoder, "<three>", torch.randn(3, 64))
print("a 3-vector word:", ids, "->", demo.tokenizer.encode("a <three> circle"))
assert demo.tokenizer.encode("a <three> circle") == [320, *ids, tokenizer.encode("circle")[0]]

# %% [markdown]
# ## Where the gradient goes
#
# The token table $E \in \mathbb R^{V \times D}$ enters the text encoder through a lookup: position
# $p$ of the prompt gets $x_p = E_{\mathrm{id}_p} + P_p$. A lookup is a product with a one-hot
# matrix, $x = O E + P$ with $O_{pr} = [\mathrm{id}_p = r]$, so
#
# $$\frac{\partial L}{\partial E_r} = \sum_p O_{pr}\,\frac{\partial L}{\partial x_p} = \sum_{p:\ \mathrm{id}_p = r} \frac{\partial L}{\partial x_p} .$$
#
# Row $r$ gets a gradient only if token $r$ occurs in the batch's prompts, and then the sum of the
# gradients at its positions. Two consequences. Training the whole table would also move the rows
# of "a", "red", "in", "the", ... and so change prompts that never contain the new word. And if
# every old row is frozen, the gradient that reaches the one trainable row is exactly
# $\sum_{p:\,\mathrm{id}_p = \texttt{<bar>}} \partial L / \partial x_p$. The check: a batch of real
# bar images, the loss through the frozen course U-Net, the gradient of the *whole* table.

# %%
enc_latents, enc_captions = train.ti.encode_concept_images(pipe.vae, "bar", n=8)
check_te = minisd.checkpoint.course_text_encoder()
check_tok = CLIPTokenizer.sd15()
textual_inversion.add_tokens(check_tok, check_te, "<bar>", train.ti.init_vectors(check_tok, check_te, "bar", 1))
ids = check_tok([train.ti_prompt(c, "bar") for c in enc_captions])                  # (8, 77)
table = check_te.embeddings.token_embedding.weight.detach().clone().requires_grad_(True)
x_tok = F.embedding(ids, table)                                                       # (8, 77, 64)
x_tok.retain_grad()
x = x_tok + check_te.embeddings.position_embedding.weight[:77]
context = check_te.final_layer_norm(check_te.encoder(x, check_te.config.layers))      # the encoder's forward
assert torch.equal(context, check_te(ids))
loss = training_loss(pipe.unet, enc_latents, context, generator=torch.Generator().manual_seed(0))
loss.backward()
rows = set(torch.nonzero(table.grad.abs().sum(1)).flatten().tolist())
print(f"rows with a gradient: {len(rows)} of {len(table)}; tokens in the prompts: {len(set(ids.flatten().tolist()))}")
print("their words:", sorted(check_tok.decoder[r].replace("</w>", "") for r in rows))
by_hand = x_tok.grad[ids == 49408].sum(0)                                             # sum over the <bar> positions
print(f"row <bar>: |dL/dE| = {table.grad[49408].norm():.3e}; "
      f"largest |dL/dE - sum of dL/dx_p| relative to it: {(table.grad[49408] - by_hand).abs().max() / table.grad[49408].abs().max():.0e}")
assert rows == set(ids.flatten().tolist())
torch.testing.assert_close(table.grad[49408], by_hand, atol=1e-8, rtol=1e-5)

# %% [markdown]
# Every token of the prompts gets a gradient, the start and padding tokens included, and no
# other row does; the new row's gradient is the sum over its positions. So `train.train_ti` does
# not train the table: during training the table is `train.ti.NewRows`, the $V$ old rows as a
# frozen buffer and the new ones as the only `nn.Parameter`, looked up in their concatenation.
#
# ## Training the word
#
# `python -m minisd train ti --concept bar` writes `data/course_ti_bar.safetensors`. It is chapter
# 9's loop with one parameter:
#
# 1. `<bar>` starts at the vector of the word "bar" (which the course text encoder never saw
#    trained), so at step 0 the model is exactly the base model on "a red bar ...".
# 2. Each step draws 32 bar images, replaces "bar" with `<bar>` in their captions, runs the text
#    encoder (the gradient must pass through it) and the U-Net, and takes an AdamW step on the
#    vector. No caption dropout: the empty prompt holds no `<bar>`, so it would teach nothing.
# 3. No replay of old images (chapter 13's LoRA needed 40 %): nothing the old prompts use can
#    change.
#
# The same function, for a few steps on a fresh copy, to see what moves:

# %%
demo_te, demo_tok = minisd.checkpoint.course_text_encoder(), CLIPTokenizer.sd15()
demo_unet = course_unet()
unet_before = {k: v.clone() for k, v in demo_unet.state_dict().items()}
old_context = demo_te(demo_tok(["a red circle in the top left"]))
token, demo_log = train.train_ti(demo_unet, pipe.vae, demo_te, demo_tok, "bar", steps=10, n=256, progress=False)
after = demo_te.embeddings.token_embedding.weight
start = train.ti.init_vectors(demo_tok, demo_te, "bar", 1)[0]
unet_moved = max(float((v - unet_before[k]).abs().max()) for k, v in demo_unet.state_dict().items())
old_moved = float((demo_te(demo_tok(["a red circle in the top left"])) - old_context).abs().max())
print(f"{token}: moved {float((after[49408] - start).norm()):.3f} from 'bar' in {len(demo_log['loss'])} steps")
print(f"largest change of any U-Net weight: {unet_moved}; of the context of an old prompt: {old_moved}")
assert unet_moved == 0.0 and old_moved == 0.0

# %% [markdown]
# The committed word was trained for the same 1,000 steps of 32 images as chapter 13's bar LoRA
# (its orange LoRA: 800), single-threaded, so the two are compared at about the same cost; a
# textual-inversion step costs a little more CPU than a LoRA step, since the text encoder runs in
# every step. The logs:

# %%
logs = {c: {"ti": json.loads((DATA_DIR / f"course_ti_{c}_log.json").read_text()),
            "lora": json.loads((DATA_DIR / f"course_lora_{c}_log.json").read_text())} for c in ("bar", "orange")}
for c, lg in logs.items():
    ti_log, lora_log = lg["ti"], lg["lora"]
    print(f"{c:6s} textual inversion: {ti_log['trained_parameters']:>6,d} parameters, {ti_log['file_bytes']:>7,d} bytes, "
          f"{ti_log['steps']} steps, {ti_log['train_cpu_seconds']:.0f} s CPU")
    print(f"{'':6s} LoRA:              {lora_log['sizes']['lora_parameters']:>6,d} parameters, "
          f"{lora_log['sizes']['lora_bytes']:>7,d} bytes, {lora_log['steps']} steps, {lora_log['train_cpu_seconds']:.0f} s CPU")
fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
for c, lg in logs.items():
    for ax, key in zip(axes, ("ti", "lora")):
        loss = np.array(lg[key]["loss"])
        ax.plot(np.convolve(loss, np.ones(50) / 50, mode="valid"), label=c)
for ax, title in zip(axes, ("textual inversion", "LoRA (chapter 13)")):
    ax.set_title(f"{title}: training loss (mean of 50 steps)", fontsize=9)
    ax.set_xlabel("step"), ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The two loss curves are not on one scale: the LoRA's batches hold 40 % replayed old images,
# whose loss is low, while every textual-inversion batch is the new concept only. What they show
# is the shape: the LoRA's loss falls in the first hundred steps; the word's loss on bar barely
# moves in 1,000 (and its vector's norm grows, `norm` in the log), a first sign of what the
# comparison below measures.
#
# ## Before and after
#
# The two files go into one pipeline: `textual_inversion.load(pipe, path)` adds `<bar>` and
# `<orange>` to its tokenizer and text encoder (the old prompts are untouched, so both can stay
# loaded), and chapter 13's LoRA files go on copies of the U-Net. The same seeds for all three.

# %%
for c in ("bar", "orange"):
    print("loaded", textual_inversion.load(pipe, DATA_DIR / f"course_ti_{c}.safetensors"))
base_unet = pipe.unet
lora_unets = {c: lora.load(course_unet(), DATA_DIR / f"course_lora_{c}.safetensors").eval() for c in ("bar", "orange")}


def generate(prompts, seed=0, unet=None):
    """uint8 (N, 32, 32, 3) images of `prompts` from the pipeline (with `unet` in place of its own)."""
    pipe.unet = unet or base_unet
    try:
        return (pipe(prompts, seed=seed, output_type="np", progress=False) * 255).round().astype(np.uint8)
    finally:
        pipe.unet = base_unet


shown = {"bar": ["a red bar in the top left", "a green bar in the center", "a blue bar in the bottom right",
                 "a yellow bar in the top right", "a cyan bar in the bottom left", "a magenta bar in the center"],
         "orange": ["a orange circle in the top left", "a orange square in the center",
                    "a orange triangle in the bottom right", "a orange circle in the bottom left",
                    "a orange square in the top right", "a orange triangle in the center"]}
fig, axes = plt.subplots(6, 6, figsize=(7.5, 7.8))
for k, (c, prompts) in enumerate(shown.items()):
    rows = {"base": generate(prompts, seed=3), "LoRA": generate(prompts, seed=3, unet=lora_unets[c]),
            "TI": generate([train.ti_prompt(p, c) for p in prompts], seed=3)}
    for j, (name, images) in enumerate(rows.items()):
        for i, image in enumerate(images):
            ax = axes[3 * k + j, i]
            ax.imshow(image), ax.set_xticks([]), ax.set_yticks([])
            if 3 * k + j == 0 or j == 0:
                ax.set_title(prompts[i].replace(" in the ", "\n"), fontsize=6)
        axes[3 * k + j, 0].set_ylabel(f"{c}: {name}", fontsize=8)
fig.suptitle("base model, chapter 13's LoRA and textual inversion (TI), same seeds", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The comparison
#
# `python -m minisd train ti --compare` judges the three models on the same prompts and seeds
# (the course model's own sampling settings, DDIM {cite:p}`song2021ddim`; the table records
# them): 300 images of each new concept per model (bar: 30 combinations × 10 seeds; orange:
# 15 × 20), read by chapter 13's judge
# (for bar the judge that knows the new shapes), and the pixel measure of chapter 12,
# `metrics.fidelity` (the soft IoU of the foreground with the caption's shape, fitted). Each rate
# has its Wilson 95 % interval, each mean its normal interval. The old prompts (90 × 4 seeds) are
# judged for the base model and the LoRA; textual inversion cannot change them (checked above), so
# its row is the base model's.

# %%
table = json.loads((DATA_DIR / "course_ti_comparison.json").read_text())


def cell(v):
    return f"{v[0]:6.1%} [{v[1]:.1%}, {v[2]:.1%}]"


print(f"{'':16s} {'n':>4s}  {'judge: all three right':>26s}  {'shape':>24s}  {'colour':>24s}  {'fidelity (IoU)':>22s}")
for c, rows in table["concepts"].items():
    for name in ("base", "lora", "ti"):
        r = rows[name]["new"]
        fid = r["pixel"]["fidelity"]
        print(f"{c + ' ' + name:16s} {r['n']:4d}  {cell(r['judge']['all']):>26s}  {cell(r['judge']['shape']):>24s}  "
              f"{cell(r['judge']['colour']):>24s}  {fid[0]:.3f} [{fid[1]:.3f}, {fid[2]:.3f}]")
    for name in ("base", "lora"):
        r = rows[name]["old"]
        print(f"{c + ' ' + name:16s} {r['n']:4d}  old prompts: {cell(r['judge']['all'])}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for ax, key, label in ((axes[0], "judge", "judge: all three right"), (axes[1], "pixel", "fidelity (soft IoU)")):
    for k, (c, rows) in enumerate(table["concepts"].items()):
        for j, name in enumerate(("base", "lora", "ti")):
            v = rows[name]["new"][key]["all" if key == "judge" else "fidelity"]
            ax.bar(3 * k + j * 0.8, v[0], width=0.7, color=f"C{j}", label=name if k == 0 else None,
                   yerr=[[v[0] - v[1]], [v[2] - v[0]]], capsize=3)
    ax.set_xticks([0.8, 3.8], list(table["concepts"])), ax.set_title(label, fontsize=9), ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %%
verdict = {}
for c, rows in table["concepts"].items():
    ti, lo = rows["ti"]["new"]["judge"]["all"], rows["lora"]["new"]["judge"]["all"]
    apart = ti[1] > lo[2] or lo[1] > ti[2]
    verdict[c] = "TI" if apart and ti[0] > lo[0] else "LoRA" if apart else "neither (intervals overlap)"
    print(f"{c}: TI {ti[0]:.1%} vs LoRA {lo[0]:.1%} -> better: {verdict[c]}")

# %% [markdown]
# What a single vector can carry follows from where it enters. The vector is one input of the
# text encoder; after four transformer layers it is part of the 77 context vectors that every
# cross-attention layer of the U-Net reads through its frozen $W_K$ and $W_V$. It can only *select*
# among the behaviours the frozen U-Net already has for the contexts it can reach. A colour between
# red and yellow is a mixture of directions the cross-attention values already span, so a well
# chosen context can ask for some of it; a new shape needs the U-Net to lay down edges in a pattern
# that no prompt ever asked of it, and no context vector adds a skill the weights lack. The LoRA
# changes $W_K$, $W_V$ themselves, so it can. The verdict lines above are that argument measured
# on this model: on bar the word leaves the shape judged 0 % right (the frozen U-Net keeps drawing
# the shapes it knows, and the colour suffers as the vector grows). Orange tests the other half of
# the argument and finds a harder ceiling first: the course VAE (version 2, chapter 6) decodes real
# orange images as yellow (chapter 13 measures it), so no context vector and no U-Net LoRA can
# make the *pixels* orange, and both read near 0 % on this model. A concept must survive the VAE
# before any change to the text side or the U-Net can teach it. The printed lines are the
# measurement; this paragraph is its reading on the committed model.
#
# ## Where the learned vector lies
#
# The learned vector lives in the same space as the 49,408 rows of the table. Its nearest rows
# (cosine similarity) and its similarity to the course's own words say what the model "thinks" the
# new word is close to.

# %%
table_w = pipe.text_encoder.embeddings.token_embedding.weight.detach()
course_words = list(data.COLOURS) + list(data.SHAPES)
fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
for ax, c in zip(axes, ("bar", "orange")):
    v = textual_inversion.embedding(pipe.tokenizer, pipe.text_encoder, f"<{c}>")[0]
    start = table_w[pipe.tokenizer.encode(c)[0]]
    sims = F.cosine_similarity(table_w[:49408], v[None], dim=1)
    top = sims.topk(5)
    print(f"<{c}>: norm {v.norm():.2f} (table rows: median {table_w[:49408].norm(dim=1).median():.2f}); "
          f"cosine to its start '{c}' {F.cosine_similarity(v, start, dim=0):.2f}")
    print("   nearest rows:", ", ".join(f"{pipe.tokenizer.decoder[i].replace('</w>', '')} {s:.2f}"
                                       for s, i in zip(top.values.tolist(), top.indices.tolist())))
    word_sims = [float(F.cosine_similarity(v, table_w[pipe.tokenizer.encode(w)[0]], dim=0)) for w in course_words]
    ax.bar(course_words, word_sims, color=["C3", "C2", "C0", "C8", "C9", "C6", "0.4", "0.4", "0.4"])
    ax.set_title(f"<{c}>: cosine similarity to the course words", fontsize=9)
    ax.tick_params(axis="x", labelsize=7, rotation=45)
plt.tight_layout()
plt.show()

# %% [markdown]
# The nearest rows of the whole table are mostly words the course never used: their vectors were
# never trained, so nearness to them means little. The course words are the useful reference. On
# the committed model, read the printed similarities: `<orange>` was trained towards images the
# VAE turns yellow, and `<bar>` has no shape to move towards, so it leans on colour words, the only
# handle a context vector has here, which is where its loss of colour accuracy above comes from.
#
# ## The files people share
#
# Textual inversion was the first add-on format SD users shared (2022, before LoRAs). Three
# layouts are common, and `textual_inversion.load(pipe, path, token=None)` reads all three:
#
# | where | file | inside | token |
# |---|---|---|---|
# | diffusers, the [sd-concepts-library](https://huggingface.co/sd-concepts-library) | `learned_embeds.safetensors` / `.bin` | `{token: (D,) or (n, D)}` | the key |
# | AUTOMATIC1111 (`embeddings/` folder) | `name.pt` | `{"string_to_param": {"*": (n, D)}, "name": ...}` | `"name"` |
# | AUTOMATIC1111, newer | `name.safetensors` | `{"emb_params": (n, D)}` | the file name |
#
# A `.pt` is a pickle, so it is read with `torch.load(weights_only=True)`, which refuses anything
# but tensors and plain containers. `token=` overrides the name (A1111 users write the file's name
# in prompts; diffusers uses the key or "name"). The word we trained, written in each:

# %%
import tempfile
from pathlib import Path

from safetensors import safe_open

folder = Path(tempfile.mkdtemp())
for name in ("learned_embeds.safetensors", "bar.pt"):
    textual_inversion.save(pipe, "<bar>", folder / name)
with safe_open(str(folder / "learned_embeds.safetensors"), "pt") as f:
    print("learned_embeds.safetensors:", {k: tuple(f.get_tensor(k).shape) for k in f.keys()})
a1111 = torch.load(folder / "bar.pt", weights_only=True)
print("bar.pt:", {k: (tuple(v["*"].shape) if k == "string_to_param" else v) for k, v in a1111.items()})
fresh = types.SimpleNamespace(tokenizer=CLIPTokenizer.sd15(), text_encoder=minisd.checkpoint.course_text_encoder())
print("loaded as:", textual_inversion.load(fresh, folder / "bar.pt", token="<my-bar>"))
same = torch.equal(fresh.text_encoder(fresh.tokenizer(["a red <my-bar> in the center"])),
                   pipe.text_encoder(pipe.tokenizer(["a red <bar> in the center"])))
print("same context as the original:", same)
assert same

# %% [markdown]
# An embedding is tied to a text encoder: its width must be the table's (768 for SD 1.x, 1024 for
# SD 2.x's OpenCLIP), and even at the same width, a vector trained for one text encoder means
# nothing to another. The loader checks what it can and says what went wrong:

# %%
from safetensors.torch import save_file

save_file({"<sd2-style>": torch.randn(1, 1024)}, str(folder / "sd2_style.safetensors"))
save_file({"lora_unet_mid_block_attentions_0.lora_down.weight": torch.zeros(4, 64),
           "lora_unet_mid_block_attentions_0.lora_up.weight": torch.zeros(64, 4)}, str(folder / "style_lora.safetensors"))
for path, token in ((folder / "sd2_style.safetensors", None), (folder / "learned_embeds.safetensors", "circle"),
                    (folder / "style_lora.safetensors", None)):
    try:
        textual_inversion.load(fresh, path, token=token)
    except ValueError as e:
        print(f"{type(e).__name__}: {str(e).replace(str(folder) + '/', '')}\n")
with torch.device("meta"):
    sd15_text = minisd.CLIPTextEncoder(minisd.CLIPTextConfig.sd15())
try:
    textual_inversion.add_tokens(CLIPTokenizer.sd15(), sd15_text, "<sd2-style>", torch.randn(1, 1024))
except ValueError as e:
    print(f"into SD 1.5's text encoder: {e}")

# %% [markdown]
# Last, the reference: the same file through diffusers' `load_textual_inversion`, into
# transformers' `CLIPTextModel` holding the course text encoder's weights and transformers'
# `CLIPTokenizer` on the same vocabulary. (The tests do this for all three formats, with images, on
# random SD 1.5-size weights.)

# %%
import gzip

import diffusers
import transformers

transformers.utils.logging.set_verbosity_error()
diffusers.utils.logging.set_verbosity_error()
cfg = fresh.text_encoder.config
theirs_te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
    vocab_size=49408, hidden_size=cfg.width, intermediate_size=cfg.mlp_width, num_hidden_layers=cfg.layers,
    num_attention_heads=cfg.heads, max_position_embeddings=cfg.positions, hidden_act=cfg.act,
    layer_norm_eps=cfg.eps, bos_token_id=0, eos_token_id=2)).eval()
theirs_te.load_state_dict(minisd.checkpoint.course_text_encoder().state_dict())
merges = gzip.open(DATA_DIR / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8").read().split("\n")[1:48895]
(folder / "vocab.json").write_text(json.dumps(CLIPTokenizer.sd15().encoder))
(folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=theirs_te, unet=None, scheduler=None, safety_checker=None, feature_extractor=None,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=77),
        requires_safety_checker=False)
    theirs.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
prompts = ["a red <bar> in the top left", "a <bar>, a <BAR> and a circle"]
with torch.no_grad():
    a = pipe.encode_prompt(prompts)
    b = theirs.encode_prompt(prompts, "cpu", 1, False)[0]
print(f"minisd vs diffusers, same file: max |diff| of the text embeddings = {(a - b).abs().max():.1e}")
assert (a - b).abs().max() < 1e-5

# %% [markdown]
# ## On real Stable Diffusion
#
# For SD 1.5 the word is one vector of 768 numbers, a 3 KB file, and the library is large: the
# sd-concepts-library has about a thousand concepts (objects and styles), and A1111 users share
# many *negative* embeddings, words trained to be put in the negative prompt. Loading one:
#
# ```python
# pipe = minisd.StableDiffusion.from_pretrained("stable-diffusion-v1-5")
# token = minisd.textual_inversion.load(pipe, "learned_embeds.safetensors")   # e.g. "<cat-toy>"
# image = pipe(f"a {token} on a beach", seed=0)
# ```
#
# An embedding trained for SD 1.x works with any model that kept SD 1.x's text encoder (most
# SD 1.5 fine-tunes did), and with none whose text encoder is different (SD 2.x, SDXL).

# %% [markdown]
# ## Inpainting
#
# {term}`inpainting` repaints part of an image: a **mask** says where (white: repaint, black:
# keep), a prompt says what. `pipe.inpaint(prompt, image, mask)` does it in one of two ways, and
# picks by the U-Net's input channels, as diffusers' `StableDiffusionInpaintPipeline` does (and
# gives the same images from the same weights and seed: `tests/test_inpaint.py`):
#
# - **latent blending**, with any SD U-Net (4 input channels): sample as text-to-image, and after
#   every step put the known part of the image back into the latents, noised to where the next
#   step starts;
# - an **inpainting U-Net** (9 input channels, as SD's inpainting checkpoints): the U-Net sees,
#   beside its 4 noisy latents, the mask shrunk to the latents' size (1 channel) and the latents
#   of the masked image (4 channels), the conditioning by concatenation of the latent diffusion
#   paper {cite:p}`rombach2022ldm`.
#
# This section builds both on the course model, makes the course's own 9-channel U-Net (`python
# -m minisd train inpaint`) and measures the two against each other.

# %%
# %matplotlib inline
import json

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from minisd import DATA_DIR, StableDiffusion
from minisd.checkpoint import course_unet, load_checkpoint
from minisd.pipeline import denoise
from minisd.schedulers import make_scheduler
from minisd.train.inpaint import evaluate_inpainting, extend_unet, inpaint_task, psnr_outside

_ = torch.manual_seed(0)
ipipe = StableDiffusion.course_model()
f = ipipe.vae.config.factor
print(ipipe)

# %% [markdown]
# ### Latent blending
#
# Let $z_0$ be the image's latents and $m$ the mask shrunk to the latent grid (nearest
# neighbour, 1 = repaint). The forward process (chapter 10) says where the known part of
# $z_0$ would be at timestep $t$: $z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1-\bar\alpha_t}\,
# \varepsilon$. Blending samples as usual, and after the sampler's step from $t_i$ to $t_{i+1}$
# replaces the known part by exactly that, with the one noise $\varepsilon$ drawn at the start:
#
# $$x_{t_{i+1}} \leftarrow (1 - m) \odot \big(\sqrt{\bar\alpha_{t_{i+1}}}\, z_0 + \sqrt{1-\bar\alpha_{t_{i+1}}}\,\varepsilon\big) + m \odot x_{t_{i+1}},$$
#
# and after the last step by $z_0$ itself, so the final latents *are* the image's outside the
# mask. The U-Net never learns anything new: it is SDEdit's idea {cite:p}`meng2022sdedit` (a
# sample of the forward process is a valid point on the way back) applied region by region at
# every step. Its weakness is the same: the repainted part sees the known part only through
# noisy latents, and nothing makes the two agree at the seam.
#
# Written by hand with `denoise`'s per-step hook, it is `pipe.inpaint` on the base model, draw
# for draw (diffusers' order: the image's latents, the noise, the masked image's latents):

# %%
images, masks, prompts = inpaint_task(6, kind="complete")
n = len(images)
sched = make_scheduler("ddim")
sched.set_timesteps(ipipe.steps)
ts = sched.timesteps
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    x = 2 * (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 255) - 1  # (n, 3, 32, 32)
    z0 = ipipe.vae.encode(x).sample(g) * ipipe.vae.scaling_factor
    noise = torch.randn(z0.shape, generator=g)
    ipipe.vae.encode(x * (masks < 0.5)).sample(g)          # diffusers draws it; blending does not use it
    m = F.interpolate(masks, size=z0.shape[-2:])          # (n, 1, 8, 8), nearest

    def blend(i, t, latents):
        known = z0 if i == len(ts) - 1 else sched.add_noise(z0, noise, ts[i + 1])
        return (1 - m) * known + m * latents

    context = torch.cat([ipipe.encode_prompt([""] * n), ipipe.encode_prompt(prompts)])
    by_hand = denoise(ipipe.unet, noise * sched.init_noise_sigma, context, sched, guidance=ipipe.guidance,
                      generator=g, after_step=blend)
ours = ipipe.inpaint(prompts, images, masks, seed=0, output_type="latent", progress=False)
d_pipe = (by_hand - ours).abs().max().item()
d_known = ((by_hand - z0) * (1 - m)).abs().max().item()
print(f"by hand vs ipipe.inpaint: max |diff| = {d_pipe:.1e}")
print(f"final latents outside the mask vs the image's z0: max |diff| = {d_known:.1e}")
assert d_pipe < 1e-5 and d_known == 0.0

# %% [markdown]
# ### An inpainting U-Net that starts as the base model
#
# The 9-channel U-Net differs from the base in one place: its first convolution `conv_in`
# reads 9 channels instead of 4. Split its weight by input channels, $W = [W_x \; W_e]$; for the
# latents $x$ and the extra channels $e$ (mask and masked-image latents)
#
# $$\mathrm{conv}_{[W_x\, W_e]}([x; e]) = W_x * x + W_e * e + b \overset{W_e = 0}{=} W_x * x + b = \mathrm{conv}_{W_x}(x).$$
#
# With $W_x$ the base model's and $W_e = 0$ (`train.extend_unet`), the extended U-Net computes
# exactly what the base computes, whatever the mask says: fine-tuning starts from a model that
# already draws, and only has to learn to *use* the new channels (the same reason a
# ControlNet's convolutions start at zero). SD's inpainting checkpoint was made this way: its
# model card says it started from SD 1.2's weights with the 5 new channels' weights
# zero-initialised, then trained 440k steps on synthetic masks, a quarter of them covering the
# whole image. The check, on the course U-Net:

# %%
base = course_unet()
nine = extend_unet(base)
gx = torch.Generator().manual_seed(1)
xt, extra = torch.randn(4, 4, 8, 8, generator=gx), 3 * torch.randn(4, 5, 8, 8, generator=gx)
t, ctx = torch.tensor([1, 250, 600, 999]), ipipe.encode_prompt(prompts[:4])
with torch.no_grad():
    d_zero = (nine(torch.cat([xt, extra], 1), t, ctx) - base(xt, t, ctx)).abs().max().item()
print(f"in_channels {base.config.in_channels} -> {nine.config.in_channels}; "
      f"max |extended(x, mask, masked) - base(x)| = {d_zero}")
assert d_zero == 0.0

# %% [markdown]
# `python -m minisd train inpaint` fine-tunes it on masked course images: each of 8,000 training
# images gets one mask, whole latent cells (10 % all white, the rest a random rectangle, or the
# box around the shape or half of it), the caption describes the whole image, and the loss is
# SD's, $\lVert \varepsilon - \varepsilon_\theta([x_t; m; z_{\text{masked}}], t, c)\rVert^2$, with
# $m$ and $z_\text{masked}$ never noised. Its log:

# %%
log = json.loads((DATA_DIR / "course_inpaint_unet_log.json").read_text())
print(log["command"])
print(f"{log['steps']} steps of {log['batch_size']}, lr {log['lr']}: {log['train_cpu_seconds']} s CPU "
      f"({log['threads']} thread), loss {np.mean(log['loss'][:50]):.4f} (first 50) -> "
      f"{np.mean(log['loss'][-50:]):.4f} (last 50)")
inpaint_unet = load_checkpoint(DATA_DIR / "course_inpaint_unet.safetensors")

# %% [markdown]
# ### Blending against the 9-channel model
#
# Two tasks on course images (`train.inpaint.TASKS`). **complete**: half of the box around the
# shape is masked and repainted with the image's own caption, so the model must finish the half
# shape it is shown. **replace**: the whole box is repainted with another colour and another
# shape at the same position. Text-to-image with the same caption (the image ignored) is a
# reference, and so is the VAE's round trip of the original (what any latent model can keep at
# best). Four of each:

# %%
rows_small, shown = evaluate_inpainting(inpaint_unet, n=4)
methods = ["blending", "nine_channel", "text_to_image"]
fig, axes = plt.subplots(2 * 4, 2 + len(methods), figsize=(6.2, 13.5))
for r, (kind, k) in enumerate((kind, k) for kind in ("complete", "replace") for k in range(4)):
    s = shown[kind]
    masked = s["original"][k].copy()
    masked[s["masks"][k, 0].numpy() > 0.5] = 128          # the masked part in grey
    for c, (title, im) in enumerate([("image", s["original"][k]), ("mask", masked)]
                                    + [(name, s[name][k]) for name in methods]):
        axes[r, c].imshow(im)
        axes[r, c].set_xticks([])
        axes[r, c].set_yticks([])
        if r == 0 or r == 4:
            axes[r, c].set_title(f"{title}\n({kind})" if c == 0 else title.replace("_", " "), fontsize=8)
    axes[r, 0].set_ylabel(s["captions"][k].removeprefix("a "), fontsize=6)
plt.tight_layout()
plt.show()

# %% [markdown]
# The table, measured by `python -m minisd train inpaint` on 300 images per task (one seed,
# course sampling) and stored in `data/course_inpaint_eval.json`. "all": the pixel judge reads
# the caption's colour, shape and position (for *replace* on the inside of the mask only, the
# outside set to black); fidelity: the soft IoU of the judged shape (chapter 12); PSNR outside:
# the kept part against the original; for *complete* also PSNR inside, against the original's
# hidden half (one right answer). 95 % intervals in brackets.

# %%
record = json.loads((DATA_DIR / "course_inpaint_eval.json").read_text())
names = {"blending": "base + latent blending", "nine_channel": "9-channel course U-Net",
         "text_to_image": "text-to-image (no image)", "vae_round_trip": "VAE round trip (ceiling)"}
fmt = lambda v, p=3: f"{v[0]:.{p}f} [{v[1]:.{p}f}, {v[2]:.{p}f}]"   # noqa: E731
for kind, rows in record["rows"].items():
    print(f"{kind} (n = {rows['blending']['n']}): {record['tasks'][kind]}")
    print(f"  {'method':27s} {'all':21s} {'fidelity':21s} {'PSNR outside (dB)':21s} PSNR inside (dB)")
    for key, row in rows.items():
        inside = fmt(row["psnr_inside"], 1) if "psnr_inside" in row else "-"
        judged = "-" if key == "vae_round_trip" and kind == "replace" else fmt(row["all"])
        fid = "-" if key == "vae_round_trip" and kind == "replace" else fmt(row["fidelity"])
        print(f"  {names[key]:27s} {judged:21s} {fid:21s} {fmt(row['psnr_outside'], 1):21s} {inside}")
rc, rr = record["rows"]["complete"], record["rows"]["replace"]

# %%
gap = rc["nine_channel"]["psnr_outside"][0] - rc["text_to_image"]["psnr_outside"][0]
print(f"complete, outside: blending {rc['blending']['psnr_outside'][0]:.1f} dB (VAE ceiling "
      f"{rc['vae_round_trip']['psnr_outside'][0]:.1f}), 9-channel {rc['nine_channel']['psnr_outside'][0]:.1f} dB, "
      f"text-to-image {rc['text_to_image']['psnr_outside'][0]:.1f} dB: the 9-channel model's use of the image "
      f"is worth {gap:+.1f} dB over ignoring it")
print(f"complete, shape: fidelity blending {rc['blending']['fidelity'][0]:.3f} vs 9-channel "
      f"{rc['nine_channel']['fidelity'][0]:.3f} (a half shape from the image and a half from the model must meet)")
print(f"replace, inside: judged right, blending {rr['blending']['all'][0]:.3f} vs 9-channel "
      f"{rr['nine_channel']['all'][0]:.3f}; colour right, blending {rr['blending']['colour'][0]:.3f}")
assert rc["text_to_image"]["psnr_outside"][0] < rc["blending"]["psnr_outside"][0]   # blending keeps the outside

# %% [markdown]
# How to read it. **Blending keeps the outside by construction**: its final latents there are the
# image's, so its PSNR outside sits a few dB under the VAE's round trip (the decoder mixes
# neighbouring latents, so the seam costs a little). What it cannot make sure of is that the two
# sides *agree*: the repainted part sees the kept part only through noisy latents, so a half shape
# from the image and a half drawn by the model need not meet (the fidelity of *complete*), and in
# *replace* the latent cells just outside the box, which the VAE's encoder filled with some of the
# old shape's colour, are pasted back at every step and bleed into the new shape (its colour is
# the part the judge most often gets wrong; the red circle with a yellow rim in the figure).
# **The 9-channel model** sees the masked image at every step and is free to redraw everything, so
# nothing bleeds in (*replace*), but nothing forces it to reproduce the outside either: how much of
# the image it keeps is what its fine-tune learned, the +dB over text-to-image above (diffusers
# does not paste the original back; UIs often do), and a few CPU minutes teach it much less of
# that than SD's 440k inpainting steps did. The *replace* task's "outside" is the black
# background, which text-to-image keeps as well: that task tests the inside.

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 16.1 (★)** How many numbers does each method train for one concept on the course
# model, and on SD 1.5 (the LoRA: rank 4 on the cross-attention `to_q`, `to_k`, `to_v`, `to_out`
# of SD 1.5's 16 transformer blocks; `to_k` and `to_v` read the 768-wide text)? Check the course
# numbers against the committed files.

# %% tags=["solution", "hide-cell"]
from safetensors.torch import load_file

ti_numbers = sum(t.numel() for t in load_file(str(DATA_DIR / "course_ti_bar.safetensors")).values())
lora_numbers = sum(t.numel() for k, t in load_file(str(DATA_DIR / "course_lora_bar.safetensors")).items()
                   if not k.endswith(".alpha"))
print(f"course: textual inversion {ti_numbers:,} numbers, LoRA {lora_numbers:,} ({lora_numbers / ti_numbers:.0f}x)")
# SD 1.5's 16 cross-attention blocks: widths 320 (x5: 2 down, 3 up), 640 (x5), 1280 (x5 + mid)
widths = [320] * 5 + [640] * 5 + [1280] * 6
sd_lora = sum(4 * (n + n) + 4 * (n + 768) * 2 + 4 * (n + n) for n in widths)   # q, k, v, out
print(f"SD 1.5: textual inversion 768 numbers, LoRA {sd_lora:,} ({sd_lora / 768:.0f}x)")
assert ti_numbers == 64 and lora_numbers == logs["bar"]["lora"]["sizes"]["lora_parameters"]

# %% [markdown]
# **Exercise 16.2 (★★, break it and watch)** `train_ti` trains only the new row. Break that:
# train the *whole* token table (the way a naive implementation would, `requires_grad` on
# `token_embedding.weight`) for 5 AdamW steps on the bar batch of the gradient check, at the
# trainer's learning rate. What happens to an old prompt such as "a red circle in the top left"?

# %% tags=["solution", "hide-cell"]
naive_te, naive_tok = minisd.checkpoint.course_text_encoder(), CLIPTokenizer.sd15()
textual_inversion.add_tokens(naive_tok, naive_te, "<bar>", train.ti.init_vectors(naive_tok, naive_te, "bar", 1))
old_prompt = naive_tok(["a red circle in the top left"])
old_before = naive_te(old_prompt).detach()
weight = naive_te.embeddings.token_embedding.weight.requires_grad_(True)
naive_opt = torch.optim.AdamW([weight], lr=train.TI_COURSE["lr"], weight_decay=0.0)
bar_ids = naive_tok([train.ti_prompt(c, "bar") for c in enc_captions])
for step in range(5):
    naive_opt.zero_grad()
    training_loss(pipe.unet, enc_latents, naive_te(bar_ids), generator=torch.Generator().manual_seed(step)).backward()
    naive_opt.step()
moved_rows = int((weight.grad.abs().sum(1) > 0).sum())
drift = float((naive_te(old_prompt) - old_before).abs().max().detach())
print(f"rows moved by the last step: {moved_rows}; the old prompt's context moved by up to {drift:.3f}")
print("images of the old prompt, base vs after 5 naive steps (same seed):")
kept = pipe.text_encoder, pipe.tokenizer
pair = [generate(["a red circle in the top left"], seed=1)[0]]
pipe.text_encoder, pipe.tokenizer = naive_te.requires_grad_(False), naive_tok
pair.append(generate(["a red circle in the top left"], seed=1)[0])
pipe.text_encoder, pipe.tokenizer = kept
fig, axes = plt.subplots(1, 2, figsize=(3, 1.6))
for ax, im, t in zip(axes, pair, ("base", "naive TI, 5 steps")):
    ax.imshow(im), ax.set_xticks([]), ax.set_yticks([]), ax.set_title(t, fontsize=7)
plt.show()
# the shared words "a", "red", "in", "the", ... and the padding moved: a prompt without the token changed
assert moved_rows > 1 and drift > 1e-3

# %% [markdown]
# **Exercise 16.3 (★★)** Before `<bar>` is added, what does the tokenizer make of "a red
# `<bar>` in the top left", and what of "a red `<bar>`s in the top left" after it is added? Why
# does diffusers warn people to choose tokens such as `<cat-toy>` rather than plain words like
# `cat`, and what does `add_tokens` do with "cat"?

# %% tags=["solution", "hide-cell"]
plain = CLIPTokenizer.sd15()
print("before:", [plain.decoder[i] for i in plain.encode("a red <bar> in the top left")])
plain.add_tokens(["<bar>"])
print("after, '<bar>s':", [plain.decoder[i] for i in plain.encode("a red <bar>s in the top left")])
try:
    plain.add_tokens(["cat"])
except ValueError as e:
    print("add_tokens('cat'):", e)
# an added token is found anywhere in the text, inside words too: a plain word as a token would
# cut "category" into "cat" + "egory" and change every prompt that uses it
assert plain.encode("<bar>s")[0] == 49408 and len(plain.encode("a red <bar> in the top left")) == 7

# %% [markdown]
# **Exercise 16.4 (★)** The mask is drawn in pixels but used in latent space, shrunk by
# nearest neighbour (`F.interpolate`, as diffusers). A white 6x6 square at rows and columns
# 5-10 of a 32x32 mask: which latent cells of the 8x8 grid are repainted, and what share of the
# square's pixels ends up repainted by the 9-channel model's mask channel or by blending?

# %% tags=["solution", "hide-cell"]
mask = torch.zeros(1, 1, 32, 32)
mask[..., 5:11, 5:11] = 1.0
small = F.interpolate(mask, size=(8, 8))                      # nearest: cell i reads pixel 4 i
cells = torch.nonzero(small[0, 0]).tolist()
back = small.repeat_interleave(4, 2).repeat_interleave(4, 3)  # each cell covers 4x4 pixels
share = float((back * mask).sum() / mask.sum())
print(f"repainted cells: {cells}; share of the white square repainted: {share:.2f}")
# only cell (2, 2) reads a white pixel (8, 8): the repainted region is pixels 8-11, which covers 9 of the
# 36 white pixels (and 7 black ones): masks should be drawn on the latent grid (multiples of 8 in SD)
assert cells == [[2, 2]] and share == 0.25

# %% [markdown]
# **Exercise 16.5 (★★, break it and watch)** Take the blending hook away: the same loop, the
# same noise, no `after_step`. On 24 *complete* tasks, how far does the PSNR outside the mask
# fall, and does the model still draw the caption?

# %% tags=["solution", "hide-cell"]
images, masks, prompts = inpaint_task(24, kind="complete")
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    x = 2 * (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 255) - 1
    z0 = ipipe.vae.encode(x).sample(g) * ipipe.vae.scaling_factor
    noise = torch.randn(z0.shape, generator=g)
    m = F.interpolate(masks, size=z0.shape[-2:])
    context = torch.cat([ipipe.encode_prompt([""] * len(images)), ipipe.encode_prompt(prompts)])
    out = {}
    for name, hook in (("with blending", blend), ("without", None)):
        sched.set_timesteps(ipipe.steps)
        lat = denoise(ipipe.unet, noise * sched.init_noise_sigma, context, sched, guidance=ipipe.guidance,
                      after_step=hook)
        out[name] = np.rint(ipipe.decode(lat).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
psnr = {k: psnr_outside(v, images, masks).mean() for k, v in out.items()}
print({k: f"{v:.1f} dB" for k, v in psnr.items()})
# without the hook it is text-to-image: a right shape somewhere near, not this image's shape
assert psnr["without"] < psnr["with blending"] - 3

# %% [markdown]
# ## What you built
#
# Textual inversion from the tokenizer up: `CLIPTokenizer.add_tokens` puts a new word in the
# vocabulary with transformers' rules, `textual_inversion.add_tokens` gives it rows of the token
# table, `textual_inversion.load` / `save` read and write the three formats people share
# (diffusers' `learned_embeds`, A1111's `.pt` and `.safetensors`) exactly as diffusers loads them,
# and `train.train_ti` (`python -m minisd train ti`) learns the vector with everything else frozen:
# the gradient of a lookup reaches only the rows the prompts use, and the trainer keeps only the new
# one trainable, so every prompt without the word is bit-for-bit the base model's. Measured against
# chapter 13's LoRA on the same concepts and a similar budget (`--compare`, 300 images per model and
# concept with 95 % intervals), the table shows what a word can and cannot carry: it can only select
# among what the frozen model already draws, not teach it a new skill (a shape), which a change of
# the weights can; and neither can pass what the VAE cannot decode (orange). Inpainting reuses the
# pipeline of chapter 11 for a masked image: `pipe.inpaint` blends the known latents back at every
# step on any model, or feeds a 9-channel U-Net the mask and the masked image's latents
# (`train.inpaint.extend_unet` starts the new channels at zero, so the extended model begins as the
# base model), equal to diffusers' `StableDiffusionInpaintPipeline` in both modes.
# Next: the same frozen-model-plus-small-addition idea
# runs through ControlNet (a trainable copy for a new input) and LCM-LoRA (a LoRA for fewer steps).
