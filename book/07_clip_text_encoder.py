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
# # 7. The CLIP text encoder
#
# **You will build** CLIP's byte-level BPE tokenizer, `minisd.CLIPTokenizer` (same ids as
# transformers'), and the text encoder `minisd.CLIPTextEncoder` with `CLIPTextConfig`, equal to
# transformers' `CLIPTextModel`, including the "clip skip" option.
#
# The U-Net never reads the prompt. It reads a $77 \times 768$ matrix of numbers, the
# *context* that every cross-attention layer attends to (chapter 3). SD 1.x makes that matrix
# with the {term}`text encoder` of OpenAI's {term}`CLIP` ViT-L/14 {cite}`radford2021clip`, frozen, exactly as
# it was released:
#
# $$ \text{prompt} \xrightarrow{\text{tokenizer}} 77 \text{ token ids}
#    \xrightarrow{\text{embeddings}} 77 \times 768
#    \xrightarrow{12 \times \text{CLIPEncoderLayer}} 77 \times 768
#    \xrightarrow{\text{final LayerNorm}} \text{context}. $$
#
# This chapter takes one real prompt through each arrow: `minisd.tokenizer` (byte-level BPE with
# CLIP's real vocabulary) and `minisd.clip.CLIPTextEncoder`.

# %%
# %matplotlib inline
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

import minisd
from minisd import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer

_ = torch.manual_seed(0)  # (assigned: nbval shows a trailing-";" result)

# %% [markdown]
# ## 1. The tokenizer, step by step
#
# CLIP's {term}`tokenizer` is a **byte-pair encoding** ({term}`BPE`, {cite}`sennrich2016bpe`) over bytes, as in
# GPT-2. Its vocabulary file `bpe_simple_vocab_16e6.txt.gz` ships in `data/` (MIT, from OpenAI's
# CLIP). It holds 48,894 *merges*: pairs of symbols, in the order they were learned.
# The 49,408 tokens are the 256 byte characters, the same 256 with an end-of-word mark `</w>`,
# one token per merge, and two special tokens.

# %%
tok = CLIPTokenizer.sd15()
print("vocabulary:", tok.vocab_size, "tokens")
print("first merges:", list(tok.ranks)[:6])
print("special tokens:", tok.decoder[49406], "=", tok.bos_id, "|", tok.decoder[49407], "=", tok.eos_id)

# %% [markdown]
# **Step 1, normalise.** Unicode NFC, every run of whitespace becomes one space, everything is
# lowercased: CLIP cannot tell `Horse` from `horse`.
#
# **Step 2, pre-tokenise.** The text is cut into runs of letters, *single* digits, runs of other
# characters (punctuation, emoji), and the English endings `'s 't 're 've 'm 'll 'd`.
# Spaces disappear here; where a word ended is remembered by the `</w>` mark in step 3. Note how
# the weighting syntax `(masterpiece:1.2)` of some front-ends is, for CLIP, just more tokens:
# weighting is done by those programs on the context, never by the tokenizer.

# %%
prompt = "A photograph of an astronaut riding a horse, (masterpiece:1.2) by Greg Rutkowski"
text = tok.normalize(prompt)
pieces = tok.pretokenize(text)
print(repr(text))
print(pieces)

# %% [markdown]
# **Step 3, bytes and merges.** Each piece becomes its UTF-8 bytes, each byte shown as one
# printable character (bytes that are not printable, such as those of `é` or an emoji, are
# mapped to characters above U+0100, so every string of bytes has a name in the vocabulary).
# The last symbol gets `</w>`. Then, repeatedly, the adjacent pair with the lowest merge rank is
# joined, until no pair left is a known merge. Here is that loop by hand on `rutkowski`:

# %%
symbols = [tok.byte_encoder[b] for b in "rutkowski".encode("utf-8")]
symbols[-1] += "</w>"
print(symbols)
while True:
    pairs = list(zip(symbols, symbols[1:]))
    known = [p for p in pairs if p in tok.ranks]
    if not known:
        break
    best = min(known, key=tok.ranks.get)
    i = pairs.index(best)  # (each pair occurs once in this word)
    symbols = symbols[:i] + [best[0] + best[1]] + symbols[i + 2:]
    print(f"merge #{tok.ranks[best]:5d} {best[0]!r:>10} + {best[1]!r:<12} -> {symbols}")
print("minisd's bpe gives the same:", tok.bpe("rutkowski") == symbols)

