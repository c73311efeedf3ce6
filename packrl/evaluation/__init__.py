"""Evaluation of models, checkpoints and adapters on a task: the library behind
``recipes/evaluate.py`` and the GRPO recipe's periodic eval (docs/evaluation.md).

    pass_at_k.py  the unbiased pass@k estimator (Chen et al. 2021)
    questions.py  Temporal Clue per-question grades and question kinds
    metrics.py    eval_metrics: reward, accuracy, pass@k, by difficulty, by question, lengths
    run.py        evaluate_prompts: chunked collect_rollouts with resume hooks and seeds
    samples.py    SampleStore: every sample as JSONL, resuming from it
    models.py     resolve_model / load_weights: HF dirs, GRPO checkpoints, PEFT adapters
    report.py     the markdown table and the accuracy-by-difficulty plot
    config.py     EVAL_SCHEMA, the eval recipe's config keys
"""

from packrl.evaluation.metrics import eval_metrics, is_correct
from packrl.evaluation.pass_at_k import default_ks, mean_pass_at_k, pass_at_k
from packrl.evaluation.run import eval_seed, evaluate_prompts

__all__ = [
    "default_ks",
    "eval_metrics",
    "eval_seed",
    "evaluate_prompts",
    "is_correct",
    "mean_pass_at_k",
    "pass_at_k",
]
