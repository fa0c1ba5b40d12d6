"""The course inpainting U-Net (chapter 16): the zero-initialised extension equals the base model,
the masks, the task, the measures, and the command end to end on a few steps."""
import json

import numpy as np
import pytest
import torch

from minisd import UNet, checkpoint, data
from minisd.train import course_unet_config
from minisd.train.inpaint import (box_mask, extend_unet, inpaint_task, position_box, psnr_outside, random_masks,
                                  train_inpaint_model)


def test_extended_unet_equals_the_base_model():
    """Zero weights on the 5 new input channels: the output equals the base model's, whatever
    the mask and masked-image latents say (max |diff| exactly 0.0)."""
    torch.manual_seed(0)
    base = UNet(course_unet_config(64)).eval()
    nine = extend_unet(base)
    assert nine.config.in_channels == 9 and base.config.in_channels == 4
    x, extra = torch.randn(3, 4, 8, 8), 5 * torch.randn(3, 5, 8, 8)
    t, ctx = torch.tensor([1, 400, 999]), torch.randn(3, 77, 64)
    with torch.no_grad():
        d = (nine(torch.cat([x, extra], 1), t, ctx) - base(x, t, ctx)).abs().max().item()
    assert d == 0.0
    assert torch.equal(nine.conv_in.weight[:, :4], base.conv_in.weight)
    assert nine.conv_in.weight[:, 4:].abs().sum() == 0
    # the ablation: random new weights make it another model before any training
    with torch.no_grad():
        nine.conv_in.weight[:, 4:].normal_(0, 0.1)
        assert (nine(torch.cat([x, extra], 1), t, ctx) - base(x, t, ctx)).abs().max() > 1e-2


def test_masks_are_whole_latent_cells_and_cover_the_shape():
    for position in data.POSITIONS:
        top, bottom, left, right = position_box(position)
        assert all(v % 4 == 0 for v in (top, bottom, left, right))
        images, captions = data.sample(200, seed=1, only=[(c, s, position) for c in data.COLOURS
                                                           for s in data.SHAPES])
        m = box_mask(position)
        assert images[:, m < 0.5].max() == 0, f"a shape {position} reaches outside its box"
        halves = [box_mask(position, side=s) for s in ("left", "right", "top", "bottom")]
        assert np.array_equal(halves[0] + halves[1], m) and np.array_equal(halves[2] + halves[3], m)
    masks = random_masks(500, ["in the center"] * 500, seed=0)
    cells = masks.reshape(500, 1, 8, 4, 8, 4)
    assert torch.equal(cells.amax(dim=(3, 5)), cells.amin(dim=(3, 5)))   # constant on each 4x4 cell
    full = (masks.flatten(1).mean(1) == 1).float().mean()
    assert 0.05 < full < 0.15 and set(masks.unique().tolist()) == {0.0, 1.0}


def test_task_and_psnr():
    images, masks, prompts = inpaint_task(20, kind="replace")
    old = [data.parse(c) for c in data.sample(20, seed=16)[1]]
    new = [data.parse(c) for c in prompts]
    assert all(a[0] != b[0] and a[1] != b[1] and a[2] == b[2] for a, b in zip(old, new))
    images2, masks2, prompts2 = inpaint_task(20, kind="complete")
    assert np.array_equal(images, images2) and prompts2 == data.sample(20, seed=16)[1]
    assert (masks2.flatten(1).sum(1) < masks.flatten(1).sum(1)).all()      # half boxes
    p = psnr_outside(images, images, masks)
    assert np.all(p == 100.0)                                              # identical: capped at 1e-10 MSE
    noisy = np.clip(images.astype(int) + 10 * masks[:, 0, :, :, None].numpy().astype(int), 0, 255).astype(np.uint8)
    assert np.all(psnr_outside(noisy, images, masks) == 100.0)            # changes inside do not count
    assert np.all(psnr_outside(noisy, images, masks, inside=True) < 30)
    with pytest.raises(ValueError, match="kind='fill'"):
        inpaint_task(2, kind="fill")


def test_a_few_training_steps_move_only_what_they_should():
    torch.manual_seed(0)
    nine = extend_unet(UNet(course_unet_config(64)))
    n = 16
    encoded = (torch.randn(n, 4, 8, 8), (torch.rand(n, 1, 8, 8) > 0.5).float(), torch.randn(n, 4, 8, 8),
               torch.zeros(n, dtype=torch.long), torch.randn(2, 77, 64), ["a red circle in the center", ""])
    before = nine.conv_in.weight.detach().clone()
    nine, log = train_inpaint_model(nine, encoded, steps=3, batch_size=4, progress=False)
    assert len(log["loss"]) == 3 and np.isfinite(log["loss"]).all()
    assert (nine.conv_in.weight[:, 4:] != 0).any() and not torch.equal(nine.conv_in.weight, before)


def test_train_inpaint_command_end_to_end(tmp_path):
    """A few steps on a few images, measured on a few: the checkpoint loads as a 9-channel U-Net
    with the course sampling settings, the log and the evaluation are written."""
    from minisd.train import main
    out, ev = tmp_path / "inp.safetensors", tmp_path / "eval.json"
    assert main(["inpaint", "--steps", "2", "--images", "40", "--eval-n", "6", "--out", str(out),
                 "--eval-out", str(ev)]) == 0
    unet = checkpoint.load_checkpoint(out)
    assert unet.config.in_channels == 9 and checkpoint.sampling_settings(out)["sampler"] == "ddim"
    log = json.loads((tmp_path / "inp_log.json").read_text())
    assert len(log["loss"]) == 2
    record = json.loads(ev.read_text())
    assert set(record["rows"]) == {"complete", "replace"}
    assert set(record["rows"]["complete"]) == {"blending", "nine_channel", "text_to_image", "vae_round_trip"}
    assert record["rows"]["complete"]["blending"]["n"] == 6
