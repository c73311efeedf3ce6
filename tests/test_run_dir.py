"""One run per output directory: the lock, the fresh-run rule, overwrite and resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from test_checkpointing import load_source, make_source, tiny

from packrl.checkpointing import (
    OutputDirError,
    claim_output_dir,
    latest_checkpoint,
    save_checkpoint,
)
from packrl.training.metrics import JsonlWriter

LOCK = ".packrl-run.lock"


@pytest.fixture()
def old_run(tmp_path):
    """An output dir as recipes/grpo.py leaves it after 2 steps: two checkpoints, metrics
    and completions."""
    src = make_source(tmp_path / "source")
    out = tmp_path / "run"
    model = load_source(tiny(), src)
    for step in (1, 2):
        save_checkpoint(out / "checkpoints", step, model=model, source_checkpoint_dir=src)
    metrics = JsonlWriter(out / "metrics.jsonl")
    for step in (1, 2):
        metrics.write({"step": step, "reward/mean": 0.5})
    metrics.close()
    (out / "completions.jsonl").write_text(json.dumps({"step": 1, "completion": "4"}) + "\n")
    return out


def test_fresh_run_into_an_old_run_stops_and_names_what_is_there(old_run):
    with pytest.raises(OutputDirError) as e:
        claim_output_dir(old_run, resume=False, overwrite=False)
    msg = str(e.value)
    assert f"output_dir={old_run} already holds a run" in msg
    assert "checkpoints/ (2 step dirs step_1 .. step_2, latest: step_2)" in msg
    assert "metrics.jsonl (2 records, last step 2)" in msg
    assert "completions.jsonl (1 records, last step 1)" in msg
    assert "resume_from_checkpoint: true" in msg and "output_dir=<a new directory>" in msg
    assert "overwrite: true" in msg
    assert not (old_run / LOCK).exists()  # the refused run released its lock
    assert latest_checkpoint(old_run / "checkpoints") == old_run / "checkpoints" / "step_2"
    # the same directory resumes fine
    with claim_output_dir(old_run, resume=True, overwrite=False) as lock:
        assert lock.held and lock.moved_to is None and lock.stale is None
        record = json.loads((old_run / LOCK).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert not lock.held and not (old_run / LOCK).exists()


def test_overwrite_moves_the_old_run_aside(old_run, caplog):
    before = (old_run / "metrics.jsonl").read_text()
    with caplog.at_level("WARNING", logger="packrl.checkpointing"):
        lock = claim_output_dir(old_run, resume=False, overwrite=True)
    moved = lock.moved_to
    assert moved.parent == old_run and moved.name.startswith("overwritten-")
    assert f"moved the previous run in {old_run}" in caplog.text and str(moved) in caplog.text
    assert sorted(p.name for p in old_run.iterdir()) == [LOCK, moved.name]
    assert (moved / "metrics.jsonl").read_text() == before
    assert latest_checkpoint(moved / "checkpoints") == moved / "checkpoints" / "step_2"
    lock.release()
    # the moved-aside run does not count as a run in the directory
    claim_output_dir(old_run, resume=False, overwrite=False).release()


def test_resume_needs_a_checkpoint_and_contradictions_are_errors(tmp_path):
    with pytest.raises(OutputDirError, match="holds no checkpoint.*resume_from_checkpoint: false"):
        claim_output_dir(tmp_path / "new", resume=True, overwrite=False)
    with pytest.raises(ValueError, match="contradict"):
        claim_output_dir(tmp_path / "new", resume=True, overwrite=True)
    # an empty metrics file (a run that died before its first step) does not block
    (tmp_path / "new" / "metrics.jsonl").write_text("")
    claim_output_dir(tmp_path / "new", resume=False, overwrite=False).release()


def test_second_claim_in_the_same_process_is_refused(tmp_path):
    with claim_output_dir(tmp_path, resume=False, overwrite=False):
        with pytest.raises(OutputDirError, match=f"in use by another run \\(pid {os.getpid()}"):
            claim_output_dir(tmp_path, resume=False, overwrite=False)
    claim_output_dir(tmp_path, resume=False, overwrite=False).release()


def test_two_processes_and_a_stale_lock(tmp_path, caplog):
    """A live run in another process keeps this one out; once it is SIGKILLed its lock file
    stays behind, unlocked, and is reported as stale and taken over."""
    script = textwrap.dedent(
        f"""
        import sys
        from packrl.checkpointing import claim_output_dir
        lock = claim_output_dir({str(tmp_path)!r}, resume=False, overwrite=False)
        print("locked", flush=True)
        sys.stdin.readline()
        """
    )
    other = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "locked"
        host = socket.gethostname()
        with pytest.raises(OutputDirError, match=f"pid {other.pid} on host {host}, started"):
            claim_output_dir(tmp_path, resume=False, overwrite=False)
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == other.pid  # left behind
    with caplog.at_level("WARNING", logger="packrl.checkpointing"):
        lock = claim_output_dir(tmp_path, resume=False, overwrite=False)
    assert lock.stale["pid"] == other.pid
    assert f"taking over a stale lock (pid {other.pid} on host {host}" in caplog.text
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
