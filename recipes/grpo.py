"""GRPO on packed multi-prompt sequences, full fine-tuning or LoRA, on one device or many.

    tune run recipes/grpo.py --config tune_configs/smollm2_135m_arithmetic_full_cpu.yaml
    tune run --nproc_per_node 8 recipes/grpo.py --config tune_configs/<config>.yaml

Each step:
  1. take `prompts_per_step` rows from the task (seeded order, resumable position);
  2. sample `group_size` completions per prompt with the sampler (KV cache, no gradients);
  3. score them with the task's reward functions (TRL convention, weighted sum);
  4. group-relative advantages; optionally drop groups whose rewards are all equal;
  5. pack the groups into fixed-length rows (each prompt once per row, its completions after
     it) and run `num_passes` optimizer passes over them, in micro-batches of rows, with the
     clipped-surrogate loss (plus a k3 KL penalty to the reference when beta > 0);
  6. log, evaluate on held-out rows every `eval.every_n_steps`, checkpoint every
     `save_every_n_steps` and at the end.
Full fine-tuning or LoRA follows from the model component: a LoRA builder trains adapters only.

Under torchrun (FSDP2, see docs/distributed.md) every rank takes the same prompts, generates and
scores every world_size-th of them (per-prompt seeds, so the samples are those of one process),
and gathers all rollouts; each rank then packs the same batch and trains every world_size-th
row. The loss weights come from the whole batch, so the summed gradient equals one device's.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchtune import config, modules, training, utils
from torchtune.modules.peft import DoRALinear, get_adapter_params, set_trainable_params
from tqdm.auto import tqdm

from packrl.checkpointing import load_checkpoint, save_checkpoint
from packrl.models.weights import load_base_weights
from packrl.packed.attention import packed_block_mask, use_packed_attention
from packrl.packed.logprobs import packed_logprobs
from packrl.packed.packing import GroupRollout, PackedBatch, pack_groups
from packrl.rewards import RewardScorer, RewardScores, func_name
from packrl.rl.advantages import group_advantages, uniform_groups
from packrl.rl.loss import LossStats, completion_loss_weights, grpo_loss
from packrl.rl.reference import reference_for
from packrl.rollout.base import Completion
from packrl.training.config_schema import validate_config
from packrl.training.distributed import all_reduce, full_tensor, gather_objects, world
from packrl.training.metrics import JsonlWriter, mean_std, peak_memory, plot_metrics, read_metrics

log = utils.get_logger("INFO")


class Rollouts(NamedTuple):
    """A step's generated and scored completions, prompt-major."""

    completions: list[list[Completion]]  # [P][G]
    texts: list[str]  # [P * G]
    scores: RewardScores  # [P * G] each
    accuracy: torch.Tensor  # [P * G]
    generation_s: float  # this rank's time in the sampler
    scoring_s: float  # this rank's scoring, plus waiting for and gathering the other ranks


