"""Random Stable Diffusion models built with diffusers and transformers, for the weights and
pipeline tests: the reference side of every comparison (nothing here uses minisd's code)."""
import gzip
import json

import torch

import minisd

# SD 1.5's scheduler_config.json (as in tests/test_schedulers.py)
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None, "clip_sample": False}

# A tiny SD that follows SD 1.x's conventions (8 heads, 32 groups, 64-wide CLIP heads), so that
# an original single file of it has every config number recoverable from its tensor shapes.
TINY_UNET = dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=64,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=8)
TINY_VAE = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, sample_size=16,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1)
# SD 1.5's own sizes (diffusers' and transformers' defaults are not SD's: say everything)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)

# SD 2.x: SD 2.1's scheduler file (DDIM, v-prediction); a tiny SD 2-style model (64-wide heads, linear
# projections, upcast attention, a GELU text encoder); SD 2.1's own sizes (its VAE is SD 1.5's)
SD21_SCHEDULER = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}
TINY2_UNET = dict(TINY_UNET, block_out_channels=[64, 128], attention_head_dim=[1, 2], use_linear_projection=True,
                  upcast_attention=True)
TINY2_TEXT = dict(TINY_TEXT, hidden_act="gelu")
SD21_UNET = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                 use_linear_projection=True, upcast_attention=True)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu")


def write_clip_tokenizer(folder):
    """transformers' CLIPTokenizer files (vocab.json, merges.txt) written from the CLIP vocabulary
    in data/, as tests/test_tokenizer.py builds them."""
    lines = gzip.open(minisd.DATA_DIR / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8").read().split("\n")
    lines = lines[1:48895]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    tokens = chars + [c + "</w>" for c in chars] + [line.replace(" ", "") for line in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return folder


def reference_pipeline(folder, unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, seed=0, max_shard_size="10GB",
                       scheduler=("PNDMScheduler", SD15_SCHEDULER), pad_token="<|endoftext|>"):
    """A random diffusers StableDiffusionPipeline (seeded), saved to `folder` and returned.
    A small `max_shard_size` saves large parts in shards (safetensors writes a whole file from
    memory: shards keep the peak down). `scheduler`: (class name, config); SD 2.x's tokenizer
    pads with "!"."""
    import diffusers
    import transformers
    torch.manual_seed(seed)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder / "tokenizer")),
                                                       model_max_length=77, pad_token=pad_token)
    text_config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                              bos_token_id=0, eos_token_id=2, **{"hidden_act": "quick_gelu", **text})
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**vae), text_encoder=transformers.CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer, unet=diffusers.UNet2DConditionModel(**unet),
        scheduler=getattr(diffusers, scheduler[0]).from_config(scheduler[1]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), max_shard_size=max_shard_size)
    # the scheduler as a user who loads the folder gets it: from the file diffusers just wrote, which
    # names every field (timestep_spacing "leading" too), so Cls.from_config carries them all over
    pipe.scheduler = getattr(diffusers, scheduler[0]).from_pretrained(str(folder), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


SCHEDULER_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                     "dpm++2m": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler",
                     "lcm": "LCMScheduler"}


def use_scheduler(pipe, name):
    """Swap the reference pipeline's sampler the way diffusers users do: from the loaded config."""
    import diffusers
    pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(pipe.scheduler.config)
    return pipe
