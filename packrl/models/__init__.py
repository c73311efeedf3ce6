"""Model builders, the offline SmolLM2 checkpoint, and chat tokenizers."""

from packrl.models.smollm2 import (
    default_checkpoint_dir,
    ensure_smollm2_checkpoint,
    load_hf_checkpoint,
    load_smollm2,
    lora_smollm2_135m,
    smollm2_135m,
)

__all__ = [
    "default_checkpoint_dir",
    "ensure_smollm2_checkpoint",
    "load_hf_checkpoint",
    "load_smollm2",
    "lora_smollm2_135m",
    "smollm2_135m",
]
