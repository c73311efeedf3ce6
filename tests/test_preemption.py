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
from conftest import ROOT, step_metrics, tiny_tune_config, tune_env
from safetensors.torch import load_file

from packrl.training.preemption import PREEMPTED_EXIT_CODE

TUNE = str(Path(sys.executable).parent / "tune")


def _config(tmp: Path, model_dir: Path, out: Path, **settings) -> Path:
    return tiny_tune_config(tmp / f"{out.name}.yaml", model_dir, out, max_steps=4,
                            save_every_n_steps=None, **settings)  # fmt: skip


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
