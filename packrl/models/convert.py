"""torchtune <-> HF and PEFT conversion of model weights and LoRA adapters.

Used by the checkpoint writer (HF safetensors, PEFT adapters) and by the vLLM sampler (which
streams HF-named weights and writes PEFT adapters into its engine). Key names and RoPE row
layouts follow torchtune's own converters, dispatched as ``FullModelHFCheckpointer`` does:
``convert_weights`` for the Llama family, ``qwen2_*`` for Qwen2.
"""

import json
from pathlib import Path

import torch
from torch import nn
from torchtune.models import convert_weights

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"

# torchtune checkpointer model types whose HF <-> torchtune conversion is the generic llama one.
_GENERIC_TYPES = {"LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL"}
SUPPORTED_MODEL_TYPES = tuple(sorted(_GENERIC_TYPES | {"QWEN2"}))
# config.json "model_type" -> torchtune model type, used when the caller gives none.
_HF_MODEL_TYPES = {"llama": "LLAMA3_2", "mistral": "MISTRAL", "qwen2": "QWEN2"}

# torchtune module names -> PEFT target module names (as torchtune's converter maps them).
_PEFT_TARGETS = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "output_proj": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "output": "lm_head",
}


def read_hf_config(source_checkpoint_dir: Path) -> dict:
    """The HF ``config.json`` of a model directory, with an error that says what to pass."""
    path = source_checkpoint_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"source_checkpoint_dir={source_checkpoint_dir} has no config.json; pass the HF "
            "model directory the run started from (the checkpointer's checkpoint_dir)"
        )
    return json.loads(path.read_text())


def resolve_model_type(model_type: str | None, config: dict) -> str:
    """torchtune's model type (LLAMA3_2, QWEN2, ...): given, or inferred from config.json."""
    if model_type is None:
        hf_type = config.get("model_type")
        if hf_type not in _HF_MODEL_TYPES:
            raise ValueError(
                f"cannot infer model_type from config.json model_type={hf_type!r}; pass "
                f"model_type= one of {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        return _HF_MODEL_TYPES[hf_type]
    model_type = model_type.upper()
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported for HF checkpoints; use one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def _head_args(config: dict) -> dict:
    return dict(
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        dim=config["hidden_size"],
    )


def tune_to_hf(state_dict: dict, model_type: str, config: dict) -> dict:
    """torchtune keys -> HF keys, exactly as FullModelHFCheckpointer.save_checkpoint does."""
    if model_type == "QWEN2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        return qwen2_tune_to_hf(
            state_dict,
            **_head_args(config),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )
    return convert_weights.tune_to_hf(
        state_dict, **_head_args(config), head_dim=config.get("head_dim")
    )


def hf_to_tune(state_dict: dict, model_type: str, config: dict) -> dict:
    """HF keys -> torchtune keys, exactly as FullModelHFCheckpointer.load_checkpoint does."""
    if model_type == "QWEN2":
        from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

        return qwen2_hf_to_tune(
            state_dict,
            **_head_args(config),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )
    return convert_weights.hf_to_tune(
        state_dict, **_head_args(config), head_dim=config.get("head_dim")
    )


def _rope_rows_to_hf(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Output rows of a q/k projection ([out, ...], out = n_heads * head_dim) from torchtune's
    RoPE layout (per head, interleaved pairs) to HF's (per head, two halves), the permutation
    ``convert_weights.tune_to_hf`` applies to the q/k weights."""
    return t.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(t.shape)


def tune_to_peft(adapter: dict[str, torch.Tensor], model_type: str, config: dict) -> dict:
    """LoRA/DoRA adapter weights, torchtune keys -> PEFT keys, with rows in the layout of the
    HF base weights that ``tune_to_hf`` writes for ``model_type``, so PEFT and vLLM apply them
    to the right outputs.

    torchtune's ``tune_to_peft_adapter_weights`` gives the names, but its layout is right only
    for LoRA on Llama-layout models: it permutes q/k ``lora_B`` rows even for Qwen2, whose
    converter permutes nothing, and it never permutes DoRA magnitudes (one per output row).
    """
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    names = convert_weights.tune_to_peft_adapter_weights(
        adapter, **_head_args(config), head_dim=config.get("head_dim")
    )
    peft = {}
    for (key, value), name in zip(adapter.items(), names, strict=True):
        # layers.0.attn.q_proj.lora_b.weight or layers.0.attn.q_proj.magnitude
        module = key.removesuffix(".weight").split(".")[-2]
        per_output_row = key.endswith(("lora_b.weight", "magnitude"))
        if model_type in _GENERIC_TYPES and module in heads and per_output_row:
            value = _rope_rows_to_hf(value, heads[module], head_dim)
        peft[name] = value
    return peft


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """LoRA/DoRA modules by name (activation-checkpoint wrapper prefixes removed)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_a") and hasattr(module, "lora_b"):
            out[name.replace("_checkpoint_wrapped_module.", "")] = module
    return out


def lora_hparams(model: nn.Module) -> dict:
    """rank, alpha, dropout, use_dora and target modules, read off the model's LoRA modules."""
    modules = _lora_modules(model)
    ranks = {m.lora_a.out_features for m in modules.values()}
    alphas = {
        float(m.alpha) if hasattr(m, "alpha") else m.scaling * m.lora_a.out_features
        for m in modules.values()
    }
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(
            f"LoRA modules have mixed ranks {sorted(ranks)} or alphas {sorted(alphas)}; the PEFT "
            "format and the merged checkpoint need one rank and one alpha"
        )
    dropouts = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for m in modules.values()}
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    unknown = [t for t in targets if t not in _PEFT_TARGETS]
    if unknown:
        raise ValueError(
            f"LoRA on modules {unknown} has no PEFT name; known: {list(_PEFT_TARGETS)}"
        )
    return dict(
        rank=ranks.pop(),
        alpha=alphas.pop(),
        dropout=max(dropouts),
        use_dora=any(hasattr(m, "magnitude") for m in modules.values()),
        targets=targets,
    )


def peft_adapter_config(model: nn.Module, base_model_name_or_path: str | None) -> dict:
    """PEFT ``adapter_config.json`` contents for the LoRA adapters of ``model``."""
    hp = lora_hparams(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": hp["rank"],
        "lora_alpha": hp["alpha"],
        "lora_dropout": hp["dropout"],
        "target_modules": [_PEFT_TARGETS[t] for t in hp["targets"]],
        "use_dora": hp["use_dora"],
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
