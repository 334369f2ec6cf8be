"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def cpu_launch_args(num_processes: int) -> list[str]:
    """``accelerate launch`` arguments for ``num_processes`` CPU processes on this machine (gloo)."""
    return [
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
    ]


def run_group(cmd: list[str], *, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a process group of its own, killed whole when it
    ends, times out, or the test is stopped (pytest-timeout): a launcher's worker processes never outlive it
    (an orphaned rank of a timed-out two-process run otherwise keeps a core busy for the rest of the suite)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
