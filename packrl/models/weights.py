"""Loading base weights into a model that may carry freshly initialised adapters."""

from __future__ import annotations

import torch
from torch import nn


def load_base_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str, hint: str = ""
) -> nn.Module:
    """Load ``state_dict`` (torchtune keys) into ``model``; every non-adapter weight must be there.

    LoRA/DoRA adapter weights keep their initial values (a base checkpoint has none), and DoRA
    magnitudes are reset to the norms of the loaded base weights. Any other missing or
    unexpected key is a RuntimeError naming ``source`` (and ``hint``, the fix to try).
    """
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    not_adapter = [k for k in missing if "lora_" not in k and not k.endswith("magnitude")]
    if not_adapter or unexpected:
        raise RuntimeError(
            f"{source} does not fit the model: missing {not_adapter[:5]}, "
            f"unexpected {unexpected[:5]}{'; ' + hint if hint else ''}"
        )
    for module in model.modules():
        if hasattr(module, "initialize_dora_magnitude"):
            module.initialize_dora_magnitude()
    return model
