"""Convert a llama-architecture GGUF file into a Hugging Face model directory.

The directory holds what torchtune's ``FullModelHFCheckpointer``, transformers and vLLM read:
``model.safetensors`` (fp32, HF ``LlamaForCausalLM`` key names), ``config.json``,
``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat
template stored in the GGUF).
"""

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

# GGUF tensor names -> HF LlamaForCausalLM names ("{i}" is the layer index).
_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# llama.cpp pre-tokenizer names -> the splits it applies before the GPT-2 regex.
_PRE_TOKENIZERS = {
    "gpt2": [],
    "smollm": [pre_tokenizers.Digits(individual_digits=True)],
}

_TOKEN_TYPE_CONTROL = 3


def _field(reader: gguf.GGUFReader, key: str, default=KeyError):
    if key in reader.fields:
        return reader.fields[key].contents()
    if default is KeyError:
        raise KeyError(f"GGUF file has no metadata field {key!r}")
    return default


def hf_name(gguf_name: str) -> str:
    """HF LlamaForCausalLM key for a GGUF tensor name."""
    if gguf_name in _TOP_KEYS:
        return _TOP_KEYS[gguf_name]
    blk, layer, kind, suffix = gguf_name.split(".")
    if blk != "blk" or kind not in _LAYER_KEYS:
        raise KeyError(f"unknown GGUF tensor name {gguf_name!r}")
    return f"model.layers.{layer}.{_LAYER_KEYS[kind]}.{suffix}"


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's half-split layout).

    llama.cpp reorders each head's rows from [x0..x_{d/2-1}, y0..y_{d/2-1}] to
    [x0, y0, x1, y1, ...]. w: [n_heads * head_dim, dim] -> same shape, HF row order.
    """
    out_dim, dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def convert_weights(reader: gguf.GGUFReader) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to fp32 and return an HF-named state dict."""
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv_heads = int(_field(reader, "llama.attention.head_count_kv"))
    state_dict = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False):
        # GGUF shapes list the fastest-moving dimension first; numpy's is [rows, cols].
        shape = tuple(int(d) for d in reversed(t.shape))
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))  # own copy
        w = w.to(torch.float32).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_kv_heads)
        state_dict[hf_name(t.name)] = w.contiguous()
    return state_dict


def hf_config(reader: gguf.GGUFReader) -> dict:
    """config.json for LlamaForCausalLM from the GGUF's llama.* metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tied = "output.weight" not in {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "hidden_size": hidden,
        "head_dim": hidden // n_heads,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv")),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        # GGUF stores float32: 6 significant digits give back 1e-5 rather than 9.9999997e-6.
        "rms_norm_eps": float(f"{_field(reader, 'llama.attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "rope_scaling": None,
        "tie_word_embeddings": tied,
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def hf_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """Byte-level BPE tokenizer rebuilt from the GGUF vocab, merges and pre-tokenizer name."""
    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF tokenizer (tokenizer.ggml.model={kind!r}, "
            f"tokenizer.ggml.pre={pre!r}); supported: gpt2 with pre in {sorted(_PRE_TOKENIZERS)}"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *_PRE_TOKENIZERS[pre],
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are matched before BPE and never split.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _TOKEN_TYPE_CONTROL
        ]
    )
    return tok


def tokenizer_config(reader: gguf.GGUFReader, tokenizer: Tokenizer) -> dict:
    """tokenizer_config.json: special tokens and the GGUF's own chat template."""

    def token(key: str) -> str | None:
        token_id = _field(reader, key, None)
        return None if token_id is None else tokenizer.id_to_token(int(token_id))

    added = {
        str(i): {
            "content": t.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length")),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "added_tokens_decoder": added,
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write a complete HF model directory for ``gguf_path`` into ``out_dir`` (must exist)."""
    reader = gguf.GGUFReader(str(gguf_path))
    config = hf_config(reader)
    state_dict = convert_weights(reader)
    if config["tie_word_embeddings"]:
        state_dict.pop("lm_head.weight", None)
    save_file(state_dict, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = hf_tokenizer(reader)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    files = {
        "config.json": config,
        "tokenizer_config.json": tokenizer_config(reader, tokenizer),
        "generation_config.json": {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        },
    }
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
