"""Scale benchmark: convert a random-weight LLaMA-shaped checkpoint with `convert --stream`.

    python bench/scale.py --shape llama-7b --work /tmp/fptq-scale

1. writes the checkpoint with bench/make_random_checkpoint.py (fp16 safetensors shards);
2. runs `fptq-onnx convert CKPT OUT/model.onnx --stream ...` as a child process and
   measures its wall time and peak RSS (getrusage of the child: the tool's whole
   run, including the ONNX Runtime parity check);
3. reads the manifests (decisions, parity, output sizes) and writes
   bench/scale_<shape>.json; prints a markdown row for bench/scale.md;
4. deletes the checkpoint and the outputs (the disk is shared) unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-7b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fptq-scale"))
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--format", default="qdq,w4a8")
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    work = args.work / args.shape
    ckpt, out_dir = work / "ckpt", work / "out"
    if work.exists():
        shutil.rmtree(work)
    out_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("FPTQ_DATA_DIR", str(HERE.parents[1] / "shared" / "data"))
    result: dict = {"shape": args.shape}
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "make_random_checkpoint.py"), "--shape", args.shape, str(ckpt)],
                       check=True, env=env)
        result["checkpoint_s"] = round(time.perf_counter() - start, 1)
        result["checkpoint_gb"] = round(sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1024**3, 2)

        out = out_dir / "model.onnx"
        command = ["fptq-onnx", "convert", str(ckpt), str(out), "--stream", "--calib", "wikitext2",
                   "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
                   "--format", args.format, "--ppl-windows", "0"]
        if args.max_memory:
            command += ["--max-memory", args.max_memory]
        result["command"] = " ".join(command)
        log = work / "convert.log"
        start = time.perf_counter()
        with open(log, "w") as stderr:
            proc = subprocess.run(command, stderr=stderr, stdout=stderr, env=env)
        result["convert_s"] = round(time.perf_counter() - start, 1)
        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2, 2)
        result["exit_code"] = proc.returncode
        lines = [line for line in log.read_text().splitlines() if "\r" not in line and "%|" not in line]
        result["log_tail"] = lines[-25:]
        if proc.returncode == 0:
            formats = [f.strip() for f in args.format.split(",")]
            for i, fmt in enumerate(formats):
                path = out if i == 0 else out.with_name(f"model.{fmt}.onnx")
                manifest = json.loads(path.with_name(path.stem + ".manifest.json").read_text())
                result[fmt] = {
                    "file": path.name,
                    "onnx_gb": round(path.stat().st_size / 1024**3, 4),
                    "data_gb": round(path.with_name(path.name + ".data").stat().st_size / 1024**3, 2),
                    "counts": manifest["counts"],
                    "parity": manifest["parity"],
                    "tool_peak_rss_mb": manifest["streaming"]["peak_rss_mb"],
                    "memory_estimate_gb": manifest["streaming"]["memory_estimate_gb"],
                }
    finally:
        (HERE / f"scale_{args.shape}.json").write_text(json.dumps(result, indent=2))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=2))
    print("\n".join(result.get("log_tail", [])))
    return 0 if result.get("exit_code") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
