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
from fptq_onnx.evaluation.perplexity import encode, perplexity_of_file, token_logprobs, tokenize_for_windows
from fptq_onnx.evaluation.scoring import encode_pair

ALPHABET = " \n.,:?!='()abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
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


def run_task(name: str, scorer, tokenizer, data_dir: Path, **kwargs) -> dict:
    return evaluate(scorer, tokenizer, [name], data_dir, progress=False, **kwargs)[name]


def metrics(result: dict) -> dict:
    """A task result without its timing (seconds, items/s), which no two runs share."""
    return {k: v for k, v in result.items() if k not in ("seconds", "items_per_s", "windows_per_s")}


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
        assert metrics(res[task]) == {"acc": 1.0, "acc_norm": 1.0, "n": 3}
    assert metrics(res["winogrande"]) == {"acc": 1.0, "n": 2}
    assert all(res[t]["items_per_s"] > 0 for t in res)
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
    assert set(known_tasks()) == {"wikitext2", "c4", "lambada_openai", "piqa", "arc_easy", "winogrande", "mmlu"}


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

    tasks = [t for t in known_tasks() if t != "mmlu"]
    res = evaluate(scorer, tok, tasks, SHARED_DATA, seqlen=128, limit=5, max_length=256, progress=False)
    json.dumps(res)
    for corpus in ("wikitext2", "c4"):
        assert res[corpus]["n"] == 5 and res[corpus]["tokens"] == 5 * 127
        assert vocab / 2 < res[corpus]["perplexity"] < vocab * 2  # random init ~ uniform
    # MMLU: one question per subject (--limit is per subject); a short context keeps the tiny model fast
    mmlu = evaluate(scorer, tok, ["mmlu"], SHARED_DATA, limit=1, max_length=48, progress=False)["mmlu"]
    assert mmlu["n"] == len(mmlu["subjects"]) == 57 and 0.0 <= mmlu["acc"] <= 1.0
    for task in ("lambada_openai", "piqa", "arc_easy", "winogrande"):
        assert res[task]["n"] == 5 and 0.0 <= res[task]["acc"] <= 1.0
    assert 0.0 <= res["piqa"]["acc_norm"] <= 1.0 and math.isfinite(res["lambada_openai"]["perplexity"])

    # the limit shortcut tokenizes a prefix; its tokens must equal the full tokenization's
    text = "\n\n".join(l if l.strip() else "" for l in (SHARED_DATA / "wikitext-2-raw-test.txt").read_text().splitlines(True)[:400])
    assert tokenize_for_windows(tok, text, 128, 5)[: 5 * 128] == encode(tok, text)[: 5 * 128]


# ---- C4 (GPTQ protocol) -------------------------------------------------------------------------


def test_c4_joins_documents_with_spaces_and_stops_at_256_windows(tmp_path: Path) -> None:
    docs = [{"text": "ab cd"}, {"text": "ef"}] * 300  # 300 * 9 chars joined with spaces: > 256 windows of 8
    write_jsonl(tmp_path / "c4-validation.jsonl", docs)
    seen: list[list[int]] = []

    def recording(ids: np.ndarray) -> np.ndarray:
        seen.append(ids[0].tolist())
        return uniform_scorer(ids)

    res = run_task("c4", recording, TOK, tmp_path, seqlen=8)
    joined = TOK(" ".join(d["text"] for d in docs))["input_ids"]
    assert len(joined) // 8 > 256 and res["n"] == 256 and "windows_per_s" in res
    assert sum(seen, []) == joined[: 256 * 8]
    assert run_task("c4", uniform_scorer, TOK, tmp_path, seqlen=8, windows=3)["n"] == 3
    assert run_task("c4", uniform_scorer, TOK, tmp_path, seqlen=8, limit=2)["n"] == 2
    assert run_task("c4", uniform_scorer, TOK, tmp_path, seqlen=8, windows=300, limit=2)["n"] == 300  # --windows wins


# ---- MMLU ----------------------------------------------------------------------------------------

MMLU_ROWS = [
    {"subject": "high_school_physics", "question": f"Question {i}? ", "choices": ["w", "x", "y", "z"], "answer": i % 4}
    for i in range(6)
] + [{"subject": "anatomy", "question": f"Bone {i}?", "choices": ["p", "q", "r", "s"], "answer": (i + 1) % 4} for i in range(2)]


def mmlu_context(subject: str, shots: list[dict], item: dict) -> str:
    """The lm-eval MMLU prompt, spelled out independently of the code under test."""
    def block(row: dict) -> str:
        return (row["question"].strip() + "\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", row["choices"]))
                + "Answer:")
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(block(s) + " " + "ABCD"[s["answer"]] + "\n\n" for s in shots) + block(item)


