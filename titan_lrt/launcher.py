"""torchrun with the trainer's last word: `./run_train.sh` starts the trainers through `torchrun(argv)`.

Plain torchrun ends every failed run with a 30-line ChildFailedError report and
exit code 1. Here the trainers hand a user error (bad config or data: exit code
2; a non-finite stop: 3) to the launcher in torchrun's per-rank error file
(`report_user_error`) and stay quiet; the launcher prints that message as the
last line and exits with the trainer's code. A crash (traceback above) ends with
one line naming the rank and its exit code. Under a bare `torchrun` the message
is printed by the trainer and also shows in torchrun's report.
"""

from __future__ import annotations

import json
import logging
import os
import time

LAUNCHER_ENV = "TITAN_LRT_LAUNCHER"  # set by torchrun() for its trainers: leave user errors to it
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # torchrun's per-rank error file
_KEY = "titan_lrt"  # our entry in the error file, beside torchrun's own keys

logger = logging.getLogger("titan_lrt")


def report_user_error(message: str, exit_code: int) -> None:
    """Say a user error once: to our launcher, which prints it last, else on the console (and in the
    error file, where a bare torchrun's report shows it)."""
    written = _write_error_file(message, exit_code)
    if not (written and os.environ.get(LAUNCHER_ENV)):
        logger.error(message)


def report_crash(error: BaseException) -> None:
    """After a crash's traceback: the one line our launcher ends with."""
    text = (str(error).strip().splitlines() or [""])[0][:300]
    rank = os.environ.get("RANK", "0")
    _write_error_file(f"rank {rank} failed: {type(error).__name__}: {text} (traceback above)", 1)


def _write_error_file(message: str, exit_code: int) -> bool:
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    entry = {"message": message, "exit_code": exit_code, "time": time.time()}
    with open(path, "w") as f:  # torchrun's format: "message" and "timestamp", read back as they are
        json.dump({"message": message, "timestamp": int(entry["time"]), _KEY: entry}, f)
    return True


def torchrun(argv: list[str]) -> int:
    """Run `torchrun argv` in this process; the exit code of the rank that failed first (0 if none)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ[LAUNCHER_ENV] = "1"
    # torchrun logs each failed rank; the line printed below says it instead
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_not_a_failure_record)
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        rank, failure = root_cause(e.failures)
        print(last_line(rank, failure), flush=True)
        return exit_code_of(failure.exitcode)
    return 0


def root_cause(failures: dict) -> tuple[int, object]:
    """(rank, failure): the earliest failure a trainer reported (a user error or a crash), else the
    earliest failure (a rank stopped because another failed reports nothing)."""
    reported = {r: f for r, f in failures.items() if _KEY in (f.error_file_data or {})}
    if reported:
        return min(reported.items(), key=lambda kv: (kv[1].error_file_data[_KEY]["time"], kv[0]))
    return min(failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))


def last_line(rank: int, failure) -> str:
    entry = (failure.error_file_data or {}).get(_KEY)
    if entry:
        return entry["message"]
    if failure.exitcode < 0:
        return f"rank {rank} was killed by {failure.signal_name()}"
    return f"rank {rank} failed with exit code {failure.exitcode} (its output is above)"


def exit_code_of(code: int) -> int:
    """A rank's exit code as a shell reports it (128 + N for a signal N)."""
    return code if code > 0 else 128 - code if code < 0 else 1


def _not_a_failure_record(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("failed (exitcode")
