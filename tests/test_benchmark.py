"""The benchmark command runs end to end (at the tiny config: a smoke run, no timing assertions)."""
import json

import torch

from minisd import benchmark
from minisd.weights import random_weights


def test_unet_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert benchmark.main(["--component", "unet", "--device", "cpu", "--tiny", "--sizes", "8",
                           "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio minisd/diffusers" in printed and "load" in printed
    result = json.loads(out.read_text())
    assert set(result["loads"]) == {"minisd", "diffusers"}
    assert set(result["steps"]["8"]["medians"]) == {"minisd", "diffusers"}


def test_random_weights_are_seeded_and_cover_every_tensor():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(2, 8))
    a, b = random_weights(model, seed=1), random_weights(model, seed=1)
    assert a.keys() == model.state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert abs(a["0.weight"].std().item() - 1 / 6) < 0.05  # fan-in 4*3*3 = 36


def test_without_diffusers_the_command_names_the_extra(monkeypatch, capsys):
    import sys
    from minisd.__main__ import main
    monkeypatch.setitem(sys.modules, "diffusers", None)      # import diffusers now raises ImportError
    assert main(["benchmark", "--tiny"]) == 1
    err = capsys.readouterr().err
    assert "pip install -e '.[test]'" in err and "diffusers" in err
