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
    assert "ratio minisd / diffusers" in printed and "load" in printed
    result = json.loads(out.read_text())
    assert set(result["loads"]) == {"minisd", "diffusers"}
    assert set(result["steps"]["8"]["medians"]) == {"minisd", "diffusers", "diffusers channels_last"}
    assert result["steps"]["8"]["max_diff"] < 1e-4  # both sides computed the same step


def test_vae_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert benchmark.main(["--component", "vae", "--device", "cpu", "--tiny", "--sizes", "8",
                           "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["decode"]["8"]["max_diff"] < 1e-4
    assert set(result["decode"]["8"]["ratios"]) == {"diffusers", "diffusers channels_last"}


def test_profile_names_the_modules(capsys):
    assert benchmark.main(["--profile", "--tiny", "--sizes", "8"]) == 0
    printed = capsys.readouterr().out
    assert "per module" in printed and "ResNetBlock" in printed and "SpatialTransformer" in printed


def test_per_call_counts_wall_and_cpu_time_apart():
    """Timer's clock also reads the CPU clock: a step that sleeps takes wall time but no CPU."""
    import time
    wall, cpu = benchmark.per_call(lambda: time.sleep(0.02), torch.device("cpu"), threads=1)
    assert 0.02 <= wall < 0.2 and cpu < 0.5 * wall

    def busy():
        end = time.process_time() + 0.02
        while time.process_time() < end:
            pass
    wall, cpu = benchmark.per_call(busy, torch.device("cpu"), threads=1)
    assert cpu >= 0.02 and cpu > 0.5 * wall


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


def test_plain_kernels_switch_the_fast_paths_off_and_back_on(monkeypatch):
    """--plain (the 'before' profile) must be minisd without its CPU speed choices: every Conv2d
    through nn.Conv2d's convolution, the feed-forward in one piece; and restored afterwards."""
    from torch import nn
    from minisd import attention, resnet
    torch.manual_seed(0)
    conv, ff = resnet.Conv2d(8, 8, 1), attention.FeedForward(8)
    monkeypatch.setattr(attention, "FF_CHUNK_BYTES", 1000 * 64 * 4)  # 1,000 tokens of GEGLU's 64 floats
    x, tokens = torch.randn(2, 8, 4, 4), torch.randn(1, 10_000, 8)
    calls = []
    ff.geglu.register_forward_hook(lambda m, i, o: calls.append(len(i[0].reshape(-1, 8))))
    with torch.no_grad():
        with benchmark.plain_kernels():
            assert torch.equal(conv(x), nn.functional.conv2d(x, conv.weight, conv.bias))
            ff(tokens)
            assert calls == [10_000]
        ff(tokens)
    assert resnet.FAST_CPU and calls[1:] == [1000] * 10


def test_fused_sides_and_counted_flops(tmp_path):
    out = tmp_path / "result.json"
    assert benchmark.main(["--component", "unet", "--device", "cpu", "--tiny", "--sizes", "8", "--fuse-qkv",
                           "--repeats", "1", "--json", str(out)]) == 0
    step = json.loads(out.read_text())["steps"]["8"]
    assert {"minisd fused qkv", "diffusers fused qkv"} <= set(step["medians"]) and step["fused_ratio"] > 0
    config = benchmark.UNetConfig.tiny()
    assert step["flops"] == benchmark.step_flops(config, 2, 8) > 0
    # the count is linear in the batch and grows with the map (convolutions x4, attention x16)
    assert benchmark.step_flops(config, 4, 8) == 2 * step["flops"]
    assert 4 * step["flops"] < benchmark.step_flops(config, 2, 16) < 16 * step["flops"]


def test_compile_mode_needs_compile(capsys):
    import pytest
    with pytest.raises(SystemExit):
        benchmark.main(["--tiny", "--compile-mode", "reduce-overhead"])
    assert "--compile-mode needs --compile" in capsys.readouterr().err
