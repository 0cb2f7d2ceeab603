"""Data parallelism with real processes (gloo, CPU): FSDP2 against one process,
gradient accumulation, kill -9 and resume, resharding 2 -> 1 and 1 -> 2, two
launchers (multi-node), all through run_train.sh as a user runs it."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SLOW, scalars, tiny_args
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8


def torchrun(nproc: int, args: list[str], extra_torchrun: tuple[str, ...] = (), **kw):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra_torchrun,
        str(ROOT / "run_train.sh"),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, **kw)


def dp_args(small_data, dump, nproc, *extra):
    """8 sequences per step however many ranks share them."""
    return tiny_args(
        small_data,
        dump,
        f"--training.steps={STEPS}",
        "--training.global_batch_size=8",
        f"--training.local_batch_size={8 // nproc}",
        "--checkpoint.interval=4",
        *extra,
    )


def final_params(dump: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    out = dump / f"params-{step}.pt"
    dcp_to_torch_save(dump / "checkpoints" / f"step-{step:08d}", out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if k.startswith("model.")}


def assert_same_run(a: Path, b: Path, steps=range(1, STEPS + 1), tol=1e-5, params=True):
    la, lb = scalars(a / "tb", "loss/total"), scalars(b / "tb", "loss/total")
    for step in steps:
        assert lb[step] == pytest.approx(la[step], rel=tol, abs=tol), (step, la[step], lb[step])
    if params:
        pa, pb = final_params(a), final_params(b)
        assert pa.keys() == pb.keys()
        for k in pa:
            torch.testing.assert_close(pb[k], pa[k], rtol=tol, atol=tol, msg=k)


def run_cache(root: Path, make_args):
    """get(name, nproc, *extra) -> the dump folder of a successful torchrun run, made once per
    name with make_args(dump, nproc, *extra) (runs shared by several tests)."""
    made = {}

    def get(name, nproc, *extra):
        if name not in made:
            dump = root / name
            out = torchrun(nproc, make_args(dump, nproc, *extra))
            assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
            made[name] = dump
        return made[name]

    return get


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    return run_cache(
        tmp_path_factory.mktemp("dp"), lambda dump, nproc, *extra: dp_args(small_data, dump, nproc, *extra)
    )


@pytest.mark.parametrize(
    "schedule",
    [
        ("--lrt.mode=off",),
        ("--lrt.mode=interleaved",),
        pytest.param(
            ("--lrt.mode=interleaved", "--lrt.detach_buffer=true", "--lrt.kv_refresh=true"),
            marks=SLOW,
            id="lrt_s2_detached",
        ),
        pytest.param(
            ("--lrt.mode=interleaved", "--lrt.refine_fraction=0.5", "--lrt.pass0_backward=false"),
            marks=SLOW,
            id="lrt_s2_cheap",
        ),
    ],
    ids=["baseline", "lrt_s2", "lrt_s2_detached", "lrt_s2_cheap"],
)
def test_two_rank_fsdp_matches_one_process(runs, schedule):
    """The two LRT variants behind SLOW add no collective of their own (their schedule-level
    gradients are pinned in float64 by test_lrt_schedules.py and test_schedule_options.py)."""
    name = "_".join(a.split("=")[-1] for a in schedule)
    one = runs(f"one_{name}", 1, *schedule)
    two = runs(f"two_{name}", 2, *schedule)
    assert_same_run(one, two)


@pytest.mark.parametrize(
    "variant",
    [
        ("--parallelism.data_parallel_replicate_degree=2",),
        ("--parallelism.fsdp_reshard_after_forward=never", "--checkpoint.async_mode=async"),
    ],
    ids=["hsdp", "never_reshard_async_save"],
)
def test_hsdp_and_reshard_policies_match_one_process(runs, variant):
    one = runs("one_interleaved", 1, "--lrt.mode=interleaved")
    two = runs("two_" + variant[0].split(".")[-1], 2, "--lrt.mode=interleaved", *variant)
    assert_same_run(one, two)


def test_bf16_mixed_precision_stays_close(runs):
    """bf16 parameters in compute, fp32 reduction: within 2% of fp32 over 8 steps."""
    fp32 = runs("one_interleaved", 1, "--lrt.mode=interleaved")
    bf16 = runs("two_bf16", 2, "--lrt.mode=interleaved", "--training.mixed_precision=bfloat16")
    assert_same_run(fp32, bf16, tol=2e-2, params=False)


def test_gradient_sync_every_micro_batch_gives_the_same_update(runs):
    accumulate = runs("two_accum_last", 2, "--lrt.mode=interleaved", "--training.local_batch_size=2")
    every = runs(
        "two_accum_every",
        2,
        "--lrt.mode=interleaved",
        "--training.local_batch_size=2",
        "--parallelism.gradient_sync=every_micro_batch",
    )
    one = runs("one_interleaved", 1, "--lrt.mode=interleaved")
    assert_same_run(accumulate, every)
    assert_same_run(one, accumulate)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_same_run(runs, small_data, tmp_path, before, after):
    """Model, optimizer and data position reshard: steps 5..8 equal the uninterrupted run."""
    reference = runs("one_interleaved", 1, "--lrt.mode=interleaved")
    source = runs("two_interleaved", 2, "--lrt.mode=interleaved") if before == 2 else reference
    dump = tmp_path / "resharded"
    (dump / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step-00000004", dump / "checkpoints" / "step-00000004")
    out = torchrun(after, dp_args(small_data, dump, after, "--lrt.mode=interleaved"))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "resumed from step 4" in out.stdout
    assert_same_run(reference, dump, steps=range(5, STEPS + 1))


def test_resume_on_fewer_ranks_keeps_the_global_batch(runs, small_data, tmp_path):
    """Step 4 of 2 ranks x 4 sequences resumed on one rank with local_batch_size 4 and global_batch_size
    left to the world size: 8 sequences per step are kept (2 micro-batches), steps 5..8 as uninterrupted."""
    reference = runs("one_interleaved", 1, "--lrt.mode=interleaved")
    source = runs("two_interleaved", 2, "--lrt.mode=interleaved")
    dump = tmp_path / "fewer"
    (dump / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step-00000004", dump / "checkpoints" / "step-00000004")
    args = tiny_args(
        small_data,
        dump,
        f"--training.steps={STEPS}",
        "--training.local_batch_size=4",
        "--checkpoint.interval=4",
        "--lrt.mode=interleaved",
    )
    out = torchrun(1, args)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "training.global_batch_size: 8 -> 0" in out.stdout
    assert "keeping the checkpoint's global batch of 8 sequences (2 ranks then, 1 now): 2 micro-batches" in out.stdout
    assert_same_run(reference, dump, steps=range(5, STEPS + 1))
    assert "global_batch_size = 8" in (dump / "checkpoints" / "step-00000008" / "config.toml").read_text()


def test_kill_minus_nine_of_two_ranks_then_resume(runs, small_data, tmp_path):
    reference = runs("two_interleaved", 2, "--lrt.mode=interleaved")
    dump = tmp_path / "killed"
    args = dp_args(small_data, dump, 2, "--lrt.mode=interleaved", "--checkpoint.interval=2")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "run_train.sh"),
        *args,
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (dump / "checkpoints" / "step-00000004" / "complete.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint at step 4"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    out = torchrun(2, args)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    start = int(out.stdout.split("resumed from step ")[1].split()[0])
    assert start >= 4
    assert_same_run(reference, dump, steps=range(start + 1, STEPS + 1))


def test_two_launchers_as_two_nodes(runs, small_data, tmp_path):
    """`torchrun --nnodes 2 --node_rank {0,1} --rdzv_backend c10d` on one machine."""
    reference = runs("two_interleaved", 2, "--lrt.mode=interleaved")
    dump = tmp_path / "multinode"
    with socket_port() as port:
        args = dp_args(small_data, dump, 2, "--lrt.mode=interleaved")
        nodes = []
        for node_rank in (0, 1):
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node_rank}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=titan-lrt-test",
                str(ROOT / "run_train.sh"),
                *args,
            ]
            nodes.append(
                subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
            )
        outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert (dump / "checkpoints" / f"step-{STEPS:08d}" / "complete.json").is_file()
    assert_same_run(reference, dump)


class socket_port:
    """A free TCP port on the loopback interface."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


