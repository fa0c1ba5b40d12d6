"""minisd: Stable Diffusion 1.x rebuilt piece by piece, one module per chapter of the course."""
from pathlib import Path
import os

__version__ = "0.1.0"

# data/ beside the package holds the CLIP vocabulary and the course's trained checkpoints.
DATA_DIR = Path(os.environ.get("MINISD_DATA", Path(__file__).resolve().parent.parent / "data"))

from . import data  # noqa: E402
from . import embeddings, resnet, attention, unet, weights  # noqa: E402
from .unet import UNet, UNetConfig  # noqa: E402
from . import tokenizer  # noqa: E402
from .tokenizer import CLIPTokenizer  # noqa: E402
from . import clip  # noqa: E402
from .clip import CLIPTextEncoder, CLIPTextConfig  # noqa: E402
from . import diffusion  # noqa: E402
from . import schedulers  # noqa: E402
from . import vae  # noqa: E402
from .vae import AutoencoderKL, VAEConfig  # noqa: E402
from . import pipeline  # noqa: E402
from .pipeline import StableDiffusion  # noqa: E402
from . import lora, metrics  # noqa: E402
