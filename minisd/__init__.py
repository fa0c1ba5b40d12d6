"""minisd: Stable Diffusion 1.x rebuilt piece by piece, one module per chapter of the course."""
__version__ = "0.1.0"

# data/ holds the CLIP vocabulary and the course's trained checkpoints (minisd.paths says where).
from .paths import DATA_DIR  # noqa: E402

from . import data  # noqa: E402
from . import embeddings, resnet, attention, unet  # noqa: E402
from .unet import UNet, UNetConfig  # noqa: E402
from . import tokenizer  # noqa: E402
from .tokenizer import CLIPTokenizer  # noqa: E402
from . import clip  # noqa: E402
from .clip import CLIPTextEncoder, CLIPTextConfig  # noqa: E402
from . import diffusion  # noqa: E402
from . import schedulers  # noqa: E402
from . import vae  # noqa: E402
from .vae import AutoencoderKL, VAEConfig  # noqa: E402
from . import weights, checkpoint  # noqa: E402
from . import controlnet  # noqa: E402
from .controlnet import ControlNet, ControlNetConfig  # noqa: E402
from . import pipeline  # noqa: E402
from .pipeline import StableDiffusion  # noqa: E402
from . import lora, metrics, textual_inversion  # noqa: E402
