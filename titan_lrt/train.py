"""The trainer: builds the pieces from the config, then runs the training loop.

for each step:
    for each micro-batch:                 # gradient accumulation
        run the LRT schedule on it        # pass 0 + refinement passes, with backward
    clip, guard against NaN/inf, optimizer step, LR step
    log / evaluate / checkpoint
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from titan_lrt import checkpoint as ckpt
from titan_lrt.config import Config, ConfigError, load_config
from titan_lrt.cpu_allocator import keep_freed_memory
from titan_lrt.data.corpus import ensure_stdlib_corpus
from titan_lrt.data.loader import build_dataloader, merge_loader_states
from titan_lrt.data.prepared import require_data_source
from titan_lrt.data.sources import DataError
from titan_lrt.data.tokenizer import Tokenizer, ensure_tokenizer
from titan_lrt.eval.bpb import evaluate_bpb
from titan_lrt.guards import (
    MAX_ROLLBACKS_IN_A_ROW,
    LossSpikeError,
    LossSpikeGuard,
    NonFiniteError,
    PathwayMonitor,
    TrainingHalted,
    nonfinite_count,
)
from titan_lrt.launcher import report_crash, report_user_error
from titan_lrt.metrics import (
    MetricsLogger,
    Rates,
    StepStats,
    ThroughputWindow,
    device_peak_flops,
    format_step_line,
    lrt_statistics,
    memory_stats,
    pathway_grad_norms,
    setup_logging,
)
from titan_lrt.model.accounting import StepFlops, count_parameters, published_step_flops, run_flops, step_flops
from titan_lrt.model.schedule import StepResult, pass_target_counts, run_schedule
from titan_lrt.model.transformer import Transformer
from titan_lrt.optim import build_lr_schedulers, build_optimizers, clip_grad_norm_
from titan_lrt.parallel.context_parallel import ContextParallel
from titan_lrt.parallel.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    seed_everything,
    shutdown,
)
from titan_lrt.parallel.float8 import precompute_scales
from titan_lrt.parallel.parallelize import parallelize
from titan_lrt.precision import compute_dtype
from titan_lrt.preemption import StopRequest
from titan_lrt.resume_settings import (
    describe_diff,
    flat_settings,
    kept_global_batch,
    refusal,
    saved_world_size,
    settings_diff,
)

logger = logging.getLogger("titan_lrt")

MAX_SKIPPED_STEPS = 10
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        t = config.training
        if t.deterministic:
            _deterministic_cublas()  # before init_distributed starts CUDA
        self.dist: DistInfo = init_distributed(
            device=t.device, timeout_s=config.parallelism.process_group_timeout_seconds
        )
        self.device = self.dist.device
        if self.device.type == "cpu":
            keep_freed_memory()
        seed_everything(t.seed, t.deterministic)
        self.dump_folder = Path(config.job.dump_folder)
        self.compute_dtype = compute_dtype(t.mixed_precision, self.device)
        self.fsdp = self.dist.world_size > 1
        # one process: autocast; FSDP: its mixed-precision policy casts the parameters
        use_autocast = not self.fsdp and self.compute_dtype != torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=self.compute_dtype) if use_autocast else None

        self.tokenizer = self._prepare_tokenizer()
        self.model_args = config.model_args(self.tokenizer.vocab_size, self.tokenizer.bos_id)
        self.model, mesh = self._build_model()
        # Data parallelism proper: ranks with different rows. The ranks of a context-parallel
        # group get the same rows and split their positions (self.cp, None without CP).
        self.dp_rank, self.dp_degree = (mesh["dp"].get_local_rank(), mesh["dp"].size()) if mesh else (0, 1)
        cp = config.parallelism.context_parallel_degree
        self.cp = ContextParallel(mesh["cp"].get_group()) if cp > 1 else None
        f8 = config.float8
        self.float8_fsdp_scales = f8.enable and self.fsdp and f8.recipe_name == "tensorwise"
        self.optimizers = build_optimizers(self.model, **vars(config.optimizer))
        self.lr_schedulers = build_lr_schedulers(self.optimizers, steps=t.steps, **vars(config.lr_scheduler))

        dp = self.dp_degree
        self.global_batch = t.global_batch_size or t.local_batch_size * dp
        if self.global_batch % (t.local_batch_size * dp):
            raise ConfigError(
                f"training.global_batch_size={self.global_batch} is not a multiple of local_batch_size x "
                f"data-parallel ranks = {t.local_batch_size} x {dp}"
            )
        self.grad_accum = self.global_batch // (t.local_batch_size * dp)
        self.data_source = self._data_source()
        self.train_loader = self._loader(split="train")
        self.batches = iter(self.train_loader)
        self.token_bytes = self.tokenizer.token_bytes().to(self.device)

        self.state = ckpt.TrainState()
        self.skipped_in_a_row = 0
        self.spike_guard = LossSpikeGuard(t.spike_factor, t.spike_patience)
        self.rollbacks_in_a_row, self.last_spike_step = 0, 0
        start = self.model_args.lrt.warning_start_step
        self.pathway_monitor = PathwayMonitor(start) if start is not None else None
        self.checkpointer = ckpt.CheckpointManager(
            self.dump_folder / config.checkpoint.folder,
            {
                "model": ckpt.ModelWrapper(self.model),
                "optimizer": self.optimizers,
                "lr_scheduler": self.lr_schedulers,
                "dataloader": ckpt.PerRankWrapper(self.train_loader, merge_loader_states),
                "train_state": self.state,
            },
            interval=config.checkpoint.interval,
            keep_latest_k=config.checkpoint.keep_latest_k,
            async_mode=config.checkpoint.async_mode,
            load=config.checkpoint.load,
            initial_load_path=config.checkpoint.initial_load_path or None,
            run_config=config.to_toml(),
        )
        self.metrics = MetricsLogger(
            self.dump_folder / config.metrics.save_tb_folder if self.dist.is_main else None,
            config.metrics.enable_tensorboard,
        )
        self.flops = step_flops(self.model_args, t.seq_len)
        self.step_costs: dict[int, tuple[StepFlops, float]] = {}
        self.peak_flops = device_peak_flops(self.device)
        self._log_setup()

    # ---- set-up ------------------------------------------------------------------

    def _prepare_tokenizer(self) -> Tokenizer:
        m, d = self.config.model, self.config.data
        path = Path(m.tokenizer_path)
        if not d.streaming:  # local data: a missing or unfinished folder stops here, naming the command
            for source in d.mixture or ([d.dataset] if d.dataset != "stdlib" else []):
                require_data_source(source, m.vocab_size)
        if d.dataset == "stdlib":
            self._on_main_first(lambda: ensure_stdlib_corpus(d.corpus_path, show_progress=self.dist.is_main))
            if not path.exists():
                self._on_main_first(
                    lambda: ensure_tokenizer(path, d.corpus_path, m.vocab_size, show_progress=self.dist.is_main)
                )
        if not path.is_file():
            raise ConfigError(
                f"model.tokenizer_path={m.tokenizer_path}: no such file; give a tokenizer.json or train one "
                "with tools/train_tokenizer.py"
            )
        if self.dist.is_main:  # the run folder carries its tokenizer (for evaluation and export)
            self.dump_folder.mkdir(parents=True, exist_ok=True)
            if not (self.dump_folder / ckpt.RUN_TOKENIZER).exists():
                shutil.copyfile(path, self.dump_folder / ckpt.RUN_TOKENIZER)
        return Tokenizer.from_file(path)

    def _build_model(self):
        """The model, parallelized and initialised, and the device mesh (None for one process)."""
        with torch.device("meta"):
            model = Transformer(self.model_args)
        mesh = parallelize(model, self.config, self.device, self.dist.world_size, self.compute_dtype)
        model.to_empty(device=self.device)
        # Initialise a full copy on the CPU of rank 0 and load it (sharding it out under
        # FSDP): the same initial weights for every world size and device.
        full = {}
        if self.dist.is_main:
            reference = Transformer(self.model_args)
            torch.manual_seed(self.config.training.seed)
            reference.init_weights()
            full = reference.state_dict()
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.fsdp)
        set_model_state_dict(model, full, options=options)
        model.init_buffers(self.device)
        return model, mesh

    def _data_source(self) -> str | dict[str, float]:
        d = self.config.data
        if d.mixture:
            return d.mixture
        return d.corpus_path if d.dataset == "stdlib" else d.dataset

    def _loader(self, split: str, eval_mode: bool = False, source: str | dict[str, float] | None = None):
        d, t = self.config.data, self.config.training
        return build_dataloader(
            self.data_source if source is None else source,
            tokenizer=self.tokenizer,
            seq_len=t.seq_len,
            local_batch_size=t.local_batch_size,
            split=split,
            text_column=d.text_column,
            # evaluation scores whole sequences on every rank (no context parallelism)
            dp_rank=self.dist.rank if eval_mode else self.dp_rank,
            dp_world_size=self.dist.world_size if eval_mode else self.dp_degree,
            num_streams=self.dist.world_size if eval_mode else d.num_streams,
            packing="concat" if eval_mode else d.packing,
            seed=t.seed,
            num_workers=0 if eval_mode else d.num_workers,
            streaming=d.streaming,
        )

    def _on_main_first(self, fn):
        """Run fn on rank 0, then on the others (shared files are built once)."""
        if self.dist.is_main:
            fn()
        barrier()
        if not self.dist.is_main:
            fn()

    def _log_setup(self) -> None:
        c, t = self.config, self.config.training
        counts = count_parameters(self.model_args)
        lrt = self.model_args.lrt
        logger.info(f"titan_lrt: {c.job.description or 'run'} -> {self.dump_folder}")
        logger.info(
            f"model: flavor {c.model.flavor}, {self.model_args.n_layers} layers, dim {self.model_args.dim}, "
            f"{self.model_args.n_heads} heads, vocab {self.model_args.vocab_size}; LRT mode {lrt.describe()}"
        )
        logger.info(counts.describe())
        logger.info(
            f"FLOPs per token (training): {self.flops.total / 1e6:.1f}M, {self.flops.baseline_ratio:.3f}x the "
            f"baseline step; passes: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in self.flops.passes.items())
        )
        if lrt.refine_fraction < 1 or lrt.start_step or not lrt.pass0_backward or lrt.jacobi_mix:
            average = run_flops(self.model_args, t.seq_len, t.steps, t.seed)[-1] / t.steps
            logger.info(
                f"schedule {lrt.describe()}: {average / self.flops.baseline:.3f}x the baseline step on average "
                f"over the {t.steps} steps"
            )
        logger.info(
            f"batch: {self.global_batch} sequences x {t.seq_len} tokens per step ({self.grad_accum} micro-batches "
            f"of {t.local_batch_size} on each of {self.dp_degree} data-parallel ranks"
            + (f", each sequence split over {self.cp.degree} context-parallel ranks" if self.cp else "")
            + f"); device {self.device}, compute dtype {self.compute_dtype}"
            + (" (FSDP)" if self.fsdp else "")
        )

    # ---- the loop -----------------------------------------------------------------

    def resume(self) -> None:
        """Load the checkpoint the config asks for (the newest one by default), if any. Settings changed
        since it was saved are printed and applied, or refused (ConfigError naming the key)."""
        source = self._resume_source()
        if source is not None:
            self._check_settings_against(source)
        fresh = self._optimizer_settings()
        resumed = self.checkpointer.load()
        if resumed is not None:
            self.batches = iter(self.train_loader)
            if not self.state.flops_seen:  # a checkpoint from before the FLOPs count: every step ran in full
                self.state.flops_seen = {k: v * self.state.tokens_seen for k, v in self.flops.passes.items()}
            self.model.set_training_step(self.state.step)  # the warmup ramps of the restored step
            if source is not None:
                self._apply_optimizer_settings(fresh)
            logger.info(f"resumed from step {resumed}")

    def _resume_source(self) -> Path | None:
        """The step folder a full resume will load (None: a fresh start or a model-only initial load)."""
        load = self.config.checkpoint.load
        if load != "latest":
            return None if load == "none" else Path(load)
        folders = ckpt.step_folders(self.checkpointer.folder)  # highest step first
        return next((path for _, path in folders if ckpt.checkpoint_problem(path) is None), None)

    def _check_settings_against(self, source: Path) -> None:
        saved_config = source / ckpt.RUN_CONFIG
        if not saved_config.is_file():
            logger.warning(f"{source} holds no {saved_config.name}: settings changed since are not checked")
            return
        saved, current = flat_settings(saved_config.read_text()), flat_settings(self.config.to_toml())
        diff = settings_diff(saved, current)
        refused = refusal(diff)
        if refused:
            raise ConfigError(refused)
        if diff:
            logger.info(f"resume: settings changed since {source.name} was saved (checkpoint -> now), applied:")
            for line in describe_diff(diff):
                logger.info(line)
        saved_world = saved_world_size(source)
        kept = kept_global_batch(saved, saved_world, current, self.global_batch) if saved_world else None
        if kept:
            self._keep_global_batch(kept, saved_world)

    def _keep_global_batch(self, global_batch: int, saved_world: int) -> None:
        """Resuming on another number of ranks keeps the run's global batch: more or fewer micro-batches."""
        per_micro_batch = self.config.training.local_batch_size * self.dp_degree
        if global_batch % per_micro_batch:
            raise ConfigError(
                f"training.global_batch_size: the checkpoint's run ({saved_world} ranks) trained on {global_batch} "
                f"sequences per step, not a multiple of local_batch_size x data-parallel ranks = {per_micro_batch} "
                "here; set training.global_batch_size (and local_batch_size) explicitly"
            )
        self.global_batch, self.grad_accum = global_batch, global_batch // per_micro_batch
        # the checkpoints of this run record it, so that the next resume keeps it too
        self.config.training.global_batch_size = global_batch
        self.checkpointer.run_config = self.config.to_toml()
        logger.warning(
            f"keeping the checkpoint's global batch of {global_batch} sequences ({saved_world} ranks then, "
            f"{self.dist.world_size} now): {self.grad_accum} micro-batches of {self.config.training.local_batch_size} "
            f"on each of {self.dp_degree} data-parallel ranks; set training.global_batch_size to change it"
        )

    def _optimizer_settings(self) -> tuple[list[dict], list[list[float]]]:
        """The current config's optimizer hyperparameters (per param group) and the schedulers' base LRs."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizers.param_groups]
        return groups, [list(s.base_lrs) for s in self.lr_schedulers]

    def _apply_optimizer_settings(self, settings: tuple[list[dict], list[list[float]]]) -> None:
        """A restored optimizer and scheduler carry the saved run's LRs and hyperparameters: put the current
        config's back (the schedule's position stays restored; its shape is the current config's already)."""
        groups, base_lrs = settings
        for group, fresh in zip(self.optimizers.param_groups, groups):
            group.update(fresh)
        for scheduler, bases in zip(self.lr_schedulers, base_lrs):
            scheduler.base_lrs = bases
            for group, base, factor in zip(scheduler.optimizer.param_groups, bases, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)  # LambdaLR's own formula: exact when unchanged
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def train(self, stop: StopRequest) -> None:
        c = self.config
        window = ThroughputWindow()
        try:
            while self.state.step < c.training.steps:
                stats = self.train_step()
                window.add(stats.tokens, sum(stats.flops.values()), stats.published_flops)
                step = self.state.step
                if self._logs_at(step):
                    self._log_step(step, stats, window.rate())
                if self._rolled_back_after_spike(step, float(stats.loss)):
                    continue
                with window.excluded():  # tokens/s and MFU measure training only
                    if c.eval.interval and (step % c.eval.interval == 0 or step == c.training.steps):
                        self.evaluate()
                    if stop.requested(self.device):
                        logger.info(f"{stop.signal_name or 'stop signal'} on some rank: saving step {step} and exiting")
                        if c.checkpoint.enable:
                            self.checkpointer.save(step, force=True)
                        break
                    last = step == c.training.steps
                    if c.checkpoint.enable and (last or not self._spike_suspected()):
                        self.checkpointer.save(step, force=last)
        except TrainingHalted:  # every rank halts together: finish a save in flight of an earlier, good step
            self.checkpointer.close()
            self.metrics.close()
            raise
        self.checkpointer.close()
        self.metrics.close()

    def train_step(self) -> StepStats:
        """One optimizer step over grad_accum micro-batches."""
        t = self.config.training
        self.model.set_training_step(self.state.step)  # the warmup ramps of this step (LRTArgs.ramps)
        micro_batches = [
            tuple(x.to(self.device, non_blocking=True) for x in next(self.batches)) for _ in range(self.grad_accum)
        ]
        passes = self.model_args.lrt.passes_at(self.state.step, t.seed)
        counts = self._global_target_counts(micro_batches, passes)
        results: list[StepResult] = []
        for k, (inputs, targets) in enumerate(micro_batches):
            last_micro_batch = k == len(micro_batches) - 1

            def backward(loss: torch.Tensor, last_of_micro_batch: bool) -> None:
                self._set_gradient_sync(last_micro_batch and last_of_micro_batch)
                loss.backward()

            with self.autocast or contextlib.nullcontext():
                result = run_schedule(
                    self.model,
                    inputs,
                    targets,
                    backward=backward,
                    loss_denominators=counts,
                    layout=self.cp,
                    passes=passes,
                )
            results.append(result)
        loss = all_reduce_sum(torch.stack([r.loss.detach() for r in results]).sum())
        logged = self.model_args.lrt.enabled and self._logs_at(self.state.step + 1)
        grad_norms = pathway_grad_norms(self.model) if logged else {}  # before clipping scales them
        grad_norm = clip_grad_norm_(self.model.parameters(), t.max_norm)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizers.step()
            self._check_parameters_finite(loss, grad_norm)
            if self.float8_fsdp_scales:
                precompute_scales(self.model)
            self.skipped_in_a_row = 0
        else:
            self._handle_nonfinite(loss, grad_norm)
        self.lr_schedulers.step()
        self.optimizers.zero_grad(set_to_none=True)
        tokens = self.global_batch * t.seq_len
        per_token, published = self._step_cost(passes)
        flops = {name: tokens * f for name, f in per_token.passes.items()}
        self.state.step += 1
        self.state.tokens_seen += tokens
        for name, amount in flops.items():
            self.state.flops_seen[name] = self.state.flops_seen.get(name, 0.0) + amount
        self.model.set_training_step(self.state.step)  # what evaluation and checkpoints of these weights use
        return StepStats(
            results=results,
            loss=loss,
            grad_norm=grad_norm,
            tokens=tokens,
            flops=flops,
            published_flops=tokens * published,
            counts=counts,
            grad_norms=grad_norms,
        )

    def _logs_at(self, step: int) -> bool:
        """Whether the step that ends with `step` optimizer steps done is logged."""
        return step % self.config.metrics.log_freq == 0 or step == self.config.training.steps

    def _step_cost(self, passes: int) -> tuple[StepFlops, float]:
        """FLOPs per token of a step of `passes` passes: ours per pass, and the published convention's
        (counted once per kind of step)."""
        if passes not in self.step_costs:
            seq_len = self.config.training.seq_len
            self.step_costs[passes] = (
                step_flops(self.model_args, seq_len, passes),
                published_step_flops(self.model_args, seq_len, passes),
            )
        return self.step_costs[passes]

    def _global_target_counts(self, micro_batches, passes: int) -> list[float]:
        """Scored targets of each pass over the whole global batch (all micro-batches, all ranks;
        the ranks of a context-parallel group hold the same rows, which count once)."""
        targets = torch.stack([targets for _, targets in micro_batches])
        local = pass_target_counts(self.model_args.lrt, targets, passes)
        counts = all_reduce_sum(local) / (self.cp.degree if self.cp else 1)
        return [max(float(c), 1.0) for c in counts]

    def _set_gradient_sync(self, sync: bool) -> None:
        if self.fsdp:
            every = self.config.parallelism.gradient_sync == "every_micro_batch"
            self.model.set_requires_gradient_sync(sync or every)

    def _handle_nonfinite(self, loss, grad_norm) -> None:
        step = self.state.step + 1
        message = (
            f"non-finite values at step {step}: loss {float(loss)}, gradient norm {float(grad_norm)}. "
            "Lower optimizer.lr, raise lr_scheduler.warmup_steps or check the data; "
            'training.nonfinite = "skip" skips such steps instead.'
        )
        if self.config.training.nonfinite == "stop":
            raise NonFiniteError(message + " Stopping; the last checkpoint is intact.")
        self.skipped_in_a_row += 1
        logger.warning(f"skipping the optimizer step: {message}")
        if self.skipped_in_a_row >= MAX_SKIPPED_STEPS:
            raise NonFiniteError(f"{MAX_SKIPPED_STEPS} steps in a row were skipped; stopping. Last: {message}")

    def _check_parameters_finite(self, loss, grad_norm) -> None:
        """An update can overflow the weights from a finite loss and gradient (a huge LR): stop before
        anything saves them (whatever training.nonfinite says: an applied update cannot be skipped)."""
        if float(all_reduce_sum(nonfinite_count(self.model.parameters()))):
            raise NonFiniteError(
                f"non-finite parameters after the optimizer step of step {self.state.step + 1} (loss {float(loss)}, "
                f"gradient norm {float(grad_norm)}): the update overflowed. Lower optimizer.lr or raise "
                "lr_scheduler.warmup_steps. Stopping; the last checkpoint is intact."
            )

    # ---- loss spikes ---------------------------------------------------------------

    def _spike_suspected(self) -> bool:
        """Flagged losses under an acting guard: hold regular saves (they could replace the last good one)."""
        return self.config.training.spike_action in ("stop", "rollback") and self.spike_guard.suspicious

    def _rolled_back_after_spike(self, step: int, loss: float) -> bool:
        """Feed the loss spike guard and act on a spike; True when the run was rolled back."""
        t = self.config.training
        if t.spike_action == "off":
            return False
        mean = self.spike_guard.mean
        if not self.spike_guard.observe(step, loss):
            if step > self.last_spike_step and not self.spike_guard.suspicious:
                self.rollbacks_in_a_row = 0  # got past the previous spike
            return False
        first = self.spike_guard.first_flagged
        message = (
            f"loss spike: loss {loss:.4f} at step {step}, above {t.spike_factor} x its running mean {mean:.4f} "
            f"for {t.spike_patience} steps in a row (since step {first})"
        )
        self.metrics.log(step, {"guard/loss_spike": 1.0})
        if t.spike_action == "warn":
            logger.warning(message)
            self.spike_guard.reset_flags()
            return False
        if t.spike_action == "stop":
            raise LossSpikeError(
                f"{message}. Stopping; lower optimizer.lr or raise lr_scheduler.warmup_steps, or set "
                'training.spike_action = "rollback" to reload the last good checkpoint and skip the batches.'
            )
        self._roll_back(step, first, message)
        return True

    def _roll_back(self, step: int, first_flagged: int, message: str) -> None:
        """Reload the newest checkpoint from before the spike and train on from there with the batches
        that follow the spike (the data loader keeps its position: the batches in between are skipped).

        The loss of step k is computed with the weights saved at step k - 1: the newest good
        checkpoint is the newest at or below first_flagged - 2."""
        if self.rollbacks_in_a_row >= MAX_ROLLBACKS_IN_A_ROW:
            raise LossSpikeError(
                f"{message}; {MAX_ROLLBACKS_IN_A_ROW} rollbacks in a row did not get past it. "
                "Stopping; lower optimizer.lr or raise lr_scheduler.warmup_steps."
            )
        folder = self.checkpointer.folder
        good = [
            s
            for s, path in ckpt.step_folders(folder)
            if s <= first_flagged - 2 and ckpt.checkpoint_problem(path) is None
        ]
        if not self.config.checkpoint.enable or not good:
            raise LossSpikeError(
                f"{message}; no checkpoint from before step {first_flagged - 1} in {folder} to roll back to. Stopping."
            )
        target = max(good)
        data_position = self.train_loader.state_dict()
        self.checkpointer.load(target)
        self.train_loader.load_state_dict(data_position)
        self.batches = iter(self.train_loader)
        if self.dist.is_main:  # the abandoned trajectory's checkpoints must not be resumed from
            for s, path in ckpt.step_folders(folder):
                if s > target:
                    logger.info(f"removing {path}: saved on the trajectory that was rolled back")
                    shutil.rmtree(path)
        self.spike_guard.reset_flags()
        self.rollbacks_in_a_row += 1
        self.last_spike_step = step
        logger.warning(
            f"{message}; rolled back to step {target} and skipping the batches of steps "
            f"{target + 1}..{step} (rollback {self.rollbacks_in_a_row} in a row)"
        )
        self.metrics.log(step, {"guard/rollback_to_step": float(target)})

    # ---- logging and evaluation ----------------------------------------------------

    def _log_step(self, step: int, stats: StepStats, rates: Rates) -> None:
        results, counts = stats.results, stats.counts
        scalars = {"loss/total": float(stats.loss)}
        n_passes = len(results[0].pass_losses)
        sums = [sum(r.pass_token_losses[i].double().sum() for r in results) for i in range(n_passes)]
        sums.append(sum(r.token_loss.double().sum() for r in results))
        sums = all_reduce_sum(torch.stack(sums)).tolist()
        for i in range(n_passes):
            scalars[f"loss/pass{i}"] = sums[i] / counts[i]
        merged = sums[-1] / counts[0]
        scalars["loss/merged"] = merged
        if n_passes > 1:
            scalars["loss/merged_minus_pass0"] = merged - scalars["loss/pass0"]
        scalars.update(lrt_statistics(self.model, results))
        scalars.update({k: float(v) for k, v in stats.grad_norms.items()})
        lrt = self.model_args.lrt
        if lrt.gamma_warmup_steps or lrt.gate_warmup_steps:
            scalars["lrt/gamma_ramp"], scalars["lrt/gate_ramp"] = lrt.ramps(step - 1)  # this step's
        warning = self._check_pathway(step, scalars)
        scalars["throughput/tokens_per_s"] = rates.tokens
        scalars["throughput/tokens_seen"] = self.state.tokens_seen
        scalars.update(self._flops_scalars(stats))
        achieved = rates.flops / self.dist.world_size
        scalars["throughput/tflops_per_device"] = achieved / 1e12
        if self.peak_flops:
            scalars["throughput/mfu_pct"] = 100 * achieved / self.peak_flops
            published = rates.published_flops / self.dist.world_size
            scalars["throughput/mfu_published_pct"] = 100 * published / self.peak_flops
        lrs = self.lr_schedulers.last_lr()
        scalars["optim/lr"] = lrs.get("matrix", max(lrs.values()))
        scalars.update({f"optim/lr_{name}": lr for name, lr in lrs.items()})
        scalars["optim/grad_norm"] = float(stats.grad_norm)
        scalars["data/waste_fraction"] = self.train_loader.stats()["waste_fraction"]
        scalars.update(memory_stats(self.device))
        scalars.update(self._tokens_by_source())
        line = format_step_line(step, scalars) + _tokens_by_source_text(scalars)
        self.metrics.log(step, scalars, line if self.dist.is_main else None)
        if warning and self.dist.is_main:
            logger.warning(warning)

    def _check_pathway(self, step: int, scalars: dict[str, float]) -> str | None:
        """The LRT early warning (`PathwayMonitor`): sets lrt/pathway_warning; the line to print, once."""
        if self.pathway_monitor is None or "loss/merged_minus_pass0" not in scalars:  # pass 0 ran alone
            return None
        warning = self.pathway_monitor.observe(step, scalars["loss/pass0"], scalars["loss/merged"])
        scalars["lrt/pathway_warning"] = float(self.pathway_monitor.failing)
        return warning

    def _flops_scalars(self, stats: StepStats) -> dict[str, float]:
        """Training FLOPs of what ran: this step's and the run's so far, in total and per pass."""
        seen = sum(self.state.flops_seen.values())
        scalars = {
            "flops/step": sum(stats.flops.values()),
            "flops/seen": seen,
            "throughput/baseline_equivalent_tokens": seen / self.flops.baseline,
        }
        scalars.update({f"flops/seen_{name}": amount for name, amount in self.state.flops_seen.items()})
        return scalars

    def _tokens_by_source(self) -> dict[str, float]:
        """Mixtures: tokens read from each source over all ranks (data/tokens/<source>)."""
        by_source = self.train_loader.stats().get("tokens_read_by_source")
        if not by_source:
            return {}
        totals = all_reduce_sum(torch.tensor(list(by_source.values()), dtype=torch.float64)).tolist()
        return {f"data/tokens/{name}": total for name, total in zip(by_source, totals)}

    def evaluate(self) -> dict[str, float]:
        """Validation bits per byte; a mixture is scored as a whole and per source (val/<source>/...)."""
        scalars = self._evaluate_source(None, "val")
        for source in self.config.data.mixture:
            scalars.update(self._evaluate_source(source, f"val/{source}"))
        return scalars

    def _evaluate_source(self, source: str | None, prefix: str) -> dict[str, float]:
        e = self.config.eval
        self.model.set_training_step(self.state.step)  # the warmup ramps of the weights evaluated
        loader = self._loader(split=e.split, eval_mode=True, source=source)
        batches = (tuple(x.to(self.device) for x in b) for _, b in zip(range(e.steps), loader))
        self.model.eval()
        try:
            result = evaluate_bpb(self.model, batches, self.token_bytes, e.exact_sequences, self.autocast)
        finally:
            self.model.train()
        result.all_reduce()
        scalars = {prefix + k.removeprefix("val"): v for k, v in result.scalars().items()}
        label = "eval   " if source is None else f"eval {source}: "
        line = label + " | ".join(f"{k.rsplit('/', 1)[1]} {v:.4f}" for k, v in scalars.items())
        self.metrics.log(self.state.step, scalars, line if self.dist.is_main else None)
        return scalars


