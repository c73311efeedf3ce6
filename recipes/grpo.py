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
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchtune import config, modules, training, utils
from torchtune.modules.peft import DoRALinear, get_adapter_params, set_trainable_params
from tqdm.auto import tqdm

from packrl.checkpointing import (
    CheckpointError,
    ConfigChangeError,
    OutputDirError,
    RunLock,
    claim_output_dir,
    config_changes,
    load_checkpoint,
    save_checkpoint,
    saved_config,
)
from packrl.evaluation import eval_metrics, evaluate_prompts
from packrl.models.weights import load_base_weights
from packrl.packed.attention import BLOCK_SIZE, packed_block_mask, use_packed_attention
from packrl.packed.logprobs import packed_logprobs
from packrl.packed.packing import PackedBatch, pack_groups
from packrl.rewards import TrainerState
from packrl.rl.advantages import assign_advantages
from packrl.rl.loss import LossStats
from packrl.rl.reference import reference_for
from packrl.rollout.collect import collect_rollouts, prompt_seed
from packrl.rollout.group import GroupRollout
from packrl.tasks.checks import check_task_rows
from packrl.training.components import build_scorer, instantiate
from packrl.training.config_schema import ConfigError, validate_config, with_defaults
from packrl.training.distributed import all_reduce, full_tensor, gather_objects, world
from packrl.training.memory import (
    activation_bytes,
    checkpointed_activation_bytes,
    default_activation_budget,
    plan_activation_memory,
    release_freed_host_memory,
)
from packrl.training.metrics import (
    JsonlWriter,
    peak_memory,
    plot_metrics,
    read_metrics,
    rollout_metrics,
)
from packrl.training.micro_batches import plan_micro_batches
from packrl.training.preemption import PREEMPTED_EXIT_CODE, PreemptionGuard

log = utils.get_logger("INFO")


