"""``torch.randn`` of a CPU generator, bit for bit, in numpy (no torch).

The official DAC script draws its initial latents with ``torch.randn(..., generator=torch.Generator(device)
.manual_seed(seed))``. A torch-free bundle has to draw the very same numbers, so that a bundle and the PyTorch
path sample the same edit for a seed; this is ATen's CPU algorithm written out:

- the generator is ATen's mt19937, seeded like MT's ``init_genrand`` with the seed's low 32 bits;
- a float uniform is the low 24 bits of one 32-bit draw times 2⁻²⁴;
- a float tensor of 16 or more contiguous elements is first filled with uniforms, then Box–Muller turns each
  block of 16 into normals (u₁ from the block's first 8, u₂ from its last 8); when the size is not a multiple of 16,
  16 fresh uniforms are drawn and the last 16 elements are recomputed from them;
- fewer than 16 elements are drawn one by one in double precision, the pair's second normal kept for the next.

Box–Muller's log, sin and cos depend on the CPU kernel ATen dispatches to, decided once at start-up: on an x86
CPU with AVX2 (AVX-512 included: ATen registers no AVX-512 normal kernel and falls back to its AVX2 one) they are
avx_mathfun's Cephes polynomials in float32 with the FMAs GCC contracted them into, transcribed below; with the
``default`` kernel (``ATEN_CPU_CAPABILITY=default``, x86 without AVX2, ARM) they are the C library's ``logf`` and
``sincosf``, called through ctypes so that they round exactly as torch's calls do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import numpy as np

STATE_SIZE = 624
BLOCK = 16
AVX2 = "avx2"
SCALAR = "scalar"
CAPABILITY_VARIABLE = "ATEN_CPU_CAPABILITY"

F = np.float32


def aten_cpu_kernel(environ: Mapping[str, str] | None = None, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Which Box–Muller ATen runs here, ``avx2`` or ``scalar``: its CPU capability, forced by ``ATEN_CPU_CAPABILITY``
    or detected (AVX2 and FMA; where no flags can be read, any x86-64 CPU of the last decade has them)."""
    requested = (os.environ if environ is None else environ).get(CAPABILITY_VARIABLE)
    if requested == "default":
        return SCALAR
    if requested in ("avx2", "avx512"):
        return AVX2
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return AVX2 if platform.machine().lower() in ("x86_64", "amd64") else SCALAR
    flags = set(next((line for line in lines if line.startswith("flags")), "").split())
    return AVX2 if {"avx2", "fma"} <= flags else SCALAR


class TorchCpuGenerator:
    """``torch.Generator("cpu").manual_seed(seed)``: :meth:`randn` draws what ``torch.randn`` draws from it."""

    def __init__(self, seed: int, kernel: str | None = None) -> None:
        key = np.empty(STATE_SIZE, dtype=np.uint32)
        value = seed & 0xFFFFFFFF
        for index in range(STATE_SIZE):
            key[index] = value
            value = (1812433253 * (value ^ (value >> 30)) + index + 1) & 0xFFFFFFFF
        self._engine = np.random.MT19937()
        self._engine.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": STATE_SIZE}}
        self._kernel = kernel or aten_cpu_kernel()
        self._cached_normal: float | None = None

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """Float32 standard normals of ``shape``, as ``torch.randn(shape, generator=this)``."""
        size = math.prod(shape)
        if size < BLOCK:
            return np.array([self._double_normal() for _ in range(size)], dtype=np.float32).reshape(shape)
        data = self._uniforms(size)
        whole = size - size % BLOCK
        data[:whole] = self._box_muller(data[:whole].reshape(-1, BLOCK)).reshape(-1)
        if size % BLOCK:
            data[-BLOCK:] = self._box_muller(self._uniforms(BLOCK).reshape(1, BLOCK)).reshape(-1)
        return data.reshape(shape)

    def _uniforms(self, count: int) -> np.ndarray:
        bits = self._engine.random_raw(count).astype(np.uint32) & np.uint32(0xFFFFFF)
        return (bits.astype(np.float64) * 2.0**-24).astype(np.float32)

    def _box_muller(self, blocks: np.ndarray) -> np.ndarray:
        u1, u2 = F(1) - blocks[:, :8], blocks[:, 8:]
        if self._kernel == AVX2:
            radius = np.sqrt(F(-2) * cephes_log(u1))
            sin, cos = cephes_sincos(F(2 * math.pi) * u2)
        else:
            radius = np.sqrt(F(-2) * libm_logf(u1))
            sin, cos = libm_sincosf((2 * math.pi * u2.astype(np.float64)).astype(np.float32))  # θ rounded from double
        # both kernels end with fma(n, std 1, mean 0), which also turns −0 into +0
        return np.concatenate([radius * cos + F(0), radius * sin + F(0)], axis=1)

    def _double_normal(self) -> float:
        if self._cached_normal is not None:
            normal, self._cached_normal = self._cached_normal, None
            return normal
        u1, u2 = self._double_uniform(), self._double_uniform()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta) + 0.0  # ATen's n·std + mean, std 1 and mean 0
        return radius * math.cos(theta) + 0.0

    def _double_uniform(self) -> float:
        high, low = (int(word) for word in self._engine.random_raw(2))
        return (((high << 32) | low) & ((1 << 53) - 1)) * 2.0**-53


