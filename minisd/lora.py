"""LoRA (chapter 13): a frozen layer W0 plus a trainable low-rank update,
W' = W0 + (alpha / rank) * up @ down, injected into the U-Net's attention projections.

Files are written in the kohya-ss format that community tools share:
`lora_unet_<diffusers module path, dots as underscores>.lora_down.weight`, `.lora_up.weight`
and `.alpha` (`lora_te_...` for the text encoder), so a LoRA trained here loads elsewhere. They
are read in that format and in diffusers'/peft's (`unet.<module path>.lora_A.weight`, and the
older spellings), so an SD 1.x or 2.x LoRA from elsewhere loads here (into a model of its
family), e.g. LCM-LoRA (chapter 15), which wraps convolutions as well as attention.
"""
import torch
from torch import nn

from . import weights
from .attention import CrossAttention, SelfAttention
from .clip import CLIPTextEncoder
from .unet import UNet


class LoRALinear(nn.Module):
    """A frozen base layer (nn.Linear or nn.Conv2d) plus a low-rank update (chapter 13).

    y = base(x) + scale * (alpha / rank) * up(down(x)), where `down` maps the input to `rank`
    channels and `up` maps them back. For a Conv2d, `down` is a conv with the base's kernel,
    stride and padding and `up` a 1x1 conv (a 1x1 conv is a Linear applied at every pixel).
    `down` starts Gaussian (std 1/rank) and `up` at zero, so training starts exactly at W0.
    With `symmetric=True` both start Gaussian and their product is subtracted from W0 first
    (the seed's "W' = W0 - dW + dW"): the outputs at step 0 are unchanged all the same.
    """

    def __init__(self, base, rank, alpha=None, symmetric=False, scale=1.0):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise ValueError("this layer already holds a LoRA; merge it (lora.merge) into a fresh copy "
                             "of the model, or load into a model without one")
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d layers, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, float(rank if alpha is None else alpha), scale
        self.merged = False
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            if base.groups != 1 or base.dilation != (1, 1):
                raise ValueError("LoRA supports plain convolutions (groups=1, dilation=1)")
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        self.down.to(base.weight.device, base.weight.dtype)
        self.up.to(base.weight.device, base.weight.dtype)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=1 / rank)
            if symmetric:
                nn.init.normal_(self.up.weight, std=1 / rank)
                self.base.weight -= self.delta_weight()
            else:
                nn.init.zeros_(self.up.weight)
        # the initial factors, kept so that `save` can still describe W' relative to the original W0
        self.register_buffer("init_down", self.down.weight.detach().clone() if symmetric else None)
        self.register_buffer("init_up", self.up.weight.detach().clone() if symmetric else None)

    def delta_weight(self):
        """The update scale * (alpha / rank) * up @ down, shaped like the base weight."""
        up, down = self.up.weight.flatten(1), self.down.weight.flatten(1)   # (out, r), (r, in*k*k)
        return (self.scale * self.alpha / self.rank * (up @ down)).view_as(self.base.weight)

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight: one layer again, no extra cost per step."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the update back out of the base weight (undoes `merge`)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base(x)
        return self.base(x) + self.scale * self.alpha / self.rank * self.up(self.down(x))

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, merged={self.merged}"


def _layers(module):
    """(path, layer) for every Linear, Conv2d and LoRALinear in `module`, not looking inside LoRALinears."""
    out, inside = [], None
    for path, layer in module.named_modules():   # parents come right before their children
        if inside is not None and path.startswith(inside):
            continue
        if isinstance(layer, LoRALinear):
            inside = path + "."
        if isinstance(layer, (LoRALinear, nn.Linear, nn.Conv2d)):
            out.append((path, layer))
    return out


def _replace(module, path, new):
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, new)


# The U-Net layers a LoRA wraps by default: the attention projections (chapter 13).
TARGETS = ("to_q", "to_k", "to_v", "to_out")


def inject(module, rank, alpha=None, targets=TARGETS, only_cross=False,
           symmetric=False):
    """Wrap every Linear/Conv2d of `module` whose attribute name is in `targets` in a LoRALinear
    and freeze everything else (chapter 13). Returns {path: LoRALinear}.

    In the U-Net the names are the attention projections `to_q`, `to_k`, `to_v`, `to_out`
    (`proj_in`, `proj_out` and `proj`/`out` inside the feed-forward can be added); in the
    text encoder `q_proj`, `k_proj`, `v_proj`, `out_proj`. `only_cross=True` keeps the
    cross-attention layers (attn2, where the text comes in) and skips self-attention.
    `alpha` defaults to `rank` (update scale 1).
    """
    module.requires_grad_(False)
    added = {}
    for path, layer in _layers(module):
        parent_path, _, name = path.rpartition(".")
        if name not in targets or isinstance(layer, LoRALinear):
            continue
        parent = module.get_submodule(parent_path) if parent_path else module
        if only_cross and (not isinstance(parent, CrossAttention) or isinstance(parent, SelfAttention)):
            continue
        added[path] = LoRALinear(layer, rank, alpha, symmetric)
        _replace(module, path, added[path])
    if not added:
        raise ValueError(f"no nn.Linear/nn.Conv2d named {targets} found in {type(module).__name__}"
                         f"{' inside cross-attention' if only_cross else ''}; check the target names")
    return added


