"""Evaluation harness: metric properties on crafted data, input errors, and a smoke run on the real files.

Most tests use a character tokenizer and numpy scorers whose answers are known
in closed form (a uniform model has perplexity = vocab size; an oracle that
knows the gold text gets accuracy 1), so a wrong shift, split or
normalisation shows up as a wrong number, not just a crash.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from fptq_onnx.errors import FptqError
from fptq_onnx.evaluation import evaluate, known_tasks
from fptq_onnx.evaluation.perplexity import encode, perplexity_of_file, tokenize_for_windows
from fptq_onnx.evaluation.tasks import encode_pair, run_task

ALPHABET = " \n.,:?!='abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
V = len(ALPHABET) + 1  # id 0 is BOS


class CharTokenizer:
    """One token per character; duck-types the HF ``__call__`` the harness uses."""

    bos_token_id = 0
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ALPHABET.index(c) + 1 for c in text]}


TOK = CharTokenizer()


def uniform_scorer(ids: np.ndarray) -> np.ndarray:
    return np.zeros((1, ids.shape[1], V), dtype=np.float32)


def oracle_scorer(gold_texts: list[str]):
    """Puts (almost) all mass on the next character of any gold text the input is a prefix of."""
    nxt: dict[tuple[int, ...], int] = {}
    for text in gold_texts:
        ids = TOK(text)["input_ids"]
        for t in range(len(ids) - 1):
            nxt[tuple(ids[: t + 1])] = ids[t + 1]

    def scorer(ids: np.ndarray) -> np.ndarray:
        seq = tuple(int(i) for i in ids[0])
        out = np.zeros((1, len(seq), V), dtype=np.float32)
        for t in range(len(seq)):
            target = nxt.get(seq[: t + 1])
            if target is not None:
                out[0, t, target] = 50.0
        return out

    return scorer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


LAMBADA = [
    {"context": "the cat sat on the", "continuation": "mat"},
    {"context": "Hello, how are", "continuation": "you"},
    {"context": "one two three four", "continuation": "five"},
]
MC = [
    {"query": "Question: what is red?\n", "choices": ["a blue sky", "an apple"], "gold": 1},
    {"query": "Question: sky colour?", "choices": ["blue", "green", "pink"], "gold": 0},
    {"query": "Question: count", "choices": ["one two", "one three", "one four"], "gold": 2},
]
TROPHY = ["The trophy did not fit the suitcase because the trophy", "The trophy did not fit the suitcase because the suitcase"]
WINO = [
    {"context_options": TROPHY, "continuation": "was too big.", "gold": 0},
    {"context_options": TROPHY, "continuation": "was too small.", "gold": 1},
]


def mc_gold_texts(rows: list[dict]) -> list[str]:
    return [r["query"].rstrip("\n") + "\nAnswer: " + r["choices"][r["gold"]] for r in rows]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "tasks" / "lambada_openai.jsonl", LAMBADA)
    write_jsonl(tmp_path / "tasks" / "piqa.jsonl", MC)
    write_jsonl(tmp_path / "tasks" / "arc_easy.jsonl", MC)
    write_jsonl(tmp_path / "tasks" / "winogrande.jsonl", WINO)
    rows = ["", " = Title = \n", "", " some text here, and more. \n"] * 40
    (tmp_path / "wikitext-2-raw-test.txt").write_text("".join(r or " \n" for r in rows), encoding="utf-8")
    return tmp_path


# ---- perplexity -------------------------------------------------------------------------------


def test_uniform_scorer_perplexity_is_vocab_size(data_dir: Path) -> None:
    res = evaluate(uniform_scorer, TOK, ["wikitext2"], data_dir, seqlen=64, progress=False)["wikitext2"]
    assert res["perplexity"] == pytest.approx(V, rel=1e-9)
    text = "\n\n".join(["", " = Title = \n", "", " some text here, and more. \n"] * 40)
    assert res["n"] == len(text) // 64  # partial last window dropped
    assert res["tokens"] == res["n"] * 63  # each window predicts seqlen - 1 tokens


def test_windows_are_non_overlapping_and_limit_caps_them(data_dir: Path) -> None:
    seen: list[list[int]] = []

    def recording(ids: np.ndarray) -> np.ndarray:
        seen.append(ids[0].tolist())
        return uniform_scorer(ids)

    res = evaluate(recording, TOK, ["wikitext2"], data_dir, seqlen=50, limit=3, progress=False)["wikitext2"]
    text = "\n\n".join(["", " = Title = \n", "", " some text here, and more. \n"] * 40)
    assert res["n"] == 3 and len(seen) == 3
    assert sum(seen, []) == TOK(text)["input_ids"][:150]


def test_local_corpus_txt_and_jsonl(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "c4.jsonl", [{"text": "abc " * 30}, {"text": "xyz " * 30}])
    res = perplexity_of_file(uniform_scorer, TOK, tmp_path / "c4.jsonl", seqlen=32)
    assert res["n"] == (240 + 2) // 32 and res["perplexity"] == pytest.approx(V)
    out = evaluate(uniform_scorer, TOK, ["c4.jsonl"], tmp_path, seqlen=32, progress=False)
    assert out["c4.jsonl"]["n"] == res["n"]


def test_oracle_scorer_has_perplexity_one(tmp_path: Path) -> None:
    """An oracle of the text gets perplexity 1: any off-by-one in the logits/target shift would not."""
    (tmp_path / "t.txt").write_text("ab cd\n" * 30, encoding="utf-8")
    text = "\n\n".join(["ab cd\n"] * 30)  # .txt rows are lines, joined with a blank line
    res = perplexity_of_file(oracle_scorer([text]), TOK, tmp_path / "t.txt", seqlen=40, limit=1)
    assert res["n"] == 1 and res["perplexity"] == pytest.approx(1.0, abs=1e-9)


# ---- tasks --------------------------------------------------------------------------------------


def test_oracle_gets_full_accuracy_on_every_task(data_dir: Path) -> None:
    gold = (
        [r["context"] + " " + r["continuation"] for r in LAMBADA]
        + mc_gold_texts(MC)
        + [r["context_options"][r["gold"]] + " " + r["continuation"] for r in WINO]
    )
    res = evaluate(oracle_scorer(gold), TOK, ["lambada", "piqa", "arc_easy", "winogrande"], data_dir, progress=False)
    assert res["lambada_openai"]["acc"] == 1.0 and res["lambada_openai"]["n"] == 3
    assert res["lambada_openai"]["perplexity"] == pytest.approx(1.0, abs=1e-6)
    for task in ("piqa", "arc_easy"):
        assert res[task] == {"acc": 1.0, "acc_norm": 1.0, "n": 3}
    assert res["winogrande"] == {"acc": 1.0, "n": 2}
    json.dumps(res)  # JSON-able


def test_wrong_oracle_gets_zero(data_dir: Path) -> None:
    """An oracle of the *wrong* answers scores 0: proves the metrics look at gold, not at position."""
    wrong_mc = [r["query"].rstrip("\n") + "\nAnswer: " + r["choices"][(r["gold"] + 1) % len(r["choices"])] for r in MC]
    wrong_wino = [r["context_options"][1 - r["gold"]] + " " + r["continuation"] for r in WINO]
    wrong_lambada = [r["context"] + " " + r["continuation"][::-1] for r in LAMBADA]
    scorer = oracle_scorer(wrong_mc + wrong_wino + wrong_lambada)
    res = evaluate(scorer, TOK, ["lambada_openai", "piqa", "winogrande"], data_dir, progress=False)
    assert res["lambada_openai"]["acc"] == 0.0
    assert res["piqa"]["acc"] == 0.0 and res["winogrande"]["acc"] == 0.0


def test_winogrande_partial_scoring_depends_on_context_option(tmp_path: Path) -> None:
    """Same continuation, two contexts: only the scorer's view of the context decides."""
    item = {"context_options": ["I fed the dog", "I fed the cat"], "continuation": "and it barked.", "gold": 0}
    write_jsonl(tmp_path / "tasks" / "winogrande.jsonl", [item, {**item, "continuation": "and it purred.", "gold": 1}])
    scorer = oracle_scorer(["I fed the dog and it barked.", "I fed the cat and it purred."])
    assert run_task("winogrande", scorer, TOK, tmp_path)["acc"] == 1.0


