"""scripts/clip_score_anchor.py (chapter 12): the diffusers docs' CLIP-score protocol, run end to
end on tiny random models saved in the real layouts (a diffusers SD folder, a transformers CLIPModel
folder with its tokenizer and image processor); nothing is downloaded."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from reference_sd import reference_pipeline, write_clip_tokenizer

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("clip_score_anchor", ROOT / "scripts" / "clip_score_anchor.py")
anchor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(anchor)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two random tiny SD folders (different seeds) and a random tiny CLIPModel folder."""
    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    root = tmp_path_factory.mktemp("anchor")
    sd = [root / "sd_a", root / "sd_b"]
    reference_pipeline(sd[0], seed=0)
    reference_pipeline(sd[1], seed=1)
    torch.manual_seed(5)   # a random CLIP whose cosines on the test images have both signs
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    clip = root / "clip"
    transformers.CLIPModel(config).save_pretrained(str(clip))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(root / "tok")), model_max_length=77)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(clip))
    return sd, clip


def test_clip_scores_equal_transformers_forward(folders):
    import transformers
    _, clip_dir = folders
    clip = anchor.load_clip(clip_dir)
    images = np.random.default_rng(0).integers(0, 256, (6, 40, 24, 3), dtype=np.uint8)   # not square, not 32
    score, per_pair = anchor.clip_scores(clip, images, anchor.PROMPTS)

    # the reference: CLIPModel's own forward on CLIPProcessor's inputs (logits = scale * cosine)
    model = transformers.CLIPModel.from_pretrained(str(clip_dir)).eval()
    processor = transformers.CLIPProcessor.from_pretrained(str(clip_dir))
    inputs = processor(text=anchor.PROMPTS, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
        cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    np.testing.assert_allclose(per_pair, 100 * cos.numpy(), atol=1e-4)
    assert (cos > 0).any() and (cos < 0).any()   # so the clamp at 0 is exercised
    assert score == pytest.approx((100 * cos).clamp(min=0).mean().item(), abs=1e-4)
    # a real difference: the same images against other prompts score differently
    other, other_pairs = anchor.clip_scores(clip, images, anchor.PROMPTS[1:] + anchor.PROMPTS[:1])
    assert np.abs(other_pairs - per_pair).max() > 1 and abs(other - score) > 1e-3


def test_protocol_end_to_end_diffusers_and_minisd(folders, capsys):
    """The script's diffusers run equals the docs' code (one generator shared by both models), and
    minisd's pipeline from the same noise gives the same scores."""
    import diffusers
    sd, clip_dir = folders
    argv = ["--clip", str(clip_dir), "--weights", str(sd[0]), str(sd[1]), "--steps", "3"]
    ours = anchor.main(argv)
    assert "CLIP score" in capsys.readouterr().out

    clip = anchor.load_clip(clip_dir)
    generator = torch.manual_seed(0)   # the docs' generator, then reused for the second model
    expected = {}
    for path in sd:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(path))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(anchor.PROMPTS, num_images_per_prompt=1, generator=generator, output_type="np",
                      num_inference_steps=3).images
        expected[str(path)] = anchor.clip_scores(clip, (images * 255).astype("uint8"), anchor.PROMPTS)[0]
    assert ours == pytest.approx(expected, abs=1e-5)
    assert abs(ours[str(sd[0])] - ours[str(sd[1])]) > 1e-3   # two different models, two scores

    with_minisd = anchor.main(argv + ["--pipeline", "minisd"])
    assert with_minisd == pytest.approx(ours, abs=0.05)   # uint8 truncation may flip a pixel level


def test_missing_paths_say_what_to_pass(folders, tmp_path):
    sd, clip_dir = folders
    with pytest.raises(FileNotFoundError, match="CLIPModel folder"):
        anchor.load_clip(tmp_path / "nowhere")
    with pytest.raises(SystemExit):
        anchor.main(["--clip", str(clip_dir), "--weights", str(tmp_path / "no_sd")])
