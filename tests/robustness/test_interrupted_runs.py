"""Interrupted `convert` runs never leave a half-written output; the next run cleans up; `compare` resumes.

Each case runs the real CLI in a subprocess on a tiny checkpoint and signals it at a
known point: during calibration (its progress line), with the model files written
in the staging dir (hook `staged`), in the middle of the streamed external-data file
(hook `external-data`), and between the renames of the commit (hook `commit`); the
hooks are saving.pause_point's FPTQ_TEST_PAUSE_AT. SIGINT must leave nothing (or,
inside the commit, which it is held off from, the complete new output); SIGKILL
must leave only a `.fptq-partial-<pid>-*` staging dir, which the next run removes
(or, when the commit had begun, finishes). What a killed run had staged is compared
byte for byte with what the next run writes.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from fptq_onnx.saving import COMMIT_MARKER, PARTIAL_PREFIX, recover_partials, staged_outputs
from interrupt import listing, only_partials, run_until

FAST = ["--calib", "random", "--calib-samples", "2", "--calib-seqlen", "16", "--ppl-windows", "0", "--format", "qdq",
        "--no-verify"]  # the parity check is not what these tests are about
MODES = {"memory": [], "stream": ["--stream"]}
SLOW_CALIBRATION = ["--calib", "random", "--calib-samples", "64", "--calib-seqlen", "256", "--ppl-windows", "0"]
MODEL_FILES = ("m.onnx", "m.onnx.data")


def _convert(ckpt, directory: Path, mode: str) -> list:
    return ["convert", ckpt, directory / "m.onnx", *FAST, *MODES[mode]]


def _partial(directory: Path) -> Path:
    (name,) = [n for n in listing(directory) if n.startswith(PARTIAL_PREFIX)]
    return directory / name


def _model_files(directory: Path) -> dict[str, str]:
    return {k: v for k, v in listing(directory).items() if k in MODEL_FILES}


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGKILL", "SIGINT"])
def test_interrupt_during_calibration_leaves_nothing(tiny_checkpoint, tmp_path, sig):
    run = run_until(["convert", tiny_checkpoint, tmp_path / "m.onnx", *SLOW_CALIBRATION], "• walking the layers", sig)
    assert run.code == (130 if sig == signal.SIGINT else -sig), run.stderr
    assert "Traceback" not in run.stderr
    if sig == signal.SIGINT:
        assert list(tmp_path.iterdir()) == []
    else:  # the layer walk writes each layer's weights into its staging dir: a named partial, removed next run
        assert only_partials(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode,point", [("memory", "staged"), ("stream", "external-data")])
def test_sigint_while_saving_leaves_nothing(tiny_checkpoint, tmp_path, mode, point):
    run = run_until(_convert(tiny_checkpoint, tmp_path, mode), f"paused at {point}", signal.SIGINT, pause_at=point)
    assert run.code == 130, run.stderr
    assert list(tmp_path.iterdir()) == [], "the staging dir is removed on Ctrl-C"


@pytest.mark.parametrize("mode,point", [
    ("memory", "staged"),
    pytest.param("stream", "external-data", marks=pytest.mark.slow),
])
def test_sigkill_while_saving_leaves_only_a_named_partial(tiny_checkpoint, tmp_path, cli, mode, point):
    run = run_until(_convert(tiny_checkpoint, tmp_path, mode), f"paused at {point}", signal.SIGKILL, pause_at=point)
    assert run.code == -signal.SIGKILL
    assert only_partials(tmp_path) == [], f"a killed run left {only_partials(tmp_path)}"
    staged = _model_files(_partial(tmp_path))
    result = cli(*_convert(tiny_checkpoint, tmp_path, mode))
    assert result.code == 0, result.stderr
    assert not [n for n in listing(tmp_path) if n.startswith(PARTIAL_PREFIX)], "the next run removes the partial"
    if point == "staged":  # the staged model was complete: the next run writes the same bytes
        assert _model_files(tmp_path) == staged


def test_sigkill_inside_the_commit_is_finished_by_the_next_run(tiny_checkpoint, tmp_path):
    """Streamed (external data): killed after the data file was renamed in, before the model."""
    run = run_until(_convert(tiny_checkpoint, tmp_path, "stream"), "paused at commit", signal.SIGKILL,
                    pause_at="commit")
    assert run.code == -signal.SIGKILL
    partial = _partial(tmp_path)
    assert (partial / COMMIT_MARKER).is_file()
    assert "m.onnx" not in listing(tmp_path) and "m.onnx.data" in listing(tmp_path), "the model is renamed last"
    expected = {**_model_files(tmp_path), **_model_files(partial)}
    recover_partials(tmp_path)  # what the next run in this directory does first
    assert not partial.exists()
    assert _model_files(tmp_path) == expected
    assert (tmp_path / "m.manifest.json").is_file()


@pytest.mark.slow
def test_sigint_inside_the_commit_is_held_until_it_is_done(tiny_checkpoint, tmp_path):
    run = run_until(_convert(tiny_checkpoint, tmp_path, "stream"), "paused at commit", signal.SIGINT,
                    pause_at="commit")
    assert run.code == 130, run.stderr
    names = listing(tmp_path)
    assert not [n for n in names if n.startswith(PARTIAL_PREFIX)]
    assert set(MODEL_FILES) <= set(names), "the whole model, never one half of it"


def test_stale_partial_of_a_live_process_is_left_alone(tmp_path):
    """Two runs may share a directory: only the partials of dead pids are removed."""
    sleeper = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        live_dir = tmp_path / f"{PARTIAL_PREFIX}{sleeper.pid}-x"
        dead_dir = tmp_path / f"{PARTIAL_PREFIX}{dead.pid}-y"
        dead_file = tmp_path / f"{PARTIAL_PREFIX}{dead.pid}-m.manifest.json"
        for d in (live_dir, dead_dir):
            d.mkdir()
            (d / "m.onnx").write_bytes(b"partial")
        dead_file.write_text("{")
        recover_partials(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [live_dir.name]
    finally:
        sleeper.kill()
        sleeper.wait()


COMPARE = ["--methods", "fp32,rtn,fptq", "--calib", "random", "--calib-samples", "2", "--calib-seqlen", "16",
           "--seqlen", "16", "--limit", "2"]


@pytest.mark.slow
def test_compare_resumes_after_sigkill_with_the_same_table(tiny_checkpoint, tmp_path, cli):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\nhello world , this is a tiny tokenizer\n" * 30)
    args = ["compare", tiny_checkpoint, *COMPARE, "--tasks", corpus, "--data-dir", tmp_path]
    whole = cli(*args, "--out", tmp_path / "whole")
    assert whole.code == 0, whole.stderr
    run = run_until([*args, "--out", tmp_path / "resumed"], "[2/3]", signal.SIGKILL)
    assert run.code == -signal.SIGKILL
    resumed = cli(*args, "--out", tmp_path / "resumed")
    assert resumed.code == 0, resumed.stderr
    assert "reusing the existing float export" in resumed.stderr and "reusing the existing scores" in resumed.stderr
    table = "comparison.md"
    assert (tmp_path / "resumed" / table).read_text() == (tmp_path / "whole" / table).read_text()
    assert not list((tmp_path / "resumed").rglob(PARTIAL_PREFIX + "*"))


def test_signals_are_held_during_the_commit_and_delivered_after(tmp_path, monkeypatch):
    """In process: Ctrl-C in the middle of the renames is raised only once every file is in place."""
    with pytest.raises(KeyboardInterrupt):
        with staged_outputs(tmp_path) as stage:
            for name in ("a.json", "m.onnx.data", "m.onnx"):
                stage(name).write_text(name)
            os.kill(os.getpid(), signal.SIGINT)  # arrives before the commit starts: raised at once
    assert list(tmp_path.iterdir()) == []

    real_replace = os.replace
    calls = []

    def replace_and_interrupt(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside the commit: held
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_and_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with staged_outputs(tmp_path) as stage:
            for name in ("a.json", "m.onnx.data", "m.onnx"):
                stage(name).write_text(name)
    monkeypatch.undo()
    assert calls[-1] == "m.onnx", "the model is renamed last"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "m.onnx", "m.onnx.data"]
