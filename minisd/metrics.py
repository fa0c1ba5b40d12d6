"""Measuring generated images (chapter 12): FID's Fréchet distance, CLIP score, and the
automatic judge of course images (colour, shape, position)."""
import numpy as np
import torch

# --- CLIP score (chapter 8 / 12) -------------------------------------------------------------

# --- Fréchet distance and FID (chapter 12) ---------------------------------------------------

# --- the judge: colour, shape and position of a course image ----------------------------------
