"""Training objectives: the VAE's (chapter 6), CLIP's contrastive loss (chapter 8)."""
import torch
import torch.nn.functional as F

# --- VAE: reconstruction, perceptual, PatchGAN, KL, VQ (chapter 6) -------------------------

# --- CLIP: contrastive loss (chapter 8) -------------------------------------------------------