FAILING_RANK_WORKER = """
import sys, time
import torch, torch.distributed as dist
from titan_lrt.parallel.distributed import init_distributed, shutdown

info = init_distributed(device="cpu", timeout_s=float(sys.argv[1]))
code = 1
try:
    dist.barrier()
    if info.rank == 1:
        print(f"raised at {time.time()}", flush=True)
        raise RuntimeError("rank 1 fails mid-run")
    time.sleep(120)  # a long step: rank 0 reaches no collective for a while
    dist.all_reduce(torch.ones(8))
    code = 0
finally:
    shutdown(code)
"""


def test_a_failing_rank_stops_the_others_well_before_the_process_group_timeout(tmp_path):
    """Rank 1 raises while rank 0 is busy; rank 1 leaves at once (no shutdown barrier) and rank 0,
    told through the store, stops within seconds rather than at its next collective or the timeout."""
    timeout_s = 60
    worker = tmp_path / "worker.py"
    worker.write_text(FAILING_RANK_WORKER)
    with socket_port() as port:
        procs = []
        for rank in range(2):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(worker), str(timeout_s)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        exited = {}
        deadline = time.time() + 3 * timeout_s
        while len(exited) < 2 and time.time() < deadline:
            for rank, proc in enumerate(procs):
                if rank not in exited and proc.poll() is not None:
                    exited[rank] = time.time()
            time.sleep(0.05)
        for proc in procs:
            proc.kill()
        outputs = [proc.communicate()[0] for proc in procs]
    assert len(exited) == 2, outputs
    raised = float(outputs[1].split("raised at ")[1].split()[0])
    assert exited[1] - raised < 10, outputs  # no barrier waiting for rank 0
    assert exited[0] - raised < 10, outputs  # 2 s apart at most in practice; the timeout is 60 s
    assert "rank 1 failed; stopping this rank too" in outputs[0], outputs
    assert [proc.returncode for proc in procs] == [1, 1], outputs
