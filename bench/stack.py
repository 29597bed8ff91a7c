"""The stack every bench and the demo runs: a stand-in teacher and ``kdgate serve`` as child processes.

:class:`Stack` writes the gateway's settings to ``<workdir>/kdgate.toml``, starts the stand-in
teacher (``python -m bench.standin``) and the gateway (``python -m cli --config ... serve``, which
starts its embedded distiller unless the settings say ``embedded_distiller = false``) on loopback,
each in its own process group with its log under ``workdir``, and waits until each answers.

Stopping is SIGTERM to each process group (the gateway drains its ledger queue and stops its
distiller, which shares its group), then SIGKILL after a timeout. It happens on :meth:`Stack.stop`,
when the ``with`` block ends, at interpreter exit, and on SIGTERM of the bench process (turned into
``SystemExit(143)`` so that ``finally`` blocks run); SIGINT already raises ``KeyboardInterrupt``.
Children run in their own sessions, so a terminal's Ctrl-C reaches only the bench, which then
stops them in order.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["Stack", "child_env", "wait_http", "toml_settings", "write_results"]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without KDGATE_* settings, offline, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDGATE_")}
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OPENAI_API_KEY": "sk-stand-in"})
    env.update(extra)
    return env


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


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)  # strings, numbers and booleans are spelt alike in JSON and TOML


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def toml_settings(settings: dict[str, Any]) -> str:
    """Gateway settings as a TOML file: top-level keys (tables inline), then one ``[routes.NAME]`` table each."""
    routes = settings.get("routes") or {}
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in settings.items() if k != "routes" and v is not None]
    for name, route in routes.items():
        lines.append(f"[routes.{_toml_key(name)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in route.items() if v is not None]
    return "\n".join(lines) + "\n"


class Stack:
    """A stand-in teacher and a gateway (with its embedded distiller) as child processes on loopback.

    ``settings`` are the gateway's (``gateway.settings.Settings`` keys); the stack fills in ``db``
    (``<workdir>/kdgate.db``), ``teacher`` (``openai/<teacher_model>``), ``teacher_api_base`` (the
    stand-in), ``port`` and ``auth = false`` unless given. The stand-in answers from ``dataset`` (a
    ``{messages, answer}`` JSONL) or "ok". ``env`` is added to every child's environment.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        settings: dict[str, Any] | None = None,
        teacher_model: str = "gpt-4o-mini",
        dataset: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        ready_path: str = "/readyz",
    ):
        from bench.standin import free_port

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.teacher_model = teacher_model
        self.dataset = dataset
        self.teacher_port = free_port()
        self.settings: dict[str, Any] = {
            "db": str(self.workdir / "kdgate.db"), "teacher": f"openai/{teacher_model}",
            "teacher_api_base": f"{self.teacher_url}/v1", "port": port or free_port(), "auth": False,
            **(settings or {}),
        }
        self.port = int(self.settings["port"])
        self.db = Path(self.settings["db"])
        self.config = self.workdir / "kdgate.toml"
        self.config.write_text(toml_settings(self.settings))
        self.env = child_env(**(env or {}))
        self.ready_path = ready_path
        self.teacher: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self._gateway_starts = 0
        self._previous_sigterm: Any = None
        self._watching = False

    # -- addresses ----------------------------------------------------------------------------
    @property
    def teacher_url(self) -> str:
        return f"http://127.0.0.1:{self.teacher_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    # -- starting -----------------------------------------------------------------------------
    def start(self) -> Stack:
        """The stand-in teacher, then the gateway; returns when both answer."""
        self.start_teacher()
        self.start_gateway()
        return self

    def spawn(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``cmd`` in its own process group, its output in ``<workdir>/<name>.log``; stopped with the stack."""
        self._watch()
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_teacher(self) -> None:
        cmd = [sys.executable, "-m", "bench.standin", "--port", str(self.teacher_port), "--model", self.teacher_model]
        if self.dataset is not None:
            cmd += ["--dataset", str(self.dataset)]
        self.teacher = self.spawn("teacher", cmd)
        wait_http(f"{self.teacher_url}/v1/models", proc=self.teacher)

    def start_gateway(self) -> None:
        """Start (or, after :meth:`stop_gateway`, restart) the gateway on the same ledger."""
        self._gateway_starts += 1
        name = "gateway" if self._gateway_starts == 1 else f"gateway-{self._gateway_starts}"
        self.gateway = self.spawn(name, [sys.executable, "-m", "cli", "--config", str(self.config), "serve"])
        wait_http(self.url + self.ready_path, proc=self.gateway)

    def start_replica(self, port: int, *, name: str | None = None, distiller: bool = False) -> subprocess.Popen:
        """Another ``kdgate serve`` on the same settings and ledger (a replica; with a PostgreSQL
        ``db``), on ``port``, without an embedded distiller unless asked: one worker per ledger."""
        env = {"KDGATE_PORT": str(port), "KDGATE_EMBEDDED_DISTILLER": "true" if distiller else "false"}
        proc = self.spawn(name or f"replica-{port}", [sys.executable, "-m", "cli", "--config", str(self.config), "serve"], env=env)
        wait_http(f"http://127.0.0.1:{port}{self.ready_path}", proc=proc)
        return proc

    # -- stopping -----------------------------------------------------------------------------
    def alive(self) -> bool:
        """Whether every process the stack started is still running."""
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def stop_gateway(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Stop the gateway (and its distiller) with ``sig``; returns its exit code."""
        return None if self.gateway is None else _stop(self.gateway, sig=sig, timeout=timeout)

    def kill_gateway(self) -> None:
        """SIGKILL to the gateway's process group, as a crash would: nothing is drained."""
        if self.gateway is not None and self.gateway.poll() is None:
            os.killpg(self.gateway.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop every process, newest first (SIGTERM, SIGKILL after a timeout). Safe to call twice."""
        if self._watching and threading.current_thread() is threading.main_thread():
            # a second SIGTERM must not cut the cleanup short and leave children behind
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for proc in reversed(self.procs):
                _stop(proc, timeout=60.0 if proc is self.gateway else 15.0)
            self.procs.clear()
        finally:
            self._unwatch()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _watch(self) -> None:
        if self._watching:
            return
        self._watching = True
        atexit.register(self.stop)
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _terminated)

    def _unwatch(self) -> None:
        if not self._watching:
            return
        self._watching = False
        atexit.unregister(self.stop)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm if self._previous_sigterm is not None else signal.SIG_DFL)


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _stop(proc: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
    """Send ``sig`` to the process group, then SIGKILL after ``timeout``; returns the exit code.

    The group is signalled even when its leader has exited: a gateway that died leaves its
    distiller in the group."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass  # nothing of the group is left
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(10)


def write_results(results: dict[str, Any], name: str, out: Path | None = None, results_dir: Path | None = None) -> Path:
    """Save a bench's JSON as ``<results_dir>/<name>.json`` (default ``bench/results``) and, if given,
    also at ``out``. Returns the file under ``results_dir``."""
    text = json.dumps(results, indent=2)
    results_dir = Path("bench/results") if results_dir is None else results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return path