def trainable_parameters(module):
    """The LoRA factors of `module` (what an optimizer should get after `inject`)."""
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.down.weight, m.up.weight)]


def count_parameters(module):
    """(LoRA parameters, all other parameters) of `module`: what a LoRA file holds against what
    the full model file holds. At rank 4 on SD 1.5's attention projections: 797,184 vs
    859,520,964, under 0.1 % (chapter 13's table over the rank)."""
    lora_ids = {id(p) for p in trainable_parameters(module)}
    n_lora = sum(p.numel() for p in module.parameters() if id(p) in lora_ids)
    return n_lora, sum(p.numel() for p in module.parameters()) - n_lora


def merge(module):
    """Fold every LoRA of `module` into its base weights."""
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge(module):
    """Take every merged LoRA of `module` back out of its base weights."""
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


# --- the kohya-ss file format ------------------------------------------------------------

def diffusers_path(path):
    """Our U-Net module path -> diffusers', e.g. 'down_blocks.0.attentions.0.block.attn1.to_out'
    -> 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0' (weights.UNET_NAMES, read backwards)."""
    return weights.unet_diffusers_key(path + ".weight").removesuffix(".weight")


def _unet_names(unet):
    """{kohya name: our module path} for every layer of our U-Net a LoRA file can address."""
    return {"lora_unet_" + diffusers_path(path).replace(".", "_"): path for path, _ in _layers(unet)}


def _text_names(text_encoder):
    """{kohya name: our module path} for the text encoder. Ours has transformers' module names
    without the `text_model.` prefix that kohya names keep:
    encoder.layers.0.self_attn.q_proj -> lora_te_text_model_encoder_layers_0_self_attn_q_proj."""
    return {"lora_te_text_model_" + path.replace(".", "_"): path for path, _ in _layers(text_encoder)}


def diffusers_name(prefix, path):
    """Our module path -> the module path diffusers' own files use for it: the U-Net's diffusers path
    (`diffusers_path`), or transformers' text-encoder path (with `text_model.`)."""
    return diffusers_path(path) if prefix == "lora_unet_" else "text_model." + path


def _parts(obj):
    """[(prefix, module, names)] for a pipeline (its unet and text_encoder), a U-Net, or a text encoder."""
    if isinstance(obj, UNet):
        return [("lora_unet_", obj, _unet_names(obj))]
    if isinstance(obj, CLIPTextEncoder):
        return [("lora_te_", obj, _text_names(obj))]
    if isinstance(getattr(obj, "unet", None), UNet):
        out = [("lora_unet_", obj.unet, _unet_names(obj.unet))]
        if isinstance(getattr(obj, "text_encoder", None), CLIPTextEncoder):
            out.append(("lora_te_", obj.text_encoder, _text_names(obj.text_encoder)))
        return out
    raise TypeError(f"expected a minisd pipeline, UNet or CLIPTextEncoder, got {type(obj).__name__}")