def test_mmlu_prompt_is_lm_evals(tmp_path: Path) -> None:
    from fptq_onnx.evaluation.mmlu import build_context

    row = MMLU_ROWS[1]
    assert build_context(row["subject"], [], row) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Question 1?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert build_context(row["subject"], MMLU_ROWS[:1], row) == mmlu_context(row["subject"], MMLU_ROWS[:1], row)


@pytest.mark.parametrize("k", [0, 1])
def test_mmlu_oracle_micro_macro_and_subjects(tmp_path: Path, k: int) -> None:
    """Right on physics, wrong on anatomy: micro and macro averages differ as the subject sizes say."""
    write_jsonl(tmp_path / "tasks" / "mmlu.jsonl", MMLU_ROWS)
    groups = {"high_school_physics": MMLU_ROWS[:6], "anatomy": MMLU_ROWS[6:]}
    texts = []
    for subject, rows in groups.items():
        for item in rows[k:]:
            letter = "ABCD"[item["answer"] if subject != "anatomy" else (item["answer"] + 1) % 4]
            texts.append(mmlu_context(subject, rows[:k], item) + " " + letter)
    res = run_task("mmlu", oracle_scorer(texts), TOK, tmp_path, num_fewshot=k)
    n_phys, n_anat = 6 - k, 2 - k
    assert res["subjects"] == {"high_school_physics": {"acc": 1.0, "n": n_phys}, "anatomy": {"acc": 0.0, "n": n_anat}}
    assert res["n"] == n_phys + n_anat and res["num_fewshot"] == k
    assert res["acc"] == pytest.approx(n_phys / (n_phys + n_anat)) and res["acc_macro"] == pytest.approx(0.5)


def test_mmlu_limit_is_per_subject_after_the_exemplars(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "tasks" / "mmlu.jsonl", MMLU_ROWS)
    contexts: list[str] = []
    alphabet_ids = {i + 1: c for i, c in enumerate(ALPHABET)}

    def recording(ids: np.ndarray) -> np.ndarray:
        contexts.append("".join(alphabet_ids[int(i)] for i in ids[0]))
        return uniform_scorer(ids)

    res = run_task("mmlu", recording, TOK, tmp_path, limit=2, num_fewshot=1)
    assert {s: v["n"] for s, v in res["subjects"].items()} == {"high_school_physics": 2, "anatomy": 1}
    assert any(c.startswith(mmlu_context("anatomy", MMLU_ROWS[6:7], MMLU_ROWS[7])) for c in contexts)
    scored = {c.rsplit("\n\n", 1)[-1].split("\n")[0] for c in contexts}  # the question after the shots
    assert scored == {"Question 1?", "Question 2?", "Bone 1?"}  # exemplars (Question 0, Bone 0) never scored


@pytest.mark.parametrize("tasks, k, pattern", [
    (["mmlu"], 2, r"subject 'anatomy' has 2 questions; 2-shot \(--num-fewshot 2 or @2shot\) needs at least 3"),
    (["piqa"], 5, r"--num-fewshot applies to MMLU-schema tasks.*none of piqa"),
    (["mmlu"], -1, r"--num-fewshot must be >= 0"),
])
def test_mmlu_fewshot_errors(tmp_path: Path, tasks: list[str], k: int, pattern: str) -> None:
    write_jsonl(tmp_path / "tasks" / "mmlu.jsonl", MMLU_ROWS)
    write_jsonl(tmp_path / "tasks" / "piqa.jsonl", MC)
    with pytest.raises(FptqError, match=pattern):
        evaluate(uniform_scorer, TOK, tasks, tmp_path, num_fewshot=k, progress=False)


def test_kshot_task_name_is_the_fewshot_task_under_its_own_name(tmp_path: Path) -> None:
    """mmlu@1shot scores as --num-fewshot 1 does, beside plain mmlu, with a title and key of its own."""
    from fptq_onnx.compare_report import table_columns
    from fptq_onnx.evaluation.registry import canonical_name

    write_jsonl(tmp_path / "tasks" / "mmlu.jsonl", MMLU_ROWS)
    mine = write_jsonl(tmp_path / "mine.jsonl", MMLU_ROWS)
    assert [canonical_name(t) for t in ("mmlu@5shot", "mmlu@0shot", f"{mine}@2shot")] == [
        "mmlu@5shot", "mmlu", f"{mine}@2shot"]
    texts = [mmlu_context(r["subject"], MMLU_ROWS[:1] if r in MMLU_ROWS[:6] else MMLU_ROWS[6:7], r) + " "
             + "ABCD"[r["answer"]] for r in MMLU_ROWS[1:6] + MMLU_ROWS[7:]]
    res = evaluate(oracle_scorer(texts), TOK, ["mmlu", "mmlu@1shot", f"{mine}@1shot"], tmp_path, progress=False)
    assert list(res) == ["mmlu", "mmlu@1shot", f"{mine}@1shot"]
    one_shot = run_task("mmlu", oracle_scorer(texts), TOK, tmp_path, num_fewshot=1)
    assert metrics(res["mmlu@1shot"]) == metrics(one_shot) == metrics(res[f"{mine}@1shot"])
    assert res["mmlu@1shot"]["acc"] == 1.0 and res["mmlu@1shot"]["num_fewshot"] == 1
    assert res["mmlu"]["num_fewshot"] == 0 and res["mmlu"]["n"] == len(MMLU_ROWS)
    assert table_columns(["mmlu", "mmlu@5shot"]) == [("mmlu", "acc", "MMLU acc"),
                                                     ("mmlu@5shot", "acc", "MMLU 5-shot acc")]


