"""Child processes for benchmarks and the demo: spawn, wait until serving, stop politely."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

__all__ = ["child_env", "spawn", "wait_http", "stop"]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without KDGATE_* settings, offline, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDGATE_")}
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OPENAI_API_KEY": "sk-stand-in"})
    env.update(extra)
    return env


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, its output in ``log``."""
    fh = open(log, "wb")
    return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def wait_http(url: str, *, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    """Until ``url`` answers; fails early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up in {timeout:.0f}s")


def stop(proc: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
    """Send ``sig`` to the process group, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is not None:
        return proc.returncode
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(10)
