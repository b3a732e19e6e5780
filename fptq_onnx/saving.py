"""Write ONNX models and their sidecar files without ever leaving a half-written output.

Everything goes to a staging directory beside the destination first, named
`.fptq-partial-<pid>-*`, and is renamed into place at the end, so a crash, an
error or Ctrl-C before that leaves the old state. The commit itself is ordered
and journalled: a `.commit` marker listing the staged names is written into the
staging directory, then the sidecars and external data files are renamed, then
the `.onnx` files last (an `.onnx` being replaced is removed before its new data
file arrives, so an `.onnx` never meets data it was not written with).
SIGINT/SIGTERM/SIGHUP are held off for those few renames and delivered right
after. A run killed with SIGKILL leaves its staging directory; the next
`staged_outputs` in that directory finds it (its pid is dead) and deletes it,
or, if its marker says the commit had begun, finishes the renames.

Test hook: `FPTQ_TEST_PAUSE_AT=<point>` makes `pause_point(<point>)` announce
`paused at <point>` on stderr and wait for a signal, so a test can signal a run
at a known stage: `staged` (model files written in the staging dir), `commit`
(sidecars and data renamed, models not yet), `external-data` (streaming: first
layer's weights appended to the staged data file).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from fptq_onnx.errors import FptqError

# ONNX protobufs cannot exceed 2 GB; keep weights outside well before that.
EXTERNAL_DATA_THRESHOLD = 512 * 1024 * 1024
PARTIAL_PREFIX = ".fptq-partial-"
COMMIT_MARKER = ".commit"
_PARTIAL = re.compile(re.escape(PARTIAL_PREFIX) + r"(\d+)-")
PAUSE_ENV = "FPTQ_TEST_PAUSE_AT"


def pause_point(name: str) -> None:
    """Test hook (see the module doc): stop here when $FPTQ_TEST_PAUSE_AT names this point, until a
    signal arrives (one held off by `_signals_held` ends the pause and is delivered after the commit)."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"paused at {name}", file=sys.stderr, flush=True)
        end = time.monotonic() + 600
        while time.monotonic() < end and not _HELD:
            time.sleep(0.05)


def _partial_prefix() -> str:
    return f"{PARTIAL_PREFIX}{os.getpid()}-"


def check_output_path(path: Path, force: bool) -> None:
    """Fail early (before minutes of work) on outputs that cannot or must not be written.

    A missing output directory is created (as `mkdir -p` would), not refused.
    """
    if path.suffix != ".onnx":
        raise FptqError(f"output must end in .onnx: {path}")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise FptqError(f"output directory is a file: {parent}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FptqError(f"cannot create the output directory {parent} ({exc.strerror})") from None
    try:  # os.access says yes to root even where writes fail (read-only mounts, /sys)
        os.rmdir(tempfile.mkdtemp(prefix=_partial_prefix(), dir=parent))
    except OSError as exc:
        raise FptqError(f"output directory is not writable: {parent} ({exc.strerror})") from None
    if path.exists() and not force:
        raise FptqError(f"{path} exists; pass --force to overwrite")


def data_file_name(path: Path) -> str:
    return path.name + ".data"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover_partials(directory: Path) -> None:
    """Finish or remove the staging dirs of dead runs in `directory` (see the module doc)."""
    for entry in directory.glob(PARTIAL_PREFIX + "*"):
        match = _PARTIAL.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        marker = entry / COMMIT_MARKER
        if marker.is_file():
            _finish_commit(entry, directory, marker.read_text().splitlines())
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


_HELD: list[int] = []  # signals that arrived while `_signals_held` was active


@contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP until the block is done, then deliver them (main thread only:
    Python runs signal handlers there, whichever thread the kernel picked)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, _frame: _HELD.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        held = list(dict.fromkeys(_HELD))
        _HELD.clear()
        for sig in held:
            signal.raise_signal(sig)


def _commit(tmp: Path, final_dir: Path, names: list[str]) -> None:
    """Journal the staged `names` in the commit marker, then move them into `final_dir`."""
    present = [n for n in dict.fromkeys(names) if (tmp / n).exists()]
    journal = tmp / (COMMIT_MARKER + ".tmp")
    journal.write_text("\n".join(present))
    os.replace(journal, tmp / COMMIT_MARKER)  # the marker is whole or absent
    _finish_commit(tmp, final_dir, present)


def _finish_commit(tmp: Path, final_dir: Path, names: list[str]) -> None:
    """Move what of `names` is still in `tmp`: data and sidecars first, `.onnx` files last.
    Idempotent, so `recover_partials` can finish a commit a killed run began."""
    models = [n for n in names if n.endswith(".onnx")]
    for name in models:
        if (tmp / name).exists() and data_file_name(Path(name)) in names:
            (final_dir / name).unlink(missing_ok=True)  # the old model must not meet the new data
    for name in names:
        if name not in models and (tmp / name).exists():
            os.replace(tmp / name, final_dir / name)
    pause_point("commit")
    for name in models:
        if (tmp / name).exists():
            os.replace(tmp / name, final_dir / name)
        if data_file_name(Path(name)) not in names:
            (final_dir / data_file_name(Path(name))).unlink(missing_ok=True)  # stale weights of an older version


@contextmanager
def staged_outputs(final_dir: Path) -> Iterator[Callable[[str], Path]]:
    """Yield `stage(name) -> temp path`; on success move every staged file into final_dir."""
    recover_partials(final_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(), dir=final_dir))
    except OSError as exc:
        raise FptqError(f"output directory is not writable: {final_dir} ({exc.strerror})") from None
    staged: list[str] = []

    def stage(name: str) -> Path:
        staged.append(name)
        return tmp / name

    try:
        yield stage
        with _signals_held():
            _commit(tmp, final_dir, staged)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` (same suffix, so writers that go by it work); rename it
    onto `final` on success, remove it on failure. A SIGKILL leaves it for `recover_partials`."""
    tmp = final.with_name(f"{_partial_prefix()}{final.stem}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: ir.Model, path: Path, external: bool | None = None) -> None:
    """Save with weights in `<name>.onnx.data` when large (always when > 2 GB would be hit)."""
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    use_external = size > EXTERNAL_DATA_THRESHOLD if external is None else external
    if use_external:
        ir.save(model, path, external_data=data_file_name(path), size_threshold_bytes=1024)
    else:
        ir.save(model, path)


def stage_model(stage: Callable[[str], Path], model: ir.Model, final: Path, external: bool | None = None) -> Path:
    """Save `model` under the staged name of `final` (and its data file); return the staged path."""
    staged = stage(final.name)
    stage(data_file_name(final))
    save_model(model, staged, external)
    pause_point("staged")
    return staged


def write_sidecars(model, tokenizer, stage: Callable[[str], Path], directory: Path) -> None:
    """config.json, generation_config.json, tokenizer files and the apps' files (app_files.py) of `model`,
    staged like the ONNX files (which must be staged already: the genai configs describe them)."""
    from fptq_onnx import app_files

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        app_files.write_app_files(directory, Path(tmp), model, tokenizer, stage)
        for file in Path(tmp).iterdir():
            if file.is_file():
                file.rename(stage(file.name))