@pytest.mark.parametrize("task, k, pattern", [
    ("mmlu@five", 0, r"task 'mmlu@five': the part after '@' must be Kshot .*e\.g\. mmlu@5shot"),
    ("mmlu@5", 0, r"the part after '@' must be Kshot"),
    ("@5shot", 0, r"the part after '@' must be Kshot"),
    ("squad@5shot", 0, r"unknown task 'squad'"),
    ("piqa@5shot", 0, r"task 'piqa@5shot': @Kshot applies to MMLU-schema tasks.*piqa is scored as multiple choice"),
    ("mmlu@2shot", 0, r"subject 'anatomy' has 2 questions; 2-shot"),
    ("mmlu@1shot", 1, r"--num-fewshot 1 and mmlu@1shot both set the exemplars"),
])
def test_bad_kshot_task_names(tmp_path: Path, task: str, k: int, pattern: str) -> None:
    write_jsonl(tmp_path / "tasks" / "mmlu.jsonl", MMLU_ROWS)
    write_jsonl(tmp_path / "tasks" / "piqa.jsonl", MC)
    with pytest.raises(FptqError, match=pattern) as info:
        evaluate(uniform_scorer, TOK, [task], tmp_path, num_fewshot=k, progress=False)
    assert "\n" not in str(info.value)


# ---- local files: schema detected by fields ------------------------------------------------------


def test_local_multiple_choice_file_scores_like_piqa(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "tasks" / "piqa.jsonl", MC)
    mine = write_jsonl(tmp_path / "elsewhere" / "my_task.jsonl", MC)
    scorer = oracle_scorer(mc_gold_texts(MC[:2]))  # right on two of three
    res = evaluate(scorer, TOK, ["piqa", str(mine)], tmp_path, progress=False)
    assert metrics(res[str(mine)]) == metrics(res["piqa"]) and res["piqa"]["acc"] == pytest.approx(2 / 3)
    assert "items_per_s" in res[str(mine)]


def test_local_cais_mmlu_file_with_and_without_subjects(tmp_path: Path) -> None:
    with_subject = write_jsonl(tmp_path / "mine.jsonl", MMLU_ROWS)
    rows = [{k: v for k, v in r.items() if k != "subject"} for r in MMLU_ROWS[:3]]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    texts = [mmlu_context("", [], r).replace(" about .", ".") + " " + "ABCD"[r["answer"]] for r in rows]
    res = evaluate(oracle_scorer(texts), TOK, [str(plain), str(with_subject)], None, progress=False)
    assert "subjects" not in res[str(plain)] and res[str(plain)]["acc"] == 1.0 and res[str(plain)]["n"] == 3
    assert set(res[str(with_subject)]["subjects"]) == {"high_school_physics", "anatomy"}


def test_local_text_files_stay_perplexity(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": "abc " * 30, "url": "x"}])
    (tmp_path / "corpus.txt").write_text("abc " * 30, encoding="utf-8")
    res = evaluate(uniform_scorer, TOK, ["corpus.jsonl", "corpus.txt"], tmp_path, seqlen=16, progress=False)
    assert all(r["perplexity"] == pytest.approx(V) and "windows_per_s" in r for r in res.values())


def test_local_file_of_unknown_schema_is_one_clear_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "q", "answers": ["a"]}])
    with pytest.raises(FptqError, match=r'odd\.jsonl: fields \{answers, prompt\} fit no known task schema; '
                                         r'expected one of .*"query": str, "choices": list\[str\], "gold": int.*'
                                         r'"question": str, "choices": list\[str\], "answer": int') as info:
        evaluate(uniform_scorer, TOK, ["odd.jsonl"], tmp_path, progress=False)
    assert "\n" not in str(info.value)


