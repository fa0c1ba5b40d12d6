"""`python -m minisd train vae|clip|unet|lora`: reproduce the checkpoints in data/.

Each trainer draws the course data (`minisd.data`), shows a tqdm bar, logs its losses and
writes a safetensors file whose metadata records the command that made it.
"""
import sys

# --- VAE (chapter 6) ---------------------------------------------------------------------------

# --- CLIP (chapter 8) --------------------------------------------------------------------------

# --- U-Net (chapter 9) -------------------------------------------------------------------------

# --- LoRA (chapter 13) -------------------------------------------------------------------------


# --- command line --------------------------------------------------------------------------------
def main(argv):
    # each trainer adds itself here: "name": function taking the remaining argv
    trainers = {}
    if not argv or argv[0] not in trainers:
        print(f"usage: python -m minisd train {{{'|'.join(trainers) or 'vae|clip|unet|lora'}}} [--help]",
              file=sys.stderr)
        return 2
    return trainers[argv[0]](argv[1:])
