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
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from titan_lrt import checkpoint as ckpt
from titan_lrt.config import Config, ConfigError, load_config
from titan_lrt.cpu_allocator import keep_freed_memory
from titan_lrt.data.corpus import ensure_stdlib_corpus
from titan_lrt.data.loader import build_dataloader, merge_loader_states
from titan_lrt.data.sources import DataError
from titan_lrt.data.tokenizer import Tokenizer, ensure_tokenizer
from titan_lrt.eval.bpb import evaluate_bpb
from titan_lrt.launcher import report_crash, report_user_error
from titan_lrt.metrics import MetricsLogger, device_peak_flops, format_step_line, memory_stats
from titan_lrt.model.accounting import count_parameters, step_flops
from titan_lrt.model.schedule import StepResult, run_schedule
from titan_lrt.model.transformer import IGNORE_INDEX, Transformer
from titan_lrt.optim import build_lr_schedulers, build_optimizers, clip_grad_norm_
from titan_lrt.parallel.context_parallel import ContextParallel
from titan_lrt.parallel.distributed import DistInfo, init_distributed, shutdown
from titan_lrt.parallel.float8 import precompute_scales
from titan_lrt.parallel.parallelize import DTYPES, parallelize
from titan_lrt.preemption import StopRequest

logger = logging.getLogger("titan_lrt")