# %% [markdown]
# Common words are a single token (`astronaut</w>`, `photograph</w>`); rare names and
# non-English text break into several. Bytes make everything encodable, even an emoji:

# %%
for word in ["astronaut", "rutkowski", "café", "🐴"]:
    print(f"{word!r:12} bytes {list(word.encode('utf-8'))!s:24} -> {tok.bpe(word)}")

# %% [markdown]
# **Step 4, ids and the 77-token window.** Each token's index in the vocabulary is its id.
# `<|startoftext|>` (49406) goes in front, `<|endoftext|>` (49407) behind, and the row is padded
# with more `<|endoftext|>` up to 77, the number of positions CLIP was trained with (its
# {term}`context length`).

# %%
ids = tok(prompt)
print("shape:", tuple(ids.shape))
print("ids:", ids[0, :22].tolist(), "...")
print("decoded:", tok.decode(ids[0, :22]))
print("tokenizer.encode (no start/end):", tok.encode("a photograph of an astronaut riding a horse"))

# %% [markdown]
# A prompt longer than $77 - 2 = 75$ tokens is cut: CLIP has no position 78. The end token is
# kept, so the context still ends the way CLIP expects, and minisd warns with the number of
# tokens that were dropped (diffusers logs the same). Whatever the prompt, long, short or empty,
# the U-Net receives a $77 \times 768$ matrix.

# %%
long_prompt = ", ".join(["a beautiful detailed oil painting of a castle on a hill at sunset"] * 6)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    long_ids = tok(long_prompt)
print(len(tok.encode(long_prompt)), "tokens in the prompt")
print("warning:", caught[0].message)
print("last ids kept:", long_ids[0, -4:].tolist())

