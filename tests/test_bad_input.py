"""Bad input at the edges (issue 23's four cases): a clear error before any work, naming the
argument or file and what to do; never torch's advice to unpickle; no image lost."""
import math

import pytest
import torch

from minisd import StableDiffusion, checkpoint, weights
from minisd.pipeline import main

POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
           b"oid sha256:6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa\n"
           b"size 4265146304\n")


@pytest.mark.parametrize("name", ["v1-5-pruned.safetensors", "v1-5-pruned.ckpt", "pytorch_model.bin"])
def test_a_git_lfs_pointer_is_named_as_one(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(POINTER)
    with pytest.raises(weights.WeightsError) as e:
        weights.load_state_dict(path)
    message = str(e.value)
    assert "Git LFS pointer" in message and "git lfs pull" in message and "4,265,146,304 bytes" in message
    assert "weights_only" not in message


def test_a_git_lfs_pointer_as_a_course_checkpoint(tmp_path):
    path = tmp_path / "course_unet.safetensors"
    path.write_bytes(POINTER)
    with pytest.raises(weights.WeightsError, match="Git LFS pointer"):
        checkpoint.load_checkpoint(path)


def test_a_git_lfs_pointer_inside_a_diffusers_folder(tmp_path):
    """from_pretrained reads each part's weight file through load_state_dict: a pointer there is named."""
    import json
    for part, file in [("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors")]:
        (tmp_path / part).mkdir()
        (tmp_path / part / file).write_bytes(POINTER)
    from reference_sd import SD15_TEXT, SD15_UNET, SD15_VAE
    (tmp_path / "unet" / "config.json").write_text(json.dumps(SD15_UNET))
    (tmp_path / "vae" / "config.json").write_text(json.dumps(SD15_VAE))
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps(SD15_TEXT))
    with pytest.raises(weights.WeightsError, match="Git LFS pointer"):
        StableDiffusion.from_pretrained(tmp_path)


def test_a_pickle_with_objects_gets_no_advice_to_unpickle(tmp_path):
    import argparse
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)}, path)  # as old .ckpt files
    with pytest.raises(weights.WeightsError) as e:
        weights.load_state_dict(path)
    message = str(e.value)
    assert "never unpickles" in message and ".safetensors" in message
    assert "weights_only=False" not in message and "weights_only" not in message


@pytest.fixture(scope="module")
def course():
    return StableDiffusion.course_model()


@pytest.mark.parametrize("guidance", [math.nan, math.inf, -math.inf])
def test_guidance_must_be_finite(course, guidance, monkeypatch):
    monkeypatch.setattr(course, "encode_prompt", lambda *a: pytest.fail("work started before the check"))
    with pytest.raises(ValueError, match="guidance"):
        course("a red circle in the top left", guidance=guidance, progress=False)


def test_guidance_must_be_a_number(course):
    with pytest.raises(TypeError, match="guidance"):
        course("a red circle in the top left", guidance="strong", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_refused_up_front():
    with pytest.raises(ValueError, match="no CUDA GPU.*device='cpu'"):
        StableDiffusion.course_model(device="cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the message where MPS is missing")
def test_mps_without_mps_is_refused_up_front():
    with pytest.raises(ValueError, match="MPS"):
        StableDiffusion.course_model(device="mps")


def _no_work(monkeypatch):
    monkeypatch.setattr(StableDiffusion, "course_model",
                        classmethod(lambda cls, **kw: pytest.fail("the model was loaded before --out was checked")))


@pytest.mark.parametrize("args, words", [
    (["--guidance", "nan"], "--guidance nan"),
    (["--device", "cuda"], None),
])
def test_cli_refuses_bad_options_with_a_message(tmp_path, capsys, args, words):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["a red circle in the top left", "--out", str(tmp_path / "x.png"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    if words:
        assert words in err
    assert not (tmp_path / "x.png").exists()


def test_cli_checks_out_before_any_work(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    missing = tmp_path / "no_such_folder" / "x.png"
    assert main(["a red circle in the top left", "--out", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and "does not exist" in err and "mkdir -p" in err
    assert main(["a red circle in the top left", "--out", str(tmp_path / "x.txt")]) == 1
    assert "not an image format" in capsys.readouterr().err


def test_cli_writes_atomically(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["a red circle in the top left", "--out", str(out), "--steps", "2"]) == 0
    assert out.exists() and [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left
    from PIL import Image
    assert Image.open(out).size == (32, 32)


# --- every case of the appendix page's table (tests/bad_input_cases.py) ------------------------------
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import minisd  # noqa: E402
from bad_input_cases import CASES, run  # noqa: E402


@pytest.mark.parametrize("case", CASES, ids=[f"{c['group']}: {c['input'][:50]}" for c in CASES])
def test_every_bad_input_of_the_appendix(tmp_path, course, case):
    if case.get("unless") and eval(case["unless"], {"torch": torch}):
        pytest.skip(f"not a bad input on this machine ({case['unless']})")
    kind, message, error = run(case, tmp_path, course)
    assert kind == case["raises"], f"{case['call']}: {kind}: {message}"
    for words in case["words"]:
        assert words in message, f"{case['call']}: {words!r} not in {message!r}"
    assert "Traceback" not in message and "weights_only=False" not in message
    if error is not None:  # raised by minisd itself, not from deeper (torch, safetensors, pickle)
        frame = traceback.extract_tb(error.__traceback__)[-1]
        assert Path(frame.filename).resolve().is_relative_to(Path(minisd.__file__).resolve().parent), frame
