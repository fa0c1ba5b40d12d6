"""Nothing half-written (issue 23): every file the package writes goes through
`minisd.paths.write_atomically` (a temporary file in the same folder, then os.replace), so a run
interrupted mid-write leaves the previous file whole and no temporary file behind."""
import ast
from pathlib import Path

import pytest
import torch

import minisd
from minisd import checkpoint, lora, paths, weights
from minisd.unet import UNet, UNetConfig

PACKAGE = Path(minisd.__file__).resolve().parent


def _interrupt_mid_write(monkeypatch, owner, name):
    """Make `owner.name` (a writer) write half of its (temporary) file, then be killed."""
    def half_then_killed(*args, **kwargs):
        target = next(a for a in args if isinstance(a, (str, Path)) and Path(a).name.startswith("."))
        Path(target).write_bytes(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(owner, name, half_then_killed)


def _tiny_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny())


import safetensors.torch  # noqa: E402

WRITERS = {  # name: (write(path), the writer it hands the temporary file to: (object, attribute))
    "weights.save_file": (lambda path: weights.save_file({"w": torch.ones(3)}, path), (safetensors.torch, "save_file")),
    "checkpoint.save_checkpoint": (lambda path: checkpoint.save_checkpoint(path, _tiny_unet()),
                                   (safetensors.torch, "save_file")),
    "lora.save": (lambda path: lora.save(_lora_unet(), path), (safetensors.torch, "save_file")),
    "paths.write_text (the trainers' JSON logs)": (lambda path: paths.write_text(path, '{"step": 2}'),
                                                   (Path, "write_text")),
}


def _lora_unet():
    unet = _tiny_unet()
    lora.inject(unet, rank=1)
    return unet


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path, monkeypatch, name):
    write, (owner, attribute) = WRITERS[name]
    path = tmp_path / ("log.json" if "json" in name else "model.safetensors")
    old = b"the previous file, whole"
    path.write_bytes(old)
    _interrupt_mid_write(monkeypatch, owner, attribute)
    with pytest.raises(KeyboardInterrupt):
        write(path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone too


def test_a_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "unet.safetensors"
    path.write_bytes(b"old")
    checkpoint.save_checkpoint(path, _tiny_unet())
    assert checkpoint.load_checkpoint(path).config == UNetConfig.tiny()
    assert [p.name for p in tmp_path.iterdir()] == ["unet.safetensors"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # not mkstemp's 0600


def _direct_writes(tree):
    """(line, call) of every call in `tree` that writes a file itself: X.write_text / X.write_bytes
    (X not minisd.paths), open(..., "w"/"a"/"x"), torch.save, json.dump, np.save, savefig, and
    safetensors' save_file where the module imports it. (PIL's image.save is not told apart from the
    package's own .save methods; the one image write, in pipeline.main, goes through write_atomically.)"""
    safetensors_save = any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("safetensors")
                           and any(a.name == "save_file" for a in n.names) for n in ast.walk(tree))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        call = ast.unparse(node.func)
        name = call.rsplit(".", 1)[-1]
        if name in ("write_text", "write_bytes") and not call.startswith("paths."):
            found.append((node.lineno, call))
        elif call == "open" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and any(m in str(node.args[1].value) for m in "wax"):
            found.append((node.lineno, f"open(..., {node.args[1].value!r})"))
        elif call in ("torch.save", "json.dump", "np.save", "np.savez", "plt.savefig") or name == "savefig":
            found.append((node.lineno, call))
        elif call in ("save_file", "_save") and safetensors_save:
            found.append((node.lineno, call))
    return found


def test_every_write_in_the_package_goes_through_write_atomically():
    """An audit of the source: a direct write is allowed only as the `write` handed to
    paths.write_atomically (its lambda or its argument) and in paths.py itself."""
    offenders = []
    for file in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(file.read_text())
        handed = set()  # lines of the `write` arguments given to write_atomically
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("write_atomically"):
                for arg in node.args[1:]:
                    handed.update(range(arg.lineno, arg.end_lineno + 1))
        offenders += [f"{file.relative_to(PACKAGE.parent)}:{line}: {call}" for line, call in _direct_writes(tree)
                      if file.name != "paths.py" and line not in handed]
    assert not offenders, ("direct (non-atomic) writes; use minisd.paths.write_atomically or paths.write_text:\n"
                           + "\n".join(offenders))


def test_the_audit_sees_a_direct_write():
    """The audit is not vacuous: the writes this issue replaced are each caught."""
    source = """
import json, torch
from safetensors.torch import save_file
log_path.write_text(json.dumps(record))
with open(out, "w") as f:
    json.dump(rows, f)
torch.save(state, tmp)
save_file(tensors, path)
paths.write_text(log_path, text)
"""
    assert sorted(call for _, call in _direct_writes(ast.parse(source))) == \
        sorted(["log_path.write_text", "open(..., 'w')", "json.dump", "torch.save", "save_file"])