MAX_SKIPPED_STEPS = 10
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/inf."""


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        t = config.training
        if t.deterministic:
            _deterministic_cublas()  # before init_distributed starts CUDA
        self.dist: DistInfo = init_distributed(t.device, config.parallelism.process_group_timeout_seconds)
        self.device = self.dist.device
        if self.device.type == "cpu":
            keep_freed_memory()
        _seed_everything(t.seed, t.deterministic)
        self.dump_folder = Path(config.job.dump_folder)
        self.compute_dtype = _compute_dtype(t.mixed_precision, self.device)
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
        self.optimizers = build_optimizers(self.model, **_optimizer_kwargs(config))
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
        self.peak_flops = device_peak_flops(self.device)
        self._log_setup()

    # ---- set-up ------------------------------------------------------------------

    def _prepare_tokenizer(self) -> Tokenizer:
        m, d = self.config.model, self.config.data
        path = Path(m.tokenizer_path)
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

    def _data_source(self) -> str:
        d = self.config.data
        return d.corpus_path if d.dataset == "stdlib" else d.dataset

    def _loader(self, split: str, eval_mode: bool = False):
        d, t = self.config.data, self.config.training
        return build_dataloader(
            self.data_source,
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
        _barrier()
        if not self.dist.is_main:
            fn()

    def _log_setup(self) -> None:
        c, t = self.config, self.config.training
        counts = count_parameters(self.model_args)
        lrt = self.model_args.lrt
        logger.info(f"titan_lrt: {c.job.description or 'run'} -> {self.dump_folder}")
        logger.info(
            f"model: flavor {c.model.flavor}, {self.model_args.n_layers} layers, dim {self.model_args.dim}, "
            f"{self.model_args.n_heads} heads, vocab {self.model_args.vocab_size}; LRT mode {lrt.mode}"
            + (f", S={lrt.num_subsets}" if lrt.mode == "interleaved" else "")
            + (f", K={lrt.jacobi_passes}" if lrt.mode == "jacobi" else "")
        )
        logger.info(counts.describe())
        logger.info(
            f"FLOPs per token (training): {self.flops.total / 1e6:.1f}M, {self.flops.baseline_ratio:.3f}x the "
            f"baseline step; passes: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in self.flops.passes.items())
        )
        logger.info(
            f"batch: {self.global_batch} sequences x {t.seq_len} tokens per step ({self.grad_accum} micro-batches "
            f"of {t.local_batch_size} on each of {self.dp_degree} data-parallel ranks"
            + (f", each sequence split over {self.cp.degree} context-parallel ranks" if self.cp else "")
            + f"); device {self.device}, compute dtype {self.compute_dtype}" + (" (FSDP)" if self.fsdp else "")
        )

    # ---- the loop -----------------------------------------------------------------

    def resume(self) -> None:
        """Load the checkpoint the config asks for (the newest one by default), if any."""
        resumed = self.checkpointer.load()
        if resumed is not None:
            self.batches = iter(self.train_loader)
            logger.info(f"resumed from step {resumed}")

    def train(self, stop: StopRequest) -> None:
        c = self.config
        window_start, window_tokens = time.perf_counter(), 0
        while self.state.step < c.training.steps:
            stats = self.train_step()
            window_tokens += stats["tokens"]
            step = self.state.step
            if step % c.metrics.log_freq == 0 or step == c.training.steps:
                elapsed = time.perf_counter() - window_start
                self._log_step(step, stats, window_tokens / elapsed)
                window_start, window_tokens = time.perf_counter(), 0
            if c.eval.interval and (step % c.eval.interval == 0 or step == c.training.steps):
                self.evaluate()
            if stop.requested(self.device):
                logger.info(f"{stop.signal_name or 'stop signal'} on some rank: saving step {step} and exiting")
                if c.checkpoint.enable:
                    self.checkpointer.save(step, force=True)
                break
            if c.checkpoint.enable:
                self.checkpointer.save(step, force=step == c.training.steps)
        self.checkpointer.close()
        self.metrics.close()

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches."""
        t = self.config.training
        micro_batches = [tuple(x.to(self.device, non_blocking=True) for x in next(self.batches))
                         for _ in range(self.grad_accum)]
        counts = self._global_target_counts(micro_batches)
        results: list[StepResult] = []
        for k, (inputs, targets) in enumerate(micro_batches):
            last_micro_batch = k == len(micro_batches) - 1

            def backward(loss: torch.Tensor, last_of_micro_batch: bool) -> None:
                self._set_gradient_sync(last_micro_batch and last_of_micro_batch)
                loss.backward()

            with self.autocast or contextlib.nullcontext():
                result = run_schedule(
                    self.model, inputs, targets, backward=backward, loss_denominators=counts, layout=self.cp
                )
            results.append(result)
        loss = _all_reduce_sum(torch.stack([r.loss.detach() for r in results]).sum())
        grad_norm = clip_grad_norm_(self.model.parameters(), t.max_norm)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizers.step()
            if self.float8_fsdp_scales:
                precompute_scales(self.model)
            self.skipped_in_a_row = 0
        else:
            self._handle_nonfinite(loss, grad_norm)
        self.lr_schedulers.step()
        self.optimizers.zero_grad(set_to_none=True)
        tokens = self.global_batch * t.seq_len
        self.state.step += 1
        self.state.tokens_seen += tokens
        return {"results": results, "loss": loss, "grad_norm": grad_norm, "tokens": tokens, "counts": counts}

    def _global_target_counts(self, micro_batches) -> list[float]:
        """Scored targets of each pass over the whole global batch (all micro-batches, all ranks;
        the ranks of a context-parallel group hold the same rows, which count once)."""
        lrt = self.model_args.lrt
        scored = torch.stack([(targets != IGNORE_INDEX) for _, targets in micro_batches]).sum(dim=(0, 1))  # (T,)
        if lrt.mode == "interleaved":
            S = lrt.num_subsets
            per_pass = [scored.sum()] + [scored[i::S].sum() for i in range(S)]
        else:
            per_pass = [scored.sum()] * (lrt.jacobi_passes if lrt.mode == "jacobi" else 1)
        counts = _all_reduce_sum(torch.stack(per_pass).double()) / (self.cp.degree if self.cp else 1)
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
            "training.nonfinite = \"skip\" skips such steps instead."
        )
        if self.config.training.nonfinite == "stop":
            raise NonFiniteError(message + " Stopping; the last checkpoint is intact.")
        self.skipped_in_a_row += 1
        logger.warning(f"skipping the optimizer step: {message}")
        if self.skipped_in_a_row >= MAX_SKIPPED_STEPS:
            raise NonFiniteError(f"{MAX_SKIPPED_STEPS} steps in a row were skipped; stopping. Last: {message}")

    # ---- logging and evaluation ----------------------------------------------------

    def _log_step(self, step: int, stats: dict, tokens_per_s: float) -> None:
        results: list[StepResult] = stats["results"]
        counts = stats["counts"]
        scalars = {"loss/total": float(stats["loss"])}
        n_passes = len(results[0].pass_losses)
        sums = [sum(r.pass_token_losses[i].double().sum() for r in results) for i in range(n_passes)]
        sums.append(sum(r.token_loss.double().sum() for r in results))
        sums = _all_reduce_sum(torch.stack(sums)).tolist()
        for i in range(n_passes):
            scalars[f"loss/pass{i}"] = sums[i] / counts[i]
        merged = sums[-1] / counts[0]
        scalars["loss/merged"] = merged
        if n_passes > 1:
            scalars["loss/merged_minus_pass0"] = merged - scalars["loss/pass0"]
        scalars.update(_lrt_statistics(self.model, results))
        scalars["throughput/tokens_per_s"] = tokens_per_s
        scalars["throughput/tokens_seen"] = self.state.tokens_seen
        scalars["throughput/baseline_equivalent_tokens"] = self.state.tokens_seen * self.flops.baseline_ratio
        achieved = tokens_per_s * self.flops.total / self.dist.world_size
        scalars["throughput/tflops_per_device"] = achieved / 1e12
        if self.peak_flops:
            scalars["throughput/mfu_pct"] = 100 * achieved / self.peak_flops
        lrs = self.lr_schedulers.last_lr()
        scalars["optim/lr"] = lrs.get("matrix", max(lrs.values()))
        scalars.update({f"optim/lr_{name}": lr for name, lr in lrs.items()})
        scalars["optim/grad_norm"] = float(stats["grad_norm"])
        scalars["data/waste_fraction"] = self.train_loader.stats()["waste_fraction"]
        scalars.update(memory_stats(self.device))
        self.metrics.log(step, scalars, format_step_line(step, scalars) if self.dist.is_main else None)

    def evaluate(self) -> dict[str, float]:
        e = self.config.eval
        loader = self._loader(split=e.split, eval_mode=True)
        batches = (tuple(x.to(self.device) for x in b) for _, b in zip(range(e.steps), loader))
        self.model.eval()
        try:
            result = evaluate_bpb(self.model, batches, self.token_bytes, e.exact_sequences, self.autocast)
        finally:
            self.model.train()
        result.all_reduce()
        scalars = result.scalars()
        line = "eval   " + " | ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in scalars.items())
        self.metrics.log(self.state.step, scalars, line if self.dist.is_main else None)
        return scalars


