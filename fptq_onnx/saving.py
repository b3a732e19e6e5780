"""Write ONNX models and their sidecar files without ever leaving a half-written output.

Everything goes to a temporary directory beside the destination first and is
renamed into place at the end, so a crash or an error leaves the old state.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from fptq_onnx.errors import FptqError

# ONNX protobufs cannot exceed 2 GB; keep weights outside well before that.
EXTERNAL_DATA_THRESHOLD = 512 * 1024 * 1024


def check_output_path(path: Path, force: bool) -> None:
    """Fail early (before minutes of work) on outputs that cannot or must not be written."""
    if path.suffix != ".onnx":
        raise FptqError(f"output must end in .onnx: {path}")
    parent = path.parent
    if not parent.is_dir():
        raise FptqError(f"output directory does not exist: {parent}")
    try:  # os.access says yes to root even where writes fail (read-only mounts, /sys)
        os.rmdir(tempfile.mkdtemp(prefix=".fptq-probe-", dir=parent))
    except OSError as exc:
        raise FptqError(f"output directory is not writable: {parent} ({exc.strerror})") from None
    if path.exists() and not force:
        raise FptqError(f"{path} exists; pass --force to overwrite")


def data_file_name(path: Path) -> str:
    return path.name + ".data"


@contextmanager
def staged_outputs(final_dir: Path) -> Iterator[Callable[[str], Path]]:
    """Yield `stage(name) -> temp path`; on success move every staged file into final_dir."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".fptq-", dir=final_dir))
    except OSError as exc:
        raise FptqError(f"output directory is not writable: {final_dir} ({exc.strerror})") from None
    staged: list[str] = []

    def stage(name: str) -> Path:
        staged.append(name)
        return tmp / name

    try:
        yield stage
        for name in staged:
            if (tmp / name).exists():
                os.replace(tmp / name, final_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model: ir.Model, path: Path, external: bool | None = None) -> None:
    """Save with weights in `<name>.onnx.data` when large (always when > 2 GB would be hit)."""
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    use_external = size > EXTERNAL_DATA_THRESHOLD if external is None else external
    if use_external:
        ir.save(model, path, external_data=data_file_name(path), size_threshold_bytes=1024)
    else:
        ir.save(model, path)


def remove_model(path: Path) -> None:
    for file in (path, path.with_name(data_file_name(path))):
        file.unlink(missing_ok=True)


def stage_model(stage: Callable[[str], Path], model: ir.Model, final: Path, external: bool | None = None) -> Path:
    """Save `model` under the staged name of `final` (and its data file); return the staged path."""
    staged = stage(final.name)
    stage(data_file_name(final))
    save_model(model, staged, external)
    if not staged.with_name(data_file_name(final)).exists():
        final.with_name(data_file_name(final)).unlink(missing_ok=True)  # stale weights of an older version
    return staged
