"""`fptq-onnx eval`: the evaluation harness driven by an ONNX model in ONNX Runtime."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fptq_onnx.errors import FptqError
from fptq_onnx.loading import load_onnx_tokenizer
from fptq_onnx.report import say


def model_max_length(onnx_path: Path) -> int | None:
    """max_position_embeddings from the config.json written beside the model."""
    config = Path(onnx_path).with_name("config.json")
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("max_position_embeddings")
    except json.JSONDecodeError:
        raise FptqError(f"corrupt {config}") from None


def run_eval(onnx_path: Path, tasks: list[str], seqlen: int, limit: int | None, data_dir: str | None,
             threads: int | None, json_out: Path | None, windows: int | None = None, num_fewshot: int = 0,
             allow_calibration_overlap: bool = False, provider: str = "cpu") -> dict:
    """Score the model on every task; print the JSON report (per task: metrics, n, seconds, items/s).

    A perplexity on the text the model was calibrated on is refused before any scoring
    (`leakage.py`); allowed, it is marked in the report. `provider`: the ORT EP that scores, with the
    CPU's numbers on either (ep_models.py).
    """
    from fptq_onnx.ep_models import scoring_lm
    from fptq_onnx.evaluation import evaluate
    from fptq_onnx.leakage import check_corpora, model_calibration, perplexity_corpora

    if json_out is not None and not Path(json_out).parent.is_dir():
        raise FptqError(f"directory for --json does not exist: {Path(json_out).parent}")
    overlap = check_corpora(model_calibration(onnx_path), perplexity_corpora(tasks, data_dir),
                            allow_calibration_overlap)
    lm = scoring_lm(onnx_path, provider, threads)
    tokenizer = load_onnx_tokenizer(onnx_path)
    start = time.perf_counter()
    results = evaluate(lm, tokenizer, tasks, data_dir=data_dir, seqlen=seqlen, limit=limit,
                       max_length=model_max_length(onnx_path), progress=True, windows=windows,
                       num_fewshot=num_fewshot)
    report = {"model": str(onnx_path), "provider": provider, "seqlen": seqlen, "limit": limit, "windows": windows,
              "num_fewshot": num_fewshot, "seconds": round(time.perf_counter() - start, 1), "results": results}
    if overlap:
        report["calibration_overlap"] = overlap  # scored on the calibration text: optimistic
        say(f"warning: {', '.join(overlap)} scored on the model's own calibration text (optimistic)")
    text = json.dumps(report, indent=2)
    print(text)
    if json_out is not None:
        tmp = Path(json_out).with_name(Path(json_out).name + ".tmp")
        tmp.write_text(text)
        tmp.replace(json_out)
        say(f"wrote {json_out}")
    return report