@cache
def _libm() -> ctypes.CDLL:
    library = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    library.logf.argtypes, library.logf.restype = [ctypes.c_float], ctypes.c_float
    library.sincosf.argtypes = [ctypes.c_float, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float)]
    library.sincosf.restype = None
    return library


def libm_logf(values: np.ndarray) -> np.ndarray:
    """The C library's float32 ``logf`` of each value (ATen's scalar kernel calls it)."""
    logf = _libm().logf
    return np.array([logf(value) for value in values.ravel().tolist()], dtype=np.float32).reshape(values.shape)


def libm_sincosf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The C library's float32 ``sincosf`` of each value: (sin, cos), as GCC merged ATen's ``std::sin``/``std::cos``."""
    sincosf = _libm().sincosf
    sin, cos = ctypes.c_float(), ctypes.c_float()
    sines, cosines = [], []
    for value in values.ravel().tolist():
        sincosf(value, ctypes.byref(sin), ctypes.byref(cos))
        sines.append(sin.value)
        cosines.append(cos.value)
    return (
        np.array(sines, dtype=np.float32).reshape(values.shape),
        np.array(cosines, dtype=np.float32).reshape(values.shape),
    )


def _bits(values: np.ndarray) -> np.ndarray:
    return values.view(np.int32)


def _floats(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.int32).view(np.float32)


LOG_POLYNOMIAL = [
    F(c)
    for c in (
        7.0376836292e-2,
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    )
]
SQRT_HALF, LOG_Q1, LOG_Q2 = F(0.707106781186547524), F(-2.12194440e-4), F(0.693359375)
FOUR_OVER_PI = F(1.27323954473516)
MINUS_DP = (F(-0.78515625), F(-2.4187564849853515625e-4), F(-3.77489497744594108e-8))
SIN_POLYNOMIAL = (F(-1.9515295891e-4), F(8.3321608736e-3), F(-1.6666654611e-1))
COS_POLYNOMIAL = (F(2.443315711809948e-005), F(-1.388731625493765e-003), F(4.166664568298827e-002))


def fma(a: np.ndarray | np.float32, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """Float32 a·b + c rounded once, as the FMA instruction does (results in float32's normal range): the product is
    exact in double and so is the sum, unless it rounded onto a float32 midpoint, where its rounding error decides."""
    product = np.float64(a) * np.asarray(b, dtype=np.float64)
    addend = np.asarray(c, dtype=np.float64)
    total = product + addend
    virtual = total - product
    error = (product - (total - virtual)) + (addend - virtual)
    midpoint = (total.view(np.uint64) & np.uint64((1 << 29) - 1)) == np.uint64(1 << 28)
    nudged = np.where(midpoint & (error != 0), np.nextafter(total, np.copysign(np.inf, error)), total)
    return nudged.astype(np.float32)


def cephes_log(x: np.ndarray) -> np.ndarray:
    """avx_mathfun's ``log256_ps`` in float32 (for x in (0, 1], all Box–Muller feeds it)."""
    x = np.maximum(x, np.finfo(np.float32).tiny)
    exponent = (_bits(x) >> 23) - 0x7F
    x = _floats((_bits(x) & ~0x7F800000) | 0x3F000000)  # the mantissa with 0.5's exponent: x in [0.5, 1)
    e = exponent.astype(np.float32) + F(1)
    below = x < SQRT_HALF
    e = e - np.where(below, F(1), F(0))
    x = (x - F(1)) + np.where(below, x, F(0))
    z = x * x
    y = fma(LOG_POLYNOMIAL[0], x, LOG_POLYNOMIAL[1])
    for coefficient in LOG_POLYNOMIAL[2:]:
        y = fma(y, x, coefficient)
    y = fma(y * x, z, e * LOG_Q1)
    y = fma(-z, F(0.5), y)
    return fma(e, LOG_Q2, x + y)


def cephes_sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun's ``sincos256_ps`` in float32: (sin x, cos x)."""
    sign_sin = _bits(x) & np.int32(-0x80000000)
    x = np.abs(x)
    octant = ((x * FOUR_OVER_PI).astype(np.int32) + 1) & ~1
    y = octant.astype(np.float32)
    sign_sin = sign_sin ^ ((octant & 4) << 29)
    sine_series_for_sin = (octant & 2) == 0  # else sin takes the cosine series and cos the sine series
    x = fma(y, MINUS_DP[2], fma(y, MINUS_DP[1], fma(y, MINUS_DP[0], x)))
    sign_cos = (~(octant - 2) & 4) << 29
    z = x * x
    cos_part = fma(fma(COS_POLYNOMIAL[0], z, COS_POLYNOMIAL[1]), z, COS_POLYNOMIAL[2]) * z
    cos_part = fma(cos_part, z, -(z * F(0.5))) + F(1)
    sin_part = fma(fma(fma(SIN_POLYNOMIAL[0], z, SIN_POLYNOMIAL[1]), z, SIN_POLYNOMIAL[2]) * z, x, x)
    zero = F(0)
    sin = np.where(sine_series_for_sin, zero, cos_part) + np.where(sine_series_for_sin, sin_part, zero)
    cos = np.where(sine_series_for_sin, cos_part, zero) + np.where(sine_series_for_sin, zero, sin_part)
    return _floats(_bits(sin) ^ sign_sin), _floats(_bits(cos) ^ sign_cos)
