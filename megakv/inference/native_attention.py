"""Decode attention through a small native kernel (CPU, fp32), built on first use with the C compiler.

Why: at one query token per sequence, attention is a stream over the cached K/V. On the 24-layer d1024
benchmark shape (GQA 16/4, 2048 positions x 8 sequences, one core) torch's SDPA reads it at ~5-7 GB/s
(5.1 ms a layer); kernels/decode_attention.c reads each K/V head's K and V once for all the query heads
that share it, at ~14 GB/s (2.4 ms a layer; a plain read of the same bytes takes 1.3 ms), which takes a
decode step from 233 to 162 ms (benchmarks/bench_inference.py --limit: megakv against megakv-sdpa, same
run). Numbers agree with SDPA to ~1e-6, and with a float64 reference at least as closely as SDPA's own.

The kernel is plain C with vector extensions. `DecodeAttentionKernel.load()` compiles it once per source,
compiler and CPU into kernels/ of the user's megakv cache (megakv/user_cache.py: $MEGAKV_CACHE, else
~/.cache/megakv; the data downloads' root too) and loads it with ctypes; it
returns None when there is no working compiler, and the engine then keeps SDPA (same numbers, slower). The
build is atomic (compiled to a private name, then renamed), so concurrent processes never load a half-written
library.

`NativeDecodeAttention` is an Attention whose one-token calls use the kernel; the engine's decode view
(megakv/inference/decode_view.py) swaps it in, so the model file stays free of it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from megakv.model import KV, Attention
from megakv.user_cache import cache_root

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "decode_attention.c"
SYMBOL = "megakv_decode_attention"
# Tried in order: the fastest build this compiler accepts (-march=native may be unknown to it, and OpenMP
# may be missing; without OpenMP the kernel runs on one thread).
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])
# Limits of kernels/decode_attention.c (MAX_CHUNKS, MAX_ROWS and its accumulator array).
MAX_HEAD_DIM, MAX_GROUP, MAX_GROUP_WIDTH = 256, 64, 2048


def compiler() -> str | None:
    name = os.environ.get("CC", "cc")
    return shutil.which(name)


def cpu_identity() -> str:
    """What a -march=native build depends on: a library built on one CPU may not run on another."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _library_key(cc: str, version: str, flags: list[str]) -> str:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), version.encode(), " ".join(flags).encode(),
                 cpu_identity().encode(), sys.platform.encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def build_library(directory: Path | None = None) -> Path | None:
    """Compile the kernel (or find it already compiled) and return the shared library's path; None when no
    compiler on this machine builds it (the reason is logged)."""
    cc = compiler()
    if cc is None:
        logger.info("decode attention: no C compiler (%s) found, using SDPA", os.environ.get("CC", "cc"))
        return None
    directory = (directory or cache_root()) / "kernels"
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    for flags in FLAG_SETS:
        target = directory / f"decode_attention-{_library_key(cc, version, flags)}.so"
        if target.exists():
            return target
        # A flag set this compiler rejects is recorded, so later processes skip it (the key changes with the
        # compiler, its version and the source). Not the plain last set: its failure is the environment's (a
        # full disk, a killed compiler), worth trying again.
        failed = target.with_suffix(".failed") if flags != FLAG_SETS[-1] else None
        if failed is not None and failed.exists():
            errors.append(f"{' '.join(flags)}: {failed.read_text(errors='replace').strip()} (recorded in {failed}; "
                          "delete it to try again)")
            continue
        directory.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=".building-", suffix=".so", dir=directory)
        os.close(fd)
        try:
            result = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", partial, str(SOURCE), "-lm"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                os.replace(partial, target)
                return target
            message = result.stderr.strip()[-300:]
            errors.append(f"{' '.join(flags)}: {message}")
            if failed is not None:
                failed.write_text(message + "\n")
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    logger.warning("decode attention: %s could not build %s, using SDPA:\n%s", cc, SOURCE.name, "\n".join(errors))
    return None


