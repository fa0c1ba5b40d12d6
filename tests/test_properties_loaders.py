"""Property: every loader of the package, given a broken or wrong file or folder, raises the
package's own weights error (`minisd.weights.WeightsError`, a ValueError) naming the file, never a
bare exception from safetensors, zipfile, pickle, json or torch.

Inputs drawn: random bytes; a valid file of each format cut at any byte (truncated); a valid file
of another format under the loader's suffix (a torch zip named .safetensors, a safetensors file
named .ckpt, a LoRA file given as a checkpoint, a checkpoint given as a LoRA, JSON, PNG, a plain
zip, a legacy (non-zip) torch pickle, a Git LFS pointer); and diffusers folders (tiny SD 1.x and
SD 2.x, made with diffusers) with a part missing, two parts swapped, a config.json or weight file
replaced by random bytes or cut short, or a part taken from the other model family.

`LOADERS` is the one table of loaders: name -> (load(path), the suffixes it reads, FOLDER for a
diffusers folder). A new loader is one line there.
"""
import importlib
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from minisd import StableDiffusion, checkpoint, lora, weights  # noqa: E402
from minisd.weights import WeightsError  # noqa: E402

FOLDER = "folder"
TORCH = (".ckpt", ".pth", ".pt", ".bin")


def _course_pipe():
    return StableDiffusion.course_model()


LOADERS = {
    # name: (load(path), what it reads: file suffixes, or FOLDER)
    "weights.load_state_dict": (weights.load_state_dict, (".safetensors", *TORCH)),
    "StableDiffusion.from_pretrained (single file)": (StableDiffusion.from_pretrained, (".safetensors", *TORCH)),
    "StableDiffusion.from_pretrained (folder)": (StableDiffusion.from_pretrained, FOLDER),
    "weights.from_diffusers_folder": (weights.from_diffusers_folder, FOLDER),
    "weights.load_unet_folder": (weights.load_unet_folder, FOLDER),
    "checkpoint.load_checkpoint": (checkpoint.load_checkpoint, (".safetensors",)),
    "lora.load": (lambda path: lora.load(_course_pipe(), path), (".safetensors", *TORCH)),
    "ControlNet.from_pretrained": (lambda path: importlib.import_module("minisd.controlnet").ControlNet
                                   .from_pretrained(path), (".safetensors", *TORCH)),
    "textual_inversion.load": (lambda path: importlib.import_module("minisd.textual_inversion")
                               .load(_course_pipe(), path, "<concept>"), (".safetensors", ".pt", ".bin")),
    # A ControlNet folder loader needs a ControlNet folder fixture beside `folders` before it can
    # join FOLDER_LOADERS.
}
FILE_LOADERS = sorted(name for name, (_, reads) in LOADERS.items() if reads != FOLDER)
FOLDER_LOADERS = sorted(name for name, (_, reads) in LOADERS.items() if reads == FOLDER)

