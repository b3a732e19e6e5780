"""Run `fptq-onnx` in a subprocess and signal it at a known point (a progress line or a pause hook)."""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import cli_executable

from fptq_onnx.saving import PARTIAL_PREFIX, PAUSE_ENV


@dataclass
class Interrupted:
    code: int
    stderr: str


def run_until(args: list, marker: str, sig: int, pause_at: str | None = None, timeout: float = 300) -> Interrupted:
    """Start `fptq-onnx ARGS`, send `sig` as soon as a stderr line contains `marker`, wait for the exit."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop(PAUSE_ENV, None)
    if pause_at:
        env[PAUSE_ENV] = pause_at
    proc = subprocess.Popen(cli_executable() + [str(a) for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    try:
        while True:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                raise AssertionError(f"exited before '{marker}':\n{''.join(seen)}")
            seen.append(line)
            if marker in line:
                proc.send_signal(sig)
                break
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    return Interrupted(code, "".join(seen))


def killed_by(sig: int) -> int:
    return -sig  # Popen's returncode for a signal death


def listing(directory: Path) -> dict[str, str]:
    """name -> sha256 of every file directly in `directory` (staging dirs listed as 'dir')."""
    out = {}
    for entry in sorted(directory.iterdir()):
        out[entry.name] = "dir" if entry.is_dir() else hashlib.sha256(entry.read_bytes()).hexdigest()
    return out


def only_partials(directory: Path) -> list[str]:
    """Names in `directory` that are not staging leftovers (must be empty after an interrupted first run)."""
    return [n for n in listing(directory) if not n.startswith(PARTIAL_PREFIX)]


