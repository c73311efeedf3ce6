"""Model builders, the offline SmolLM2 checkpoint, and chat tokenizers."""

from packrl.models.smollm2 import (
    default_checkpoint_dir,
    ensure_smollm2_checkpoint,
    load_hf_checkpoint,
    load_smollm2,
    lora_smollm2_135m,
    smollm2_135m,
)
from packrl.models.tokenizer import ChatTokenizer, chat_tokenizer

__all__ = [
    "ChatTokenizer",
    "chat_tokenizer",
    "default_checkpoint_dir",
    "ensure_smollm2_checkpoint",
    "load_hf_checkpoint",
    "load_smollm2",
    "lora_smollm2_135m",
    "smollm2_135m",
]
