"""`python -m minisd train vae|clip|unet|lora|controlnet|lcm|ti|inpaint`: reproduce the checkpoints in data/.

One module per model the course trains, in the book's order: `vae` (chapter 6), `clip`
(chapter 8), `unet` (chapter 9), `lora` (chapter 13, the course concept) and `lora_folder`
(chapter 13, real SD 1.x weights on a folder of images, under torchrun too), `controlnet`
(chapter 14, a ControlNet on the frozen course U-Net), `lcm` (chapter 15, latent consistency
distillation of the course U-Net) and `ti` (chapter 16, textual inversion of the course
concepts, and its comparison with the LoRA) and `inpaint` (chapter 16, the 9-channel course
inpainting U-Net). Each trainer
draws the course data (`minisd.data`), shows a tqdm bar, logs its losses and writes a
safetensors file whose metadata records the command that made it. Their functions are
importable from here (`from minisd.train import train_unet_model`).
"""
import sys

from .vae import cli_vae, held_out_images, held_out_psnr, latent_scale, train_vae_model, vae_sweep
from .clip import cli_clip, clip_test_sets, clip_zero_shot_accuracy, train_clip_model
from .unet import (COURSE_SAMPLING, cli_unet, course_prompts, course_sampling, course_unet_config, encode_course_data, frozen_course_models,
                   judge_course_unet, sample_course_latents, train_unet_model)
from .lora import (LORA_COURSE, LORA_TARGETS, cli_lora, concept_prompts, encode_concept_data, evaluate_lora,
                   lora_judge, lora_rank_sweep, train_lora)
from .inpaint import (INPAINT_COURSE, cli_inpaint, encode_inpaint_data, evaluate_inpainting, extend_unet,
                      inpaint_task, train_inpaint_model)
from .lora_folder import IMAGE_SUFFIXES, caption_folder, load_training_image, train_lora_folder
from .controlnet import (cli_controlnet, follow_scores, silhouettes, summarise, held_out_controls,
                         train_controlnet_model)
from .lcm import cli_lcm, ddim_solver_step, distill_lcm, evaluate_few_step
from .ti import TI_COURSE, cli_ti, ti_prompt, ti_token, train_ti

TRAINERS = {"vae": cli_vae, "clip": cli_clip, "unet": cli_unet, "lora": cli_lora, "controlnet": cli_controlnet,
            "lcm": cli_lcm, "ti": cli_ti, "inpaint": cli_inpaint}


def main(argv):
    if not argv or argv[0] not in TRAINERS:
        print(f"usage: python -m minisd train {{{'|'.join(TRAINERS)}}} [--help]", file=sys.stderr)
        return 2
    return TRAINERS[argv[0]](argv[1:])