POINTER = (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 4265146304\n")


# --- valid files of every format (the material the broken ones are cut from) ------------------
@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """{kind: bytes} of valid files: a course checkpoint, a LoRA, an original SD 1.x single file
    (safetensors and .ckpt), torch zips and a legacy torch pickle, JSON, PNG, a plain zip."""
    from PIL import Image
    folder = tmp_path_factory.mktemp("samples")
    pipe = _course_pipe()
    out = {}
    checkpoint.save_checkpoint(folder / "unet.safetensors", pipe.unet)
    out["course checkpoint"] = (folder / "unet.safetensors").read_bytes()
    lora.inject(pipe.unet, rank=1)
    lora.save(pipe.unet, folder / "lora.safetensors")
    out["lora"] = (folder / "lora.safetensors").read_bytes()
    weights.save_file({"w": torch.zeros(2, 2)}, folder / "plain.safetensors")
    out["plain safetensors"] = (folder / "plain.safetensors").read_bytes()

    def torch_bytes(obj, zip_format=True):
        buffer = io.BytesIO()
        torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
        return buffer.getvalue()
    out["torch zip"] = torch_bytes({"w": torch.zeros(2, 2)})
    out["lightning ckpt"] = torch_bytes({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "global_step": 1})
    out["legacy torch pickle"] = torch_bytes({"w": torch.zeros(2)}, zip_format=False)
    out["torch non-tensor"] = torch_bytes({"w": [1, 2], "step": 3})
    out["pickle"] = pickle.dumps({"w": 1})
    out["json"] = json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 8}).encode()
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    out["png"] = buffer.getvalue()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("data.pkl", b"not a pickle")
    out["zip"] = buffer.getvalue()
    out["lfs pointer"] = POINTER
    out["empty"] = b""
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny diffusers folders: SD 1.x-style and SD 2.x-style (made by diffusers/transformers)."""
    pytest.importorskip("diffusers")
    from reference_sd import SD21_SCHEDULER, TINY2_TEXT, TINY2_UNET, reference_pipeline
    root = tmp_path_factory.mktemp("folders")
    reference_pipeline(root / "sd1")
    # the SD 2.x-style one 96 wide (SD 2.x's text states are wider than SD 1.x's, as 1024 to 768)
    reference_pipeline(root / "sd2", unet=dict(TINY2_UNET, cross_attention_dim=96),
                       text=dict(TINY2_TEXT, hidden_size=96, intermediate_size=192),
                       scheduler=("DDIMScheduler", SD21_SCHEDULER), pad_token="!")
    return root


def _check(name, path):
    """Call the loader; a WeightsError naming `path` (or a file inside it) passes, anything else fails."""
    load, _ = LOADERS[name]
    try:
        result = load(path)
    except WeightsError as e:
        assert str(path) in str(e), f"{name}: the message does not name {path}: {e}"
        return e
    except Exception as e:
        pytest.fail(f"{name}({path.name}) raised {type(e).__module__}.{type(e).__name__}, not a WeightsError: {e}")
    return result


def _file_name(name):
    return st.sampled_from(LOADERS[name][1]).map(lambda suffix: "model" + suffix)


broken = st.one_of(
    st.tuples(st.just("random bytes"), st.binary(max_size=600)),
    st.tuples(st.just("truncated"), st.sampled_from(["course checkpoint", "lora", "plain safetensors", "torch zip",
                                                     "lightning ckpt", "legacy torch pickle"]),
              st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("header bytes replaced"), st.sampled_from(["course checkpoint", "lora", "torch zip"]),
              st.integers(0, 200), st.binary(min_size=1, max_size=8)),
)


def _bytes(samples, case):
    kind = case[0]
    if kind == "random bytes":
        return case[1]
    data = samples[case[1]]
    if kind == "truncated":
        return data[:int(case[2] * len(data))]
    at = min(case[2], len(data) - 1)
    return data[:at] + case[3] + data[at + len(case[3]):]


@settings(max_examples=4 * settings().max_examples, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.sampled_from(FILE_LOADERS), case=broken)
def test_a_broken_file_gets_a_weights_error_naming_it(tmp_path, samples, data, name, case):
    path = tmp_path / data.draw(_file_name(name), label="file")
    content = _bytes(samples, case)
    path.write_bytes(content)
    if case[0] == "header bytes replaced" and content == samples[case[1]]:
        return  # replaced by the same bytes: still a valid file
    result = _check(name, path)
    if not isinstance(result, WeightsError):
        # a change that left a valid file (e.g. bytes inside a tensor's data): it loaded, whole
        assert case[0] == "header bytes replaced", f"{name} loaded a {case[0]} file"


WRONG = {  # for each loader, the sample kinds that are the wrong format for it (all of them, but its own)
    "weights.load_state_dict": ["json", "png", "zip", "pickle", "lfs pointer", "empty", "torch non-tensor"],
    "StableDiffusion.from_pretrained (single file)": ["course checkpoint", "lora", "plain safetensors", "torch zip",
                                                      "lightning ckpt", "legacy torch pickle", "json", "png", "zip",
                                                      "pickle", "lfs pointer", "empty", "torch non-tensor"],
    "checkpoint.load_checkpoint": ["lora", "plain safetensors", "torch zip", "lightning ckpt", "json", "png", "zip",
                                   "lfs pointer", "empty"],
    "lora.load": ["course checkpoint", "plain safetensors", "torch zip", "lightning ckpt", "legacy torch pickle",
                  "json", "png", "zip", "pickle", "lfs pointer", "empty", "torch non-tensor"],
}


@settings(max_examples=2 * settings().max_examples, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.sampled_from(FILE_LOADERS))
def test_a_wrong_format_file_gets_a_weights_error_naming_it(tmp_path, samples, data, name):
    kind = data.draw(st.sampled_from(WRONG.get(name, sorted(samples))), label="content")
    path = tmp_path / data.draw(_file_name(name), label="file")
    path.write_bytes(samples[kind])
    assert isinstance(_check(name, path), WeightsError), f"{name} loaded a {kind} file as {path.name}"


# --- folders -------------------------------------------------------------------------------
PARTS = ("unet", "vae", "text_encoder")
FOLDER_READS = {"weights.load_unet_folder": ("unet",), "weights.from_diffusers_folder": PARTS}  # default: all + scheduler/


def _weight_file(part_folder):
    return next(p for p in sorted(part_folder.iterdir()) if p.suffix in (".safetensors", ".bin"))


folder_damage = st.one_of(
    st.tuples(st.just("part missing"), st.sampled_from(PARTS)),
    st.tuples(st.just("config missing"), st.sampled_from(PARTS)),
    st.tuples(st.just("weights missing"), st.sampled_from(PARTS)),
    st.tuples(st.just("parts swapped"), st.sampled_from([("unet", "vae"), ("unet", "text_encoder"),
                                                         ("vae", "text_encoder")])),
    st.tuples(st.just("configs swapped"), st.sampled_from([("unet", "vae"), ("vae", "text_encoder"),
                                                           ("unet", "text_encoder")])),
    st.tuples(st.just("config bytes"), st.sampled_from([*PARTS, "scheduler"]), st.binary(max_size=40)),
    st.tuples(st.just("config cut"), st.sampled_from([*PARTS, "scheduler"]), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("weights cut"), st.sampled_from(PARTS), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("weights replaced"), st.sampled_from(PARTS), st.binary(max_size=200)),
    st.tuples(st.just("part from the other family"), st.sampled_from(PARTS)),
)


def _damage(folder, other, damage):
    kind, part = damage[0], damage[1]
    if kind == "part missing":
        shutil.rmtree(folder / part)
    elif kind == "config missing":
        (folder / part / "config.json").unlink()
    elif kind == "weights missing":
        _weight_file(folder / part).unlink()
    elif kind == "parts swapped":
        a, b = part
        (folder / a).rename(folder / "tmp")
        (folder / b).rename(folder / a)
        (folder / "tmp").rename(folder / b)
    elif kind == "configs swapped":
        a, b = part
        ca, cb = (folder / a / "config.json").read_bytes(), (folder / b / "config.json").read_bytes()
        (folder / a / "config.json").write_bytes(cb)
        (folder / b / "config.json").write_bytes(ca)
    elif kind in ("config bytes", "config cut"):
        file = folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
        data = file.read_bytes()
        file.write_bytes(damage[2] if kind == "config bytes" else data[:int(damage[2] * len(data))])
        return _same_json(data, file.read_bytes())
    elif kind == "weights cut":
        file = _weight_file(folder / part)
        data = file.read_bytes()
        file.write_bytes(data[:int(damage[2] * len(data))])
    elif kind == "weights replaced":
        _weight_file(folder / part).write_bytes(damage[2])
    elif kind == "part from the other family":
        shutil.rmtree(folder / part)
        shutil.copytree(other / part, folder / part)
    return False


def _same_json(a, b):
    """A cut that only took trailing whitespace leaves the same config: not damage."""
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


@settings(max_examples=2 * settings().max_examples, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FOLDER_LOADERS), family=st.sampled_from(["sd1", "sd2"]), damage=folder_damage)
def test_a_damaged_folder_gets_a_weights_error_naming_the_file(tmp_path_factory, folders, name, family, damage):
    folder = tmp_path_factory.mktemp("damaged") / family
    shutil.copytree(folders / family, folder)
    unchanged = _damage(folder, folders / ("sd2" if family == "sd1" else "sd1"), damage)
    result = _check(name, folder)
    if isinstance(result, WeightsError):
        return
    # it loaded: only if the damage did not reach what this loader reads (the VAE, for load_unet_folder)
    reads = FOLDER_READS.get(name, (*PARTS, "scheduler"))
    untouched = unchanged or not any(part in str(damage[1]) for part in reads)
    # a whole part of the other family is a valid part: a damage only where it must fit another part
    # (the U-Net's cross-attention and the text encoder); both families share the tiny VAE
    untouched |= damage[0] == "part from the other family" and (damage[1] == "vae" or reads == ("unet",))
    assert untouched, f"{name} loaded a folder with {damage}"
