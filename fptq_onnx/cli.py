"""`fptq-onnx` command line. User errors print one line and exit 1; bugs trace."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fptq_onnx.errors import FptqError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Hugging Face causal LM -> calibrated W4A8 (FPTQ) ONNX for ONNX Runtime.",
)

ModelArg = Annotated[
    Optional[str],
    typer.Argument(help="HF checkpoint dir, a .gguf file (or dir holding one), or 'smollm2-135m' (the default)."),
]
OutArg = Annotated[
    Optional[Path],
    typer.Argument(help="Output .onnx path (tokenizer and config are written beside it); default model.onnx."),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option(help="Where torch runs calibration, GPTQ and the weight searches: cpu or cuda (default: cuda if available)."),
]
ProviderOpt = Annotated[
    str,
    typer.Option(help="ONNX Runtime execution provider that scores: cpu, or cuda (onnxruntime-gpu; quantized models are scored through float-op copies with the CPU's arithmetic)."),
]


def model_and_output(model: str | None, out: Path | None) -> tuple[str | None, Path]:
    """`cmd OUT.onnx` alone means the default model into OUT.onnx (README: `cmd [MODEL] OUT.onnx`)."""
    if out is None and model is not None and model.lower().endswith(".onnx"):
        return None, Path(model)
    return model, out or Path("model.onnx")


@app.command()
def export(
    model: ModelArg = None,
    out: OutArg = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output.")] = False,
    verify: Annotated[bool, typer.Option(help="Check torch vs ONNX Runtime logits after export.")] = True,
    tolerance: Annotated[float, typer.Option(help="Max abs logits difference allowed by the check.")] = 1e-3,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle (.bin) weights, which can run code.")] = False,
) -> None:
    """Export the float model with KV cache (Optimum I/O names), verified against torch."""
    from fptq_onnx.pipeline import export_command

    model, out = model_and_output(model, out)
    export_command(model, out, force=force, verify=verify, tolerance=tolerance, allow_pickle=allow_pickle)


@app.command()
def generate(
    onnx_model: Annotated[Path, typer.Argument(help="An exported .onnx model (tokenizer files beside it).")],
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the tokenizer's chat template if it has one.")] = True,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0 = ORT default).")] = 0,
) -> None:
    """Greedy-decode with the KV cache in ONNX Runtime, streaming tokens."""
    from fptq_onnx.loading import load_onnx_tokenizer
    from fptq_onnx.runtime import OnnxCausalLM, generate_text

    lm = OnnxCausalLM(onnx_model, threads=threads or None)
    tokenizer = load_onnx_tokenizer(onnx_model)
    generate_text(lm, tokenizer, prompt, max_new_tokens, on_text=lambda s: print(s, end="", flush=True), chat=chat)
    print()


@app.command()
def convert(
    model: ModelArg = None,
    out: OutArg = None,
    method: Annotated[Optional[str], typer.Option(help="Quantization method (see `fptq-onnx methods`); default fptq.")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="A named method + options: fptq (the paper) or best (accuracy first).")] = None,
    format: Annotated[str, typer.Option("--format", help="Comma list of qdq, w4a8, native; the first is OUT, others OUT.<fmt>.onnx.")] = "qdq,w4a8",
    group_size: Annotated[int, typer.Option(help="int4 weight group size along K (power of two >= 16).")] = 128,
    asym: Annotated[Optional[bool], typer.Option("--asym/--sym", help="Asymmetric int4 weights (zero points); default: the method's.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="int4 weight quantizer after equalization: rtn, mse (clip search) or gptq; default: the method's.")] = None,
    v0: Annotated[float, typer.Option(help="FPTQ: below this max|X| -> per-tensor static int8.")] = 15.0,
    v1: Annotated[float, typer.Option(help="FPTQ: at or above this max|X| -> per-token dynamic int8.")] = 150.0,
    fold_pairs: Annotated[bool, typer.Option("--fold-pairs", help="FPTQ extension: LAE for o_proj/down_proj folded into v_proj/up_proj.")] = False,
    act_clip: Annotated[str, typer.Option(help="Static activation range: 'max' or a percentile of token maxima, e.g. p99.9.")] = "max",
    calib: Annotated[str, typer.Option(help="Calibration: auto (c4 train if the data dir has it, else random), c4, wikitext2 (overlaps evaluation: warned), random (data-free), or a .txt/.jsonl file.")] = "auto",
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 32,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling.")] = 0,
    data_dir: Annotated[Optional[str], typer.Option(help="Data dir (WikiText-2, tasks); default $FPTQ_DATA_DIR.")] = None,
    ppl_windows: Annotated[int, typer.Option(help="Quick WikiText-2 perplexity windows after convert (0 = skip).")] = 4,
    verify: Annotated[bool, typer.Option(help="Check each output against the torch fake-quant reference.")] = True,
    tolerance: Annotated[float, typer.Option(help="qdq check: allowed mean |logits diff| vs torch fake-quant (fp64), in units of torch fp32's own distance from fp64.")] = 3.0,
    opt: Annotated[Optional[list[str]], typer.Option(help="Method-specific KEY=VALUE (repeatable), e.g. --opt alpha=0.8.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite existing outputs.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle (.bin) weights, which can run code.")] = False,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Process one decoder layer at a time from the safetensors files (for models larger than memory); default: stream when the whole model would not fit in --max-memory.")] = None,
    max_memory: Annotated[Optional[str], typer.Option(help="Memory budget, e.g. 20GB (default: 90% of RAM): decides auto-streaming; streaming refuses settings estimated above it.")] = None,
    quantize_lm_head: Annotated[Optional[bool], typer.Option("--quantize-lm-head/--no-quantize-lm-head", help="Quantize lm_head like the decoder linears (per-token int8 activations) and a tied embedding as int8 rows; default: the recipe's (off).")] = None,
    device: DeviceOpt = None,
) -> None:
    """Calibrate, apply the quantization method, export and write the quantized ONNX model(s)."""
    from fptq_onnx.calibration import CalibrationConfig
    from fptq_onnx.convert import ConvertOptions, convert_command
    from fptq_onnx.formats import parse_formats

    from fptq_onnx.algorithms import recipe as named_recipe

    method_name, recipe_options = named_recipe(recipe) if recipe else (method or "fptq", {})
    recipe_lm_head = bool(recipe_options.pop("quantize_lm_head", False))
    if recipe and method and method != method_name:
        raise FptqError(f"--recipe {recipe} is method '{method_name}'; drop --method {method} or the recipe")
    chosen = dict(group_size=group_size, symmetric=None if asym is None else not asym, v0=v0, v1=v1,
                  fold_pairs=fold_pairs, act_clip=act_clip, weights=weights)
    options = ConvertOptions(
        method=method_name,
        recipe=recipe,
        formats=parse_formats(format),
        algorithm_options={**recipe_options, **{k: v for k, v in chosen.items() if v is not None}},
        calibration=CalibrationConfig(source=calib, samples=calib_samples, seqlen=calib_seqlen, seed=seed,
                                      data_dir=data_dir),
        extra_options=_key_values(opt or []),
        verify=verify, tolerance=tolerance, ppl_windows=ppl_windows, data_dir=data_dir, force=force,
        allow_pickle=allow_pickle, stream=stream, max_memory=max_memory, device=device,
        quantize_lm_head=recipe_lm_head if quantize_lm_head is None else quantize_lm_head,
    )
    model, out = model_and_output(model, out)
    convert_command(model, out, options)


def _key_values(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FptqError(f"--opt expects KEY=VALUE, got '{item}'")
        pairs[key.strip()] = value.strip()
    return pairs


@app.command()
def inspect(
    onnx_model: Annotated[Path, typer.Argument(help="A model written by `fptq-onnx convert`.")],
) -> None:
    """Print the per-layer decisions recorded in the model's manifest."""
    from fptq_onnx.inspection import format_manifest
    from fptq_onnx.plan import read_manifest

    print(format_manifest(read_manifest(onnx_model)))


