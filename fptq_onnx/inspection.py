"""Readable per-layer table of a manifest (what `fptq-onnx inspect` prints)."""

from __future__ import annotations


def format_manifest(manifest: dict) -> str:
    lines = [
        f"method {manifest.get('method')}"
        + (f" (recipe {manifest['recipe']})" if manifest.get("recipe") else "")
        + f"  format {manifest.get('format')}  model {manifest.get('model')}",
        f"config {manifest.get('config')}",
        f"calibration {manifest.get('calibration')}",
        f"decisions {manifest.get('counts')}",
    ]
    if manifest.get("parity"):
        p = manifest["parity"]
        lines.append(f"parity vs torch fake-quant: prefill {p['prefill_max_abs']:.3g}, decode {p['decode_max_abs']:.3g}")
    if manifest.get("quick_perplexity"):
        q = manifest["quick_perplexity"]
        lines.append(f"quick perplexity ({q['windows']}x{q['seqlen']}): float {q['float']:.3f}, quantized {q['quantized']:.3f}")
    width = max([11] + [len(info["strategy"]) for info in manifest["linears"].values()])
    header = f"{'linear':40s} {'strategy':{width}s} {'max|X|':>9s} {'after eq':>9s} {'act scale':>10s}  {'weight':16s}  why"
    lines += ["", header, "-" * len(header)]
    for name, info in manifest["linears"].items():
        weight = info.get("weight") or {}
        grouping = "per-channel" if weight.get("per_channel") else f"g{weight.get('group_size')}"
        wdesc = f"int{weight['bits']} {grouping} {'sym' if weight['symmetric'] else 'asym'}" if weight else "float"
        scale = "" if info.get("act_scale") is None else f"{info['act_scale']:.4g}"
        lines.append(
            f"{name:40s} {info['strategy']:{width}s} {info['max_abs']:9.2f} {info['max_abs_equalized']:9.2f} {scale:>10s}  "
            f"{wdesc:16s}  {info.get('reason', '')}"
        )
    return "\n".join(lines)
