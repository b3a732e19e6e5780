"""Drive an exported causal-LM ONNX model (KV cache, Optimum I/O names) in ONNX Runtime."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fptq_onnx.errors import FptqError

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
CUSTOM_DOMAIN = "fptq"


_ACCURACY_LEVEL_KEY = "fptq.ort_matmulnbits_accuracy_level"


def _header(path: Path):
    """The model proto without weights: opsets and metadata only."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _external_tensors(graph) -> Iterator:
    """Every TensorProto of `graph` and its subgraphs that keeps its bytes in an external file."""
    from onnx import AttributeProto, TensorProto

    tensors = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        tensors += [sparse.values, sparse.indices]
    for node in graph.node:
        for attr in node.attribute:
            tensors += ([attr.t] if attr.type == AttributeProto.TENSOR else []) + list(attr.tensors)
            for sub in ([attr.g] if attr.type == AttributeProto.GRAPH else []) + list(attr.graphs):
                yield from _external_tensors(sub)
    yield from (t for t in tensors if t.data_location == TensorProto.EXTERNAL)


def check_external_data(path: Path, header) -> None:
    """Refuse external data that escapes the model's directory (`../`, absolute paths, symlinks out)
    or lies past its file's end: a model file must not make us read other files."""
    root = path.resolve().parent
    for tensor in _external_tensors(header.graph):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise FptqError(f"{path}: external data '{location}' of tensor '{tensor.name}' is outside the model's "
                            f"directory {root}; refusing to read it")
        if not target.is_file():
            raise FptqError(f"{path}: external data file '{location}' of tensor '{tensor.name}' not found")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            offset = length = -1
        if offset < 0 or length < 0:
            raise FptqError(f"{path}: tensor '{tensor.name}' has a bad external-data offset/length")
        end = offset + length
        if end > target.stat().st_size:
            raise FptqError(f"{path}: tensor '{tensor.name}' reads up to byte {end} of '{location}', "
                            f"which has {target.stat().st_size}")


def make_session(path: Path, threads: int | None = None, providers: list | None = None,
                 spin: bool = True, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An ORT session; registers our custom-op library when the model needs it.

    spin=False stops idle intra-op threads from busy-waiting: slightly slower on an idle
    machine, much faster (25% measured here) when other processes compete for the cores,
    as in long evaluations on shared machines. `options`: the caller's SessionOptions to
    start from (profiling, logging), completed here like a fresh one.
    """
    path = Path(path)
    if not path.is_file():
        raise FptqError(f"ONNX model not found: {path}")
    options = options or ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        header = _header(path)
        check_external_data(path, header)
        if any(op.domain == CUSTOM_DOMAIN for op in header.opset_import):
            from fptq_onnx import custom_ops

            custom_ops.register(options)
        hints = {p.key: p.value for p in header.metadata_props}
        if _ACCURACY_LEVEL_KEY in hints:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", hints[_ACCURACY_LEVEL_KEY])
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except FptqError:
        raise
    except Exception as exc:  # onnx/ORT raise many types for a bad file
        raise FptqError(f"cannot load {path} as an ONNX model: {str(exc).splitlines()[0]}") from None


class OnnxCausalLM:
    """Prefill/decode with an explicit KV cache, and a plain `logits(ids)` scorer for evaluation."""

    def __init__(self, path: Path, threads: int | None = None, providers: list | None = None,
                 spin: bool = True, options: ort.SessionOptions | None = None) -> None:
        self.path = Path(path)
        self.session = make_session(self.path, threads, providers, spin, options)
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - inputs.keys()
        if missing or "logits" not in {o.name for o in self.session.get_outputs()}:
            raise FptqError(f"{path} is not a causal-LM export (needs input_ids, attention_mask -> logits)")
        self.has_position_ids = "position_ids" in inputs
        past = sorted((int(m.group(1)), m.group(2)) for n in inputs if (m := _PAST.fullmatch(n)))
        self.num_layers = len(past) // 2
        if self.num_layers == 0:
            raise FptqError(f"{path} has no past_key_values inputs; export it with KV cache")
        shape = inputs["past_key_values.0.key"].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.num_layers)]

    def forward(
        self, input_ids: np.ndarray, past: list[np.ndarray], attention_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step: returns logits [B, T, V] and the new cache (past + these T positions)."""
        batch, seq = input_ids.shape
        past_len = past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), np.int64)
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        if self.has_position_ids:
            positions = np.cumsum(attention_mask, axis=1)[:, -seq:] - 1
            feed["position_ids"] = np.maximum(positions, 0).astype(np.int64)
        for layer in range(self.num_layers):
            feed[f"past_key_values.{layer}.key"] = past[2 * layer]
            feed[f"past_key_values.{layer}.value"] = past[2 * layer + 1]
        outputs = dict(zip(self.output_names, self.session.run(None, feed)))
        present = [outputs[f"present.{i}.{k}"] for i in range(self.num_layers) for k in ("key", "value")]
        return outputs["logits"], present

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Scorer interface for evaluation: logits of a fresh prefill."""
        return self.forward(input_ids, self.empty_past(input_ids.shape[0]))[0]

    __call__ = logits

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> Iterator[int]:
        """Greedy decoding with the KV cache, yielding tokens as they are chosen."""
        ids = np.array([prompt_ids], np.int64)
        past = self.empty_past(1)
        for _ in range(max_new_tokens):
            logits, past = self.forward(ids, past)
            token = int(np.argmax(logits[0, -1]))
            yield token
            if token in eos_ids:
                return
            ids = np.array([[token]], np.int64)


def generate_text(
    lm: OnnxCausalLM, tokenizer, prompt: str, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
    chat: bool = True,
) -> str:
    """Greedy completion; streams decoded text pieces through `on_text`."""
    if chat and getattr(tokenizer, "chat_template", None):
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
            prompt_ids = prompt_ids["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    generated: list[int] = []
    shown = ""
    for token in lm.generate_ids(list(prompt_ids), max_new_tokens, eos_ids):
        if token in eos_ids:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown):])
        shown = text
    return shown
