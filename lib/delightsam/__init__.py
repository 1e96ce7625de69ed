"""De-LightSAM: a prompt-free lightweight SAM for medical image segmentation.

Public API::

    model = delightsam.load_model(path, device="cpu")       # released or project checkpoint
    normalise = delightsam.get_normalization(model)           # MONAI transform for [3, H, W] in 0..255
    out = model(images, modality="fundus")                    # images [B, 3, S, S], normalised
    out.mask_logits, out.patch_logits, out.image_embeddings
"""

from .checkpoint import CheckpointError, load_model, load_released, save_model
from .config import RELEASED_MODALITIES, DeLightSAMConfig, Modality, Structure, released_config
from .model import DeLightSAM, DeLightSAMOutput
from .normalization import PixelNormalization, get_normalization

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "DeLightSAM", "DeLightSAMConfig", "DeLightSAMOutput", "Modality", "RELEASED_MODALITIES",
    "PixelNormalization", "Structure", "get_normalization", "load_model", "load_released", "released_config", "save_model",
]