class GRPORecipe:
    """GRPO recipe: `setup`, `train`, `save_checkpoint`, `cleanup` (torchtune style).

    The config is read here and in `setup` only; its defaults live in the schema
    (`packrl.training.config_schema`).
    """

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)  # every key known, typed and in range, before anything is built
        self.cfg = cfg = with_defaults(cfg)
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"device={cfg.device!r}, but torch sees no CUDA device (torch "
                f"{torch.__version__}); set device=cpu, or install a CUDA build of torch"
            )
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
        self.mixed_precision = cfg.mixed_precision
        self.output_dir = Path(cfg.output_dir)
        # Data order and sampling seeds follow rank 0's seed on every rank (seed: null draws one).
        self.seed = gather_objects(training.set_seed(cfg.seed))[0]
        self.max_steps = cfg.max_steps
        g = cfg.grpo
        self.prompts_per_step, self.group_size = g.prompts_per_step, g.group_size
        self.max_new_tokens = g.max_new_tokens
        self.sampling = dict(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        self.scale_rewards, self.drop_uniform_groups = g.scale_rewards, g.drop_uniform_groups
        self.dynamic_sampling, self.max_sampling_rounds = g.dynamic_sampling, g.max_sampling_rounds
        self.num_passes, self.reference_on_cpu = g.num_passes, g.reference_on_cpu
        p = cfg.packing
        self.row_len, self.truncate = p.row_len, p.truncate
        self.logprob_chunk = p.logprob_chunk_size
        self.rows_per_micro_batch = max(1, (p.tokens_per_micro_batch or p.row_len) // p.row_len)
        self.clip_grad_norm = cfg.clip_grad_norm
        e = cfg.eval
        self.eval_every, self.eval_at_start = e.every_n_steps, e.at_start
        self.eval_rows = e.num_rows
        self.eval_sampling = dict(
            num_samples=e.num_samples,
            max_new_tokens=e.max_new_tokens or g.max_new_tokens,
            temperature=e.temperature,
            top_p=1.0,
            top_k=None,
        )
        self.save_every, self.keep_last = cfg.save_every_n_steps, cfg.keep_last_checkpoints
        self.resume = cfg.resume_from_checkpoint
        self.run_config = OmegaConf.to_container(cfg, resolve=True)  # saved with checkpoints
        self.log_num_completions, self.plot = cfg.log_num_completions, cfg.plot
        self.source_checkpoint_dir = cfg.checkpointer.checkpoint_dir
        self.model_type = cfg.checkpointer.get("model_type")
        try:
            self.preemption = PreemptionGuard(list(cfg.preemption_signals))
        except ValueError as e:
            raise ConfigError(f"'preemption_signals': {e}") from e
        self.last_checkpoint: Path | None = None
        self.preempted: str | None = None  # the signal that stopped training early
        self.step = 0  # optimizer steps taken == rollout steps done
        self.data_position = 0  # training rows consumed so far

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.model_dir is not None and not Path(cfg.model_dir).is_dir():
            raise FileNotFoundError(
                f"model_dir={cfg.model_dir} does not exist. For SmolLM2 run "
                "`python tools/prepare_smollm2.py` (setup.sh does); for Qwen2.5 download the HF "
                "model there (see the config's header), or set model_dir=<your HF model dir>."
            )
        if self.world_size > 1 and self.reference_on_cpu:
            raise ConfigError(
                "grpo.reference_on_cpu: true applies to one device. Under torchrun the reference "
                "is sharded across the ranks like the policy, which divides its memory by the "
                "number of ranks; set grpo.reference_on_cpu: false."
            )
        self.loss = instantiate(cfg, "loss")  # cheap and checked first: its errors name keys
        self.run_lock = self._claim_output_dir()
        self.tokenizer = instantiate(cfg, "tokenizer")
        self.task = check_task_rows(
            instantiate(cfg, "task"),
            lambda row: len(self.prompt_ids([row])[0]),
            max_new_tokens=self.max_new_tokens,
            row_len=self.row_len,
            prompts_per_step=self.prompts_per_step,
            long_prompts=cfg.packing.long_prompts,
        )
        self.scorer = build_scorer(cfg, self.task, self.tokenizer.decode)
        self.model, self.is_lora = self._setup_model()
        self.sampler = instantiate(
            cfg,
            "sampler",
            self.model,
            stop_token_ids=list(self.tokenizer.stop_token_ids),
            pad_id=self.tokenizer.pad_id,
        )
        # Rollout correction "auto": on for engines whose logprobs are not the trainer's.
        self.loss.resolve_auto(self.sampler.logprobs_match_trainer)
        self.reference = reference_for(
            self.model, lora=self.is_lora, beta=self.loss.beta, offload_to_cpu=self.reference_on_cpu
        )
        if self.world_size > 1:
            # After the sampler and the reference copied what they need of the whole model.
            self._shard(self.model)
            if self.reference is not None and self.reference.model is not self.model:
                self._shard(self.reference.model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = instantiate(cfg, "optimizer", trainable)
        self.lr_scheduler = instantiate(
            cfg, "lr_scheduler", self.optimizer, num_training_steps=self.max_steps * self.num_passes
        )
        if self.resume:
            self._resume()
        self.activations_ctx = self._activation_offloading()
        if not self.is_rank_zero:
            return  # rank 0 alone logs
        self.metric_logger = instantiate(cfg, "metric_logger")
        self.metric_logger.log_config(cfg)
        self.metrics_file = JsonlWriter(self.output_dir / "metrics.jsonl")
        self.samples_file = JsonlWriter(self.output_dir / "completions.jsonl")
        log.info(
            f"GRPO: {'LoRA' if self.is_lora else 'full'} fine-tuning of "
            f"{sum(p.numel() for p in trainable) / 1e6:.1f}M parameters on {self.device} "
            f"{f'x {self.world_size} ranks (FSDP2) ' if self.world_size > 1 else ''}"
            f"({cfg.dtype}{', bf16 mixed precision' if self.mixed_precision else ''}), "
            f"task {self.task.name!r} ({len(self.task.train)} train / "
            f"{len(self.task.eval)} eval rows), reference: "
            f"{'none (beta = 0)' if self.reference is None else type(self.reference).__name__}, "
            f"rollout correction: {self.loss.rollout_correction or 'off'}"
        )

    def _claim_output_dir(self) -> RunLock | None:
        """Rank 0 locks `output_dir` (one live run per directory; a fresh run never mixes
        with an old one) and, on resume, compares the config with the checkpoint's: changes
        the saved optimizer/schedule state would silently override are errors unless listed
        in `resume_allow_changed`, the others are logged. Every rank raises rank 0's error."""
        lock, error = None, None
        if self.is_rank_zero:
            try:
                lock = claim_output_dir(
                    self.output_dir, resume=self.resume, overwrite=self.cfg.overwrite
                )
                saved = saved_config(self.output_dir / "checkpoints") if self.resume else None
                if saved is not None:
                    changes = config_changes(saved, self.run_config)
                    if warning := changes.check(self.cfg.resume_allow_changed):
                        log.warning(warning)
            except (OutputDirError, ConfigChangeError, CheckpointError) as e:
                if lock is not None:
                    lock.release()
                error = e
        error = gather_objects(error)[0]
        if error is not None:
            raise error
        return lock

    def _setup_model(self) -> tuple[torch.nn.Module, bool]:
        cfg = self.cfg
        # Weights the checkpoint does not hold (LoRA adapters) start from the run's seed, not
        # the rank's: FSDP keeps each rank's own slice, so the ranks must agree before sharding.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            with training.set_default_dtype(self.dtype), self.device:
                model = instantiate(cfg, "model")
        checkpointer = instantiate(cfg, "checkpointer")
        state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]
        load_base_weights(
            model,
            state_dict,
            source=f"checkpointer weights from {self.source_checkpoint_dir}",
            hint="check checkpointer.model_type and model._component_",
        )
        if self.model_type == "QWEN2" and any(isinstance(m, DoRALinear) for m in model.modules()):
            # torchtune's DoRA also scales Qwen2's q/k/v biases, which neither PEFT adapters
            # nor a merged checkpoint can express: the saved model would not be the trained one.
            raise ConfigError(
                "model.use_dora: true is not supported for Qwen2 (its checkpoints could not "
                "reproduce the trained model); set model.use_dora: false to train LoRA adapters"
            )
        adapter_params = get_adapter_params(model)
        is_lora = len(adapter_params) > 0
        if is_lora:
            set_trainable_params(model, adapter_params)
        checkpointing, self.offload_activations = self._activation_memory_plan(model)
        if checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        use_packed_attention(model)
        return model, is_lora

    def _activation_memory_plan(self, model: torch.nn.Module) -> tuple[bool, bool]:
        """(checkpointing, offloading) from `enable_activation_checkpointing` and
        `enable_activation_offloading`: true, false, or "auto", decided by
        `packrl.training.memory.plan_activation_memory` against `activation_memory_budget_gb`
        (default: see `packrl.training.memory.default_activation_budget`)."""
        cfg = self.cfg
        settings = (cfg.enable_activation_checkpointing, cfg.enable_activation_offloading)
        if "auto" not in settings:
            return settings
        tokens = self.rows_per_micro_batch * self.row_len
        need = activation_bytes(model, tokens, self.dtype)
        budget_gb = cfg.activation_memory_budget_gb
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        budget = (
            int(budget_gb * 2**30)
            if budget_gb is not None
            else default_activation_budget(self.device, trainable)
        )
        checkpointing, offloading = plan_activation_memory(
            *settings,
            need=need,
            need_checkpointed=checkpointed_activation_bytes(model, tokens, self.dtype),
            budget=budget,
            device_type=self.device.type,
        )
        log.info(
            f"activation checkpointing: {'on' if checkpointing else 'off'}, offloading: "
            f"{'on' if offloading else 'off'} (settings {settings}: a {tokens}-token "
            f"micro-batch needs about {need / 2**30:.2f} GiB of activations, the budget is "
            f"{budget / 2**30:.2f} GiB)"
        )
        return checkpointing, offloading

    def _shard(self, model: torch.nn.Module) -> None:
        """FSDP2: shard each transformer layer, then the rest (embeddings, norm, output)."""
        training.shard_model(
            model,
            [lambda name, m: isinstance(m, modules.TransformerSelfAttentionLayer)],
            cpu_offload=False,
            reshard_after_forward=True,
        )

    def _autocast(self) -> torch.autocast:
        """``mixed_precision: bf16``: matmuls of training forwards (and their backward) in
        bf16 over fp32 weights, gradients and optimizer states, as HF Trainer's ``bf16=True``;
        off (a no-op context) otherwise. On a CPU with AVX512-BF16 the CPU demo's training
        took 1.3-1.4x less time per position (docs/benchmarks.md)."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision == "bf16"
        )

    def _activation_offloading(self):
        enabled = self.offload_activations
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

    # ----------------------------------------------------------------------------- train
    def train(self) -> None:
        """Train to `max_steps`, or until a preemption signal (see `preemption_signals`):
        then the current step is finished, a checkpoint written, and `self.preempted` set."""
        if self.step == 0 and self.eval_at_start:
            self._log(self.evaluate(), self.step)
        bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc="GRPO",
            unit="step",
            disable=not self.is_rank_zero,
        )
        with self.preemption as guard:
            while self.step < self.max_steps:
                metrics = self.train_step()
                self.step += 1
                if self.eval_every and (
                    self.step % self.eval_every == 0 or self.step == self.max_steps
                ):
                    metrics.update(self.evaluate())
                self._log(metrics, self.step)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy']:.3f}"
                )
                if self.step == self.max_steps:
                    self.save_checkpoint(final=True)
                elif guard.should_stop(self.device):
                    self.save_checkpoint()
                    self.preempted = guard.received or "a signal on another rank"
                    break
                elif self.save_every and self.step % self.save_every == 0:
                    self.save_checkpoint()
        bar.close()
        if self.preempted and self.is_rank_zero:
            print(
                f"packrl: stopped by {self.preempted} after step {self.step} of "
                f"{self.max_steps}; checkpoint {self.last_checkpoint}. Resume with the same "
                "command plus resume_from_checkpoint=true (exit code "
                f"{PREEMPTED_EXIT_CODE}).",
                flush=True,
            )

    def train_step(self) -> dict[str, float]:
        """One GRPO step: rollout, score, advantages, pack, update. Returns its metrics."""
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step's update uses

        # 1-3. prompts, rollouts and rewards. Sampling seeds depend only on (seed, step,
        # prompt): resumable, and the same for any number of ranks. With dynamic sampling
        # (DAPO), rounds of prompts_per_step prompts are drawn until that many groups are
        # informative (not all rewards equal), or max_sampling_rounds is reached.
        groups: list[GroupRollout] = []
        generation_s = scoring_s = 0.0
        for _ in range(self.max_sampling_rounds if self.dynamic_sampling else 1):
            rows = self.next_rows(self.prompts_per_step)
            drawn = len(groups)
            rollouts = collect_rollouts(
                self.sampler,
                self.scorer,
                rows,
                self.prompt_ids(rows),
                [prompt_seed(self.seed, self.step, drawn + i) for i in range(len(rows))],
                TrainerState(global_step=self.step, max_steps=self.max_steps),
                num_samples=self.group_size,
                max_new_tokens=self.max_new_tokens,
                **self.sampling,
            )
            groups += rollouts.groups
            generation_s += rollouts.generation_s
            scoring_s += rollouts.scoring_s
            if sum(not g.is_uniform for g in groups) >= self.prompts_per_step:
                break
        t_score = time.perf_counter()

        # 4. advantages; uniform groups carry no policy gradient
        assign_advantages(groups, self.scale_rewards)
        drop = self.drop_uniform_groups or self.dynamic_sampling
        kept = [g for g in groups if not (drop and g.is_uniform)]
        if self.dynamic_sampling:
            kept = kept[: self.prompts_per_step]

        # 5. pack and update
        stats, train_metrics = None, {}
        if kept:
            self.loss.assign_loss_weights(kept, self.max_new_tokens)
            batch = pack_groups(
                kept, self.row_len, truncate=self.truncate, pad_id=self.tokenizer.pad_id
            )
            stats, train_metrics = self.update(batch)
            self.sampler.sync_weights(self.model)  # the next rollout samples the new policy
        t_train = time.perf_counter()

        # 6. metrics
        metrics = rollout_metrics(groups)
        generated = sum(n for g in groups for n in g.lengths)
        metrics.update(
            {
                "groups_kept": float(len(kept)),
                "rollout/prompts_drawn": float(len(groups)),
                "time/generation_s": generation_s,  # this rank's share (rank 0 logs)
                "time/scoring_s": scoring_s,  # incl. gathering the ranks' rollouts
                "time/training_s": t_train - t_score,  # incl. pushing weights to the sampler
                "time/step_s": t_train - t0,
                "tokens_per_s/generation": generated / max(generation_s, 1e-9),
                "lr": lr,
            }
        )
        if stats is not None:
            metrics.update({f"loss/{k}": v for k, v in stats.means().items()})
        metrics.update(train_metrics)
        metrics.update(peak_memory(self.device))
        self._log_completions(groups)
        return metrics

    def update(self, batch: PackedBatch) -> tuple[LossStats, dict[str, float]]:
        """`num_passes` optimizer steps over a packed batch, in micro-batches of rows.

        The loss is a weighted sum whose weights already hold the aggregation, so summing the
        micro-batch gradients (and, under FSDP, the ranks' gradients) gives exactly the
        full-batch gradient. Each rank trains its rows of `plan_micro_batches`, filler
        micro-batches included.
        """
        self.model.train()
        plan = plan_micro_batches(
            batch.num_rows, self.rows_per_micro_batch, self.rank, self.world_size
        )
        filler_row = [self.rank % batch.num_rows]
        t_ref = t_policy = 0.0
        trained_tokens = 0
        entropy_sum = 0.0
        drift_sum, drift_max = 0.0, 0.0
        grad_norm = float("nan")
        old_logprobs: dict[int, torch.Tensor] = {}  # per micro-batch, before the first step
        computed = 0  # positions this rank's forward passes compute (trimmed rows)
        for pass_idx in range(self.num_passes):
            stats = None
            for i, rows in enumerate(plan):
                if self.device.type == "cpu":  # activations and grads live in the host heap
                    release_freed_host_memory()
                mb = batch.select_rows(rows or filler_row).trimmed(BLOCK_SIZE).to(self.device)
                computed += mb.tokens.numel() if pass_idx == 0 and rows else 0
                loss_mask = mb.trained if rows else torch.zeros_like(mb.trained)
                mask = packed_block_mask(mb.group_ids, mb.parent_ids)  # policy and reference
                score = functools.partial(
                    packed_logprobs,
                    batch=mb,
                    mask=mask,
                    temperature=self.sampling["temperature"],
                    chunk_size=self.logprob_chunk,
                )
                t = time.perf_counter()
                ref = None
                if self.reference is not None:  # same packed batch and mask as the policy
                    with self._autocast():
                        ref, _ = self.reference.logprobs(score)
                t_ref += time.perf_counter() - t
                t = time.perf_counter()
                with self.activations_ctx, self._autocast():
                    logprobs, entropy = score(self.model, with_entropy=True)
                if self.device.type == "cpu":  # the forward's freed intermediates, before backward
                    release_freed_host_memory()
                if pass_idx == 0 and self.loss.needs_old_logprobs:
                    old_logprobs[i] = logprobs.detach()
                loss, mb_stats = self.loss(logprobs, mb, loss_mask, ref, old_logprobs.get(i))
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
            if self.clip_grad_norm is not None:
                trainable = [p for p in self.model.parameters() if p.requires_grad]
                grad_norm = float(
                    full_tensor(torch.nn.utils.clip_grad_norm_(trainable, self.clip_grad_norm))
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        tokens, entropy_sum, drift_sum, computed = all_reduce(
            [trained_tokens, entropy_sum, drift_sum, computed], self.device
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
            "packing/positions": computed,  # rows as computed: the last one trimmed
            # prompt and completion tokens over computed positions (1.0: no padding at all)
            "packing/fill": batch.stats.tokens / max(computed, 1.0),
            "packing/padded_positions": float(batch.stats.padded_positions),
            "packing/saved_fraction": batch.stats.saved_fraction,
        }

    # ------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, **sampling: Any) -> dict[str, float]:
        """Accuracy on the task's held-out rows at the `eval` section's sampling settings
        (default: greedy), or with `sampling` (e.g. temperature, num_samples) overriding
        them. The evaluation recipe's code path (`packrl.evaluation`), with its fixed seeds:
        two evaluations of the same weights agree, here and in `recipes/evaluate.py`, when
        both decode in the same precision. It decodes with the rollout sampler, so a bf16
        ``sampler.dtype`` can differ from an fp32 evaluation by a few points (near-ties:
        seed 2 of the CPU demo, 6% here against 4% in fp32, docs/benchmarks.md)."""
        rows = list(self.task.eval)[: self.eval_rows]
        if not rows:
            return {}
        sampling = {**self.eval_sampling, **sampling}
        groups = evaluate_prompts(
            self.sampler,
            self.scorer,
            rows,
            self.prompt_ids(rows),
            seed=self.seed,
            trainer_state=TrainerState(global_step=self.step, max_steps=self.max_steps),
            **sampling,
        )
        metrics = eval_metrics(groups, difficulty_key=None)
        suffix = "" if sampling["temperature"] == 0 else "_sampled"
        return {
            f"eval/accuracy{suffix}": metrics["accuracy"],
            f"eval/reward{suffix}": metrics["reward/mean"],
        }

    # --------------------------------------------------------------------------- logging
    def _log(self, metrics: dict[str, float], step: int) -> None:
        if not metrics or not self.is_rank_zero:
            return
        self.metric_logger.log_dict(metrics, step=step)
        self.metrics_file.write({"step": step, **metrics})

    def _log_completions(self, groups: list[GroupRollout]) -> None:
        """Append the step's first `log_num_completions` completions to completions.jsonl."""
        if not self.is_rank_zero:
            return
        samples = [(g, j) for g in groups for j in range(g.group_size)]
        for g, j in samples[: self.log_num_completions]:
            self.samples_file.write(
                {
                    "step": self.step + 1,  # the step these metrics are logged under
                    "prompt": g.row["messages"][-1]["content"],
                    "completion": g.completions[j].text,
                    "reward": g.reward[j],
                    "rewards": {name: values[j] for name, values in g.rewards.items()},
                    "finished": g.completions[j].finished,
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
            source_checkpoint_dir=self.source_checkpoint_dir,
            model_type=self.model_type,
            adapter_only=self.is_lora and not final,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            data_state={"data_position": self.data_position},
            keep_last=self.keep_last,
            config=self.run_config,
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
        self.run_lock.release()
        self.metric_logger.close()
        self.metrics_file.close()
        self.samples_file.close()
        plot = None
        if self.plot:
            plot = plot_metrics(
                read_metrics(self.metrics_file.path),
                self.output_dir / "reward.png",
                title=f"GRPO on {self.task.name}",
            )
        print(f"checkpoint: {self.last_checkpoint}", flush=True)
        print(f"logs:       {self.metrics_file.path} (completions: {self.samples_file.path})")
        if plot is not None:
            print(f"plot:       {plot}", flush=True)


@functools.cache
def _epoch_order(seed: int, num: int) -> list[int]:
    """The order of the training rows in one epoch: a permutation fixed by its seed."""
    return torch.randperm(num, generator=torch.Generator().manual_seed(seed)).tolist()


@config.parse
def recipe_main(cfg: DictConfig) -> int:
    """GRPO fine-tuning on packed multi-prompt sequences (see the module docstring)."""
    config.log_config(recipe_name="GRPORecipe", cfg=cfg)
    recipe = GRPORecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return PREEMPTED_EXIT_CODE if recipe.preempted else 0


if __name__ == "__main__":
    sys.exit(recipe_main())
