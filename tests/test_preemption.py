"""Preemption through `tune run`: SIGTERM mid-step finishes the step, checkpoints and exits 75,
and the resumed run reaches the same weights as an uninterrupted one (tiny random llama)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_ARCH, step_metrics, tune_env
from omegaconf import OmegaConf
from safetensors.torch import load_file

from packrl.training.preemption import PREEMPTED_EXIT_CODE

TUNE = str(Path(sys.executable).parent / "tune")
FULL = ROOT / "tune_configs/smollm2_135m_arithmetic_full_cpu.yaml"


def _config(tmp: Path, model_dir: Path, out: Path, **settings) -> Path:
    cfg = OmegaConf.load(FULL)
    values = {
        "model_dir": str(model_dir),
        "output_dir": str(out),
        "model": {"_component_": "torchtune.models.llama3_2.llama3_2", **TINY_ARCH},
        "max_steps": 4,
        "task.n_train": 40,
        "task.n_eval": 2,
        "grpo.prompts_per_step": 2,
        "grpo.group_size": 4,
        "grpo.max_new_tokens": 8,
        "grpo.drop_uniform_groups": False,
        "packing.row_len": 128,
        "packing.tokens_per_micro_batch": 128,
        "rewards.reward_funcs": ["recipe_test_rewards.distinct_chars"],
        "eval.at_start": False,
        "eval.every_n_steps": None,
        "save_every_n_steps": None,  # only the preemption checkpoint and the final one
        "keep_last_checkpoints": None,
        "enable_activation_checkpointing": False,
        "plot": False,
        **settings,
    }
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    path = tmp / f"{out.name}.yaml"
    OmegaConf.save(cfg, path)
    return path


def _run(config: Path, *extra: str, nproc: int = 1) -> subprocess.Popen:
    launch = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    log = config.with_suffix(".log").open("a")
    return subprocess.Popen(
        [TUNE, "run", *launch, "recipes/grpo.py", "--config", str(config), *extra],
        cwd=ROOT,
        env=tune_env(),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step}" / "model.safetensors"))


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_mid_step_checkpoints_and_resumes_exactly(tmp_path, tiny_model_dir, nproc):
    ref_out, run_out = tmp_path / "uninterrupted", tmp_path / "preempted"
    ref = _run(_config(tmp_path, tiny_model_dir, ref_out), nproc=nproc)
    run_cfg = _config(tmp_path, tiny_model_dir, run_out)
    run = _run(run_cfg, nproc=nproc)
    # SIGTERM once step 1 is logged, i.e. during step 2, to the whole process group (as
    # SLURM's scancel does: under torchrun every rank gets it, and torchrun forwards it too).
    deadline = time.monotonic() + 600
    while 1 not in (step_metrics(run_out) if (run_out / "metrics.jsonl").exists() else {}):
        assert run.poll() is None, run_cfg.with_suffix(".log").read_text()[-5000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGTERM)
    run.wait(timeout=600)
    log = run_cfg.with_suffix(".log").read_text()
    if nproc == 1:  # torchrun's own exit code reports that it was signalled
        assert run.returncode == PREEMPTED_EXIT_CODE, log[-5000:]
    latest = (run_out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.removeprefix("step_"))
    assert 1 <= stopped_at < 4 and "resume_from_checkpoint=true" in log, log[-5000:]
    assert ref.wait(timeout=600) == 0

    resumed = _run(run_cfg, "resume_from_checkpoint=true", nproc=nproc)
    assert resumed.wait(timeout=600) == 0, run_cfg.with_suffix(".log").read_text()[-5000:]
    a, b = _weights(ref_out, 4), _weights(run_out, 4)
    assert a.keys() == b.keys()
    for name in a:  # the resume tolerance of tests/test_recipe.py
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)
    assert step_metrics(run_out)[4]["loss/policy_loss"] == pytest.approx(
        step_metrics(ref_out)[4]["loss/policy_loss"], abs=1e-6
    )
