"""The bad inputs minisd handles, one row per case: what a user gives, the call, and what must come
back. tests/test_bad_input.py runs every row; the appendix page book/appendix_bad_input runs the same
rows and prints the messages, so the page and the tests cannot drift apart.

A case is a dict: `group` (files, arguments, prompts, devices), `input` (the bad input in words),
`setup` (statements that make the files, in `folder`), `call` (the expression run, shown on the
page), `raises` (the error class expected, by name), `words` (what the message must contain), and
`unless` (a condition under which the input is not bad on this machine, e.g. it has CUDA).
Everything runs in a namespace with `folder` (a pathlib.Path to write into), `pipe` (the course
model), `minisd`, `torch`, and the package's modules imported below.
"""
import argparse
import io
import json
import math
import warnings
from pathlib import Path

import torch

import minisd
from minisd import StableDiffusion, checkpoint, lora, weights
from minisd.pipeline import main as generate

POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
           b"oid sha256:6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa\n"
           b"size 4265146304\n")


def _torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _course_checkpoint(path):
    checkpoint.save_checkpoint(path, checkpoint.course_unet())


def _lora_file(path):
    unet = checkpoint.course_unet()
    lora.inject(unet, rank=1)
    lora.save(unet, path)


def _folder(root, without=None, config=None):
    """A diffusers-shaped folder (config.json and a weight file per part) missing `without`, with
    `config` (bytes) as unet/config.json: only the layout, enough for the checks that come first."""
    for part, file in [("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors")]:
        (root / part).mkdir(parents=True, exist_ok=True)
        weights.save_file({"w": torch.zeros(1)}, root / part / file)
        if part != without:
            (root / part / "config.json").write_text("{}")
    if config is not None:
        (root / "unet" / "config.json").write_bytes(config)
    return root


