"""fptq::W4A8MatMul under concurrent Run calls: 8 Python threads on one session, and two sessions at once.

ORT allows Run on one InferenceSession from many threads; the kernel object is then
shared, so everything it writes per call must be per-call scratch. Every output is
compared bit for bit with the same input run sequentially first. Sizes are above the
kernel's serial threshold, so ORT's intra-op pool splits each call as well.
custom_ops/run_asan_tests.sh runs this file against the AddressSanitizer build too.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from op_graphs import OpCase, session

THREADS = 8
ROUNDS = 6  # each thread runs every input of its share this many times, in a shuffled order


def _hammer(runs: list[tuple[object, dict, np.ndarray]]) -> list[str]:
    """Run (session, feed, expected) items from THREADS threads started together; return mismatches."""
    barrier = threading.Barrier(THREADS)
    failures: list[str] = []

    def worker(t: int) -> None:
        rng = np.random.default_rng(t)
        mine = [runs[i] for i in range(t, len(runs), THREADS)] or runs[:1]
        barrier.wait()
        for _ in range(ROUNDS):
            for i in rng.permutation(len(mine)):
                sess, feed, expected = mine[i]
                (y,) = sess.run(None, feed)
                if not np.array_equal(y, expected):
                    failures.append(f"thread {t}: input {i} differs by {np.abs(y - expected).max()}")

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(worker, t) for t in range(THREADS)]:
            future.result()
    return failures


def _sequential(sess, case: OpCase, rows: list[int], fed: dict | None = None) -> list[tuple[object, dict, np.ndarray]]:
    runs = []
    for i, m in enumerate(rows):
        feed = {"A": case.activations(m, seed=100 + i), **(fed or {})}
        (y,) = sess.run(None, feed)
        np.testing.assert_array_equal(y, case.reference(feed["A"]))
        runs.append((sess, feed, y))
    return runs


ROWS = [1, 3, 8, 17, 64, 1, 33, 5, 2, 48, 9, 16]


@pytest.mark.parametrize("intra", [1, 2])
@pytest.mark.parametrize("weights", ["initializers", "fed"])
@pytest.mark.parametrize("act_mode", ["static", "per_token"])
def test_one_session_from_eight_threads(intra, weights, act_mode):
    case = OpCase(K=576, N=200, G=128, act_mode=act_mode)
    fed_names = ("B", "scales", "zero_points") if weights == "fed" else ()
    sess = session(case.model(graph_inputs=fed_names), threads=intra)
    runs = _sequential(sess, case, ROWS, {n: case.arrays[n] for n in fed_names})
    assert _hammer(runs) == []


def test_two_sessions_in_one_process_at_once():
    """Two models (different shapes and modes) of one library, run interleaved from 8 threads."""
    first, second = OpCase(K=576, N=200, G=128), OpCase(K=300, N=96, G=64, act_mode="per_token", seed=3)
    runs = (_sequential(session(first.model(), threads=2), first, ROWS[:6])
            + _sequential(session(second.model(), threads=2), second, ROWS[6:]))
    assert _hammer(runs) == []