def _lrt_statistics(model: Transformer, results: list[StepResult]) -> dict[str, float]:
    """Mean gamma and mean gate values per pass (over layers and micro-batches)."""
    out = {}
    gammas = [layer.gamma for layer in model.layers if layer.gamma is not None]
    if gammas:
        out["lrt/gamma_mean"] = float(torch.stack([_local(g).detach().float().mean() for g in gammas]).mean())
    for p in range(len(results[0].gate_means)):
        sums: dict[str, list[float]] = {}
        for r in results:
            for layer, means in zip(model.layers, r.gate_means[p]):
                if means is None:
                    continue
                for name, value in zip(layer.attention.gate_names, means.tolist()):
                    sums.setdefault(name, []).append(value)
        for name, values in sums.items():
            out[f"lrt/gate_{name}_pass{p}"] = sum(values) / len(values)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _optimizer_kwargs(config: Config) -> dict:
    return vars(config.optimizer)


def _compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        choice = "bfloat16" if device.type == "cuda" or _cpu_has_native_bf16() else "float32"
    return DTYPES[choice]


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def _cpu_has_native_bf16() -> bool:
    """bf16 matmuls are fast only with AVX512-BF16 or AMX; elsewhere they are emulated."""
    capability = torch.backends.cpu.get_cpu_capability()
    return "AMX" in capability or "AVX512_BF16" in capability or _cpu_flag("avx512_bf16") or _cpu_flag("amx_bf16")


def _cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _deterministic_cublas() -> None:
    """cuBLAS is deterministic only with a fixed workspace, read from the environment when CUDA
    starts (PyTorch's reproducibility notes); a value the user set is kept."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(message)s" if rank else "%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def main(argv: list[str]) -> int:
    """Train; returns the process exit code."""
    _setup_logging(int(os.environ.get("RANK", "0")))
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
    except NonFiniteError as e:
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
