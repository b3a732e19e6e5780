"""Files that let ONNX Runtime apps load an output directory with no glue code.

Beside each model the bundle carries what its readers look for:

* onnxruntime-genai reads ``genai_config.json`` from the model's directory: the
  decoder's file, I/O names, heads and KV layout, special token ids and greedy
  search defaults. A w4a8 model also names the fptq custom-op library, which genai
  accepts only as a path inside the model directory, so the library is copied there.
  One directory holds one ``genai_config.json``: it describes ``OUT.onnx``; each
  ``OUT.<format>.onnx`` written beside it gets ``genai_config.<format>.json``.
* Optimum and other transformers 4.x apps read ``tokenizer_config.json``, whose
  ``tokenizer_class`` transformers 5 writes as ``TokenizersBackend``, a class 4.x
  lacks; ``PreTrainedTokenizerFast`` is the name both read (in 5.x it is the same class).
  Its 4.x default inputs add ``token_type_ids``, which a decoder's ``generate`` refuses,
  so the model's input names are written out too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from fptq_onnx import custom_ops
from fptq_onnx.export import kv_shape
from fptq_onnx.formats import FORMATS
from fptq_onnx.models.registry import spec_for
from fptq_onnx.passes.stamp_decisions import ORT_ACCURACY_LEVEL_KEY

GENAI_CONFIG = "genai_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend"}
_SESSION_ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"


def write_app_files(directory: Path, sidecar_dir: Path, model, tokenizer, stage: Callable[[str], Path]) -> None:
    """Make the saved tokenizer files portable and write genai files for every staged model.

    `sidecar_dir` holds the just-saved config/tokenizer files (moved into place by the
    caller); the bundle's models are already staged (`stage(name)` gives their directory),
    and `directory` is where the bundle lands, to see which other models live there.
    """
    portable_tokenizer_config(sidecar_dir / TOKENIZER_CONFIG, tokenizer)
    staging = stage(GENAI_CONFIG).parent
    siblings = {p.name for p in directory.glob("*.onnx")} | {p.name for p in staging.glob("*.onnx")}
    for model_file in sorted(staging.glob("*.onnx")):
        header = _header(model_file)
        needs_ops = any(op.domain == custom_ops.DOMAIN for op in header.opset_import)
        if needs_ops:
            shutil.copyfile(custom_ops.library_path(), stage(custom_ops.LIBRARY_NAME))
        entries = {_SESSION_ACCURACY_LEVEL: p.value for p in header.metadata_props if p.key == ORT_ACCURACY_LEVEL_KEY}
        config = genai_config(model, tokenizer, model_file.name, "position_ids" in {i.name for i in header.graph.input},
                              custom_ops.LIBRARY_NAME if needs_ops else None, entries)
        stage(genai_config_name(model_file.name, siblings)).write_text(json.dumps(config, indent=2) + "\n")


def genai_config_name(model_file: str, siblings: set[str]) -> str:
    """`genai_config.<fmt>.json` for `OUT.<fmt>.onnx` written beside `OUT.onnx`, else `genai_config.json`."""
    stem, _, suffix = Path(model_file).stem.rpartition(".")
    if stem and suffix in FORMATS and f"{stem}.onnx" in siblings:
        return f"genai_config.{suffix}.json"
    return GENAI_CONFIG


def genai_config(model, tokenizer, filename: str, has_position_ids: bool, custom_ops_library: str | None,
                 session_entries: dict[str, str]) -> dict:
    """onnxruntime-genai's description of one exported decoder (the layout export.py writes)."""
    config = model.config
    spec = spec_for(config.model_type)
    kv_heads, head_dim = kv_shape(config)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if has_position_ids:
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": spec.past_key_format.format(layer="%d", kind="key"),
               "past_value_names": spec.past_key_format.format(layer="%d", kind="value")}
    outputs = {"logits": "logits",
               "present_key_names": spec.present_key_format.format(layer="%d", kind="key"),
               "present_value_names": spec.present_key_format.format(layer="%d", kind="value")}
    session_options: dict = {"log_id": "onnxruntime-genai", "provider_options": [], **session_entries}
    if custom_ops_library is not None:
        session_options["custom_ops_library"] = custom_ops_library
    ids = special_token_ids(model, tokenizer)
    context = config.max_position_embeddings
    return {
        "model": {
            "type": config.model_type,
            **ids,
            "context_length": context,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": filename,
                "session_options": session_options,
                "hidden_size": config.hidden_size,
                "head_size": head_dim,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "inputs": inputs,
                "outputs": outputs,
            },
        },
        # Greedy, like `fptq-onnx generate`. The graph concatenates past and new keys
        # (present has the total length), so genai cannot share one fixed KV buffer.
        "search": {"do_sample": False, "num_beams": 1, "top_k": 1, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": False},
    }


def special_token_ids(model, tokenizer) -> dict:
    """bos/eos/pad ids: generation_config, then config, then the tokenizer; eos also gets the
    tokenizer's eos (a chat model's end of turn, which config.json often omits)."""
    sources = [s for s in (getattr(model, "generation_config", None), model.config, tokenizer) if s is not None]

    def first(name: str):
        return next((v for s in sources if (v := getattr(s, name, None)) is not None), None)

    eos = first("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    if tokenizer.eos_token_id is not None:
        eos_ids.append(tokenizer.eos_token_id)
    eos_ids = list(dict.fromkeys(int(i) for i in eos_ids))
    out: dict = {"eos_token_id": eos_ids}
    bos, pad = first("bos_token_id"), first("pad_token_id")
    if bos is not None:
        out["bos_token_id"] = int(bos)
    if pad is None and eos_ids:
        pad = eos_ids[0]
    if pad is not None:
        out["pad_token_id"] = int(pad)
    return out


def portable_tokenizer_config(path: Path, tokenizer) -> None:
    """A tokenizer_config.json that transformers 4.x and 5.x load alike (see the module doc)."""
    data = json.loads(path.read_text())
    if data.get("tokenizer_class") in _V5_ONLY_TOKENIZER_CLASSES:
        data["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    data.setdefault("model_input_names", list(tokenizer.model_input_names))
    data.pop("local_files_only", None)  # how this run loaded it ($HF_HUB_OFFLINE): would make outputs differ
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _header(path: Path):
    """The model proto without external weights: opsets, metadata, graph inputs."""
    import onnx

    return onnx.load(str(path), load_external_data=False)
