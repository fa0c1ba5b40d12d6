"""LoRA training (chapter 13): the new shapes and colour, the course trainer, and the real-SD trainer with
its distributed (gloo) and resumable runs, on tiny models."""
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import minisd
from minisd import data, lora, train
from minisd.clip import CLIPTextConfig, CLIPTextEncoder
from minisd.metrics import Judge
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet, UNetConfig
from minisd.vae import AutoencoderKL, VAEConfig


# --- the new colour and its judge ------------------------------------------------------------

def test_orange_is_drawable_but_not_a_course_colour():
    assert "orange" not in data.COLOURS and data.NEW_COLOURS["orange"] == (255, 128, 0)
    assert not any(c == "orange" for c, _, _ in data.combinations()) and len(data.combinations()) == 90
    combos = data.concept_combinations("orange")
    assert len(combos) == 15 and len(set(combos)) == 15 and all(c == "orange" for c, _, _ in combos)
    img = data.render("orange", "square", "in the center")
    assert tuple(img[16, 16]) == (255, 128, 0)                        # the middle of the square: full colour
    images, captions = data.sample(20, seed=3, only=combos)
    assert all(c.startswith("a orange ") for c in captions)
    with pytest.raises(ValueError, match="not a new concept"):
        data.concept_combinations("red")
    with pytest.raises(ValueError, match="not a course caption"):
        data.parse("a orange circle in the center")                   # the course grammar is unchanged
    assert data.parse("a orange circle in the center", new=True) == ("orange", "circle", "in the center")


def test_default_judge_is_unchanged_and_orange_judge_reads_real_orange():
    default = Judge.load()
    assert default.colours == data.COLOURS
    images, captions = data.sample(600, seed=2025)
    explicit = Judge.load(colours=data.COLOURS)
    assert default(images) == explicit(images)
    # a course-palette judge can only call orange red or yellow (its nearest colours)
    orange, orange_captions = data.sample(600, seed=7, only=data.concept_combinations("orange"))
    assert {g[0] for g in default(orange)} <= {"red", "yellow"}
    judge = train.lora_judge("orange")
    assert list(judge.colours) == [*data.COLOURS, "orange"]
    assert judge.accuracy(orange, orange_captions) == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}
    # adding orange to the palette does not change the verdict on the old colours' real images
    assert judge(images) == default(images)


def test_new_shapes_are_drawable_but_not_course_shapes():
    assert data.NEW_SHAPES == ("bar", "plus", "ring") and not set(data.NEW_SHAPES) & set(data.SHAPES)
    assert not any(s in data.NEW_SHAPES for _, s, _ in data.combinations())
    combos = data.concept_combinations("bar")
    assert len(combos) == 30 and len(set(combos)) == 30 and {s for _, s, _ in combos} == {"bar"}
    assert {c for c, _, _ in combos} == set(data.COLOURS) and {p for _, _, p in combos} == set(data.POSITIONS)
    # a bar is wider than high, about a circle's area; a plus leaves its corners empty; a ring its middle
    bar = data.render("red", "bar", "in the center", size=64)[..., 0] > 127
    rows, cols = np.nonzero(bar.any(axis=1))[0], np.nonzero(bar.any(axis=0))[0]
    assert (cols[-1] - cols[0]) > 1.8 * (rows[-1] - rows[0])
    circle = data.render("red", "circle", "in the center", size=64)[..., 0] > 127
    assert abs(int(bar.sum()) - int(circle.sum())) < 0.05 * circle.sum()
    plus = data.render("red", "plus", "in the center", size=64)[..., 0]
    assert plus[32, 32] == 255 and plus[26, 26] == 0 and plus[32, 24] == 255
    ring = data.render("green", "ring", "in the center", size=64)[..., 1]
    assert ring[32, 32] == 0 and ring[32, 32 + 10] == 255
    assert data.parse("a red bar in the top left", new=True) == ("red", "bar", "in the top left")
    with pytest.raises(ValueError, match="not a course caption"):
        data.parse("a red bar in the top left")
    with pytest.raises(ValueError, match="unknown shape"):
        data.render("red", "hexagon", "in the center")