class DecodeAttentionKernel:
    """The loaded kernel: `kernel(q, k, v, key_valid)` for q (batch, kv_heads, group, head_dim)."""

    def __init__(self, library: Path):
        self.library = library
        self._function = getattr(ctypes.CDLL(str(library)), SYMBOL)
        self._function.restype = ctypes.c_int
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._function.argtypes = [pointer] * 5 + [size] * 5 + [pointer, pointer, size, ctypes.c_int]

    @classmethod
    def load(cls, directory: Path | None = None) -> DecodeAttentionKernel | None:
        """The kernel, compiled if needed; None where it cannot be built or loaded (SDPA stays in use)."""
        try:
            library = build_library(directory)
            return None if library is None else cls(library)
        except (OSError, subprocess.SubprocessError, AttributeError) as error:
            logger.warning("decode attention: the native kernel is unavailable (%s), using SDPA", error)
            return None

    @staticmethod
    def handles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether attention of q (batch, heads, 1, head_dim) over k, v (batch, kv_heads, keys, head_dim) fits the
        kernel: one query position, fp32 on the CPU, K/V rows contiguous, no autograd."""
        head_dim, kv_heads = q.shape[-1], k.shape[1]
        group = q.shape[1] // kv_heads
        return (q.shape[2] == 1 and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
                and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM and q.shape[1] == group * kv_heads
                and 1 <= group <= MAX_GROUP and group * head_dim <= MAX_GROUP_WIDTH and k.stride(-1) == 1
                and v.stride(-1) == 1 and k.shape == v.shape and k.shape[2] >= 1 and not torch.is_grad_enabled())

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """q: (batch, kv_heads, group, head_dim), the query heads of each K/V head as rows; k, v: (batch,
        kv_heads, keys, head_dim); key_valid: (batch, keys) bool, False = masked, or None. Returns q's shape."""
        batch, kv_heads, group, head_dim = q.shape
        q = q.contiguous()
        out = torch.empty_like(q)
        valid_pointer, valid_stride = None, 0
        if key_valid is not None:
            if key_valid.stride(-1) != 1:
                key_valid = key_valid.contiguous()
            valid_pointer, valid_stride = key_valid.data_ptr(), key_valid.stride(0)
        k_strides = (ctypes.c_int64 * 3)(*k.stride()[:3])
        v_strides = (ctypes.c_int64 * 3)(*v.stride()[:3])
        status = self._function(q.data_ptr(), k.data_ptr(), v.data_ptr(), valid_pointer, out.data_ptr(),
                                batch, kv_heads, group, head_dim, k.shape[2], k_strides, v_strides,
                                valid_stride, torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"decode attention kernel failed (status {status}) on q {tuple(q.shape)}, "
                               f"k {tuple(k.shape)}")
        return out


class NativeDecodeAttention(Attention):
    """Attention whose one-token calls go through the native kernel (built only by the decode view)."""

    decode_kernel: DecodeAttentionKernel

    def attend(self, q: torch.Tensor, kv: KV, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        k, v = kv
        if not self.decode_kernel.handles(q, k, v) or not kernel_takes_mask(attn_mask, q, k):
            return super().attend(q, kv, attn_mask)
        batch, heads, _, head_dim = q.shape
        key_valid = None if attn_mask is None else attn_mask[:, 0, 0, :].expand(batch, k.shape[2])
        grouped = q.reshape(batch, k.shape[1], heads // k.shape[1], head_dim)
        out = self.decode_kernel(grouped, k, v, key_valid)
        return self.o_proj(out.view(batch, 1, heads * head_dim))


def kernel_takes_mask(attn_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> bool:
    """True for no mask or a one-token key mask (batch or 1, 1, 1, keys) of booleans, the decode step's."""
    return attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.dim() == 4
                                 and attn_mask.shape[1:] == (1, 1, k.shape[2])
                                 and attn_mask.shape[0] in (1, q.shape[0]))
