"""Property: every call of the pipeline either runs or raises a ValueError/TypeError whose message
names the argument, raised by minisd itself (never an error from inside torch, numpy or PIL).

The model is the course model (32x32 images, ~5M parameters); sizes, steps and batches are drawn
small so that a call that runs costs a few hundredths of a second. Two properties per entry
point: one argument arbitrary and the rest valid (then the message must name *that* argument),
and every argument arbitrary at once (then it must name one of them).
"""
import math
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import minisd  # noqa: E402
from minisd import StableDiffusion  # noqa: E402
from minisd.schedulers import SCHEDULERS  # noqa: E402

PACKAGE = Path(minisd.__file__).resolve().parent

# --- the arguments: each a strategy mixing valid and invalid values ---------------------------
junk = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(), st.text(max_size=4), st.binary(max_size=4),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                 st.just(object()), st.just(torch.zeros(2)), st.just(np.zeros(2)), st.integers(1, 12).map(np.int64))
prompts = st.one_of(st.text(max_size=30), st.lists(st.text(max_size=12), max_size=3),
                    st.tuples(st.text(max_size=5)), st.lists(st.one_of(st.text(max_size=3), junk), max_size=2), junk)
sizes = st.one_of(st.none(), st.integers(-16, 40), st.sampled_from([8, 16, 24, 32]),
                  st.floats(allow_nan=True, allow_infinity=True), junk)
steps = st.one_of(st.integers(-3, 3), st.sampled_from([0, 1000, 1001, 10 ** 12]), junk)
guidances = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 20),
                      st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1.0, 7.5, 1e300]),
                      st.complex_numbers(max_magnitude=10), junk)
seeds = st.one_of(st.none(), st.integers(-2 ** 65, 2 ** 65), st.sampled_from([-2 ** 63, 2 ** 64 - 1, 2 ** 64]),
                  st.integers(0, 2 ** 32).map(np.int64), junk)
schedulers = st.one_of(st.none(), st.sampled_from([*SCHEDULERS, "DDIM", "k_euler", ""]), junk)
output_types = st.one_of(st.sampled_from(["pil", "np", "latent", "PIL", "numpy", "pt"]), junk)
latents = st.one_of(st.none(), st.just("shaped"),
                    st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 9), st.integers(1, 9))
                    .map(lambda s: torch.zeros(s)), junk)

ARGUMENTS = {"prompt": prompts, "negative_prompt": prompts, "height": sizes, "width": sizes, "steps": steps,
             "guidance": guidances, "seed": seeds, "scheduler": schedulers, "output_type": output_types,
             "latents": latents}
VALID = {"prompt": "a red circle in the top left", "negative_prompt": "", "height": 16, "width": 16, "steps": 1,
         "guidance": 4.0, "seed": 0, "scheduler": "ddim", "output_type": "latent", "latents": None}
NAMES = {"negative_prompt": ("negative_prompt", "negative prompt")}  # how a message may name an argument


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusion.course_model()