def save(obj, path, dtype=None):
    """Write the LoRAs of a pipeline, U-Net or text encoder to a kohya-style .safetensors file,
    the factors in `dtype` if given (community files are mostly float16: half the bytes).

    A LoRA made with `symmetric=True` has W' = W0 + dW - dW_init, which is written exactly as a
    rank-2r LoRA: down = [down; init_down], up = [up, -init_up], alpha doubled.
    `scale` is not written (it is a setting of the loader, as in other tools).
    """
    out = {}
    for _, module, names in _parts(obj):
        ours_to_kohya = {p: k for k, p in names.items()}
        for p, layer in _layers(module):
            if not isinstance(layer, LoRALinear):
                continue
            down, up, alpha = layer.down.weight, layer.up.weight, layer.alpha
            if layer.init_down is not None:
                down = torch.cat([down, layer.init_down])
                up = torch.cat([up, -layer.init_up], dim=1)
                alpha = 2 * alpha
            name = ours_to_kohya[p]
            out[name + ".lora_down.weight"] = down.detach().to(dtype or down.dtype).contiguous()
            out[name + ".lora_up.weight"] = up.detach().to(dtype or up.dtype).contiguous()
            out[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if not out:
        raise ValueError("nothing to save: the model holds no LoRA layers (call lora.inject first)")
    weights.save_file(out, path, metadata={"ss_network_module": "networks.lora"})


def _cause(file_shape, want):
    """Which model family a LoRA file is for, from a layer's shapes in the file and in this model."""
    if 2048 in file_shape:
        return "a width of 2048 (SDXL's text encoders) in the file: this LoRA was made for SDXL, minisd loads SD 1.x and 2.x"
    if 1024 in file_shape and 1024 not in want:
        return ("a width of 1024 (SD 2.x's text encoder) in the file: this LoRA was made for SD 2.x; load it into an "
                "SD 2.x model")
    if 768 in file_shape and 1024 in want:
        return ("a width of 768 (SD 1.x's text encoder) in the file where this SD 2.x model has 1024: this LoRA was "
                "made for SD 1.x; load it into an SD 1.x model")
    return "the LoRA was made for a model of another size or architecture"


# --- the other formats diffusers' load_lora_weights reads for SD 1.x/2.x ----------------------

# suffix of a diffusers/peft key -> which factor it is. "lora_A"/"lora_B" is peft's naming (what
# diffusers writes today); "lora.down"/"lora.up" and "lora_linear_layer" are the older diffusers
# files (attention processors), which diffusers converts on load (utils/state_dict_utils.py).
DIFFUSERS_SUFFIXES = ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
                      (".lora.down.weight", "lora_down.weight"), (".lora.up.weight", "lora_up.weight"),
                      (".lora_linear_layer.down.weight", "lora_down.weight"),
                      (".lora_linear_layer.up.weight", "lora_up.weight"))
# the oldest diffusers files name the attention processor's own LoRA layers (UNET_TO_DIFFUSERS)
OLD_ATTENTION = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
DIFFUSERS_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te_"}


