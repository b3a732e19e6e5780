"""Load test: `generate` and `eval` requests of random lengths against one ONNX model; RSS over time.

Requests alternate between a greedy generation (prefill of the prompt, then a few
cached decode steps, as `fptq-onnx generate` does) and an evaluation scoring (one
forward over the whole sequence and its token log-probabilities, as `fptq-onnx eval`
does per window). Lengths are uniform in 1..--max-len tokens (random ids, fixed seed).
Before the measured requests one generation and one scoring at the maximum length
bring ORT's arena to its working size; RSS (resident set, /proc/self/statm) after
that is the baseline, and the table shows its growth every --every requests.

    python bench/robustness_load.py MODEL.onnx --requests 1000 --max-len 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from fptq_onnx.evaluation.perplexity import token_logprobs
from fptq_onnx.runtime import OnnxCausalLM


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_request(lm: OnnxCausalLM, kind: str, ids: np.ndarray, new_tokens: int) -> None:
    if kind == "generate":
        for _ in lm.generate_ids(ids.tolist(), new_tokens, eos_ids=set()):
            pass
    else:
        logits = lm.logits(ids[None])[0]
        token_logprobs(logits[:-1], ids[1:]).sum()


def serve(lm: OnnxCausalLM, vocab: int, requests: int, max_len: int, new_tokens: int = 4, seed: int = 0,
          every: int = 100) -> dict:
    """Run the load; returns baseline/peak/final RSS (MB), the samples and the seconds it took."""
    rng = np.random.default_rng(seed)
    for kind in ("generate", "eval"):  # warm-up at the largest shapes
        one_request(lm, kind, rng.integers(0, vocab, max_len), new_tokens)
    gc.collect()
    baseline = rss_mb()
    samples, start = [], time.perf_counter()
    lengths = rng.integers(1, max_len + 1, size=requests)
    for i, length in enumerate(lengths):
        one_request(lm, ("generate", "eval")[i % 2], rng.integers(0, vocab, int(length)), new_tokens)
        if (i + 1) % every == 0 or i + 1 == requests:
            gc.collect()
            samples.append((i + 1, rss_mb()))
    return {"baseline": baseline, "samples": samples, "final": samples[-1][1],
            "peak": max(r for _, r in samples), "seconds": time.perf_counter() - start,
            "tokens": int(lengths.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    lm = OnnxCausalLM(args.model, threads=args.threads or None, spin=False)
    vocab = json.loads(args.model.with_name("config.json").read_text())["vocab_size"]
    result = serve(lm, vocab, args.requests, args.max_len, args.new_tokens, every=args.every)
    print(f"model {args.model.name}; {platform.processor() or platform.machine()}; {args.requests} requests "
          f"(generate/eval alternating, lengths 1..{args.max_len}, {result['tokens']} prompt tokens, "
          f"{args.new_tokens} new tokens per generate) in {result['seconds']:.0f} s")
    print(f"\nbaseline RSS after warm-up: {result['baseline']:.0f} MB\n")
    print("| requests | RSS MB | growth MB |\n|---:|---:|---:|")
    for n, rss in result["samples"]:
        print(f"| {n} | {rss:.0f} | {rss - result['baseline']:+.1f} |")
    print(f"\npeak {result['peak']:.0f} MB, final growth {result['final'] - result['baseline']:+.1f} MB")


if __name__ == "__main__":
    main()