# %%
rows = {"empty prompt": "", "the astronaut": prompt, "a long prompt": long_prompt}
kinds = np.zeros((len(rows), 77))
for r, p in enumerate(rows.values()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = tok(p)[0]
    end = int((row == tok.eos_id).nonzero()[0])
    kinds[r, 0], kinds[r, 1:end], kinds[r, end], kinds[r, end + 1:] = 0, 1, 2, 3
fig, ax = plt.subplots(figsize=(11, 2.2))
cmap = plt.matplotlib.colors.ListedColormap(["#2b8cbe", "#a6bddb", "#e34a33", "#eeeeee"])
ax.imshow(kinds, cmap=cmap, vmin=-0.5, vmax=3.5, aspect="auto")
ax.set(yticks=range(len(rows)), yticklabels=list(rows), xlabel="position (0 to 76)",
       title="the 77-token window: start (dark blue), prompt tokens, first end token (red), padding (grey)")
ax.set_xticks(np.arange(-0.5, 77, 1), minor=True)
ax.grid(which="minor", color="white", linewidth=0.5)
ax.tick_params(which="minor", length=0)
plt.show()

# %% [markdown]
# **Same ids as transformers.** diffusers' SD pipelines use transformers' `CLIPTokenizer`;
# `tests/test_tokenizer.py` checks that minisd gives the same ids on 1,200 generated prompts
# (punctuation, digits, `(red:1.2)` weights, accents, CJK, emoji, empty strings, very long
# prompts, odd Unicode whitespace). Two details it took to match: whitespace means Unicode's
# `White_Space` set (Python's `str.isspace` also counts the control characters `\x1c`-`\x1f`),
# and letters are lowercased one by one (Python's `str.lower` writes a word-final `Σ` as `ς`;
# transformers writes `σ`).
#
# The tokenizer keeps a dictionary from word to ids, so repeated words cost nothing; its
# measured throughput against transformers' is in [Engineering notes](appendix_engineering.ipynb).
#
# **Text clean-up, an option.** OpenAI's own tokenizer first repairs broken Unicode with
# `ftfy.fix_text` and undoes HTML escapes (`&amp;` becomes `&`). transformers and diffusers do
# neither, so minisd does neither by default. `clean="html"` adds the unescaping;
# `clean="ftfy"` is OpenAI's full clean-up (it needs `pip install ftfy`, and says so if missing).

# %%
openai_like = CLIPTokenizer.sd15(clean="html")
for name, t in [("default (transformers)", tok), ('clean="html" (OpenAI)', openai_like)]:
    print(f"{name:24}", t.encode("salt &amp; pepper"), "->", t.decode(t.encode("salt &amp; pepper")))

# %% [markdown]
# ## 2. The text encoder
#
# CLIP's text tower is a GPT-style transformer. With $x_0$ the token embeddings plus learned
# position embeddings, each of the 12 `CLIPEncoderLayer`s is *pre-LayerNorm*:
#
# $$ h = x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad x' = h + \mathrm{MLP}(\mathrm{LN}_2(h)), $$
#
# with $\mathrm{MLP}(h) = W_2\, \mathrm{quick\_gelu}(W_1 h)$, $W_1: 768 \to 3072$, and
# $\mathrm{quick\_gelu}(u) = u\, \sigma(1.702\, u)$, the cheap GELU approximation CLIP was trained
# with. After the last layer comes one more LayerNorm. The seed's printout of one layer:

# %%
sd15 = CLIPTextConfig.sd15()
print(sd15)
with torch.device("meta"):  # shapes only: no memory, no random init
    big = CLIPTextEncoder(sd15)
print(big.encoder.layers[0])

# %% [markdown]
# The parameter count, from the module itself: the token table alone is $49408 \times 768$.

# %%
count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
print(f"token embedding     {count(big.embeddings.token_embedding):>12,}")
print(f"position embedding  {count(big.embeddings.position_embedding):>12,}")
print(f"12 encoder layers   {count(big.encoder):>12,}  ({count(big.encoder.layers[0]):,} each)")
print(f"final LayerNorm     {count(big.final_layer_norm):>12,}")
print(f"total               {count(big):>12,}  = {count(big) * 4 / 2**20:.0f} MiB in fp32, "
      f"{count(big) * 2 / 2**20:.0f} MiB in fp16")

# %% [markdown]
# 123,060,480 parameters, about 235 MiB in fp16, as the seed notes say. During SD training this
# whole network is **frozen**: the U-Net learns to read CLIP's language, CLIP never changes.
# `minisd.weights.load_text_encoder` returns it with gradients off.
#
# ### The causal mask
#
# Each token attends only to itself and to the tokens before it: the attention logits of
# token $i$ to token $j > i$ are set to $-\infty$ before the softmax,
#
# $$ \mathrm{Attn}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d}} + M\right) V,
#    \qquad M_{ij} = \begin{cases} 0 & j \le i \\ -\infty & j > i. \end{cases} $$
#
# minisd passes `is_causal=True` to `F.scaled_dot_product_attention`, which applies $M$ without
# building it. Why causal, in an encoder that reads the whole prompt at once? CLIP's authors
# kept GPT's masked attention so that the text tower could start from, or be trained alongside,
# a language model. Its consequences are what matter for SD:
#
# - the word at position $i$ is encoded knowing only the words before it;
# - only the first `<|endoftext|>` (and the padding after it) has seen the whole prompt. CLIP's
#   contrastive training (chapter 8) reads the text's meaning from that one position;
# - SD's U-Net reads all 77 rows, including the padding rows, which all summarise the prompt.

# %%
tokens = ["<start>"] + [tok.decoder[i].replace("</w>", "") for i in tok.encode("an astronaut riding a horse")] \
    + ["<end>", "<end>"]
n = len(tokens)
mask = torch.ones(n, n).tril()
fig, ax = plt.subplots(figsize=(5.5, 4.8))
ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
ax.set_xticks(range(n), tokens, rotation=60, ha="right")
ax.set_yticks(range(n), tokens)
ax.set(xlabel="key (attended to)", ylabel="query (attending)", title="causal mask: who can see whom")
for i in range(n):
    for j in range(n):
        ax.text(j, i, "✓" if mask[i, j] else "", ha="center", va="center", fontsize=8)
plt.show()

# %% [markdown]
# The mask in action, on a small random encoder: changing the last word changes no output
# before it.

# %%
small = CLIPTextEncoder(CLIPTextConfig.tiny()).eval()
a, b = tok(["a red circle in the top left", "a red circle in the top right"])
with torch.no_grad():
    ha, hb = small(a[None]), small(b[None])
changed = (ha - hb).abs().amax(dim=-1)[0]
print("position:       ", list(range(10)))
print("tokens (a):     ", [tok.decoder[i].replace("</w>", "") for i in a[:10].tolist()])
print("max |change|:   ", [f"{c:.2f}" for c in changed[:10].tolist()])

# %% [markdown]
# ## 3. Last layer or penultimate layer ({term}`clip skip`)
#
# SD 1.x conditions on the final LayerNorm of the **last** layer's output. Some fine-tuned
# checkpoints (NovelAI's anime model and the many models derived from it) were trained on the
# **penultimate** layer instead, and the community rule of thumb in the seed notes follows:
# penultimate for anime, last for photographs. What matters is to use what the checkpoint was
# trained with.
#
# diffusers' `StableDiffusionPipeline.encode_prompt(..., clip_skip=k)` takes
# `hidden_states[-(k + 1)]` (the output of layer $12 - k$) and then applies the **final
# LayerNorm**, because the U-Net was trained on normalised vectors. `skip=` in minisd is the same
# number. Careful with names: AUTOMATIC1111's "Clip skip: 2" is diffusers' `clip_skip=1`, i.e.
# minisd's `skip=1` (there, 1 means "no skip").

# %%
ids = tok(["a photograph of an astronaut riding a horse"])
with torch.no_grad():
    last = small(ids)
    penultimate = small(ids, skip=1)
    by_hand = small.final_layer_norm(small.encoder(small.embeddings(ids), small.config.layers - 1))
print("last:", tuple(last.shape), "| penultimate:", tuple(penultimate.shape))
print("skip=1 equals the final LayerNorm of layer 1's output (of 2):", torch.equal(penultimate, by_hand))

# %% [markdown]
# ## 4. Ours == transformers
#
# minisd's modules carry transformers' `CLIPTextModel` names, so a transformers state dict
# loads with no renaming: in its 5.x layout (no prefix) or in the real SD 1.5 folder's layout
# (`text_model.` prefix and a `position_ids` buffer, which is ignored). Same random weights in
# both, at a small config (the test suite also runs the full ViT-L/14 size, with a max
# difference of 0 at the last layer and at skip=1):

# %%
import transformers  # noqa: E402

cfg = CLIPTextConfig(width=128, layers=4, heads=4, mlp_width=512)
torch.manual_seed(0)
theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig(
    vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
    num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_width, max_position_embeddings=77,
    hidden_act="quick_gelu")).eval()