def _diffusers_key(key):
    """'unet.<module>.lora_A.weight' (or an older spelling) -> ('lora_unet_', '<module>', 'lora_down.weight'),
    or None if the key is not a diffusers-format LoRA factor."""
    prefix = next((p for p in DIFFUSERS_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    rest = key[len(prefix):].replace(".processor.", ".")   # diffusers' KEYS_TO_ALWAYS_REPLACE
    for suffix, kind in DIFFUSERS_SUFFIXES + ((".down.weight", "lora_down.weight"), (".up.weight", "lora_up.weight")):
        if rest.endswith(suffix):
            name = rest[:-len(suffix)]
            head, _, last = name.rpartition(".")
            if suffix in (".down.weight", ".up.weight"):   # only the old processor names end this way
                if last not in OLD_ATTENTION:
                    return None
                name = head + "." + OLD_ATTENTION[last]
            return DIFFUSERS_PREFIXES[prefix], name, kind
    return None


def _diffusers_alphas(metadata, kohya_prefix):
    """(lora_alpha, alpha_pattern) of the peft LoraConfig that diffusers stores in a safetensors file's
    "lora_adapter_metadata", for the unet or the text encoder; (None, {}) without one (alpha = rank)."""
    import json
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None, {}
    prefix = "unet." if kohya_prefix == "lora_unet_" else "text_encoder."
    config = json.loads(raw)
    return config.get(prefix + "lora_alpha"), config.get(prefix + "alpha_pattern") or {}


def _pattern_alpha(name, default, patterns):
    """peft's rule: the first alpha_pattern key that matches the end of the module name, else the default."""
    import re
    for pattern, alpha in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return alpha
    return default


def _file_metadata(path):
    from pathlib import Path
    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load(obj, path, scale=1.0):
    """Read a LoRA file into a pipeline, U-Net or text encoder (chapters 13 and 15), in any of
    the formats diffusers' `load_lora_weights` reads for SD 1.x/2.x:

    - kohya-ss: `lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
      (`lora_te_...` for the text encoder);
    - diffusers/peft: `unet.<diffusers module path>.lora_A.weight` / `.lora_B.weight`
      (`text_encoder.text_model....`), alpha = rank unless the file's "lora_adapter_metadata"
      gives peft's `lora_alpha` / `alpha_pattern`;
    - older diffusers: `.lora.down.weight` / `.lora.up.weight`, and the attention processors'
      `...attn1.processor.to_q_lora.down.weight`.

    Any Linear or Conv2d layer can be named (attention, feed-forward, proj_in/out, ResNet convs and
    shortcuts, time_emb_proj, down/upsamplers, the time embedding, conv_in/out: LCM-LoRA names
    most of them). Each pair wraps its layer in a LoRALinear with `scale` (the strength community
    tools call "weight"); `lora.merge` then folds it in. Everything is checked before anything
    changes: a key that names no layer of this model, or a shape that does not fit, raises a
    WeightsError naming the first such key.
    """
    sd = weights.load_state_dict(path)
    parts = _parts(obj)
    by_diffusers = {prefix: {diffusers_name(prefix, p): p for p in names.values()} for prefix, _, names in parts}
    found, alphas = {}, {}
    for key in sd:
        parsed = _diffusers_key(key)
        if parsed is not None:                       # diffusers/peft format -> the kohya name of the same layer
            prefix, module_name, kind = parsed
            part = next((p for p in parts if p[0] == prefix), None)
            if part is None or module_name not in by_diffusers[prefix]:
                where = "the text encoder" if prefix == "lora_te_" else "this U-Net"
                raise weights.WeightsError(
                    f"{path}: {key!r} names no layer of {where} ({module_name!r} is not one of its diffusers module "
                    "paths); this looks like a LoRA for another architecture (SDXL...)"
                    + (" or the text encoder was not given (pass the pipeline)" if prefix == "lora_te_" else ""))
            names = {p: k for k, p in part[2].items()}
            name = names[by_diffusers[prefix][module_name]]
            alphas.setdefault(name, (prefix, module_name))
            found.setdefault(name, {})[kind] = sd[key]
            continue
        name, _, kind = key.partition(".")
        if ".lora_A." in key or ".lora_B." in key or ".lora.down." in key:
            raise weights.WeightsError(f"{path}: {key!r} is a diffusers/peft-format LoRA key without the 'unet.' or "
                                       "'text_encoder.' prefix that diffusers' load_lora_weights needs (it would "
                                       "load nothing); prefix the keys with 'unet.'")
        if kind not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise weights.WeightsError(f"{path}: {key!r} is not a plain LoRA tensor (LoRA files hold lora_down/lora_up "
                                       "and alpha (kohya) or lora_A/lora_B (diffusers/peft); LoHa/LoKr/DoRA are not "
                                       "supported)")
        part = next((p for p in parts if name.startswith(p[0])), None)
        if part is None or name not in part[2]:
            where = "a text encoder" if name.startswith("lora_te") else "this U-Net"
            raise weights.WeightsError(
                f"{path}: {key!r} names no layer of {where}; minisd reads SD 1.x and 2.x LoRAs with diffusers-style "
                "paths (lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q...); "
                "this looks like a LoRA for another architecture (SDXL...)"
                + (" or the text encoder was not given (pass the pipeline)" if name.startswith("lora_te") else ""))
        found.setdefault(name, {})[kind] = sd[key]
    if alphas:                                      # diffusers format: alpha from the peft config, else the rank
        metadata = _file_metadata(path)
        for name, (prefix, module_name) in alphas.items():
            default, patterns = _diffusers_alphas(metadata, prefix)
            alpha = _pattern_alpha(module_name, default, patterns)
            if alpha is not None and "alpha" not in found[name]:
                found[name]["alpha"] = torch.tensor(float(alpha))
    plan = []
    for name, t in found.items():
        if "lora_down.weight" not in t or "lora_up.weight" not in t:
            missing = "lora_up.weight" if "lora_down.weight" in t else "lora_down.weight"
            raise weights.WeightsError(f"{path}: {name}.{missing} is missing (each LoRA layer needs both factors)")
        module, names = next((m, names) for _, m, names in parts if name in names)
        layer_path = names[name]
        layer = module.get_submodule(layer_path)
        if isinstance(layer, LoRALinear):
            raise weights.WeightsError(f"{path}: {name} is already a LoRA layer in this model ({layer_path}); "
                                       "load into a model without LoRAs (or merge the first one into a copy)")
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        if isinstance(layer, nn.Linear):
            want_down, want_up = (rank, layer.in_features), (layer.out_features, rank)
        else:
            want_down = (rank, layer.in_channels, *layer.kernel_size)
            want_up = (layer.out_channels, rank, 1, 1)
        for kind, got, want in (("lora_down.weight", down, want_down), ("lora_up.weight", up, want_up)):
            if tuple(got.shape) != want:
                raise weights.WeightsError(f"{path}: {name}.{kind} has shape {tuple(got.shape)} in the file but "
                                           f"{want} fits this model's {layer_path} ({_cause(tuple(got.shape), want)})")
        plan.append((module, layer_path, layer, down, up, float(t["alpha"]) if "alpha" in t else float(rank)))
    for module, layer_path, layer, down, up, alpha in plan:
        wrapped = LoRALinear(layer, down.shape[0], alpha, scale=scale)
        with torch.no_grad():
            wrapped.down.weight.copy_(down)
            wrapped.up.weight.copy_(up)
        _replace(module, layer_path, wrapped)
    return obj