def test_new_shapes_judge_knows_six_shapes_and_reads_real_images():
    judge = train.lora_judge("bar")
    assert judge.shapes == data.SHAPES + data.NEW_SHAPES and judge.colours == data.COLOURS
    for shape in data.NEW_SHAPES:
        images, captions = data.sample(300, seed=11, only=data.concept_combinations(shape))
        assert judge.accuracy(images, captions)["all"] >= 0.99, shape
    images, captions = data.sample(300, seed=12)                        # the old shapes are still read right
    assert judge.accuracy(images, captions)["all"] >= 0.99
    # the course judge knows three shapes: a bar is something else to it, never "bar"
    assert "bar" not in {g[1] for g in Judge.load()(data.sample(50, seed=1, only=data.concept_combinations("bar"))[0])}


def test_judge_file_records_its_shapes(tmp_path):
    from minisd.metrics import ShapeNet
    judge = Judge(ShapeNet(4), shapes=("circle", "square", "triangle", "bar"))
    judge.save(tmp_path / "j.safetensors")
    assert Judge.load(tmp_path / "j.safetensors").shapes == ("circle", "square", "triangle", "bar")
    with pytest.raises(ValueError, match="4 outputs but 3 shape names"):
        Judge(ShapeNet(4), shapes=data.SHAPES)
    with pytest.raises(ValueError, match="not a new concept"):
        train.lora_judge("circle")


# --- the course trainer on tiny models ---------------------------------------------------------

def _tiny_course_parts():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).eval().requires_grad_(False)          # f = 2: 32 px -> 16x16 latents
    text = CLIPTextEncoder(CLIPTextConfig.tiny()).eval().requires_grad_(False)
    unet = UNet(UNetConfig.tiny())                                               # 16x16 latents, context 32
    return unet, vae, text, CLIPTokenizer.sd15()


def test_course_lora_trains_only_lora_factors():
    unet, vae, text, tok = _tiny_course_parts()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    encoded = train.encode_concept_data(vae, text, tok, "orange", n_new=16, n_old=16)
    latents, labels, contexts, prompts, is_new = encoded
    assert is_new.sum() == 16 and all(prompts[k].startswith("a orange") for k in labels[is_new].tolist())
    assert not any(prompts[k].startswith("a orange") for k in labels[~is_new].tolist())
    unet, log = train.train_lora(unet, vae, text, tok, steps=3, batch_size=4, lr=1e-2, encoded=encoded, progress=False)
    assert len(log["loss"]) == 3 and all(np.isfinite(log["loss"]))
    layers = [m for m in unet.modules() if isinstance(m, lora.LoRALinear)]
    assert layers and all(m.up.weight.abs().sum() > 0 for m in layers)          # up starts at 0: it moved
    assert [p for p in unet.parameters() if p.requires_grad] == lora.trainable_parameters(unet)
    after = unet.state_dict()
    for k, v in before.items():                                                 # every base weight unchanged
        ours = k.rsplit(".", 1)
        wrapped = f"{ours[0]}.base.{ours[1]}"
        assert torch.equal(after[wrapped] if wrapped in after else after[k], v), k


def test_course_lora_file_round_trips(tmp_path):
    unet, vae, text, tok = _tiny_course_parts()
    encoded = train.encode_concept_data(vae, text, tok, "orange", n_new=8, n_old=8)
    unet, _ = train.train_lora(unet, vae, text, tok, steps=2, batch_size=4, encoded=encoded, progress=False)
    lora.save(unet, tmp_path / "l.safetensors")
    fresh = UNet(UNetConfig.tiny())
    torch.manual_seed(0)
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in unet.state_dict().items()
                           if ".down." not in k and ".up." not in k and "init_" not in k}, strict=True)
    lora.load(fresh, tmp_path / "l.safetensors")
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.allclose(fresh(x, t, c), unet(x, t, c), atol=1e-6)


def _drawn_instead_of_sampled(shape_for=None, limit=9):
    """A stand-in for train.lora.judge_course_unet that draws real course images instead of sampling
    (so these tests run in seconds): each caption's own shape, or `shape_for(shape)` instead, for
    the first `limit` combinations only (the fidelity's fits cost ~0.06 s per image)."""
    def fake(unet, vae, contexts, prompts, judge, combos, seeds=(0,), **kw):
        captions = [data.caption(*c) for c in combos[:limit]] * len(seeds)
        images = np.stack([data.render(c, shape_for(s) if shape_for else s, p, rng=np.random.default_rng(i))
                           for i, (c, s, p) in enumerate(data.parse(t, new=True) for t in captions)])
        return judge.accuracy(images, captions), images, captions
    return fake


