"""Resume tells you what changed: the config saved with a checkpoint, and the rule that sorts
a resume's changes into errors (the saved optimizer/scheduler state wins) and warnings."""

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_checkpointing import load_source, make_source, setup_training, tiny, train_step
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from packrl.checkpointing import (
    CheckpointError,
    ConfigChangeError,
    config_changes,
    load_checkpoint,
    save_checkpoint,
    saved_config,
)

DEMO = Path(__file__).resolve().parents[1] / "tune_configs/smollm2_135m_arithmetic_full_cpu.yaml"


@pytest.fixture()
def demo_config(monkeypatch, tmp_path):
    """The CPU demo's config, resolved to a plain dict as a recipe would save it."""
    monkeypatch.setenv("PACKRL_CACHE", str(tmp_path / "cache"))
    return OmegaConf.to_container(OmegaConf.load(DEMO), resolve=True)


def test_config_changes_follow_the_rule(demo_config):
    new = copy.deepcopy(demo_config)
    new["resume_from_checkpoint"] = True  # how to start: not compared
    new["resume_allow_changed"] = []
    new["optimizer"]["lr"] = 3e-5
    new["lr_scheduler"]["num_warmup_steps"] = 2
    new["max_steps"] = 30
    new["grpo"]["group_size"] = 4
    new["grpo"]["betas_typo"] = 1  # a key the saved config lacks
    del new["eval"]["num_samples"]
    diff = config_changes(demo_config, new)
    assert [c.key for c in diff.state_wins] == ["lr_scheduler.num_warmup_steps", "optimizer.lr"]
    assert [c.key for c in diff.changed] == [
        "eval.num_samples",
        "grpo.betas_typo",
        "grpo.group_size",
        "max_steps",
    ]
    assert str(diff.changed[0]) == "eval.num_samples: 1 -> (unset)"
    assert str(diff.changed[1]) == "grpo.betas_typo: (unset) -> 1"
    assert str(diff.changed[3]).startswith("max_steps: 15 -> 30 (also the LR schedule's length")

    with pytest.raises(ConfigChangeError) as e:
        diff.check()
    msg = str(e.value)
    assert "optimizer.lr: 1e-05 -> 3e-05" in msg
    assert "lr_scheduler.num_warmup_steps: 0 -> 2" in msg
    assert "resume_allow_changed: [lr_scheduler.num_warmup_steps]" in msg
    assert "max_steps" not in msg  # not an error
    with pytest.raises(ConfigChangeError, match="lr_scheduler.num_warmup_steps") as e:
        diff.check(["optimizer.lr"])
    assert "optimizer.lr" not in str(e.value)
    warning = diff.check(["optimizer", "lr_scheduler.num_warmup_steps"])  # prefix or key
    assert "max_steps: 15 -> 30" in warning and "grpo.group_size: 8 -> 4" in warning
    assert "optimizer.lr: 1e-05 -> 3e-05 (allowed; the saved state is kept)" in warning
    with pytest.raises(ValueError, match="resume_allow_changed lists 'max_steps'"):
        diff.check(["max_steps"])

    same = config_changes(demo_config, {**copy.deepcopy(demo_config), "overwrite": False})
    assert not same and same.check() is None
    # numbers as YAML may write them: 1e-5 and 0.00001 are the same value
    assert not config_changes({"optimizer": {"lr": 1e-5}}, {"optimizer": {"lr": 0.00001}})


def test_saved_state_wins_as_the_rule_says(tmp_path):
    """Why optimizer.* and lr_scheduler.* are errors: after load_checkpoint the optimizer runs
    with the saved lr and weight decay whatever the new config says, and a LambdaLR takes
    its new warmup argument on a schedule that is part-way through."""
    src = make_source(tmp_path / "source")
    model = load_source(tiny(), src)
    opt, sched = setup_training(model, lr=1e-2)  # warmup 5 of 20 steps
    for _ in range(3):
        train_step(model, opt, sched)
    kw = dict(optimizer=opt, lr_scheduler=sched)
    save_checkpoint(tmp_path / "out", 3, model=model, source_checkpoint_dir=src, **kw)
    fresh = tiny()
    params = [p for p in fresh.parameters() if p.requires_grad]
    new_opt = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.5)
    new_sched = get_cosine_schedule_with_warmup(new_opt, num_warmup_steps=1, num_training_steps=20)
    load_checkpoint(tmp_path / "out", model=fresh, optimizer=new_opt, lr_scheduler=new_sched)
    group = new_opt.param_groups[0]
    assert group["weight_decay"] == 0.01 and group["initial_lr"] == 1e-2
    assert group["lr"] == pytest.approx(1e-2 * 3 / 5)  # the saved warmup: step 3 of 5
    assert new_sched.base_lrs == [1e-2]
    new_opt.step()
    new_sched.step()
    assert new_opt.param_groups[0]["lr"] != pytest.approx(1e-2 * 4 / 5)  # not the old curve


def test_config_is_saved_with_the_checkpoint(tmp_path, demo_config):
    src = make_source(tmp_path / "source")
    model = load_source(tiny(), src)
    out = tmp_path / "out"
    step_dir = save_checkpoint(out, 1, model=model, source_checkpoint_dir=src, config=demo_config)
    meta = json.loads((step_dir / "packrl_checkpoint.json").read_text())
    assert "run_config.yaml" in meta["checksums"]
    assert saved_config(out) == demo_config == saved_config(step_dir)
    # it is a config `tune run --config` reads back as it was
    assert OmegaConf.to_container(OmegaConf.load(step_dir / "run_config.yaml")) == demo_config
    assert load_checkpoint(out, model=tiny())["config"] == demo_config
    assert not config_changes(saved_config(out), demo_config)

    plain = save_checkpoint(out, 2, model=model, source_checkpoint_dir=src)
    assert saved_config(plain) is None and not (plain / "run_config.yaml").exists()
    with pytest.raises(TypeError, match="config must hold only plain values"):
        save_checkpoint(out, 3, model=model, source_checkpoint_dir=src, config={"x": object()})
    with pytest.raises(TypeError, match="config must be a plain dict"):
        save_checkpoint(out, 3, model=model, source_checkpoint_dir=src, config=OmegaConf.create())
    assert not (out / "step_3").exists()
    (plain.parent / "step_1" / "run_config.yaml").write_text("seed: 1\n")
    with pytest.raises(CheckpointError, match="run_config.yaml is corrupt"):
        saved_config(out / "step_1")
