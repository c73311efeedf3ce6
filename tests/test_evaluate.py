"""The evaluation library (packrl.evaluation) and the eval recipe in-process, on tiny models:
pass@k against hand-computed values, the metrics and question kinds, adapters merged as the
checkpoint writer merges them, start-up errors that name the config field, resuming after an
interruption, and the GRPO recipe's eval giving the eval recipe's numbers."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_ARCH
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torchtune.models.llama3_2 import lora_llama3_2

from packrl.checkpointing import save_checkpoint
from packrl.evaluation import default_ks, eval_metrics, eval_seed, evaluate_prompts, pass_at_k
from packrl.evaluation import run as eval_run
from packrl.evaluation.models import merge_adapter, resolve_model
from packrl.evaluation.pass_at_k import mean_pass_at_k
from packrl.evaluation.questions import question_kind, question_texts
from packrl.models.smollm2 import load_hf_checkpoint
from packrl.rollout.base import Completion
from packrl.rollout.collect import prompt_seed
from packrl.rollout.group import GroupRollout
from packrl.tasks.temporal_clue.files import read_puzzles
from packrl.tasks.temporal_clue.task import puzzle_rows
from packrl.training.config_schema import ConfigError
from recipes.evaluate import EvalRecipe
from recipes.grpo import GRPORecipe

ARITH_EVAL = ROOT / "tune_configs/eval_smollm2_arithmetic_cpu.yaml"
TC_EVAL = ROOT / "tune_configs/eval_smollm2_temporal_clue_cpu.yaml"
TINY_MODEL = {"_component_": "torchtune.models.llama3_2.llama3_2", **TINY_ARCH}


# ---------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 2 / 5),  # pass@1 is the share correct
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3)
        (5, 2, 4, 1.0),  # only 3 wrong samples: every 4-subset holds a right one
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (8, 0, 8, 0.0),
        (8, 8, 1, 1.0),
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_matches_binomials_and_rejects_k_above_n():
    n, c, k = 200, 7, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert mean_pass_at_k([(5, 2), (4, 1)], 2) == pytest.approx((0.7 + 0.5) / 2)
    assert math.isnan(mean_pass_at_k([], 1))
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


# --------------------------------------------------------------------------------- metrics
def _group(row: dict, texts: list[str], accuracy: list[float], index: int = 0) -> GroupRollout:
    return GroupRollout(
        prompt_ids=[1, 2],
        completions=[Completion([5] * (i + 1), [], i % 2 == 0, t) for i, t in enumerate(texts)],
        index=index,
        row=row,
        rewards={"r": list(accuracy)},
        reward=list(accuracy),
        accuracy=list(accuracy),
        reward_failures={"r": 0},
    )


def test_eval_metrics_by_difficulty_and_question_on_real_puzzles():
    p1 = puzzle_rows(ROOT / "puzzles/validation.jsonl", players=[1], limit=1)[0]
    p2 = puzzle_rows(ROOT / "puzzles/validation.jsonl", players=[2], limit=1)[0]
    key1 = p1["solution"]
    letters = list(key1)
    right = "\n".join(f"{x}. {key1[x]}" for x in letters)
    one_wrong = "\n".join(f"{x}. {key1[x] if x != letters[0] else 'Nobody'}" for x in letters)
    hedged = "\n".join(f"{x}. {key1[x]} or maybe not" for x in letters)
    groups = [
        _group(p1, [right, one_wrong, hedged, "no answer"], [1.0, 2 / 3, 0.0, 0.0], 0),
        _group(p2, ["nothing", "nothing", "nothing", "nothing"], [0.0, 0.0, 0.0, 0.0], 1),
    ]
    m = eval_metrics(groups)
    assert m["accuracy"] == pytest.approx((1 + 2 / 3) / 8)
    assert m["pass@1"] == pytest.approx((1 / 4 + 0) / 2)  # one fully right sample of 4
    assert m["pass@2"] == pytest.approx((1 - 3 / 6) / 2)  # 1 - C(3,2)/C(4,2)
    assert m["pass@4"] == pytest.approx(0.5)
    assert m["completion_len/mean"] == pytest.approx(2.5) and m["truncated_frac"] == 0.5
    assert m["by_difficulty"]["column"] == "players"
    levels = m["by_difficulty"]["levels"]
    assert list(levels) == ["1", "2"]
    assert levels["1"]["accuracy"] == pytest.approx((1 + 2 / 3) / 4) and levels["2"]["pass@4"] == 0
    q = m["by_question"]
    kinds1, kinds2 = (
        [question_kind(t) for t in question_texts(p["messages"][-1]["content"]).values()]
        for p in (p1, p2)
    )
    assert len(kinds1) == len(letters) and "other" not in kinds1 + kinds2
    for kind in set(kinds1 + kinds2):
        # sample 0 answers every question right, sample 1 all but the first; puzzle 2: none
        right = 2 * kinds1.count(kind) - (kind == kinds1[0])
        asked = 4 * (kinds1.count(kind) + kinds2.count(kind))
        assert q[kind] == {"questions": asked, "accuracy": pytest.approx(right / asked)}, kind
    with pytest.raises(ValueError, match="every k"):
        eval_metrics(groups, ks=[5])


def test_question_kinds_match_every_shipped_puzzle():
    files = sorted((ROOT / "puzzles").rglob("*.jsonl"))
    assert files
    for path in files:
        for rec in read_puzzles(path):
            texts = question_texts(rec["prompt"])
            assert {q["letter"]: q["kind"] for q in rec["questions"]} == {
                x: question_kind(t) for x, t in texts.items()
            }, rec["id"]


def test_eval_seed_is_the_grpo_recipes_eval_seed():
    for seed, i in [(0, 0), (0, 7), (123, 49)]:
        assert eval_seed(seed, i) == prompt_seed(seed, -1, i)


# -------------------------------------------------------------------------------- adapters
def _lora_model(model_dir: Path, use_dora: bool):
    torch.manual_seed(1)
    model = lora_llama3_2(
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        lora_rank=4,
        lora_alpha=8.0,
        use_dora=use_dora,
        **TINY_ARCH,
    )
    load_hf_checkpoint(model, model_dir)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or n.endswith("magnitude"):
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_merge_equals_the_checkpoint_writers_merge(tiny_model_dir, tmp_path, use_dora):
    """PEFT adapter + base merged by the eval code == the merged model.safetensors that
    save_checkpoint writes for the same LoRA/DoRA model (torchtune's merge, tune layout)."""
    model = _lora_model(tiny_model_dir, use_dora)
    step = save_checkpoint(tmp_path / "out", 3, model=model, source_checkpoint_dir=tiny_model_dir)
    config = json.loads((step / "adapter_config.json").read_text())
    ours = merge_adapter(
        load_file(tiny_model_dir / "model.safetensors"),
        load_file(step / "adapter_model.safetensors"),
        config,
    )
    written = load_file(step / "model.safetensors")
    assert set(ours) == set(written)
    changed = 0
    for k, v in written.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(v, load_file(tiny_model_dir / "model.safetensors")[k])
    assert changed >= 2 * 7  # every adapted weight of both layers moved
    # As a PEFT dir (the adapter files copied elsewhere), base from adapter_config.json:
    peft = tmp_path / "peft"
    peft.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(step / name, peft / name)
    source = resolve_model({"name": "lora", "path": str(peft)}, 0)
    assert source.kind == "adapter" and source.weights_dir == Path(tiny_model_dir).resolve()


def test_model_sources_resolve_every_layout(tiny_model_dir, tmp_path):
    full = _lora_model(tiny_model_dir, use_dora=False)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 2, model=full, source_checkpoint_dir=tiny_model_dir)
    save_checkpoint(
        run / "checkpoints", 4, model=full, source_checkpoint_dir=tiny_model_dir, adapter_only=True
    )
    hf = resolve_model({"name": "a", "path": str(tiny_model_dir)}, 0)
    assert (hf.kind, hf.step) == ("hf", None)
    latest = resolve_model({"name": "b", "path": str(run)}, 1)  # a run's output_dir
    assert (latest.kind, latest.step, latest.adapter_dir.name) == ("adapter", 4, "step_4")
    step2 = resolve_model({"name": "c", "path": str(run / "checkpoints/step_2")}, 2)
    assert (step2.kind, step2.step, step2.weights_dir.name) == ("checkpoint", 2, "step_2")