def test_acc_norm_differs_from_acc(tmp_path: Path) -> None:
    """Uniform model: summed logprob favours the shortest choice, per-character the longest."""
    row = {"query": "Question: q", "choices": ["ab", "abcdefgh"], "gold": 1}
    write_jsonl(tmp_path / "tasks" / "piqa.jsonl", [row])
    res = run_task("piqa", uniform_scorer, TOK, tmp_path)
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0


def test_lambada_uniform_perplexity_and_greedy(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "tasks" / "lambada_openai.jsonl", [{"context": "x y", "continuation": "abc"}] * 2)
    res = run_task("lambada_openai", uniform_scorer, TOK, tmp_path)
    assert res["perplexity"] == pytest.approx(V**4, rel=1e-9)  # " abc" = 4 tokens, each 1/V
    assert res["acc"] == 0.0  # argmax of a tie is id 0 (BOS), never the target


def test_encode_pair_moves_trailing_space_and_truncation_keeps_continuation(tmp_path: Path) -> None:
    ctx, cont = encode_pair(TOK, "ab ", "cd")
    assert ctx == TOK("ab")["input_ids"] and cont == TOK(" cd")["input_ids"]
    assert encode_pair(TOK, "", "a")[0] == [0]  # empty context conditions on BOS
    lengths: list[int] = []

    def recording(ids: np.ndarray) -> np.ndarray:
        lengths.append(ids.shape[1])
        return uniform_scorer(ids)

    write_jsonl(tmp_path / "tasks" / "lambada_openai.jsonl", [{"context": "w " * 99 + "w", "continuation": "end"}])
    res = run_task("lambada_openai", recording, TOK, tmp_path, max_length=16)
    assert lengths == [16] and res["perplexity"] == pytest.approx(V**4, rel=1e-9)


