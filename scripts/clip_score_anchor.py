"""The CLIP-score anchor of the diffusers documentation, reproduced from local files (chapter 12).

The diffusers page "Evaluating Diffusion Models" compares two real checkpoints on six prompts:
one image per prompt from `generator = torch.manual_seed(0)`, the pipeline's defaults (512x512,
50 PNDM steps, guidance 7.5; float16 on a GPU), images made uint8 by `(images * 255).astype("uint8")`,
and torchmetrics' `clip_score` with CLIP ViT-B/16 (`openai/clip-vit-base-patch16`). It reports
34.91 for SD 1.4 and 36.21 for SD 1.5. SD 1.5's images there come from the *same* generator after
SD 1.4's, not from a fresh seed; this script does the same for the models in the order given.

    python scripts/clip_score_anchor.py --clip path/to/clip-vit-base-patch16 \\
        --weights path/to/stable-diffusion-v1-4 path/to/stable-diffusion-v1-5 --device cuda --dtype float16

Nothing is downloaded: `--clip` is a local transformers CLIPModel folder (with its tokenizer and
preprocessor files), `--weights` local diffusers folders (with `--pipeline minisd`, also original
single files). `--pipeline diffusers` (the default) runs the protocol as written; `--pipeline
minisd` runs minisd's pipeline from the same initial noise. The score is `minisd.metrics.clip_score`,
the mean of max(100 * cos, 0) over the six pairs; torchmetrics clamps the mean instead of each pair,
the same number whenever no pair has a negative cosine (with a real CLIP, none does).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's minisd, when not installed
from minisd import metrics  # noqa: E402

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A high tech solarpunk utopia in the Amazon rainforest",
    "A pikachu fine dining with a view to the Eiffel Tower",
    "A mecha robot in a favela in expressionist style",
    "an insect robot preparing a delicious meal",
    "A small cabin on top of a snowy mountain in the style of Disney, artstation",
]
SEED = 0
REPORTED = {"stable-diffusion-v1-4": 34.9102, "stable-diffusion-v1-5": 36.2137}   # the docs' printed values
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_clip(folder, device="cpu"):
    """A transformers CLIPModel, its tokenizer and its image processor from a local folder.
    The image processor is the PIL one (transformers 5's CLIPImageProcessorPil, 4.x's
    CLIPImageProcessor), the resize torchmetrics used when the docs' numbers were made."""
    import transformers
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:   # transformers 4.x: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as ImageProcessor
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {folder}: pass a local transformers CLIPModel folder "
                                "(config.json, weights, tokenizer and preprocessor files), e.g. a copy of "
                                "openai/clip-vit-base-patch16")
    model = transformers.CLIPModel.from_pretrained(str(folder)).to(device).eval()
    return model, transformers.CLIPTokenizer.from_pretrained(str(folder)), ImageProcessor.from_pretrained(str(folder))


@torch.no_grad()
def clip_scores(clip, images, prompts):
    """uint8 images (N, H, W, 3) and N prompts -> (CLIP score, the N per-pair values 100 * cos).
    `clip` is what load_clip returns. Prompts longer than CLIP's context are truncated."""
    model, tokenizer, image_processor = clip
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(prompts):
        raise ValueError(f"expected uint8 images (N, H, W, 3) for {len(prompts)} prompts, got "
                         f"{images.dtype} {images.shape}")
    device = next(model.parameters()).device
    pixels = image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)
    text = tokenizer(list(prompts), padding=True, truncation=True,
                     max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(device)
    image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)       # (N, D)
    text_embeds = model.text_projection(model.text_model(**text).pooler_output)                        # (N, D)
    per_pair = 100 * torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
    return metrics.clip_score(image_embeds, text_embeds), per_pair.cpu().numpy()


def generate(path, generator, pipeline="diffusers", device="cpu", dtype=torch.float32, steps=None):
    """The six prompts, one image each, float (6, H, W, 3) in [0, 1], drawing the initial noise
    from `generator` (a CPU generator, advanced as diffusers advances it)."""
    kwargs = {} if steps is None else {"steps": steps}
    if pipeline == "diffusers":
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"num_inference_steps": kwargs["steps"]} if kwargs else {}
        return pipe(PROMPTS, num_images_per_prompt=1, generator=generator, output_type="np", **kwargs).images
    import minisd
    pipe = minisd.StableDiffusion.from_pretrained(path, device=device, dtype=dtype)
    side = pipe.unet.config.sample_size
    # diffusers' randn_tensor with a CPU generator: one draw of the whole batch on the CPU, in the
    # pipeline's dtype, then moved to the device
    latents = torch.randn((len(PROMPTS), pipe.unet.config.in_channels, side, side), generator=generator, dtype=dtype)
    return pipe(PROMPTS, latents=latents, output_type="np", progress=False, **kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", required=True, help="local CLIPModel folder (the docs: openai/clip-vit-base-patch16)")
    parser.add_argument("--weights", required=True, nargs="+", help="SD 1.x weights, one or more, scored in this order")
    parser.add_argument("--pipeline", choices=["diffusers", "minisd"], default="diffusers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the docs: float16 on cuda")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 50 for SD)")
    args = parser.parse_args(argv)
    for path in args.weights:
        if not Path(path).exists():
            parser.error(f"no weights at {path}: pass a local SD 1.x diffusers folder (with --pipeline minisd, "
                         "an original .safetensors/.ckpt file works too)")
    clip = load_clip(args.clip, args.device)
    generator = torch.Generator().manual_seed(SEED)   # the docs' torch.manual_seed(0), shared by all models
    scores = {}
    for path in args.weights:
        images = generate(path, generator, args.pipeline, args.device, DTYPES[args.dtype], args.steps)
        uint8 = (images * 255).astype(np.uint8)        # the docs' conversion (truncation, not rounding)
        score, per_pair = clip_scores(clip, uint8, PROMPTS)
        scores[str(path)] = score
        reported = REPORTED.get(Path(path).name)
        print(f"{path}: CLIP score {score:.4f}" + (f"   (the diffusers docs: {reported})" if reported else ""))
        print("   per prompt: " + "  ".join(f"{v:.2f}" for v in per_pair))
    return scores


if __name__ == "__main__":
    main()