def test_local_file_rows_are_checked_against_the_detected_schema(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "mine.jsonl", [MMLU_ROWS[0], {**MMLU_ROWS[1], "answer": 7}])
    with pytest.raises(FptqError, match=r'mine\.jsonl:2: "answer" 7 out of range for 4 choices'):
        evaluate(uniform_scorer, TOK, ["mine.jsonl"], tmp_path, progress=False)


def test_table_columns_come_from_the_registry(tmp_path: Path) -> None:
    from fptq_onnx.compare_report import table_columns
    from fptq_onnx.evaluation import is_perplexity_task

    mine = write_jsonl(tmp_path / "mine.jsonl", MC)
    evaluate(uniform_scorer, TOK, [str(mine)], None, progress=False)
    cols = table_columns(["c4", "mmlu", str(mine)])
    assert cols == [("c4", "perplexity", "C4 ppl"), ("mmlu", "acc", "MMLU acc"),
                    (str(mine), "acc", "mine.jsonl acc"), (str(mine), "acc_norm", "mine.jsonl acc_norm")]
    assert is_perplexity_task("c4") and not is_perplexity_task("mmlu") and not is_perplexity_task(str(mine))


# ---- batched scoring through the KV cache --------------------------------------------------------


def test_batched_scores_equal_unbatched_on_tiny_onnx(tiny_onnx, tmp_path: Path) -> None:
    """Shared prefix + padded suffix batch == one call per request, incl. left truncation; fewer calls."""
    from fptq_onnx.evaluation.scoring import score_requests
    from fptq_onnx.runtime import OnnxCausalLM

    lm = OnnxCausalLM(tiny_onnx["llama"], spin=False)
    calls: list[tuple[int, ...]] = []
    forward = lm.forward

    def counting(ids, past, mask=None):
        calls.append(ids.shape)
        return forward(ids, past, mask)

    lm.forward = counting

    def plain(ids: np.ndarray) -> np.ndarray:  # a Scorer without a cache: the unbatched path
        return forward(ids, lm.empty_past(1))[0]

    long_ctx = "the cat sat on the mat and then it went away " * 3
    letters = [(TOK("Q: pick one\nAnswer:")["input_ids"], [TOK(letter)["input_ids"][0]]) for letter in "ABCD"]
    items = [
        [encode_pair(TOK, "Question: what is red?\nAnswer:", " " + c) for c in ("a blue sky", "an apple", "x")],
        [encode_pair(TOK, option, " was too big.") for option in TROPHY],
        letters,
        [encode_pair(TOK, long_ctx, " " + c) for c in ("a", "a much longer answer")],  # truncated apart at 24
    ]
    for requests in items:
        for max_length in (None, 24):
            calls.clear()
            batched = score_requests(lm, requests, max_length)
            assert len(calls) <= 2  # the prefix once, the suffixes in one batch
            reference = score_requests(plain, requests, max_length)
            np.testing.assert_allclose([b.logprob for b in batched], [r.logprob for r in reference],
                                       rtol=1e-5, atol=1e-5)
            assert [b.is_greedy for b in batched] == [r.is_greedy for r in reference]
    calls.clear()
    score_requests(lm, letters, None)
    assert calls == [(1, len(letters[0][0]))]  # single-token answers: one forward pass for four choices

    write_jsonl(tmp_path / "tasks" / "piqa.jsonl", MC)
    write_jsonl(tmp_path / "tasks" / "winogrande.jsonl", WINO)
    write_jsonl(tmp_path / "tasks" / "mmlu.jsonl", MMLU_ROWS)
    write_jsonl(tmp_path / "tasks" / "lambada_openai.jsonl", LAMBADA)
    tasks = ["piqa", "winogrande", "mmlu", "lambada"]
    fast = evaluate(lm, TOK, tasks, tmp_path, progress=False, num_fewshot=1)
    slow = evaluate(plain, TOK, tasks, tmp_path, progress=False, num_fewshot=1)
    assert fast.keys() == slow.keys()
    for task in fast:
        for key, value in metrics(slow[task]).items():
            assert fast[task][key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_token_logprobs_match_a_float64_log_softmax(dtype) -> None:
    """float32 exponentials summed in float64 give the all-float64 log-softmax to ~1e-6, fp16 logits included."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((600, 5000)) * 4 + 20).astype(dtype)  # 600 rows: more than one chunk
    targets = rng.integers(0, 5000, 600)
    wide = logits.astype(np.float64)
    reference = wide[np.arange(600), targets] - np.log(np.exp(wide - wide.max(-1, keepdims=True)).sum(-1)) \
        - wide.max(-1)
    got = token_logprobs(logits, targets)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, reference, rtol=0, atol=2e-5)
    assert np.all(token_logprobs(np.zeros((3, 5000), dtype), [0, 1, 2]) == -np.log(5000))