# ---- errors --------------------------------------------------------------------------------------


def test_missing_file_names_it_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FptqError, match=r"piqa\.jsonl.*--data-dir.*FPTQ_DATA_DIR"):
        evaluate(uniform_scorer, TOK, ["piqa"], tmp_path, progress=False)


def test_no_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FPTQ_DATA_DIR", raising=False)
    with pytest.raises(FptqError, match="FPTQ_DATA_DIR"):
        evaluate(uniform_scorer, TOK, ["wikitext2"], None, progress=False)


def test_env_var_is_used(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPTQ_DATA_DIR", str(data_dir))
    assert evaluate(uniform_scorer, TOK, ["winogrande"], None, progress=False)["winogrande"]["n"] == 2


@pytest.mark.parametrize(
    "line, pattern",
    [
        ('{"query": "q", "choices": ["a", "b"]}', r'piqa\.jsonl:2: .*gold.*expected \{"query": str, "choices": list\[str\], "gold": int\}'),
        ('{"query": "q", "choices": "ab", "gold": 0}', r"piqa\.jsonl:2: .*choices"),
        ('{"query": "q", "choices": ["a"], "gold": 3}', r"piqa\.jsonl:2: .*out of range"),
        ("not json", r"piqa\.jsonl:2: not valid JSON"),
    ],
)
def test_bad_jsonl_line_reports_file_and_line(tmp_path: Path, line: str, pattern: str) -> None:
    path = tmp_path / "tasks" / "piqa.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(MC[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(FptqError, match=pattern):
        run_task("piqa", uniform_scorer, TOK, tmp_path)


def test_unknown_task_lists_known(tmp_path: Path) -> None:
    with pytest.raises(FptqError, match="unknown task 'hellaswag'.*wikitext2.*lambada_openai.*piqa.*arc_easy.*winogrande"):
        evaluate(uniform_scorer, TOK, ["piqa", "hellaswag"], tmp_path, progress=False)
    assert set(known_tasks()) == {"wikitext2", "lambada_openai", "piqa", "arc_easy", "winogrande"}


def test_seqlen_longer_than_model_context(data_dir: Path) -> None:
    with pytest.raises(FptqError, match="seqlen 2048 .* maximum context 256"):
        evaluate(uniform_scorer, TOK, ["wikitext2"], data_dir, seqlen=2048, max_length=256, progress=False)


def test_bad_scorer_output_shape(data_dir: Path) -> None:
    with pytest.raises(FptqError, match="logits of shape"):
        evaluate(lambda ids: np.zeros((ids.shape[1], V), np.float32), TOK, ["wikitext2"], data_dir, seqlen=32, limit=1, progress=False)


# ---- real files, tiny random model ---------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("FPTQ_DATA_DIR") or REPO.parent / "shared" / "data")
SMOLLM2 = Path("~/.cache/fptq-onnx/smollm2-135m-instruct-fp32").expanduser()


def test_every_task_on_real_data_with_tiny_model() -> None:
    if not (SHARED_DATA / "wikitext-2-raw-test.txt").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not found at {SMOLLM2}")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    vocab = len(tok)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()

    def scorer(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(ids)).logits.float().numpy()

    res = evaluate(scorer, tok, known_tasks(), SHARED_DATA, seqlen=128, limit=5, max_length=256, progress=False)
    json.dumps(res)
    wt = res["wikitext2"]
    assert wt["n"] == 5 and wt["tokens"] == 5 * 127
    assert vocab / 2 < wt["perplexity"] < vocab * 2  # random init ~ uniform
    for task in ("lambada_openai", "piqa", "arc_easy", "winogrande"):
        assert res[task]["n"] == 5 and 0.0 <= res[task]["acc"] <= 1.0
    assert 0.0 <= res["piqa"]["acc_norm"] <= 1.0 and math.isfinite(res["lambada_openai"]["perplexity"])

    # the limit shortcut tokenizes a prefix; its tokens must equal the full tokenization's
    text = "\n\n".join(l if l.strip() else "" for l in (SHARED_DATA / "wikitext-2-raw-test.txt").read_text().splitlines(True)[:400])
    assert tokenize_for_windows(tok, text, 128, 5)[: 5 * 128] == encode(tok, text)[: 5 * 128]
