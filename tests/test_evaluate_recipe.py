"""`tune run recipes/evaluate.py` as a user runs it, on the real SmolLM2-135M: one config with
each model kind (the base HF directory, a full GRPO checkpoint, a PEFT LoRA adapter on the
base), 2 arithmetic problems x 2 samples x 12 new tokens."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT, tune_env
from omegaconf import OmegaConf

from packrl.checkpointing import save_checkpoint
from packrl.models.smollm2 import load_hf_checkpoint, lora_smollm2_135m

TUNE = str(Path(sys.executable).parent / "tune")


def _lora_adapter(smollm2_dir: Path, out: Path) -> Path:
    """A PEFT adapter dir for SmolLM2 whose (random) adapters change its samples."""
    torch.manual_seed(0)
    model = lora_smollm2_135m(["q_proj", "v_proj"], lora_rank=8, lora_alpha=16)
    load_hf_checkpoint(model, smollm2_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0.0, 0.05)
    step = save_checkpoint(
        out / "run", 3, model=model, source_checkpoint_dir=smollm2_dir, adapter_only=True
    )
    peft = out / "peft"
    peft.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(step / name, peft / name)
    return peft


def _samples(out: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]


def test_tune_run_evaluates_base_full_checkpoint_and_lora_adapter(
    smollm2_dir, smollm2_model, tmp_path
):
    full = save_checkpoint(
        tmp_path / "full_run" / "checkpoints",
        7,
        model=smollm2_model,
        source_checkpoint_dir=smollm2_dir,
    )
    peft = _lora_adapter(smollm2_dir, tmp_path / "lora")
    out = tmp_path / "eval"
    cfg = OmegaConf.load(ROOT / "tune_configs/eval_smollm2_arithmetic_cpu.yaml")
    settings = {
        "model_dir": str(smollm2_dir),
        "output_dir": str(out),
        "models": [
            {"name": "base", "path": str(smollm2_dir)},
            {"name": "full", "path": str(full.parent.parent)},  # the run's output_dir
            {"name": "lora", "path": str(peft), "base": str(smollm2_dir)},
        ],
        "num_rows": 2,
        "sampler.compile": False,
        "sampling.num_samples": 2,
        "sampling.max_new_tokens": 12,
    }
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    config = tmp_path / "eval.yaml"
    OmegaConf.save(cfg, config)
    run = subprocess.run(
        [TUNE, "run", "recipes/evaluate.py", "--config", str(config)],
        cwd=ROOT,
        env=tune_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["base", "full", "lora"]
    assert [results[m]["model"]["kind"] for m in results] == ["hf", "checkpoint", "adapter"]
    assert results["full"]["model"]["step"] == 7
    for m in results.values():
        assert m["prompts"] == 2 and m["samples_per_prompt"] == 2
        assert {"accuracy", "reward/mean", "pass@1", "pass@2", "truncated_frac"} <= set(m)
        assert m["by_difficulty"]["column"] == "difficulty"
    base, full_samples, lora = (_samples(out, n) for n in ("base", "full", "lora"))
    assert len(base) == 4 and [r["prompt_index"] for r in base] == [0, 0, 1, 1]
    # The checkpoint holds the base weights: the same seeds give the very same tokens.
    assert [r["token_ids"] for r in full_samples] == [r["token_ids"] for r in base]
    # The adapter changes the model: its samples differ.
    assert [r["token_ids"] for r in lora] != [r["token_ids"] for r in base]
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in results)
    assert (out / "accuracy_by_difficulty.png").read_bytes()[:4] == b"\x89PNG"
    assert "sample/s" in run.stderr and "<" in run.stderr  # the progress bar and its ETA
