"""What this CPU allows any kernel: its int8 dot peak and its cold-read bandwidth, measured.

A ratio target against a peer is only reachable if the peer leaves room under the machine's
ceiling: at M=512 both ours and ORT's int8 DynamicQuantizeMatMul run zmm vpdpbusd on an
AVX-512 VNNI CPU without AMX, so nothing beats it by more than peer_ms / (M*K*N / peak); at
M=1 every kernel reads each weight byte once, so nothing beats an int4 peer reading the same
bytes by more than peer_ms / (bytes / bandwidth).  The benches print these ceilings beside
their targets.  The probes are C (bench/roofline_cpu.c), compiled here with the system's C
compiler on first use; without a compiler or AVX-512 VNNI the ceilings are reported as unknown.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("roofline_cpu.c")


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The compiled probes, or None (no C compiler, or a CPU without AVX-512 VNNI: the probes use it)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    try:
        vnni = "avx512_vnni" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        vnni = False
    if cc is None or not vnni:
        return None
    out = Path(tempfile.mkdtemp(prefix="fptq_roofline_")) / "libroofline.so"
    done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None
    lib = ctypes.CDLL(str(out))
    lib.fptq_roofline_vnni_macs.restype = ctypes.c_double
    lib.fptq_roofline_vnni_macs.argtypes = [ctypes.c_int, ctypes.c_long]
    lib.fptq_roofline_read_bytes.restype = ctypes.c_double
    lib.fptq_roofline_read_bytes.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    return lib


def int8_macs_per_s(threads: int) -> float | None:
    """int8 multiply-adds per second of zmm vpdpbusd on `threads` threads (best of 8 ~0.2 s runs: a
    thread that starts late or shares its core for a while only lowers a run, never raises it)."""
    lib = _lib()
    if lib is None:
        return None
    rates = [lib.fptq_roofline_vnni_macs(threads, 6_000_000) for _ in range(8)]
    return max(rates) if max(rates) > 0 else None


def cold_read_bytes_per_s(nbytes: int, threads: int) -> float | None:
    """Bytes per second of a cache-cold read of `nbytes` split over `threads` threads (best of 8)."""
    lib = _lib()
    if lib is None:
        return None
    rate = lib.fptq_roofline_read_bytes(nbytes, threads, 8)
    return rate if rate > 0 else None
