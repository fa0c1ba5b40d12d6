"""Textual inversion (chapter 16): a new word for the text encoder, learned as one row (or a few)
of its token-embedding table, with everything else frozen.

`add_tokens` appends the token(s) to the tokenizer and the row(s) to the table; `load` reads the
files people share, `save` writes one. Three formats:

- diffusers' `learned_embeds.safetensors` / `.bin` (the sd-concepts-library): `{token: (D,) or (n, D)}`;
- AUTOMATIC1111's `.pt`: `{"string_to_param": {"*": (n, D)}, "name": ..., ...}` (read with
  `torch.load(weights_only=True)`, never unpickled freely);
- AUTOMATIC1111's `.safetensors`: `{"emb_params": (n, D)}`, the token being the file's name.

An embedding of n > 1 vectors becomes the tokens `<t>`, `<t>_1`, ... `<t>_{n-1}`, and `<t>` in a
prompt stands for all of them, as in diffusers' `load_textual_inversion`.
"""
import dataclasses
from pathlib import Path

import torch
from torch import nn

from .paths import write_atomically
from .weights import WeightsError, check_not_lfs_pointer

WIDTHS = {768: "SD 1.x (CLIP ViT-L/14)", 1024: "SD 2.x (OpenCLIP ViT-H/14)", 1280: "SDXL's second text encoder"}


def vector_tokens(token, n):
    """The tokens that carry an n-vector embedding: `<t>`, `<t>_1`, ... (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def add_tokens(tokenizer, text_encoder, token, vectors):
    """Append `token` (n vectors: n tokens) to the tokenizer and the (n, D) `vectors` as new rows of
    the text encoder's token-embedding table; returns the new ids. Nothing changes on bad input."""
    table = text_encoder.embeddings.token_embedding
    vectors = torch.as_tensor(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None]
    width = table.weight.shape[1]
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise ValueError(f"an embedding of shape {tuple(vectors.shape)} for {token!r}, but this text encoder's "
                         f"token vectors are {width} wide: {_width_hint(vectors.shape[-1], width)}")
    if table.weight.shape[0] != tokenizer.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the text encoder's table "
                         f"{table.weight.shape[0]} rows: give both the same pipeline's tokenizer and text encoder")
    ids = tokenizer.add_tokens(vector_tokens(token, len(vectors)))   # raises first if a name is taken
    weight = torch.cat([table.weight.detach(), vectors.to(table.weight)])     # (V + n, D)
    text_encoder.embeddings.token_embedding = nn.Embedding.from_pretrained(weight, freeze=not table.weight.requires_grad)
    if dataclasses.is_dataclass(getattr(text_encoder, "config", None)):
        text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=len(weight))
    return ids


def _width_hint(got, want):
    if got in WIDTHS and want in WIDTHS and got != want:
        return f"it was made for {WIDTHS[got]}, this model is {WIDTHS[want]}; use an embedding made for this model"
    return f"it was made for another text encoder (width {got}); use an embedding made for this model"


def read(path, token=None):
    """One embedding file -> (token, (n, D) float tensor), in any of the three formats above.
    `token` overrides the name the file gives (diffusers: its key; A1111 .pt: its "name";
    A1111 .safetensors: the file's name)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no embedding file at {path}")
    if path.is_dir():   # a sd-concepts-library repository: learned_embeds.safetensors or .bin inside
        files = [path / n for n in ("learned_embeds.safetensors", "learned_embeds.bin") if (path / n).exists()]
        if not files:
            raise FileNotFoundError(f"{path} is a folder without learned_embeds.safetensors or learned_embeds.bin")
        path = files[0]
    check_not_lfs_pointer(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as e:   # safetensors' own error says little: say what the file should be
            raise WeightsError(f"{path} is not a readable .safetensors file ({e})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"{path} could not be read as an embedding with torch.load(weights_only=True) "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); minisd never "
                               "unpickles arbitrary objects: convert it to .safetensors in a trusted environment")
    name, vectors = _parse(state, path)
    name = token or name
    vectors = torch.as_tensor(vectors).detach().float()
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.numel() == 0:
        raise WeightsError(f"{path}: the embedding for {name!r} has shape {tuple(vectors.shape)}; expected "
                           "(D,) or (n vectors, D)")
    return name, vectors


def _parse(state, path):
    """(name, vectors) from a loaded file; a clear error for a file that is no embedding."""
    if isinstance(state, torch.Tensor):
        return path.stem, state
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not an embedding")
    if "string_to_param" in state:       # A1111 .pt
        params = state["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise WeightsError(f"{path}: 'string_to_param' has no '*' entry, so it is no A1111 embedding")
        return str(state.get("name") or path.stem), params["*"]
    if "emb_params" in state:            # A1111 .safetensors
        return path.stem, state["emb_params"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(state) == 1 and len(tensors) == 1:   # diffusers: {token: vectors}
        return next(iter(tensors.items()))
    keys = list(state)[:3]
    kind = ("a LoRA (load it with minisd.lora.load)" if any("lora" in str(k) for k in state) else
            "a model checkpoint (load it with StableDiffusion.from_pretrained)"
            if any(str(k).startswith(("model.", "state_dict", "model_ema", "global_step", "down_blocks",
                                      "text_model", "encoder.", "decoder.")) for k in state) else "not an embedding")
    raise WeightsError(f"{path} is {kind}: it has {len(state)} entries ({', '.join(map(str, keys))}, ...). An "
                       "embedding file holds one tensor: {token: vectors} (diffusers' learned_embeds), "
                       "'string_to_param' (A1111 .pt) or 'emb_params' (A1111 .safetensors)")


def load(pipe, path, token=None):
    """Load a textual-inversion file into a pipeline (its tokenizer and text encoder), as diffusers'
    `pipe.load_textual_inversion(path, token=token)`; returns the token to write in prompts."""
    name, vectors = read(path, token)
    try:
        add_tokens(pipe.tokenizer, pipe.text_encoder, name, vectors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return name


def embedding(tokenizer, text_encoder, token):
    """The (n, D) vectors a token was given (all its `<t>_i` too)."""
    key = tokenizer.normalize(token).strip()
    if key not in tokenizer.added:
        raise KeyError(f"{token!r} is not an added token of this tokenizer (added: {list(tokenizer.added)})")
    return text_encoder.embeddings.token_embedding.weight[tokenizer.added_ids(key)].detach()


def save(pipe, token, path):
    """Write `token`'s vectors: diffusers' format `{token: (n, D)}` (.safetensors or .bin), or
    A1111's `.pt` (`string_to_param`) if the path ends in .pt. Written to a temporary name, then renamed."""
    path = Path(path)
    vectors = embedding(pipe.tokenizer, pipe.text_encoder, token).float().cpu().contiguous()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        write_atomically(path, lambda tmp: save_file({token: vectors}, tmp, metadata={"format": "pt"}))
    elif path.suffix == ".pt":
        write_atomically(path, lambda tmp: torch.save({"string_to_param": {"*": vectors}, "name": token,
                                                       "string_to_token": {"*": 265}}, tmp))
    elif path.suffix == ".bin":
        write_atomically(path, lambda tmp: torch.save({token: vectors}, tmp))
    else:
        raise ValueError(f"{path}: write .safetensors (diffusers' learned_embeds), .bin or .pt (A1111)")
    return path
