"""Write a LLaMA-shaped checkpoint with random weights, laid out like a Hugging Face one.

Real 7B weights are not available here, so `bench/scale.py` converts checkpoints
made by this script: the shapes, dtype (fp16) and file layout of the real models
(safetensors shards + `model.safetensors.index.json`, config.json,
generation_config.json, a tokenizer), with random values:

- linears and embeddings ~ N(0, 0.02) (LLaMA's init), norm weights ~ 1 + U(-0.1, 0.1);
- planted outlier channels so that every FPTQ policy fires (the decisions depend on
  max|X| of each linear's input, and a random model's norm outputs are ~N(0, 1)):
    layer % 4 == 1: 4 input_layernorm channels x 8    -> q/k/v max|X| ~ 40:  LAE + static
    layer % 4 == 2: 4 post_attention_layernorm ch x 60 -> gate/up ~ 300:      per-token
    layer % 4 == 3: 4 input_layernorm ch x 60 (q/k/v per-token), 4 post_attention_layernorm
                    ch x 8 (gate/up LAE), 16 v_proj output rows x 20 (o_proj input large:
                    per-token, as FPTQ has no norm to fold into)
    layer % 4 == 0: nothing planted: static everywhere.

Shapes (`--shape`): llama-7b = LLaMA-2-7B (4096 hidden, 11008 MLP, 32 layers, 32 heads,
vocab 32000); llama-1b = TinyLlama-1.1B (2048 hidden, 5632 MLP, 22 layers, 32 heads with
4 KV heads, vocab 32000); tiny for a quick check. Tensors are generated and written one
shard at a time, so the script's memory is about one shard (`--shard-gb`).

The tokenizer is a byte-level BPE trained on WikiText-2 (from $FPTQ_DATA_DIR or
../shared/data) with at most the model's vocabulary, so the calibration and parity
text tokenizes into valid ids.

    python bench/make_random_checkpoint.py --shape llama-7b OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2000, max_position_embeddings=512, rms_norm_eps=1e-5),
}

LAE_GAIN, PER_TOKEN_GAIN, V_ROW_GAIN = 8.0, 60.0, 20.0


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    specs = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def make_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 1:  # norm weights
        t = 1.0 + (torch.rand(shape, generator=gen) - 0.5) * 0.2
    else:
        t = torch.randn(shape, generator=gen) * 0.02
    parts = name.split(".")
    if parts[1] == "layers":
        layer, kind = int(parts[2]), ".".join(parts[3:-1])
        pick = torch.randperm(shape[0], generator=torch.Generator().manual_seed(seed + 1))
        if kind == "input_layernorm" and layer % 4 in (1, 3):
            t[pick[:4]] = LAE_GAIN if layer % 4 == 1 else PER_TOKEN_GAIN
        elif kind == "post_attention_layernorm" and layer % 4 in (2, 3):
            t[pick[:4]] = PER_TOKEN_GAIN if layer % 4 == 2 else LAE_GAIN
        elif kind == "self_attn.v_proj" and layer % 4 == 3:
            t[pick[:16]] *= V_ROW_GAIN
    return t.to(torch.float16)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    data = Path(os.environ.get("FPTQ_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    text_file = data / "wikitext-2-raw-test.txt"
    if text_file.is_file():
        lines = text_file.read_text().splitlines()
    else:  # no data dir: a synthetic corpus is enough for valid ids
        lines = [" ".join(f"w{(i * 7 + j) % 997}" for j in range(40)) for i in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 32000), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers (a slice, for speed benches)")
    args = parser.parse_args(argv)
    cfg = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})}
    out = args.out
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    start = time.perf_counter()
    specs = tensor_specs(cfg)
    limit = int(args.shard_gb * 1024**3)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = make_tensor(name, shape, args.seed * 100_003 + specs.index((name, shape)) * 7)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {file} ({len(shard)} tensors)", file=sys.stderr, flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = LlamaConfig(**cfg, tie_word_embeddings=False, torch_dtype="float16", bos_token_id=1, eos_token_id=2)
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    write_tokenizer(out, cfg["vocab_size"])
    params = sum(int(torch.Size(s).numel()) for _, s in specs)
    print(f"{args.shape}: {params / 1e9:.2f} B params, {total / 1024**3:.2f} GB fp16 in {len(shards)} shards, "
          f"{time.perf_counter() - start:.0f} s -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