@app.command("eval")
def eval_(
    onnx_model: Annotated[Path, typer.Argument(help="An exported or converted .onnx model (tokenizer beside it).")],
    task: Annotated[str, typer.Option(help="Comma list: wikitext2, c4, lambada, piqa, arc_easy, winogrande, mmlu, mmlu@5shot, or a local .txt/.jsonl file (a text corpus, or multiple choice detected by its fields).")] = "wikitext2",
    seqlen: Annotated[int, typer.Option(help="Perplexity window in tokens.")] = 2048,
    limit: Annotated[Optional[int], typer.Option(help="At most this many items per task (MMLU: per subject), and windows per corpus unless --windows.")] = None,
    windows: Annotated[Optional[int], typer.Option(help="Perplexity windows per corpus; given, --limit does not cap them (default: all, c4 the first 256, capped by --limit).")] = None,
    num_fewshot: Annotated[int, typer.Option(help="MMLU: exemplars per question, the first of each subject (not scored).")] = 0,
    data_dir: Annotated[Optional[str], typer.Option(help="Data dir; default $FPTQ_DATA_DIR.")] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0 = ORT default).")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")] = None,
    allow_calibration_overlap: Annotated[bool, typer.Option("--allow-calibration-overlap", help="Score a perplexity on the model's own calibration text anyway (marked in the output).")] = False,
    provider: ProviderOpt = "cpu",
) -> None:
    """Evaluate through ONNX Runtime: perplexity, zero-shot tasks and MMLU; prints JSON."""
    from fptq_onnx.evaluation_cli import run_eval

    run_eval(onnx_model, [t.strip() for t in task.split(",") if t.strip()], seqlen, limit, data_dir,
             threads or None, json_out, windows, num_fewshot, allow_calibration_overlap, provider)