sd = {"text_model." + k: v for k, v in theirs.state_dict().items()}   # the SD 1.5 folder's layout
sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
ours = minisd.weights.load_text_encoder(sd, cfg)
ids = tok(["a photograph of an astronaut riding a horse", "", "a red circle in the top left"])
with torch.no_grad():
    out = theirs(ids, output_hidden_states=True)
    d = (ours(ids) - out.last_hidden_state).abs().max().item()
    d1 = (ours(ids, skip=1) - theirs.final_layer_norm(out.hidden_states[-2])).abs().max().item()
print(f"last layer:        max |diff| = {d:.1e}")
print(f"skip=1 (clip_skip): max |diff| = {d1:.1e}")

# %% [markdown]
# And the tokenizer against transformers' on a few prompts (vocabulary files written from the
# same `.gz`, as `openai/clip-vit-large-patch14` ships them):

# %%
import gzip, json, tempfile  # noqa: E401,E402
from pathlib import Path  # noqa: E402

folder = Path(tempfile.mkdtemp())
(folder / "vocab.json").write_text(json.dumps(tok.encoder))
lines = gzip.open(minisd.DATA_DIR / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8").read().split("\n")
(folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines[1:48895]) + "\n")
hf_tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
prompts = [prompt, "", "ΟΔΟΣ café 東京 🐴!!", "(red:1.2), [blue], 1,000 it's", long_prompt]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    mine = tok(prompts)
hf = hf_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
print("same ids:", torch.equal(mine, hf), f"| max |diff| = {(mine - hf).abs().max().item():.1e}")
assert torch.equal(mine, hf)

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 7.1 (★)** Account for the vocabulary: 256 byte characters, the same 256 with
# `</w>`, one token per merge, and two special tokens. Check the sum against `tok.vocab_size`.
# Then: which words of the 90 course captions are *not* a single token?

# %% tags=["solution", "hide-cell"]
n_merges = len(tok.ranks)
print(f"256 + 256 + {n_merges:,} merges + 2 special = {256 + 256 + n_merges + 2:,}; vocab_size {tok.vocab_size:,}")
course_words = sorted({word for c in minisd.data.combinations() for word in minisd.data.caption(*c).split()})
multi = [word for word in course_words if len(tok.encode(word)) != 1]
print(f"{len(course_words)} distinct words in the 90 course captions; words of more than one token: "
      f"{[(word, [tok.decoder[i] for i in tok.encode(word)]) for word in multi]}")