class GRPORecipe:
    """GRPO recipe: `setup`, `train`, `save_checkpoint`, `cleanup` (torchtune style)."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)  # every key known and typed, before anything heavy is built
        self.cfg = cfg
        self.device = utils.get_device(cfg.device)  # under torchrun: this rank's device
        if training.is_distributed() and not dist.is_initialized():  # launched by torchrun
            dist.init_process_group(
                training.get_distributed_backend(
                    self.device.type, offload_ops_to_cpu=self.device.type != "cpu"
                )  # GPU: NCCL, plus gloo for CPU tensors (gathered objects); CPU: gloo
            )
        self.world_size, self.rank = world()
        self.is_rank_zero = self.rank == 0
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.output_dir = Path(cfg.output_dir)
        # Data order and sampling seeds follow rank 0's seed on every rank (seed: null draws one).
        self.seed = gather_objects(training.set_seed(cfg.seed))[0]
        self.max_steps = cfg.max_steps
        g = cfg.grpo
        self.prompts_per_step = g.prompts_per_step
        self.group_size = g.group_size
        self.max_new_tokens = g.max_new_tokens
        self.temperature = g.get("temperature", 1.0)
        self.beta = g.get("beta", 0.0)
        self.num_passes = g.get("num_passes", 1)
        self.loss_type = g.get("loss_type", "grpo")
        self.row_len = cfg.packing.row_len
        self.tokens_per_micro_batch = cfg.packing.get("tokens_per_micro_batch", self.row_len)
        self.step = 0  # optimizer steps taken == rollout steps done
        self.data_position = 0  # training rows consumed so far

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        model_dir = cfg.get("model_dir")
        if model_dir is not None and not Path(model_dir).is_dir():
            raise FileNotFoundError(
                f"model_dir={model_dir} does not exist. For SmolLM2 run "
                "`python tools/prepare_smollm2.py` (setup.sh does); for Qwen2.5 download the HF "
                "model there (see the config's header), or set model_dir=<your HF model dir>."
            )
        if self.world_size > 1 and cfg.grpo.get("reference_on_cpu", False):
            raise ValueError(
                "grpo.reference_on_cpu: true applies to one device. Under torchrun the reference "
                "is sharded across the ranks like the policy, which divides its memory by the "
                "number of ranks; set grpo.reference_on_cpu: false."
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.model, self.is_lora = self._setup_model()
        self.task = config.instantiate(cfg.task)
        self.scorer = self._setup_scorer()
        self.sampler = config.instantiate(
            cfg.sampler,
            self.model,
            stop_token_ids=list(self.tokenizer.stop_token_ids),
            pad_id=self.tokenizer.pad_id,
        )
        self.reference = reference_for(
            self.model,
            lora=self.is_lora,
            beta=self.beta,
            offload_to_cpu=cfg.grpo.get("reference_on_cpu", False),
        )
        if self.world_size > 1:
            # After the sampler and the reference copied what they need of the whole model.
            self._shard(self.model)
            if self.reference is not None and self.reference.model is not self.model:
                self._shard(self.reference.model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, trainable)
        self.lr_scheduler = config.instantiate(
            cfg.get("lr_scheduler"),
            self.optimizer,
            num_training_steps=self.max_steps * self.num_passes,
        )
        if cfg.get("resume_from_checkpoint", False):
            self._resume()
        self.activations_ctx = self._activation_offloading()
        if not self.is_rank_zero:
            return  # rank 0 alone logs
        self.metric_logger = config.instantiate(cfg.metric_logger)
        self.metric_logger.log_config(cfg)
        self.metrics_file = JsonlWriter(self.output_dir / "metrics.jsonl")
        self.samples_file = JsonlWriter(self.output_dir / "completions.jsonl")
        log.info(
            f"GRPO: {'LoRA' if self.is_lora else 'full'} fine-tuning of "
            f"{sum(p.numel() for p in trainable) / 1e6:.1f}M parameters on {self.device} "
            f"{f'x {self.world_size} ranks (FSDP2) ' if self.world_size > 1 else ''}"
            f"({cfg.dtype}), task {self.task.name!r} ({len(self.task.train)} train / "
            f"{len(self.task.eval)} eval rows), reference: "
            f"{'none (beta = 0)' if self.reference is None else type(self.reference).__name__}"
        )

    def _setup_model(self) -> tuple[torch.nn.Module, bool]:
        cfg = self.cfg
        # Weights the checkpoint does not hold (LoRA adapters) start from the run's seed, not
        # the rank's: FSDP keeps each rank's own slice, so the ranks must agree before sharding.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            with training.set_default_dtype(self.dtype), self.device:
                model = config.instantiate(cfg.model)
        checkpointer = config.instantiate(cfg.checkpointer)
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
        load_base_weights(
            model,
            state_dict,
            source=f"checkpointer weights from {cfg.checkpointer.checkpoint_dir}",
            hint="check checkpointer.model_type and model._component_",
        )
        if cfg.checkpointer.get("model_type") == "QWEN2" and any(
            isinstance(m, DoRALinear) for m in model.modules()
        ):
            # torchtune's DoRA also scales Qwen2's q/k/v biases, which neither PEFT adapters
            # nor a merged checkpoint can express: the saved model would not be the trained one.
            raise ValueError(
                "model.use_dora: true is not supported for Qwen2 (its checkpoints could not "
                "reproduce the trained model); set model.use_dora: false to train LoRA adapters"
            )
        adapter_params = get_adapter_params(model)
        is_lora = len(adapter_params) > 0
        if is_lora:
            set_trainable_params(model, adapter_params)
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        use_packed_attention(model)
        return model, is_lora

    def _shard(self, model: torch.nn.Module) -> None:
        """FSDP2: shard each transformer layer, then the rest (embeddings, norm, output)."""
        training.shard_model(
            model,
            [lambda name, m: isinstance(m, modules.TransformerSelfAttentionLayer)],
            cpu_offload=False,
            reshard_after_forward=True,
        )

    def _setup_scorer(self) -> RewardScorer:
        """The task's reward functions and weights, unless the config names its own."""
        section = self.cfg.rewards
        defaults = {}
        if section.get("reward_funcs") is None:
            defaults["reward_funcs"] = list(self.task.reward_funcs)
            if section.get("weights") is None:
                defaults["weights"] = list(self.task.reward_weights)
        scorer = config.instantiate(section, **defaults)
        # Accuracy is the task's accuracy function; score it apart only if it is not a reward.
        acc = self.task.accuracy_func
        self.accuracy_name = None if acc is None else func_name(acc)
        self.accuracy_scorer = None
        if acc is not None and self.accuracy_name not in scorer.names:
            self.accuracy_scorer = RewardScorer([acc])
        return scorer

    def _activation_offloading(self):
        enabled = self.cfg.get("enable_activation_offloading", False)
        if enabled and self.device.type != "cuda":
            warnings.warn(
                "enable_activation_offloading: true is ignored on "
                f"{self.device.type}: offloading moves activations from GPU to CPU memory, "
                "and here they already live in CPU memory. Set it to false to silence this.",
                stacklevel=2,
            )
            enabled = False
        return training.get_act_offloading_ctx_manager(self.model, enabled)

    # ------------------------------------------------------------------------------ data
    def next_rows(self, n: int) -> list[dict[str, Any]]:
        """The next `n` training rows: a fresh seeded permutation of the task per epoch, so the
        order depends only on (seed, position) and resuming continues it exactly."""
        rows = []
        num = len(self.task.train)
        for pos in range(self.data_position, self.data_position + n):
            epoch, i = divmod(pos, num)
            rows.append(self.task.train[_epoch_order(self.seed + epoch, num)[i]])
        self.data_position += n
        return rows

    def prompt_ids(self, rows: list[dict[str, Any]]) -> list[list[int]]:
        return [
            self.tokenizer.tokenize_messages(r["messages"], add_generation_prompt=True)
            for r in rows
        ]

    def score(self, rows, completions, scorer: RewardScorer | None = None):
        """Decode [P][G] completions and score them: (texts [N], RewardScores, accuracy [N])."""
        texts = [self.tokenizer.decode(c.token_ids) for group in completions for c in group]
        per = [len(group) for group in completions]
        flat_rows = [r for r, k in zip(rows, per, strict=True) for _ in range(k)]
        prompts = [r["messages"] for r in flat_rows]
        columns = {k: [r[k] for r in flat_rows] for k in flat_rows[0] if k != "messages"}
        scores = (scorer or self.scorer)(prompts, texts, columns)
        if self.accuracy_name is None:
            accuracy = torch.full((len(texts),), float("nan"))
        elif self.accuracy_name in scores.per_func:
            accuracy = scores.per_func[self.accuracy_name]
        else:
            accuracy = self.accuracy_scorer(prompts, texts, columns).total
        return texts, scores, accuracy

    def rollout(
        self,
        rows: list[dict[str, Any]],
        prompts: list[list[int]],
        seeds: list[int],
        **sampling: Any,
    ) -> Rollouts:
        """Generate and score `num_samples` completions for each row, whose prompt token ids
        are `prompts` (prompt-major).

        Each rank generates and scores every world_size-th row, and the parts are gathered,
        so every rank returns all of them. Row i samples with seed `seeds[i]`, so the result
        does not depend on the number of ranks.
        """
        t0 = time.perf_counter()
        mine = list(range(self.rank, len(rows), self.world_size))
        part = None
        if mine:
            local_rows = [rows[i] for i in mine]
            completions = self.sampler.generate(
                [prompts[i] for i in mine], seed=[seeds[i] for i in mine], **sampling
            )
            generation_s = time.perf_counter() - t0
            part = (mine, completions, *self.score(local_rows, completions))
        else:
            generation_s = 0.0
        by_row: dict[int, tuple] = {}
        failures: dict[str, int] = {}
        for got in gather_objects(part):
            if got is None:
                continue
            idx, completions, texts, scores, accuracy = got
            G = len(texts) // len(idx)
            for j, i in enumerate(idx):
                cut = slice(j * G, (j + 1) * G)
                per_func = {k: v[cut] for k, v in scores.per_func.items()}
                by_row[i] = (completions[j], texts[cut], scores.total[cut], per_func, accuracy[cut])
            for name, n in scores.failures.items():
                failures[name] = failures.get(name, 0) + n
        ordered = [by_row[i] for i in range(len(rows))]
        scores = RewardScores(
            total=torch.cat([r[2] for r in ordered]),
            per_func={k: torch.cat([r[3][k] for r in ordered]) for k in ordered[0][3]},
            failures=failures,
        )
        return Rollouts(
            completions=[r[0] for r in ordered],
            texts=[t for r in ordered for t in r[1]],
            scores=scores,
            accuracy=torch.cat([r[4] for r in ordered]),
            generation_s=generation_s,
            scoring_s=time.perf_counter() - t0 - generation_s,
        )

    # ----------------------------------------------------------------------------- train
    def train(self) -> None:
        eval_cfg = self.cfg.get("eval", {})
        every = eval_cfg.get("every_n_steps")
        save_every = self.cfg.get("save_every_n_steps")
        if self.step == 0 and eval_cfg.get("at_start", False):
            self._log(self.evaluate(), self.step)
        bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc="GRPO",
            unit="step",
            disable=not self.is_rank_zero,
        )
        while self.step < self.max_steps:
            metrics = self.train_step()
            self.step += 1
            if every and (self.step % every == 0 or self.step == self.max_steps):
                metrics.update(self.evaluate())
            self._log(metrics, self.step)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy']:.3f}"
            )
            if self.step == self.max_steps:
                self.save_checkpoint(final=True)
            elif save_every and self.step % save_every == 0:
                self.save_checkpoint()
        bar.close()

    def train_step(self) -> dict[str, float]:
        """One GRPO step: rollout, score, advantages, pack, update. Returns its metrics."""
        g = self.cfg.grpo
        P, G = self.prompts_per_step, self.group_size
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step's update uses

        # 1-3. prompts, rollouts and rewards [P, G]. Sampling seeds depend only on (seed, step,
        # prompt): resumable, and the same for any number of ranks.
        rows = self.next_rows(P)
        prompts = self.prompt_ids(rows)
        out = self.rollout(
            rows,
            prompts,
            [_prompt_seed(self.seed, self.step, p) for p in range(P)],
            num_samples=G,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=g.get("top_p", 1.0),
            top_k=g.get("top_k"),
        )
        completions, texts, scores, accuracy = out.completions, out.texts, out.scores, out.accuracy
        rewards = torch.as_tensor(scores.total, dtype=torch.float32).view(P, G)
        t_score = time.perf_counter()

        # 4. advantages [P, G]; uniform groups carry no policy gradient
        advantages = group_advantages(rewards, scale_by_std=g.get("scale_advantages_by_std", True))
        keep = torch.ones(P, dtype=torch.bool)
        if g.get("drop_uniform_groups", False):
            keep = ~uniform_groups(rewards)
        kept = [p for p in range(P) if keep[p]]

        # 5. pack and update
        stats, train_metrics = None, {}
        if kept:
            lengths = [len(c.token_ids) for p in kept for c in completions[p]]
            weights = completion_loss_weights(lengths, self.loss_type, self.max_new_tokens)
            groups = []
            for i, p in enumerate(kept):
                w = weights[i * G : (i + 1) * G]
                groups.append(
                    GroupRollout(
                        prompt_ids=prompts[p],
                        completion_ids=[c.token_ids for c in completions[p]],
                        behaviour_logprobs=[c.logprobs for c in completions[p]],
                        advantages=advantages[p].tolist(),
                        loss_weights=w,
                    )
                )
            batch = pack_groups(
                groups,
                row_len=self.row_len,
                truncate=self.cfg.packing.get("truncate", False),
                pad_id=self.tokenizer.pad_id,
            )
            stats, train_metrics = self.update(batch)
            self.sampler.sync_weights(self.model)  # the next rollout samples the new policy
        t_train = time.perf_counter()

        # 6. metrics
        lengths_all = [len(c.token_ids) for group in completions for c in group]
        finished = [c.finished for group in completions for c in group]
        metrics = self._reward_metrics(scores)
        metrics["accuracy"] = float(accuracy.mean())
        len_mean, _ = mean_std(lengths_all)
        metrics.update(
            {
                "groups_kept": float(len(kept)),
                "completion_len/mean": len_mean,
                "completion_len/min": float(min(lengths_all)),
                "completion_len/max": float(max(lengths_all)),
                "truncated_frac": 1.0 - sum(finished) / len(finished),
                "time/generation_s": out.generation_s,  # this rank's share (rank 0 logs)
                "time/scoring_s": out.scoring_s,  # incl. gathering the ranks' rollouts
                "time/training_s": t_train - t_score,  # incl. pushing weights to the sampler
                "time/step_s": t_train - t0,
                "tokens_per_s/generation": sum(lengths_all) / max(out.generation_s, 1e-9),
                "lr": lr,
            }
        )
        if stats is not None:
            metrics.update({f"loss/{k}": v for k, v in stats.means().items()})
        metrics.update(train_metrics)
        metrics.update(peak_memory(self.device))
        self._log_completions(rows, completions, texts, scores)
        return metrics

    def update(self, batch: PackedBatch) -> tuple[LossStats, dict[str, float]]:
        """`num_passes` optimizer steps over a packed batch, in micro-batches of rows.

        The loss is a weighted sum whose weights already hold the aggregation, so summing the
        micro-batch gradients (and, under FSDP, the ranks' gradients) gives exactly the
        full-batch gradient. Each rank trains every world_size-th row.

        Every rank must run the same number of forward/backward passes, since each one gathers
        and reduces the FSDP shards; a rank short of rows runs a filler micro-batch (a real
        row whose loss mask is empty: zero gradient, no stats).
        """
        self.model.train()
        rows_per_mb = max(1, self.tokens_per_micro_batch // self.row_len)
        num_rows = batch.tokens.shape[0]
        mine = list(range(self.rank, num_rows, self.world_size))
        micro_batches: list[list[int] | None] = [
            mine[i : i + rows_per_mb] for i in range(0, len(mine), rows_per_mb)
        ]
        rows_per_rank = -(-num_rows // self.world_size)
        micro_batches += [None] * (-(-rows_per_rank // rows_per_mb) - len(micro_batches))
        chunk = self.cfg.packing.get("logprob_chunk_size", 1024)
        clip = self.cfg.get("clip_grad_norm")
        g = self.cfg.grpo
        t_ref = t_policy = 0.0
        trained_tokens = 0
        entropy_sum = 0.0
        drift_sum, drift_max = 0.0, 0.0
        grad_norm = float("nan")
        for pass_idx in range(self.num_passes):
            stats = None
            for idx in micro_batches:
                mb = batch.select_rows(idx or [mine[0] if mine else 0]).to(self.device)
                loss_mask = mb.trained if idx else torch.zeros_like(mb.trained)
                mask = packed_block_mask(mb.group_ids, mb.parent_ids)  # policy and reference
                t = time.perf_counter()
                ref = None
                if self.reference is not None:  # same packed batch and mask as the policy
                    ref, _ = self.reference.logprobs(
                        lambda m, mb=mb, mask=mask: packed_logprobs(
                            m, mb, mask=mask, temperature=self.temperature, chunk_size=chunk
                        )
                    )
                t_ref += time.perf_counter() - t
                t = time.perf_counter()
                with self.activations_ctx:
                    logprobs, entropy = packed_logprobs(
                        self.model,
                        mb,
                        mask=mask,
                        temperature=self.temperature,
                        chunk_size=chunk,
                        with_entropy=True,
                    )
                loss, mb_stats = grpo_loss(
                    logprobs,
                    mb.behaviour_logprobs,
                    mb.advantages,
                    mb.loss_weights,
                    loss_mask,
                    ref,
                    epsilon_low=g.get("epsilon_low", 0.2),
                    epsilon_high=g.get("epsilon_high", 0.2),
                    beta=self.beta,
                )
                # FSDP averages the ranks' gradients; the loss weights want their sum.
                (loss * self.world_size).backward()
                t_policy += time.perf_counter() - t
                stats = mb_stats if stats is None else stats + mb_stats
                if entropy is not None:
                    entropy_sum += float(entropy.detach()[loss_mask].sum())
                trained_tokens += int(loss_mask.sum())
                if pass_idx == 0:  # before any update: how far the sampler is from the trainer
                    drift = (logprobs.detach() - mb.behaviour_logprobs)[loss_mask].abs()
                    drift_sum += float(drift.sum())
                    drift_max = max(drift_max, float(drift.max())) if drift.numel() else drift_max
            if clip is not None:
                grad_norm = float(
                    full_tensor(
                        torch.nn.utils.clip_grad_norm_(
                            [p for p in self.model.parameters() if p.requires_grad], clip
                        )
                    )
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        tokens, entropy_sum, drift_sum = all_reduce(
            [trained_tokens, entropy_sum, drift_sum], self.device
        )
        (drift_max,) = all_reduce([drift_max], self.device, op="max")
        first_pass_tokens = max(tokens / self.num_passes, 1.0)
        return stats.all_reduce(), {
            "entropy": entropy_sum / max(tokens, 1.0),
            "grad_norm": grad_norm,
            # |trainer - sampler| logprob of the sampled tokens, before the update
            "rollout/logprob_drift": drift_sum / first_pass_tokens,
            "rollout/logprob_drift_max": drift_max,
            "time/reference_s": t_ref,
            "time/policy_s": t_policy,
            "tokens_per_s/training": tokens / max(t_policy, 1e-9),
            "packing/rows": float(batch.stats.rows),
            "packing/positions": float(batch.stats.positions),
            "packing/padded_positions": float(batch.stats.padded_positions),
            "packing/saved_fraction": batch.stats.saved_fraction,
        }

    # ------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(
        self, temperature: float | None = None, num_samples: int | None = None
    ) -> dict[str, float]:
        """Accuracy on the task's held-out rows at fixed sampling settings (default: greedy).

        Uses fixed seeds, so two evaluations of the same weights give the same numbers."""
        e = self.cfg.get("eval", {})
        temperature = e.get("temperature", 0.0) if temperature is None else temperature
        num_samples = e.get("num_samples", 1) if num_samples is None else num_samples
        rows = list(self.task.eval)
        if e.get("num_rows") is not None:
            rows = rows[: e.num_rows]
        if not rows:
            return {}
        out = self.rollout(
            rows,
            self.prompt_ids(rows),
            [_prompt_seed(self.seed, -1, i) for i in range(len(rows))],
            num_samples=num_samples,
            max_new_tokens=e.get("max_new_tokens") or self.max_new_tokens,
            temperature=temperature,
            top_p=1.0,
            top_k=None,
        )
        scores, accuracy = out.scores, out.accuracy
        suffix = "" if temperature == 0 else "_sampled"
        return {
            f"eval/accuracy{suffix}": float(accuracy.mean()),
            f"eval/reward{suffix}": float(scores.total.mean()),
        }

    # --------------------------------------------------------------------------- logging
    def _reward_metrics(self, scores) -> dict[str, float]:
        out = {"reward/mean": float(scores.total.mean()), "reward/std": _std(scores.total)}
        for name, values in scores.per_func.items():
            out[f"reward/{name}/mean"] = float(values.mean())
            out[f"reward/{name}/std"] = _std(values)
        for name, n in scores.failures.items():
            out[f"reward/{name}/failures"] = float(n)
        return out

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if not metrics or not self.is_rank_zero:
            return
        self.metric_logger.log_dict(metrics, step=step)
        self.metrics_file.write({"step": step, **metrics})

    def _log_completions(self, rows, completions, texts, scores) -> None:
        """Append the first `log_num_completions` completions of this step to completions.jsonl."""
        if not self.is_rank_zero:
            return
        n = self.cfg.get("log_num_completions", 4)
        G = self.group_size
        for i in range(min(n, len(texts))):
            p = i // G
            self.samples_file.write(
                {
                    "step": self.step + 1,  # the step these metrics are logged under
                    "prompt": rows[p]["messages"][-1]["content"],
                    "completion": texts[i],
                    "reward": float(scores.total[i]),
                    "rewards": {k: float(v[i]) for k, v in scores.per_func.items()},
                    "finished": completions[p][i % G].finished,
                }
            )

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, final: bool = False) -> Path:
        """Write `output_dir/checkpoints/step_N` atomically: HF safetensors (LoRA: PEFT
        adapters, plus the merged model at the end of the run), optimizer, LR schedule, RNG
        and data position, so that `resume_from_checkpoint: true` continues exactly. Under
        torchrun every rank calls it and rank 0 writes one consolidated checkpoint."""
        self.last_checkpoint = save_checkpoint(
            self.output_dir / "checkpoints",
            self.step,
            model=self.model,
            source_checkpoint_dir=self.cfg.checkpointer.checkpoint_dir,
            model_type=self.cfg.checkpointer.get("model_type"),
            adapter_only=self.is_lora and not final,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            data_state={"data_position": self.data_position},
            keep_last=self.cfg.get("keep_last_checkpoints"),
        )
        return self.last_checkpoint

    def _resume(self) -> None:
        """Load the latest checkpoint of `output_dir` into the model (which holds the source
        weights), optimizer and scheduler; restore RNG, step and data position."""
        state = load_checkpoint(
            self.output_dir / "checkpoints",
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
        )
        self.step = state["step"]
        self.data_position = int(state["data_state"]["data_position"])
        self.sampler.sync_weights(self.model)
        log.info(f"resumed from {state['path']} at step {self.step}")

    def cleanup(self) -> None:
        # First: vLLM's teardown destroys the default process group itself.
        self.sampler.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        if not self.is_rank_zero:
            return
        self.metric_logger.close()
        self.metrics_file.close()
        self.samples_file.close()
        plot = None
        if self.cfg.get("plot", True):
            plot = plot_metrics(
                read_metrics(self.metrics_file.path),
                self.output_dir / "reward.png",
                title=f"GRPO on {self.task.name}",
            )
        print(f"checkpoint: {getattr(self, 'last_checkpoint', None)}", flush=True)
        print(f"logs:       {self.metrics_file.path} (completions: {self.samples_file.path})")
        if plot is not None:
            print(f"plot:       {plot}", flush=True)


@functools.cache
def _epoch_order(seed: int, num: int) -> list[int]:
    """The order of the training rows in one epoch: a permutation fixed by its seed."""
    return torch.randperm(num, generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of prompt `index` at `step` (-1: evaluation), in [0, 2**56)."""
    key = f"{seed}:{step}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(), "big")


def _std(x: torch.Tensor) -> float:
    return float(x.std(unbiased=False)) if x.numel() else 0.0


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """GRPO fine-tuning on packed multi-prompt sequences (see the module docstring)."""
    config.log_config(recipe_name="GRPORecipe", cfg=cfg)
    recipe = GRPORecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
