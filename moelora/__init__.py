"""moelora: fast MoE-of-LoRA fine-tuning and serving (MixLoRA, MiLoRA) for Hugging Face models."""

from moelora.backend import BACKENDS, get_backend, set_backend
from moelora.config import ExpertLoraConfig, LoraConfig, MiLoraConfig, MixLoraConfig
from moelora.model import MoeLoraModel, get_moelora_model

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ExpertLoraConfig",
    "LoraConfig",
    "MiLoraConfig",
    "MixLoraConfig",
    "MoeLoraModel",
    "get_backend",
    "get_moelora_model",
    "set_backend",
]