@app.command()
def compare(
    model: ModelArg = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the models, results.json, comparison.md/.png.")] = Path("compare"),
    methods: Annotated[str, typer.Option(help="Comma list of NAME[:key=value,...]; fp32 is the float baseline.")] = "fp32,rtn,ort-acc4,smoothquant,gptq,awq,fptq",
    tasks: Annotated[str, typer.Option(help="Comma list: wikitext2, c4, lambada, piqa, arc_easy, winogrande, mmlu, mmlu@5shot (MMLU-schema task, 5 exemplars), or local .txt/.jsonl files.")] = "wikitext2,lambada,piqa,winogrande,arc_easy",
    limit: Annotated[Optional[int], typer.Option(help="At most this many perplexity windows (and task items unless --item-limit).")] = None,
    item_limit: Annotated[Optional[int], typer.Option(help="At most this many items per zero-shot task.")] = None,
    seqlen: Annotated[int, typer.Option(help="Perplexity window in tokens.")] = 2048,
    calib: Annotated[str, typer.Option(help="Calibration: auto (c4 train if the data dir has it, else random), c4, wikitext2, random, or a .txt/.jsonl file.")] = "auto",
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 32,
    calib_seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling.")] = 0,
    data_dir: Annotated[Optional[str], typer.Option(help="Data dir (WikiText-2, tasks); default $FPTQ_DATA_DIR.")] = None,
    verify: Annotated[bool, typer.Option(help="Run each convert's parity check (slower).")] = False,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0 = ORT default).")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild and re-score everything instead of resuming.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle (.bin) weights, which can run code.")] = False,
    allow_calibration_overlap: Annotated[bool, typer.Option("--allow-calibration-overlap", help="Score a perplexity on the calibration text anyway (marked in the table).")] = False,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Read one decoder layer at a time from the safetensors files; default: when the model would not fit in memory.")] = None,
    device: DeviceOpt = None,
    provider: ProviderOpt = "cpu",
    jobs: Annotated[int, typer.Option(help="Models scored at once, each in its own process (ORT threads split between them unless --threads).")] = 1,
) -> None:
    """Quantize one model with several methods, score each through ONNX Runtime, write a table and a chart."""
    from fptq_onnx.calibration import CalibrationConfig
    from fptq_onnx.compare import compare_command
    from fptq_onnx.compare_specs import split_methods

    table = compare_command(
        model, split_methods(methods), [t.strip() for t in tasks.split(",") if t.strip()], out_dir,
        limit=limit, item_limit=item_limit, seqlen=seqlen, data_dir=data_dir,
        calibration=CalibrationConfig(source=calib, samples=calib_samples, seqlen=calib_seqlen, seed=seed,
                                      data_dir=data_dir),
        force=force, verify=verify, threads=threads or None, allow_pickle=allow_pickle, stream=stream, device=device,
        allow_calibration_overlap=allow_calibration_overlap, provider=provider, jobs=jobs,
    )
    print(table.read_text())


@app.command()
def methods() -> None:
    """List the quantization methods."""
    from fptq_onnx.algorithms import available

    for name, module in available().items():
        print(f"{name:12s} {module.SUMMARY}")


def _quiet_libraries() -> None:
    """torch/transformers deprecation chatter drowns our progress lines; users see ours."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()


def main() -> None:
    _quiet_libraries()
    try:
        app()
    except FptqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
