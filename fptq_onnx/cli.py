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
OutArg = Annotated[Path, typer.Argument(help="Output .onnx path (tokenizer and config are written beside it).")]


@app.command()
def export(
    model: ModelArg = None,
    out: OutArg = Path("model.onnx"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing output.")] = False,
    verify: Annotated[bool, typer.Option(help="Check torch vs ONNX Runtime logits after export.")] = True,
    tolerance: Annotated[float, typer.Option(help="Max abs logits difference allowed by the check.")] = 1e-3,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle (.bin) weights, which can run code.")] = False,
) -> None:
    """Export the float model with KV cache (Optimum I/O names), verified against torch."""
    from fptq_onnx.pipeline import export_command

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
