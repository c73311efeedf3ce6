"""Evaluate models, GRPO checkpoints and LoRA adapters on one task: a table, a plot, every sample.

    tune run recipes/evaluate.py --config tune_configs/eval_smollm2_arithmetic_cpu.yaml
    tune run recipes/evaluate.py --config tune_configs/eval_smollm2_arithmetic_cpu.yaml \
        'models=[{name: trained, path: /tmp/demo_run}]' sampling.num_samples=8 sampling.temperature=0.7

For each entry of ``models`` (an HF directory, a checkpoint of recipes/grpo.py, or a PEFT
adapter on a base model; see packrl/evaluation/models.py), in order:
  1. build the config's ``model`` and load the entry's weights (adapters merged in);
  2. sample ``sampling.num_samples`` completions for every row of the task's ``split``
     (greedy at temperature 0), in chunks of prompts, with the config's ``sampler``;
  3. score them with the task's reward functions (or the config's ``rewards``) and save
     every sample to ``samples/<name>.jsonl`` as each chunk finishes;
  4. compute mean reward, accuracy, pass@k, the breakdown by difficulty and by question,
     completion lengths and the share truncated.
Then write ``results.json``, ``results.md`` (one row per model) and
``accuracy_by_difficulty.png``. A rerun with the same config resumes from the saved samples.
Sampling, scoring and the numbers are the GRPO recipe's periodic eval
(``packrl.evaluation.evaluate_prompts`` + ``eval_metrics``): the same seed, rows and settings
give the same numbers. Metrics are defined in docs/evaluation.md.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from tqdm.auto import tqdm

from packrl.evaluation.config import EVAL_SCHEMA
from packrl.evaluation.metrics import difficulty_column, eval_metrics
from packrl.evaluation.models import ModelSource, load_weights, resolve_model
from packrl.evaluation.pass_at_k import default_ks
from packrl.evaluation.report import markdown_report, plot_accuracy_by_difficulty
from packrl.evaluation.run import evaluate_prompts
from packrl.evaluation.samples import SampleStore
from packrl.rewards import TrainerState
from packrl.training.components import build_scorer, instantiate
from packrl.training.config_schema import ConfigError, validate_config, with_defaults

log = utils.get_logger("INFO")


class EvalRecipe:
    """Evaluation recipe: `setup`, `evaluate`, `cleanup` (torchtune style).

    The config is read here and in `setup` only; its defaults live in the schema
    (`packrl.evaluation.config.EVAL_SCHEMA`). Every model entry, the task and the sampling
    settings are checked in `setup`, before the first model is loaded.
    """

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg, EVAL_SCHEMA)
        self.cfg = cfg = with_defaults(cfg, EVAL_SCHEMA)
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"device={cfg.device!r}, but torch sees no CUDA device; set device=cpu"
            )
        self.device = utils.get_device(cfg.device)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.output_dir = Path(cfg.output_dir)
        self.seed = cfg.seed
        self.sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
        n = self.sampling["num_samples"]
        self.ks = default_ks(n) if cfg.pass_at_k is None else list(cfg.pass_at_k)
        bad = [
            k for k in self.ks if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n
        ]
        if bad:
            raise ConfigError(
                f"'pass_at_k' {bad}: every k must be an int in 1..sampling.num_samples ({n}); "
                "pass@k needs at least k samples per problem"
            )
        self.resume, self.plot = cfg.resume, cfg.plot
        self.prompts_per_chunk = cfg.prompts_per_chunk

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        models = OmegaConf.to_container(cfg.models, resolve=True)
        if not models:
            raise ConfigError("'models' is empty: list at least one {name, path} entry")
        self.sources = [resolve_model(entry, i) for i, entry in enumerate(models)]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"'models': names must differ (they name files), got {names}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = instantiate(cfg, "tokenizer")
        self.task = _instantiate_task(cfg)
        rows = list(self.task.eval if cfg.split == "eval" else self.task.train)
        self.rows = rows[: cfg.num_rows] if cfg.num_rows is not None else rows
        if not self.rows:
            raise ConfigError(
                f"task {self.task.name!r} has no {cfg.split} rows; set split: train, or give "
                "the task an eval split (e.g. its eval_path or n_eval)"
            )
        if self.task.validate_rows is not None:  # e.g. a gold answer that does not parse
            bad = [(i, why) for i, why in enumerate(self.task.validate_rows(self.rows)) if why]
            if bad:
                raise ConfigError(
                    f"task {self.task.name!r} ({cfg.task._component_}): {len(bad)} bad "
                    f"{cfg.split} rows, e.g. row {bad[0][0]}: {bad[0][1]}"
                )
        self.prompt_ids = [
            self.tokenizer.tokenize_messages(r["messages"], add_generation_prompt=True)
            for r in self.rows
        ]
        self.column = difficulty_column(self.rows, cfg.difficulty_key)
        if self.column is not None and all(r.get(self.column) is None for r in self.rows):
            raise ConfigError(
                f"'difficulty_key'={self.column!r}: no row of task {self.task.name!r} has that "
                f"column (it has {sorted(self.rows[0])}); use auto or null"
            )
        self.scorer = build_scorer(cfg, self.task, self.tokenizer.decode)
        self.settings = {
            "task": self.task.name,
            "split": cfg.split,
            "prompts": _digest(self.prompt_ids),
            "num_rows": len(self.rows),
            "sampling": self.sampling,
            "seed": self.seed,
            "rewards": list(self.scorer.rewards.names),
            "weights": list(self.scorer.rewards.weights),
            "model_component": cfg.model._component_,
            "dtype": cfg.dtype,
        }
        log.info(
            f"eval: {len(self.sources)} model(s) on task {self.task.name!r}, "
            f"{len(self.rows)} {cfg.split} rows x {self.sampling['num_samples']} samples "
            f"(temperature {self.sampling['temperature']}), output {self.output_dir}"
        )

    def _load(self, source: ModelSource) -> tuple[torch.nn.Module, Any]:
        """The entry's model (weights loaded, eval mode) and a sampler serving it."""
        with training.set_default_dtype(self.dtype), self.device:
            model = instantiate(self.cfg, "model")
        load_weights(model, source)
        model.eval().requires_grad_(False)
        section = self.cfg.sampler
        extra = {}
        target = config._utils._get_component_from_path(section._component_)
        reads_files = "checkpoint_dir" in _parameters(target)  # vLLM starts from files
        if reads_files and section.get("checkpoint_dir") is None:
            extra["checkpoint_dir"] = str(source.weights_dir)
        sampler = instantiate(
            self.cfg,
            "sampler",
            model,
            stop_token_ids=list(self.tokenizer.stop_token_ids),
            pad_id=self.tokenizer.pad_id,
            **extra,
        )
        if reads_files and (source.kind == "adapter" or not extra):
            sampler.sync_weights(model)  # files other than these weights: serve the model's
        return model, sampler

    # -------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict[str, dict[str, Any]]:
        """Evaluate every model (resuming from saved samples); returns name -> metrics."""
        self.results: dict[str, dict[str, Any]] = {}
        n = self.sampling["num_samples"]
        for source in self.sources:
            store = SampleStore(
                self.output_dir / "samples" / f"{source.name}.jsonl",
                {**self.settings, "model": source.describe()},
                resume=self.resume,
            )
            done = store.load(self.rows, self.prompt_ids, n)
            bar = tqdm(
                total=len(self.rows) * n, initial=len(done) * n, desc=source.name, unit="sample"
            )
            if done:
                log.info(f"{source.name}: resuming, {len(done)} of {len(self.rows)} prompts saved")
            model = sampler = None
            if len(done) < len(self.rows):
                model, sampler = self._load(source)
            try:
                groups = evaluate_prompts(
                    sampler,
                    self.scorer,
                    self.rows,
                    self.prompt_ids,
                    seed=self.seed,
                    trainer_state=TrainerState(global_step=source.step or 0),
                    prompts_per_chunk=self.prompts_per_chunk,
                    done=done,
                    on_groups=functools.partial(store.append, difficulty_column=self.column),
                    progress=bar,
                    **self.sampling,
                )
            finally:
                bar.close()
                if sampler is not None:
                    sampler.close()
                del model, sampler
                gc.collect()
            self.results[source.name] = {
                "model": source.describe(),
                **eval_metrics(groups, self.ks, self.column),
            }
            self._write()
        return self.results

    def _write(self) -> None:
        (self.output_dir / "results.json").write_text(
            json.dumps(self.results, indent=2, default=float) + "\n"
        )
        title = f"{self.task.name}, {self.cfg.split} split"
        (self.output_dir / "results.md").write_text(markdown_report(self.results, title))

    def cleanup(self) -> None:
        plot = None
        if self.plot and self.results:
            plot = plot_accuracy_by_difficulty(
                self.results,
                self.output_dir / "accuracy_by_difficulty.png",
                title=f"{self.task.name} ({self.sampling['num_samples']} samples, "
                f"temperature {self.sampling['temperature']})",
            )
        print(markdown_report(self.results), flush=True)
        print(f"results: {self.output_dir / 'results.json'} and results.md")
        print(f"samples: {self.output_dir / 'samples'}/<model>.jsonl")
        if plot is not None:
            print(f"plot:    {plot}", flush=True)


def _parameters(target: Any) -> set[str]:
    try:
        return set(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return set()


def _digest(value: Any) -> str:
    """SHA-256 of a JSON value: which prompts were evaluated, in a few bytes."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _instantiate_task(cfg: DictConfig) -> Any:
    """The task; a bad file (missing, not a puzzle set, bad rows) is a ConfigError naming
    the ``task`` keys whose paths the error mentions."""
    section = cfg.task
    try:
        return config.instantiate(section)
    except (ValueError, OSError) as e:
        paths = [
            f"task.{k}={v}"
            for k, v in section.items()
            if k != "_component_"
            and isinstance(v, str)
            and ("/" in v or Path(v).suffix)
            and Path(v).name in str(e)
        ]
        where = ", ".join(paths) or f"task ({section._component_})"
        raise ConfigError(f"{where}: {e}") from e


@config.parse
def recipe_main(cfg: DictConfig) -> int:
    """Evaluate the config's models on its task (see the module docstring)."""
    config.log_config(recipe_name="EvalRecipe", cfg=cfg)
    recipe = EvalRecipe(cfg)
    recipe.setup()
    recipe.evaluate()
    recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