def _raised_by_minisd(error):
    """The innermost frame of the traceback is minisd's own code (a `raise` in the package)."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return Path(frame.filename).resolve().is_relative_to(PACKAGE)


def _call(pipe, kwargs):
    """Run the call; None if it ran, else the (ValueError or TypeError) it raised, checked."""
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("latents"), str) and kwargs["latents"] == "shaped":  # the right shape, when one exists
        try:
            f = pipe.vae.config.factor
            batch = 1 if isinstance(kwargs["prompt"], str) else len(kwargs["prompt"])
            kwargs["latents"] = torch.randn(batch, 4, kwargs["height"] // f, kwargs["width"] // f)
        except Exception:
            kwargs["latents"] = None
    try:
        out = pipe(**kwargs, progress=False)
    except (ValueError, TypeError) as e:
        assert _raised_by_minisd(e), f"{type(e).__name__} from outside minisd: {e}\n{traceback.format_exc()}"
        return e
    expected = {"pil": list, "np": np.ndarray, "latent": torch.Tensor}[kwargs["output_type"]]
    assert isinstance(out, expected)
    return None


def _names(message, argument):
    return any(name in message for name in NAMES.get(argument, (argument,)))


@settings(max_examples=4 * settings().max_examples)
@given(data=st.data(), argument=st.sampled_from(sorted(ARGUMENTS)))
def test_one_argument_anything_runs_or_names_it(pipe, data, argument):
    value = data.draw(ARGUMENTS[argument], label=argument)
    kwargs = {**VALID, argument: value}
    error = _call(pipe, kwargs)
    if error is not None:
        assert _names(str(error), argument), f"{argument}={value!r}: {type(error).__name__}: {error}"


@settings(max_examples=4 * settings().max_examples)
@given(kwargs=st.fixed_dictionaries(ARGUMENTS))
def test_every_argument_anything_runs_or_names_one(pipe, kwargs):
    error = _call(pipe, kwargs)
    if error is not None:
        assert any(_names(str(error), a) for a in kwargs), f"{type(error).__name__}: {error}"


# --- the loader's device and dtype ------------------------------------------------------------
devices = st.one_of(st.sampled_from(["cpu", "cpu:0", "cuda", "cuda:1", "mps", "meta", "xpu", "gpu", "CPU", "",
                                     torch.device("cpu"), torch.device("meta")]), junk)
dtypes = st.one_of(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8,
                                    torch.bool, torch.complex64, "float32", "fp16"]), junk)


@settings(max_examples=2 * settings().max_examples)
@given(device=devices, dtype=dtypes)
def test_course_model_device_and_dtype_load_and_run_or_are_named(device, dtype):
    try:
        pipe = StableDiffusion.course_model(device=device, dtype=dtype)
    except (ValueError, TypeError) as e:
        assert _raised_by_minisd(e), f"{type(e).__name__} from outside minisd: {e}"
        assert "device" in str(e) or "dtype" in str(e), str(e)
        return
    images = pipe("a red circle", steps=1, height=8, width=8, output_type="np", progress=False)
    assert images.shape == (1, 8, 8, 3) and pipe.dtype == dtype


# --- img2img: the same property over its own arguments ---------------------------------------
images = st.one_of(st.sampled_from(["pil", "array", "tensor"]),
                   st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 20), st.integers(1, 20))
                   .map(lambda s: torch.rand(s)), junk)
IMG2IMG = {"prompt": prompts, "image": images, "strength": st.one_of(st.floats(allow_nan=True), st.integers(-2, 2), junk),
           "steps": steps, "guidance": guidances, "seed": seeds, "output_type": output_types}
IMG2IMG_VALID = {"prompt": "a red circle", "image": "pil", "strength": 0.5, "steps": 2, "guidance": 4.0, "seed": 0,
                 "output_type": "latent"}


def _image(kind):
    from PIL import Image
    array = np.full((16, 16, 3), 128, np.uint8)
    return {"pil": Image.fromarray(array), "array": array, "tensor": torch.rand(1, 3, 16, 16)}.get(kind, kind) \
        if isinstance(kind, str) else kind


@settings(max_examples=2 * settings().max_examples)
@given(data=st.data(), argument=st.sampled_from(sorted(IMG2IMG)))
def test_img2img_one_argument_anything_runs_or_names_it(pipe, data, argument):
    value = data.draw(IMG2IMG[argument], label=argument)
    kwargs = {**IMG2IMG_VALID, argument: value}
    kwargs["image"] = _image(kwargs["image"])
    try:
        pipe.img2img(**kwargs, progress=False)
    except (ValueError, TypeError) as e:
        assert _raised_by_minisd(e), f"{type(e).__name__} from outside minisd: {e}\n{traceback.format_exc()}"
        assert _names(str(e), argument), f"{argument}={value!r}: {type(e).__name__}: {e}"