def test_evaluate_lora_records_the_fidelity_of_the_samples_it_judged(monkeypatch):
    _, vae, text, tok = _tiny_course_parts()
    monkeypatch.setattr(train.lora, "judge_course_unet", _drawn_instead_of_sampled())
    ev = train.evaluate_lora(None, vae, text, tok, "orange", new_seeds=(0, 1), old_seeds=(0,), n_real=0)
    for key in ("fidelity_new", "fidelity_old"):
        mean, lo, hi = ev[key]
        assert lo <= mean <= hi and mean > 0.99, (key, ev[key])        # real images: close to 1
    assert len(ev["images_new"]) == 18 and ev["judge_on_real_new"] is None
    # the same captions drawn as bars: the fidelity falls
    monkeypatch.setattr(train.lora, "judge_course_unet", _drawn_instead_of_sampled(lambda s: "bar"))
    row = train.lora.sweep_evaluation(None, vae, text, tok, "orange")
    assert set(row) == {"new_accuracy", "old_accuracy", "new_fidelity", "old_fidelity"}
    assert row["old_fidelity"][2] < 0.9 and row["new_fidelity"][2] < 0.9
    assert all(isinstance(v, float) for v in row["new_fidelity"])      # JSON-ready


def test_eval_only_re_measures_an_existing_lora_and_keeps_the_log(monkeypatch, tmp_path):
    import json
    import minisd.checkpoint
    unet, vae, text, tok = _tiny_course_parts()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    encoded = train.encode_concept_data(vae, text, tok, "orange", n_new=8, n_old=8)
    trained, _ = train.train_lora(unet, vae, text, tok, "orange", steps=1, batch_size=4, encoded=encoded,
                                  progress=False)
    lora.save(trained, tmp_path / "l.safetensors")
    (tmp_path / "l_log.json").write_text(json.dumps({"loss": [0.5, 0.4], "rank": 4, "evaluation": {"old": 1}}))

    def fresh_unet(*args, **kwargs):
        u = UNet(UNetConfig.tiny())
        u.load_state_dict(base_state)
        return u

    monkeypatch.setattr(minisd.checkpoint, "course_unet", fresh_unet)
    monkeypatch.setattr(train.lora, "frozen_course_models", lambda: (vae, text, tok))
    monkeypatch.setattr(train.lora, "judge_course_unet", _drawn_instead_of_sampled())
    monkeypatch.setattr(data, "sample", lambda n, seed=0, **kw: _real_sample(min(n, 20), seed, **kw))
    assert train.cli_lora(["--concept", "orange", "--eval-only", "--out", str(tmp_path / "l.safetensors")]) == 0
    log = json.loads((tmp_path / "l_log.json").read_text())
    assert log["loss"] == [0.5, 0.4] and log["rank"] == 4                # the rest of the log is kept
    ev = log["evaluation"]
    assert ev["command"].endswith("--eval-only --out " + str(tmp_path / "l.safetensors"))
    for model in ("base", "lora"):
        for kind in ("new", "old"):
            mean, lo, hi = ev["fidelity"][model][kind]
            assert lo <= mean <= hi
        assert set(ev[model]) == {"new", "old"}
    assert ev["judge_as_before"] is False and "judge_before_re_evaluation" in ev
    assert ev["steps"] == train.course_sampling()["steps"]             # the model's stored sampling settings
    with pytest.raises(SystemExit, match="does not exist"):
        train.cli_lora(["--concept", "orange", "--eval-only", "--out", str(tmp_path / "missing.safetensors")])


_real_sample = data.sample