# 'cyan' is rare enough in CLIP's training text to be split in two: 'cy' + 'an</w>'
assert 256 + 256 + n_merges + 2 == tok.vocab_size == 49408 and multi == ["cyan"]

# %% [markdown]
# **Exercise 7.2 (★★)** Take the small random encoder `small` and the prompt
# "a red circle in the top left". Change its word at position $k$ (for each $k$ from 1 to 7)
# to another word and find the first position of the output that changes. What rule do you see?

# %% tags=["solution", "hide-cell"]
base_words = "a red circle in the top left".split()
first_changed = []
with torch.no_grad():
    h_base = small(tok([" ".join(base_words)]))
    for k in range(len(base_words)):
        words_k = base_words.copy()
        words_k[k] = "blue" if words_k[k] != "blue" else "green"
        h_k = small(tok([" ".join(words_k)]))
        changed_at = ((h_k - h_base).abs().amax(-1)[0] > 1e-6).nonzero().flatten()
        first_changed.append(int(changed_at[0]))
print("word changed at position:", list(range(1, len(base_words) + 1)))
print("first output that changes:", first_changed)
# position 0 is <start>: word k sits at position k + 1 and, under the causal mask, changes only
# positions k + 1 onwards
assert first_changed == list(range(1, len(base_words) + 1))

# %% [markdown]
# **Exercise 7.3 (★★, break it and watch)** CLIP reads a caption at its first `<|endoftext|>`.
# Read the trained course CLIP (`minisd.checkpoint.course_clip()`, chapter 8) somewhere else: at
# `<start>` (position 0), at the colour word's last token and at the shape word (careful: the
# colour can be more than one token, exercise 7.1).
# Project each with `text_projection`, classify 300 course images zero-shot among the 90
# captions, and measure colour, shape and position accuracy for each read-out position.

# %% tags=["solution", "hide-cell"]
import torch.nn.functional as F  # noqa: E402

from minisd.clip import CLIP  # noqa: E402

course_clip = minisd.checkpoint.course_clip()
test_images, test_captions = minisd.data.sample(300, seed=1000, exclude=minisd.data.HELD_OUT)
candidates = [minisd.data.caption(*c) for c in minisd.data.combinations()]
cand_ids = tok(candidates)
truth = [minisd.data.parse(c) for c in test_captions]
accuracy = {}
with torch.no_grad():
    u_img = course_clip.encode_image(minisd.data.to_tensor(test_images))
    hidden = course_clip.text(cand_ids)                                      # (90, 77, width)
    first_end = cand_ids.argmax(dim=-1)
    colour_end = torch.tensor([1 + len(tok.encode(minisd.data.parse(c)[0])) for c in candidates])  # <start>, a, colour
    for where, pos in (("<start>", torch.zeros_like(first_end)), ("colour word", colour_end),
                       ("shape word", colour_end + 1), ("first end token", first_end)):
        v_txt = F.normalize(course_clip.text_projection(hidden[torch.arange(90), pos]), dim=-1)
        guess = [minisd.data.parse(candidates[k]) for k in (u_img @ v_txt.T).argmax(-1).tolist()]
        accuracy[where] = [sum(g[i] == t[i] for g, t in zip(guess, truth)) / len(truth) for i in range(3)]
        print(f"read at {where:16s} colour {accuracy[where][0]:6.1%}  shape {accuracy[where][1]:6.1%}  "
              f"position {accuracy[where][2]:6.1%}")
# Under the causal mask a position knows only the words up to it: at the colour word the position
# is at chance (1/5), at <start> everything is one constant guess; only the end token knows it all.
assert min(accuracy["first end token"]) > 0.95
assert accuracy["colour word"][2] < 0.3 and accuracy["shape word"][2] < 0.3
assert accuracy["colour word"][0] > 2 * accuracy["<start>"][0]

# %% [markdown]
# ## What you built
#
# `minisd.CLIPTokenizer` (normalise, pre-tokenise, byte-level BPE with CLIP's 48,894 merges, the
# 77-token window), equal to transformers' tokenizer, and `minisd.CLIPTextEncoder` with
# `CLIPTextConfig`: token and position embeddings, 12 pre-LayerNorm layers with causal attention
# and quick-GELU MLPs, a final LayerNorm, and `skip=` for "clip skip"; equal to transformers'
# `CLIPTextModel`. Chapter 8 trains a small CLIP, text and image encoder together, to see where
# the text encoder's knowledge comes from.
