"""launch/slurm_multinode.sbatch on a real SLURM cluster: preemption warning -> save -> requeue -> resume.

Needs a SLURM cluster whose nodes can run the project (on one machine: `sudo tools/local_slurm.sh`,
or `sudo tools/local_slurm.sh --nodes 2` for the two-node case too); skipped otherwise. The jobs
train the tiny model of the other trainer tests on CPU nodes (one process per node, gloo).
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_args

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "launch" / "slurm_multinode.sbatch"
STEPS = 80
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


@pytest.fixture(scope="module")
def slurm_cluster():
    missing = [tool for tool in ("sbatch", "sinfo", "scontrol", "scancel") if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"SLURM client tools not installed ({', '.join(missing)}); "
            "`sudo tools/local_slurm.sh` sets up a one-host cluster"
        )
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo did not answer within 20 s: no SLURM controller is up (`sudo tools/local_slurm.sh`)")
    if out.returncode != 0:
        pytest.skip(f"no SLURM cluster is up (sinfo: {out.stderr.strip()}); `sudo tools/local_slurm.sh` starts one")
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    idle = list(states.values()).count("idle")
    if not idle:
        pytest.skip(f"no idle SLURM node (node states: {states or 'none'})")
    return idle


class Job:
    """A submitted batch job: its state from scontrol and its log."""

    def __init__(self, job_id: str, log: Path):
        self.id, self.log = job_id, log
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}

    def fields(self) -> dict[str, str]:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True, timeout=20, check=False
        )
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def state(self) -> str:
        return self.fields().get("JobState", "UNKNOWN")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, what: str, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if done():
                self.timings[what] = time.monotonic() - self.t0
                return
            state = self.state()
            if state not in ACTIVE_STATES and not done():
                pytest.fail(f"job {self.id} is {state} while waiting for {what}; log {self.log}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"no {what} within {timeout:.0f} s (job {self.id} is {state}); log {self.log}:\n{self.tail()}"
                )
            time.sleep(0.5)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


def submit(small_data, tmp_path: Path, steps: int, nodes: int = 1) -> Job:
    config = tmp_path / "slurm_test.toml"
    config.write_text('[job]\ndescription = "SLURM preemption test"\n')
    args = tiny_args(small_data, tmp_path / "run", f"--training.steps={steps}", "--checkpoint.interval=5")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",  # steady step times on a small shared machine
    }
    command = [
        "sbatch",
        "--parsable",
        "--export=ALL",
        "--job-name=titan_lrt_test",
        f"--nodes={nodes}",
        "--gpus-per-node=0",
        "--time=15",
        f"--output={tmp_path}/%x-%j.out",
        str(SBATCH),
        str(config),
        *args,
    ]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    job_id = out.stdout.strip().split(";")[0]
    return Job(job_id, tmp_path / f"titan_lrt_test-{job_id}.out")


def complete_checkpoints(dump: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (dump / "checkpoints").glob("step-*/complete.json"))


@pytest.mark.parametrize("nodes", [1, 2])
def test_preemption_warning_saves_requeues_and_resumes(slurm_cluster, small_data, tmp_path, nodes):
    if slurm_cluster < nodes:
        pytest.skip(
            f"needs {nodes} idle SLURM nodes, the cluster has {slurm_cluster} "
            f"(on one machine: sudo tools/local_slurm.sh --nodes {nodes})"
        )
    dump = tmp_path / "run"
    job = submit(small_data, tmp_path, STEPS, nodes)
    try:
        job.wait_for("job start", lambda: job.state() != "PENDING", timeout=120)
        job.wait_for("first checkpoint", lambda: complete_checkpoints(dump), timeout=180)

        # what SLURM does --signal=B:USR1@... before the time limit
        subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], check=True, timeout=20)
        job.wait_for("save on USR1", lambda: "SIGUSR1 on some rank: saving step" in job.text(), timeout=120)
        saved = int(job.text().split("SIGUSR1 on some rank: saving step ")[1].split()[0])
        assert saved < STEPS, "the first run finished before the warning reached it; raise STEPS"
        job.wait_for("requeue", lambda: int(job.fields().get("Restarts", "0")) >= 1, timeout=120)
        job.wait_for("resume", lambda: f"resumed from step {saved}" in job.text(), timeout=180)
        job.wait_for("completion", lambda: job.state() == "COMPLETED", timeout=180)

        text, fields = job.text(), job.fields()
        assert fields["Restarts"] == "1", fields
        assert f"{nodes} node(s) x 1 trainer(s)" in text
        assert f"on each of {nodes} data-parallel ranks" in text
        assert f"requeueing job {job.id}" in text
        assert f"step {STEPS:6d}" in text
        assert STEPS in complete_checkpoints(dump)
        # the second run started from the saved step: no step before it was trained twice
        second_run = text.split(f"resumed from step {saved}")[1]
        assert f"step {saved:6d} |" not in second_run and f"step {saved + 1:6d} |" in second_run
        print(
            f"\njob {job.id} ({nodes} node(s)) timings (s since submission): "
            + ", ".join(f"{k} {v:.1f}" for k, v in job.timings.items())
        )
    finally:
        subprocess.run(["scancel", job.id], check=False, timeout=20)


def test_scancel_is_not_undone_by_a_requeue(slurm_cluster, small_data, tmp_path):
    dump = tmp_path / "run"
    job = submit(small_data, tmp_path, 100000)
    try:
        job.wait_for("first checkpoint", lambda: complete_checkpoints(dump), timeout=180)
        subprocess.run(["scancel", job.id], check=True, timeout=20)
        job.wait_for("cancellation", lambda: job.state() == "CANCELLED", timeout=60)
        job.wait_for("batch script exit", lambda: "not requeueing" in job.text(), timeout=60)
        time.sleep(3)
        fields = job.fields()
        assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", fields
    finally:
        subprocess.run(["scancel", job.id], check=False, timeout=20)