def test_shipped_orange_lora_is_small_and_logged():
    import json
    path = minisd.DATA_DIR / "course_lora_orange.safetensors"
    log = json.loads((minisd.DATA_DIR / "course_lora_orange_log.json").read_text())
    unet_bytes = (minisd.DATA_DIR / "course_unet.safetensors").stat().st_size
    assert path.stat().st_size < 0.01 * unet_bytes
    assert log["sizes"]["lora_bytes"] == path.stat().st_size
    assert log["command"].startswith("python -m minisd train lora")
    ev = log["evaluation"]
    assert ev["lora"]["old"]["all"] >= ev["base"]["old"]["all"] - 0.05     # the old prompts are not forgotten
    # the VAE is the ceiling: no U-Net LoRA draws orange more often than the VAE gives orange back
    # (VAE v2 decodes it as yellow: both 0 %)
    assert ev["lora"]["new"]["all"] <= ev["judge_on_vae_reconstructions"]["new"]["all"] + 0.05
    assert ev["judge_on_real"]["new"]["all"] >= 0.99 and ev["judge_on_real"]["old"]["all"] >= 0.99
    assert [r["rank"] for r in log["rank_sweep"]] == [1, 2, 4, 8, 16]
    assert all(a["file_bytes"] < b["file_bytes"] for a, b in zip(log["rank_sweep"], log["rank_sweep"][1:]))
    unet = minisd.StableDiffusion.course_model().unet
    lora.load(unet, path)
    assert sum(isinstance(m, lora.LoRALinear) for m in unet.modules()) > 0


def test_shipped_bar_lora_teaches_bar_and_keeps_the_old_prompts():
    import json
    path = minisd.DATA_DIR / "course_lora_bar.safetensors"
    log = json.loads((minisd.DATA_DIR / "course_lora_bar_log.json").read_text())
    assert path.stat().st_size < 0.01 * (minisd.DATA_DIR / "course_unet.safetensors").stat().st_size
    assert log["sizes"]["lora_bytes"] == path.stat().st_size and log["rank"] == 4
    # judged here, not read from the log: the 30 bar prompts and 30 old ones, seed 6 (the log used 0-5)
    judge = train.lora_judge("bar")
    new = train.concept_prompts("bar")
    old = [data.caption(*c) for c in data.combinations()][::3]
    pipe = minisd.StableDiffusion.course_model()

    def accuracy(prompts):
        images = (pipe(prompts, seed=6, output_type="np", progress=False) * 255).round().astype(np.uint8)
        return judge.accuracy(images, prompts)["all"]

    base_new, base_old = accuracy(new), accuracy(old)
    lora.load(pipe, path)
    lora_new, lora_old = accuracy(new), accuracy(old)
    assert base_new <= 0.1 and lora_new >= 0.8, (base_new, lora_new)
    assert lora_old >= base_old - 0.05, (base_old, lora_old)


def test_cli_rejects_a_word_that_is_no_new_concept():
    with pytest.raises(SystemExit, match="choose a shape of .*'bar'"):
        train.cli_lora(["--concept", "hexagon"])
    with pytest.raises(SystemExit, match=r"--replay: .*\[0, 1\).*got 1.5"):
        train.cli_lora(["--concept", "bar", "--replay", "1.5"])
    with pytest.raises(SystemExit, match="--sweep-only needs --rank-sweep"):
        train.cli_lora(["--concept", "bar", "--sweep-only"])


def test_shipped_rank_sweep_log_has_fixed_alpha_and_three_seeds_per_rank():
    import json
    log = json.loads((minisd.DATA_DIR / "course_lora_bar_rank_sweep.json").read_text())
    assert log["alpha"] == 4.0 and log["steps"] == 500 and log["seeds"] == [0, 1, 2]
    rows = log["rank_sweep"]
    assert sorted({(r["rank"], r["seed"]) for r in rows}) == [(r, s) for r in (1, 4, 16) for s in (0, 1, 2)]
    for r in rows:
        assert 0 <= r["new_accuracy"] <= 1 and 0 <= r["old_accuracy"] <= 1 and r["delta_norm"] > 0
        assert r["params"] == 4544 * r["rank"]          # 4,544 numbers per unit of rank on the 40 projections