def _tokens_by_source_text(scalars: dict[str, float]) -> str:
    """Console suffix: the share of tokens each mixture source has given so far."""
    by_source = {k.removeprefix("data/tokens/"): v for k, v in scalars.items() if k.startswith("data/tokens/")}
    total = sum(by_source.values()) or 1.0
    return "".join(f" | {name} {v / total:.1%}" for name, v in by_source.items())


def _deterministic_cublas() -> None:
    """cuBLAS is deterministic only with a fixed workspace, read from the environment when CUDA
    starts (PyTorch's reproducibility notes); a value the user set is kept."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)


def main(argv: list[str]) -> int:
    """Train; returns the process exit code."""
    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        config, print_only = load_config(argv)
    except ConfigError as e:
        return _user_error(f"config error: {e}", 2)
    if print_only:
        print(config.to_toml())
        return 0
    stop = StopRequest()  # from the start: a stop signal during set-up is honoured after the first step
    try:
        trainer = Trainer(config)
        trainer.resume()
    except (ValueError, FileNotFoundError) as e:  # bad config, data path or checkpoint
        return _user_error(f"error: {e}", 2)
    try:
        trainer.train(stop)
    except DataError as e:  # a bad row met mid-run; nothing was saved after the last checkpoint
        return _user_error(f"error: {e}", 2)
    except TrainingHalted as e:
        return _user_error(str(e), 3)
    return 0


def _user_error(message: str, exit_code: int) -> int:
    report_user_error(message, exit_code)
    return exit_code


def run(argv: list[str]) -> None:
    """Process entry point (run_train.sh): train, then leave without teardown aborts."""
    code = 1
    try:
        code = main(argv)
    except BaseException as e:  # noqa: BLE001 - reported here: shutdown() exits without unwinding
        traceback.print_exc()
        report_crash(e)
    finally:
        shutdown(code)


if __name__ == "__main__":
    run(sys.argv[1:])
