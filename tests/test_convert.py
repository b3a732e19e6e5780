"""`fptq-onnx convert` end to end on the tiny llama checkpoint, through the CLI entry point.

One module-scoped convert writes all three formats; the tests read what it left behind.
To stay fast it reuses the session's tiny llama export (`tiny_onnx`, same weights as
`tiny_checkpoint`) instead of a second ~15 s torch.onnx.export; calibration, planning,
passes, saving, the parity check against torch fake-quant, manifests and plots all run
for real. `test_convert_real_export_subprocess` (slow) runs it all through the console script.
Bad options must fail with one `error:` line and leave the output directory empty.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FORMATS = ("qdq", "w4a8", "native")
CONVERT_ARGS = ("--calib", "random", "--calib-samples", "2", "--calib-seqlen", "16", "--group-size", "16",
                "--v0", "1", "--v1", "5", "--ppl-windows", "0")


@pytest.fixture(scope="module")
def converted(cli, tiny_checkpoint, structure_cache, tmp_path_factory):
    from conftest import cached_graph_structure

    from fptq_onnx import convert

    out_dir = tmp_path_factory.mktemp("convert")
    out = out_dir / "tiny.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert, "graph_structure", cached_graph_structure(structure_cache))
        result = cli("convert", tiny_checkpoint, out, "--format", ",".join(FORMATS), *CONVERT_ARGS)
    assert result.code == 0, result.stdout + result.stderr
    return out, result


def _paths(out: Path) -> dict[str, Path]:
    return {"qdq": out, "w4a8": out.with_name(f"{out.stem}.w4a8.onnx"), "native": out.with_name(f"{out.stem}.native.onnx")}


def _decoder_linears() -> int:
    from tiny import tiny_config

    from fptq_onnx.models.registry import spec_for

    return tiny_config("llama").num_hidden_layers * len(spec_for("llama").linears())


def test_convert_writes_every_format(converted):
    out, _ = converted
    for fmt, path in _paths(out).items():
        assert path.is_file(), fmt
        assert path.with_name(path.stem + ".manifest.json").is_file(), fmt
        png = path.with_name(path.stem + ".ranges.png")
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fmt
    assert not list(out.parent.glob(".fptq-*")), "staging dirs left behind"


def test_manifests_count_every_linear(converted):
    out, _ = converted
    n = _decoder_linears()
    for fmt, path in _paths(out).items():
        manifest = json.loads(path.with_name(path.stem + ".manifest.json").read_text())
        assert manifest["format"] == fmt and manifest["method"] == "fptq"
        assert sum(manifest["counts"].values()) == n == len(manifest["linears"])
        assert set(manifest["counts"]) <= {"static", "lae+static", "per_token"}
        assert all(info["weight"]["bits"] == 4 and info["weight"]["group_size"] == 16
                   for info in manifest["linears"].values())
        if fmt != "native":
            assert manifest["parity"] is not None


def test_w4a8_model_uses_the_custom_op(converted):
    import onnx

    out, _ = converted
    proto = onnx.load(_paths(out)["w4a8"], load_external_data=False)
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert ("fptq", "W4A8MatMul") in ops
    assert any(o.domain == "fptq" for o in proto.opset_import)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fptq.ort_matmulnbits_accuracy_level"] == "0"
    native = onnx.load(_paths(out)["native"], load_external_data=False)
    assert {p.key: p.value for p in native.metadata_props}["fptq.ort_matmulnbits_accuracy_level"] == "4"
    assert not any(n.op_type == "QuantizeLinear" for n in native.graph.node)


def test_inspect_prints_a_row_per_linear(cli, converted):
    out, _ = converted
    result = cli("inspect", out)
    assert result.code == 0, result.stderr
    manifest = json.loads(out.with_name(out.stem + ".manifest.json").read_text())
    rows = [line for line in result.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == _decoder_linears()
    assert [r.split()[0] for r in rows] == list(manifest["linears"])
    for row, info in zip(rows, manifest["linears"].values()):  # each row says why
        assert info["reason"] and row.endswith(info["reason"])


def test_generate_on_w4a8(cli, converted):
    out, _ = converted
    result = cli("generate", _paths(out)["w4a8"], "hi", "--max-new-tokens", "3")
    assert result.code == 0, result.stdout + result.stderr
    assert not result.error_lines


@pytest.mark.parametrize(
    "args, match",
    [
        (("--group-size", "24"), "group size"),
        (("--v0", "200", "--v1", "100"), "v0"),
        (("--format", "bogus"), "format"),
        (("--calib", "/nonexistent.txt"), "nonexistent"),
        (("--method", "bogus"), "method"),
        (("--opt", "nonsense=1"), "nonsense"),
        (("--recipe", "fastest"), "recipe"),
        (("--recipe", "best", "--method", "rtn"), "recipe"),
        (("--weights", "awq2"), "weight quantizer"),
    ],
    ids=["group-size", "thresholds", "format", "calib", "method", "opt", "recipe", "recipe-method", "weights"],
)
def test_bad_options_fail_cleanly(cli, tiny_checkpoint, tmp_path, args, match):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    base = dict(zip(CONVERT_ARGS[::2], CONVERT_ARGS[1::2]))
    base.update(dict(zip(args[::2], args[1::2])))
    flat = [item for kv in base.items() for item in kv]
    if "--format" not in base:
        flat += ["--format", "qdq,w4a8"]
    result = cli("convert", tiny_checkpoint, out_dir / "m.onnx", *flat)
    text = result.stdout + result.stderr
    assert result.code == 1, text
    assert "Traceback" not in text
    assert len(result.error_lines) == 1, result.stderr
    assert match.lower() in result.error_lines[0].lower(), result.error_lines[0]
    assert list(out_dir.iterdir()) == [], "outputs left behind"


@pytest.mark.slow
def test_convert_real_export_subprocess(cli, tiny_checkpoint, tmp_path):
    """The installed console script, real torch export, two formats, then generate on the deploy form."""
    out = tmp_path / "m.onnx"
    result = cli("convert", tiny_checkpoint, out, "--format", "qdq,w4a8", *CONVERT_ARGS, in_process=False)
    assert result.code == 0, result.stdout + result.stderr
    assert out.is_file() and out.with_name("m.w4a8.onnx").is_file()
    gen = cli("generate", out.with_name("m.w4a8.onnx"), "hi", "--max-new-tokens", "3", in_process=False)
    assert gen.code == 0, gen.stderr


def test_recipe_best_writes_all_three_forms(cli, tiny_checkpoint, fast_structure, tmp_path):
    """`--recipe best`: the auto policy with asymmetric GPTQ weights, recorded in every manifest."""
    out = tmp_path / "best.onnx"
    result = cli("convert", tiny_checkpoint, out, "--recipe", "best", "--format", ",".join(FORMATS), *CONVERT_ARGS)
    assert result.code == 0, result.stdout + result.stderr
    for fmt, path in _paths(out).items():
        manifest = json.loads(path.with_name(path.stem + ".manifest.json").read_text())
        assert (manifest["recipe"], manifest["method"], manifest["format"]) == ("best", "auto", fmt)
        assert manifest["config"]["weights"] == "gptq" and manifest["config"]["symmetric"] is False
        assert all(lp["weight"]["symmetric"] is False for lp in manifest["linears"].values())
        if fmt == "qdq":
            shown = cli("inspect", path)
            assert shown.code == 0 and "(recipe best)" in shown.stdout and "error " in shown.stdout
        if fmt != "native":  # the convert passed its parity bound (else exit 1); the numbers are recorded
            assert manifest["parity"]["metric"] == "noise" and manifest["parity"]["top1_agreement"] > 0.9