# --- the real-SD trainer: a tiny diffusers folder and a folder of captioned images ------------

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from reference_sd import reference_pipeline
    folder = tmp_path_factory.mktemp("tiny_sd") / "sd"
    reference_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pics")
    images, captions = data.sample(4, seed=5)
    for i, (im, cap) in enumerate(zip(images, captions)):
        # not square and not 16 px: the trainer resizes and centre-crops
        Image.fromarray(np.concatenate([im, im[:, :8]], axis=1)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(cap + "\n")
    return folder


def _run(tiny_sd, images_dir, out, **kw):
    args = dict(rank=2, steps=6, batch_size=1, lr=1e-3, seed=0, resolution=16, save_every=2, progress=False,
                device="cpu")
    args.update(kw)
    return train.train_lora_folder(tiny_sd, images_dir, out, **args)


def _factors(unet):
    return [p.detach().clone() for p in lora.trainable_parameters(unet)]


def test_load_training_image_resizes_and_centre_crops(tmp_path):
    im = np.zeros((20, 40, 3), dtype=np.uint8)
    im[:, 10:30] = 255                                # a white centre square of a wide image
    Image.fromarray(im).save(tmp_path / "wide.png")
    x = train.load_training_image(tmp_path / "wide.png", 10)
    assert x.shape == (3, 10, 10) and x.min() >= -1 and x.max() <= 1
    assert torch.all(x[:, :, 1:-1] > 0.9)             # the crop keeps the middle, which is white


def test_folder_lora_trains_only_lora_and_writes_kohya_file(tiny_sd, images_dir, tmp_path):
    from minisd.pipeline import StableDiffusion
    base = StableDiffusion.from_pretrained(tiny_sd).unet.state_dict()
    unet, _, log = _run(tiny_sd, images_dir, tmp_path / "run")
    assert len(log["loss"]) == 6 and log["steps_done"] == 6
    after = unet.state_dict()
    for k, v in base.items():
        a, b = k.rsplit(".", 1)
        assert torch.equal(after.get(f"{a}.base.{b}", after.get(k)), v), k
    assert all(p.grad is not None for p in lora.trainable_parameters(unet))
    sd = minisd.weights.load_state_dict(tmp_path / "run" / "lora.safetensors")
    assert all(k.startswith("lora_unet_") for k in sd) and any(k.endswith(".lora_down.weight") for k in sd)
    assert (tmp_path / "run" / "log.json").exists() and (tmp_path / "run" / "checkpoint.pt").exists()


def test_folder_lora_with_text_encoder_trains_both_and_loads_back(tiny_sd, images_dir, tmp_path):
    """--train-text-encoder: LoRAs on the text encoder's q/k/v/out projections too, written as
    lora_te_ keys beside the lora_unet_ ones; the file loads into a fresh pipeline and gives the
    trained models' outputs; the frozen base weights of both stay as they were."""
    from minisd.pipeline import StableDiffusion
    base_te = StableDiffusion.from_pretrained(tiny_sd).text_encoder.state_dict()
    unet, text_encoder, log = _run(tiny_sd, images_dir, tmp_path / "te", train_text_encoder=True)
    te_layers = [m for m in text_encoder.modules() if isinstance(m, lora.LoRALinear)]
    assert te_layers and all(m.up.weight.abs().sum() > 0 for m in te_layers)     # up starts at 0: it moved
    after = text_encoder.state_dict()
    for k, v in base_te.items():
        a, b = k.rsplit(".", 1)
        assert torch.equal(after.get(f"{a}.base.{b}", after.get(k)), v), k
    sd = minisd.weights.load_state_dict(tmp_path / "te" / "lora.safetensors")
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in sd)
    assert any(k.startswith("lora_unet_") for k in sd)
    fresh = StableDiffusion.from_pretrained(tiny_sd)
    lora.load(fresh, tmp_path / "te" / "lora.safetensors")
    ids = fresh.tokenizer(["a red circle in the top left"])
    with torch.no_grad():
        want = text_encoder.float()(ids)
        got = fresh.text_encoder(ids)
    assert (want - got).abs().max() < 1e-5