C = dict  # one case
CASES = [
    # --- files -----------------------------------------------------------------------------------
    C(group="files", input="a Git LFS pointer where the weights should be (a clone made without git-lfs)",
      setup="(folder / 'v1-5-pruned.safetensors').write_bytes(POINTER)",
      call="StableDiffusion.from_pretrained(folder / 'v1-5-pruned.safetensors')",
      raises="WeightsError", words=["Git LFS pointer", "git lfs pull"]),
    C(group="files", input="random bytes named .safetensors",
      setup="(folder / 'noise.safetensors').write_bytes(bytes(range(256)) * 4)",
      call="weights.load_state_dict(folder / 'noise.safetensors')",
      raises="WeightsError", words=["noise.safetensors", "not a readable safetensors file"]),
    C(group="files", input="a course checkpoint cut off half-way (an interrupted download)",
      setup="_course_checkpoint(folder / 'unet.safetensors'); data = (folder / 'unet.safetensors').read_bytes(); "
            "(folder / 'half.safetensors').write_bytes(data[:len(data) // 2])",
      call="checkpoint.load_checkpoint(folder / 'half.safetensors')",
      raises="WeightsError", words=["half.safetensors", "truncated"]),
    C(group="files", input="a .ckpt that holds Python objects besides tensors (as old training checkpoints do)",
      setup="torch.save({'state_dict': {'w': torch.zeros(1)}, 'args': argparse.Namespace(lr=1e-4)}, "
            "folder / 'old.ckpt')",
      call="weights.load_state_dict(folder / 'old.ckpt')",
      raises="WeightsError", words=["never unpickles", ".safetensors"]),
    C(group="files", input="a .pt of plain Python values, not tensors",
      setup="torch.save({'step': 3, 'losses': [0.1, 0.2]}, folder / 'state.pt')",
      call="weights.load_state_dict(folder / 'state.pt')",
      raises="WeightsError", words=["state.pt", "not a tensor"]),
    C(group="files", input="a LoRA file given as a full checkpoint",
      setup="_lora_file(folder / 'style_lora.safetensors')",
      call="StableDiffusion.from_pretrained(folder / 'style_lora.safetensors')",
      raises="WeightsError", words=["LoRA", "minisd.lora.load"]),
    C(group="files", input="a full checkpoint given as a LoRA",
      setup="_course_checkpoint(folder / 'unet.safetensors')",
      call="lora.load(pipe, folder / 'unet.safetensors')",
      raises="WeightsError", words=["unet.safetensors", "not a plain LoRA tensor"]),
    C(group="files", input="a diffusers folder without its text encoder",
      setup="_folder(folder / 'sd', without='text_encoder')",
      call="StableDiffusion.from_pretrained(folder / 'sd')",
      raises="MissingPartError", words=["text_encoder/config.json", "is missing"]),
    C(group="files", input="a diffusers folder whose unet/config.json was cut short",
      setup="_folder(folder / 'sd2', config=b'{\"sample_size\": 64, \"block_out')",
      call="StableDiffusion.from_pretrained(folder / 'sd2')",
      raises="WeightsError", words=["unet/config.json", "not valid JSON"]),
    C(group="files", input="a path that does not exist",
      setup="", call="StableDiffusion.from_pretrained(folder / 'stable-diffusion-v1-5')",
      raises="FileNotFoundError", words=["no weights at", "diffusers folder"]),
    # --- arguments ---------------------------------------------------------------------------------
    C(group="arguments", input="guidance nan", setup="", call="pipe('a red circle', guidance=float('nan'))",
      raises="ValueError", words=["guidance=nan", "finite"]),
    C(group="arguments", input="guidance as a word", setup="", call="pipe('a red circle', guidance='strong')",
      raises="TypeError", words=["guidance='strong'"]),
    C(group="arguments", input="zero steps", setup="", call="pipe('a red circle', steps=0)",
      raises="ValueError", words=["steps=0"]),
    C(group="arguments", input="more steps than the sampler has timesteps", setup="",
      call="pipe('a red circle', steps=5000)", raises="ValueError", words=["steps=5000"]),
    C(group="arguments", input="a size the VAE cannot halve down to latents", setup="",
      call="pipe('a red circle', height=30)", raises="ValueError", words=["height=30", "multiple"]),
    C(group="arguments", input="a seed that is not an int", setup="", call="pipe('a red circle', seed=1.5)",
      raises="TypeError", words=["seed=1.5"]),
    C(group="arguments", input="a seed past 64 bits", setup="", call="pipe('a red circle', seed=2**64)",
      raises="ValueError", words=["seed=18446744073709551616"]),
    C(group="arguments", input="an unknown sampler", setup="", call="pipe('a red circle', scheduler='k_euler')",
      raises="ValueError", words=["unknown scheduler 'k_euler'"]),
    C(group="arguments", input="an unknown output type", setup="", call="pipe('a red circle', output_type='pt')",
      raises="ValueError", words=["output_type='pt'"]),
    C(group="arguments", input="initial latents of the wrong shape", setup="",
      call="pipe('a red circle', latents=torch.zeros(1, 4, 64, 64))", raises="ValueError", words=["latents"]),
    C(group="arguments", input="img2img strength above 1", setup="",
      call="pipe.img2img('a red circle', torch.rand(1, 3, 32, 32), strength=1.5)",
      raises="ValueError", words=["strength=1.5"]),
    C(group="arguments", input="`generate --out` into a folder that does not exist (checked before sampling)",
      setup="", call="generate(['a red circle', '--out', str(folder / 'no_such_folder' / 'x.png')])",
      raises="exit 1", words=["--out", "does not exist", "mkdir -p"]),
    C(group="arguments", input="`generate --guidance nan`", setup="",
      call="generate(['a red circle', '--out', str(folder / 'x.png'), '--guidance', 'nan'])",
      raises="exit 1", words=["--guidance nan"]),
    # --- prompts -----------------------------------------------------------------------------------
    C(group="prompts", input="no prompt", setup="", call="pipe(None)", raises="TypeError", words=["prompt", "got None"]),
    C(group="prompts", input="an empty list of prompts", setup="", call="pipe([])", raises="ValueError",
      words=["prompt=[]"]),
    C(group="prompts", input="a list with a non-string in it", setup="", call="pipe(['a red circle', 3])",
      raises="TypeError", words=["prompt", "got 3 (int)"]),
    C(group="prompts", input="a negative prompt per prompt, but too few", setup="",
      call="pipe(['a red circle', 'a blue square'], negative_prompt=['blurry'])", raises="ValueError",
      words=["negative_prompt", "1 negative prompts for 2 prompts"]),
    C(group="prompts", input="a prompt longer than CLIP reads (77 tokens): cut, with a warning", setup="",
      call="pipe.tokenizer('a red circle in the top left ' * 12)", raises="UserWarning",
      words=["tokens were dropped"]),
    # --- devices -----------------------------------------------------------------------------------
    C(group="devices", input="device='cuda' where torch sees no CUDA GPU", setup="",
      call="StableDiffusion.course_model(device='cuda')", raises="ValueError", words=["no CUDA GPU", "device='cpu'"],
      unless="torch.cuda.is_available()"),
    C(group="devices", input="device='mps' where there is no Apple GPU", setup="",
      call="StableDiffusion.course_model(device='mps')", raises="ValueError", words=["MPS"],
      unless="torch.backends.mps.is_available()"),
    C(group="devices", input="a device torch does not know", setup="", call="StableDiffusion.course_model(device='gpu')",
      raises="ValueError", words=["device='gpu'"]),
    C(group="devices", input="float16 on the CPU", setup="",
      call="StableDiffusion.course_model(dtype=torch.float16)", raises="ValueError", words=["float16 on the CPU"]),
    C(group="devices", input="a dtype no model runs in", setup="",
      call="StableDiffusion.course_model(dtype=torch.float64)", raises="ValueError", words=["dtype=torch.float64"]),
]
GROUPS = ["files", "arguments", "prompts", "devices"]


def namespace(folder, pipe):
    """The names a case's setup and call see."""
    return {**globals(), "folder": Path(folder), "pipe": pipe}


def run(case, folder, pipe):
    """Run one case: (what came back, the message, the exception or None): an error's class name
    and message; for the command line "exit 1" and what it printed on stderr; for a warning its
    class name and message. Raises AssertionError if the call ran without any of these."""
    ns = namespace(folder, pipe)
    exec(case["setup"], ns)
    if case["raises"] == "exit 1":
        import contextlib
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = eval(case["call"], ns)
        assert code == 1, f"{case['call']} exited with {code}"
        return "exit 1", err.getvalue().strip(), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            eval(case["call"], ns)
        except Exception as e:  # the cases' point: the error a user gets
            return type(e).__name__, str(e), e
    if caught:
        return caught[0].category.__name__, str(caught[0].message), None
    raise AssertionError(f"{case['call']} ran without an error")