def test_bad_model_entries_name_the_field(tiny_model_dir, smollm2_dir, tmp_path):
    def error(entry, index=0):
        with pytest.raises(ConfigError) as e:
            resolve_model(entry, index)
        return str(e.value)

    assert "'models[0].path'" in error({"name": "x", "path": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    assert "'models[1].path'" in error({"name": "x", "path": str(tmp_path / "empty")}, 1)
    assert "no config.json" in error({"name": "x", "path": str(tmp_path / "empty")})
    assert "'models[0].name'" in error({"name": "a/b", "path": str(tiny_model_dir)})
    assert "unknown keys ['adapter']" in error({"name": "x", "path": "/", "adapter": "/"})
    # A tiny model's adapter on SmolLM2: shapes do not fit; the error names path and base.
    step = save_checkpoint(
        tmp_path / "out",
        1,
        model=_lora_model(tiny_model_dir, use_dora=False),
        source_checkpoint_dir=tiny_model_dir,
        adapter_only=True,
    )
    msg = error({"name": "x", "path": str(step), "base": str(smollm2_dir)}, 2)
    assert "do not fit the base weight" in msg and "'models[2].base'" in msg
    assert "'models[2].path'" in msg
    # base is for adapters: on a full checkpoint it is an error
    full = save_checkpoint(
        tmp_path / "full",
        1,
        model=_lora_model(tiny_model_dir, False),
        source_checkpoint_dir=tiny_model_dir,
    )
    assert "'models[0].base' is set" in error(
        {"name": "x", "path": str(full), "base": str(tiny_model_dir)}
    )


# ------------------------------------------------------------------- the recipe in-process
def _eval_cfg(out: Path, models: list[dict], model_dir: Path, **overrides):
    cfg = OmegaConf.load(ARITH_EVAL)
    settings = {
        "model_dir": str(model_dir),
        "output_dir": str(out),
        "models": models,
        "model": TINY_MODEL,
        "task.n_train": 20,
        "task.n_eval": 4,
        "sampler.compile": False,
        "sampling.num_samples": 2,
        "sampling.max_new_tokens": 8,
        "plot": False,
        **overrides,
    }
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _run(cfg) -> dict:
    recipe = EvalRecipe(cfg)
    recipe.setup()
    results = recipe.evaluate()
    recipe.cleanup()
    return results


def _samples(out: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]


def test_start_up_errors_name_the_field(tiny_model_dir, tmp_path):
    models = [{"name": "tiny", "path": str(tiny_model_dir)}]
    math_file = tmp_path / "math.jsonl"
    math_file.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    cfg = _eval_cfg(
        tmp_path / "a",
        models,
        tiny_model_dir,
        task={
            "_component_": "packrl.tasks.temporal_clue.temporal_clue_task",
            "train_path": str(ROOT / "puzzles/validation.jsonl"),
            "eval_path": str(math_file),
        },
    )
    with pytest.raises(ConfigError, match=r"task.eval_path=.*math.jsonl.*field 'solution'"):
        EvalRecipe(cfg).setup()
    with pytest.raises(ConfigError, match="'pass_at_k'"):
        EvalRecipe(_eval_cfg(tmp_path / "b", models, tiny_model_dir, pass_at_k=[1, 4]))
    with pytest.raises(ConfigError, match=r"models\[1\].path"):
        bad = [*models, {"name": "gone", "path": str(tmp_path / "gone")}]
        EvalRecipe(_eval_cfg(tmp_path / "c", bad, tiny_model_dir)).setup()
    with pytest.raises(ConfigError, match="'sampling.temperature'"):
        EvalRecipe(
            _eval_cfg(tmp_path / "d", models, tiny_model_dir, **{"sampling.temperature": -1})
        )


def test_shipped_eval_configs_set_up(smollm2_dir, tmp_path):
    """Both shipped configs validate and load their task (no model is built in setup)."""
    for path, rows, column in ((ARITH_EVAL, 100, "difficulty"), (TC_EVAL, 11, "players")):
        cfg = OmegaConf.load(path)
        OmegaConf.update(cfg, "model_dir", str(smollm2_dir), merge=False)
        OmegaConf.update(cfg, "output_dir", str(tmp_path / path.stem), merge=False)
        OmegaConf.update(cfg, "models", [{"name": "base", "path": str(smollm2_dir)}], merge=False)
        recipe = EvalRecipe(cfg)
        recipe.setup()
        assert (len(recipe.rows), recipe.column) == (rows, column)


def test_interrupted_evaluation_resumes_from_saved_samples(tiny_model_dir, tmp_path, monkeypatch):
    models = [{"name": "tiny", "path": str(tiny_model_dir)}]
    chunked = {"prompts_per_chunk": 1, "sampling.temperature": 1.0}
    whole = _run(_eval_cfg(tmp_path / "whole", models, tiny_model_dir, **chunked))["tiny"]

    calls = []
    real = eval_run.collect_rollouts

    def counting(sampler, scorer, rows, *args, **kwargs):
        calls.append(len(rows))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while generating the third prompt
        return real(sampler, scorer, rows, *args, **kwargs)

    monkeypatch.setattr(eval_run, "collect_rollouts", counting)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _run(_eval_cfg(out, models, tiny_model_dir, **chunked))
    assert [r["prompt_index"] for r in _samples(out, "tiny")] == [0, 0, 1, 1]
    with (out / "samples/tiny.jsonl").open("a") as f:
        f.write('{"prompt_index": 2, "sample": 0, "compl')  # a line cut by the kill
    calls.clear()
    resumed = _run(_eval_cfg(out, models, tiny_model_dir, **chunked))["tiny"]
    assert calls == [1, 1]  # only prompts 2 and 3 were sampled again
    for key in ("accuracy", "reward/mean", "pass@1", "pass@2", "completion_len/mean"):
        assert resumed[key] == whole[key], key
    saved = _samples(out, "tiny")
    assert [r["prompt_index"] for r in saved] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r["completion"] for r in saved] == [
        r["completion"] for r in _samples(tmp_path / "whole", "tiny")
    ]
    # Other settings never mix with the saved samples: an error names what changed.
    with pytest.raises(ConfigError, match="temperature.*resume: false"):
        _run(_eval_cfg(out, models, tiny_model_dir, prompts_per_chunk=1))
    calls.clear()
    _run(_eval_cfg(out, models, tiny_model_dir, **chunked))
    assert calls == []  # all saved: nothing sampled


def test_grpo_recipe_eval_equals_eval_recipe_on_its_checkpoint(tiny_model_dir, tmp_path):
    """The training recipe's periodic eval and the eval recipe, on the checkpoint it saved
    after one step, with the same seed, rows and settings (4 rows x 2 samples at T=1),
    give the same numbers; so does evaluate_prompts on the recipe's own sampler."""
    settings = {
        "model_dir": str(tiny_model_dir),
        "output_dir": str(tmp_path / "run"),
        "model": TINY_MODEL,
        "seed": 3,
        "max_steps": 1,
        "task.n_train": 20,
        "task.n_eval": 4,
        "sampler.compile": False,
        "grpo.prompts_per_step": 2,
        "grpo.group_size": 4,
        "grpo.max_new_tokens": 8,
        "grpo.drop_uniform_groups": False,
        "packing.row_len": 128,
        "packing.tokens_per_micro_batch": 128,
        "optimizer.lr": 1e-2,
        "rewards.reward_funcs": ["recipe_test_rewards.distinct_chars"],
        "eval.num_samples": 2,
        "eval.temperature": 1.0,
        "eval.max_new_tokens": 8,
        "enable_activation_checkpointing": False,
        "mixed_precision": None,  # the trainer's evaluation and evaluate.py's on one path
        "sampler.dtype": "fp32",
    }
    cfg = OmegaConf.load(ROOT / "tune_configs/smollm2_135m_arithmetic_full_cpu.yaml")
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    grpo = GRPORecipe(cfg)
    grpo.setup()
    grpo.train_step()
    grpo.step += 1
    step_dir = grpo.save_checkpoint()
    training = grpo.evaluate()
    rows = list(grpo.task.eval)
    groups = evaluate_prompts(
        grpo.sampler,
        grpo.scorer,
        rows,
        grpo.prompt_ids(rows),
        seed=grpo.seed,
        num_samples=2,
        max_new_tokens=8,
        temperature=1.0,
    )
    direct = eval_metrics(groups)
    one_by_one = evaluate_prompts(
        grpo.sampler,
        grpo.scorer,
        rows,
        grpo.prompt_ids(rows),
        seed=grpo.seed,
        num_samples=2,
        max_new_tokens=8,
        temperature=1.0,
        prompts_per_chunk=1,
    )
    assert [c.token_ids for g in one_by_one for c in g.completions] == [
        c.token_ids for g in groups for c in g.completions
    ]  # chunking changes no sample
    if getattr(grpo, "run_lock", None) is not None:
        grpo.run_lock.release()

    cfg = _eval_cfg(
        tmp_path / "eval",
        [{"name": "step_1", "path": str(step_dir)}],
        tiny_model_dir,
        seed=3,
        rewards={
            "_component_": "packrl.rewards.RewardScorer",
            "reward_funcs": ["recipe_test_rewards.distinct_chars"],
        },
        **{"sampling.temperature": 1.0},
    )
    ours = _run(cfg)["step_1"]
    assert training["eval/accuracy_sampled"] == ours["accuracy"] == direct["accuracy"]
    assert training["eval/reward_sampled"] == ours["reward/mean"] == direct["reward/mean"]
    assert ours["reward/mean"] > 0 and ours["model"]["step"] == 1
    # The numbers are those of the trained weights, not the source model's.
    base = _run(
        _eval_cfg(
            tmp_path / "base",
            [{"name": "base", "path": str(tiny_model_dir)}],
            tiny_model_dir,
            seed=3,
            rewards=cfg.rewards,
            **{"sampling.temperature": 1.0},
        )
    )["base"]
    trained_text = [r["completion"] for r in _samples(tmp_path / "eval", "step_1")]
    base_text = [r["completion"] for r in _samples(tmp_path / "base", "base")]
    assert trained_text != base_text and base["prompts"] == 4