class _Killed(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tiny_sd, images_dir, tmp_path, monkeypatch):
    unet, _, _ = _run(tiny_sd, images_dir, tmp_path / "whole")
    whole = _factors(unet)
    # a run that dies during step 4 (0-based 3): its last checkpoint is the one of step 2
    real_load, calls = train.load_training_image, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise _Killed
        return real_load(*a, **k)
    monkeypatch.setattr(train.lora_folder, "load_training_image", dying)
    with pytest.raises(_Killed):
        _run(tiny_sd, images_dir, tmp_path / "cut")
    monkeypatch.setattr(train.lora_folder, "load_training_image", real_load)
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)   # tensors and plain Python only
    assert ck["step"] == 2                                          # lost 1 step, at most --save-every
    assert not (tmp_path / "cut" / "lora.safetensors").exists()
    unet, _, log = _run(tiny_sd, images_dir, tmp_path / "cut", resume=True)
    assert len(log["loss"]) == 6
    for a, b in zip(_factors(unet), whole):
        assert torch.equal(a, b)                                    # exactly the uninterrupted run's weights


def test_planned_stop_and_resume(tiny_sd, images_dir, tmp_path):
    unet, _, _ = _run(tiny_sd, images_dir, tmp_path / "whole", steps=5)
    _, _, log = _run(tiny_sd, images_dir, tmp_path / "two", steps=5, max_steps_this_run=3)
    assert log["steps_done"] == 3 and not (tmp_path / "two" / "lora.safetensors").exists()
    resumed, _, _ = _run(tiny_sd, images_dir, tmp_path / "two", steps=5, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(_factors(resumed), _factors(unet)))
    assert (tmp_path / "two" / "lora.safetensors").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, sd, pics, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    unet, _, log = train.train_lora_folder(sd, pics, out, rank=2, steps=3, batch_size=1, lr=1e-3, resolution=16,
                                           save_every=0, progress=False, device="cpu")
    torch.save({"factors": _factors(unet), "loss": log["loss"]}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_end_with_identical_lora(tiny_sd, images_dir, tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_rank_main, args=(2, _free_port(), str(tiny_sd), str(images_dir), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["factors"], r1["factors"]))
    assert any(a.abs().sum() > 0 for a in r0["factors"][1::2])       # the up factors moved
    assert r0["loss"] == r1["loss"]                                  # the logged loss is the all-reduced mean
    assert (tmp_path / "lora.safetensors").exists()                  # written once, by rank 0


def test_bad_inputs_get_clear_errors(tiny_sd, images_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        _run(tiny_sd, tmp_path / "nope", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        _run(tiny_sd, tmp_path / "empty", tmp_path / "o")
    (tmp_path / "nocap").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "nocap" / "a.png")
    with pytest.raises(FileNotFoundError, match="has no caption: write it to a.txt"):
        _run(tiny_sd, tmp_path / "nocap", tmp_path / "o")
    (tmp_path / "nocap" / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="no caption for a.png"):
        _run(tiny_sd, tmp_path / "nocap", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="--weights"):
        _run(tmp_path / "missing.safetensors", images_dir, tmp_path / "o")
    from safetensors.torch import save_file
    save_file({"some.other.model.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(minisd.weights.WeightsError):
        _run(tmp_path / "other.safetensors", images_dir, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _run(tiny_sd, images_dir, tmp_path / "fresh", resume=True)
    _run(tiny_sd, images_dir, tmp_path / "r2", steps=2, save_every=1)
    with pytest.raises(ValueError, match="rank=2, this run has rank=4"):
        _run(tiny_sd, images_dir, tmp_path / "r2", steps=4, rank=4, resume=True)


def test_killed_process_resumes_to_the_same_weights(tiny_sd, images_dir, tmp_path):
    """A real kill (SIGKILL of a `python -m minisd train lora` process once it has written a
    checkpoint), then --resume: the same LoRA as a run never interrupted."""
    import subprocess
    import sys
    import time
    steps, out = 80, tmp_path / "killed"
    cmd = [sys.executable, "-m", "minisd", "train", "lora", "--weights", str(tiny_sd), "--images", str(images_dir),
           "--resolution", "16", "--steps", str(steps), "--rank", "2", "--lr", "1e-3", "--batch-size", "1",
           "--save-every", "5", "--threads", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    assert alive, "the run ended before it could be killed: make it longer"
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < steps and not (out / "lora.safetensors").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                    # as the killed process ran, so the floats match bit for bit
    try:
        resumed, _, _ = _run(tiny_sd, images_dir, out, steps=steps, save_every=5, resume=True)
        whole, _, _ = _run(tiny_sd, images_dir, tmp_path / "whole", steps=steps, save_every=5)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(_factors(resumed), _factors(whole)))
