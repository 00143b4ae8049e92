#!/usr/bin/env python3
"""Our fused CUDA compression kernels against the same math in PyTorch.

One run on one GPU, interleaved: a device-to-device copy (the bandwidth
yardstick) and, for each compressor with error feedback (1-bit sign, int8
block-wise stochastic, top-k, fp16; bf16 on request) and each decode-add, our
kernel called through ctypes (libringflow_gpu_bench.so), the PyTorch eager
function and its torch.compile'd version, on the same tensors and stream.
Prints a compact table last; --json writes everything.

  python3 bench/gpu/compare_torch.py --lib build/lib/libringflow_gpu_bench.so \\
      [--elements 64Mi] [--reps 50] [--json out.json]
  python3 bench/gpu/compare_torch.py --device cpu --elements 1M --no-ours --no-compile
      (a dry run of the PyTorch functions and the harness on the CPU)

Bytes counted are the fewest the math needs, every input read once and every
output written once (n elements, B = block, k = elements top-k keeps):
  copy          4n read + 4n written                              8n
  sign+EF       g 4n + r 4n read, r 4n written, bits n/8, scales 4n/B
  int8+EF       g 4n + r 4n read, r 4n written, q n, scales 4n/B
  topk+EF       g 4n + r 4n read, r 4n written, 8k (uint32 index + fp32 value)
  fp16/bf16+EF  g 4n + r 4n read, r 4n written, 2n
  X-decode      the payload read, the fp32 accumulator read and written (8n)
Timing: CUDA events around each call on the current stream, after restoring
the residual and the accumulator and flushing the L2 cache (all untimed), so
every competitor starts from the same state with a cold cache; the input sets
and the order of the competitors rotate every repetition; medians reported.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback

try:
    import torch
except ImportError as exc:  # the check script shows this line and moves on
    print(f"compare_torch: PyTorch is not importable ({exc}); nothing to compare",
          file=sys.stderr)
    sys.exit(3)

T0 = time.monotonic()
LEVELS = 127  # int8 with local block scales (one rank): q in [-127, 127]
ENCODERS = ("sign", "int8", "topk", "fp16", "bf16")
DECODABLE = ("sign", "int8", "topk", "fp16", "bf16")


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def parse_count(text: str) -> int:
    """'67108864', '64Mi', '64M', '1Ki', '2G': K/M/G are binary (x1024)."""
    t = text.strip()
    mult = 1
    for suffix, m in (("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30),
                      ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive count: {text}")
    return value


def human_count(n: int) -> str:
    for unit, m in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return str(n)


# ---------------------------------------------------------------------------
# The PyTorch versions: the math of include/ringflow/compress/kernels.hpp and
# the CPU compressors (docs/compression.md), written as a PyTorch user would.
# An encoder takes the gradient g and the residual r, sets r = c - t in place
# (c = g + r, t what the payload decodes to) and returns the payload.

def torch_sign_ef(g, r, block: int):
    c = (g + r).view(-1, block)
    scale = c.abs().mean(dim=1)                      # mean |c| of each block
    neg = torch.signbit(c)                           # -0.0 counts as negative, as sign_bit()
    t = torch.where(neg, -scale[:, None], scale[:, None])
    r.copy_((c - t).view(-1))
    # Bit i of byte b is element 8b + i: the bytes of our little-endian uint32
    # words (bit i of word w is element 32w + i).
    # (arange, not torch.tensor([1, 2, 4, ...]): a tensor from a Python list is a
    # host-to-device copy that synchronizes the stream on every call.)
    shifts = torch.arange(8, dtype=torch.uint8, device=g.device)
    packed = (neg.view(-1, 8).to(torch.uint8) << shifts).sum(dim=1, dtype=torch.uint8)
    return packed, scale


def torch_int8_ef(g, r, block: int, levels: int):
    c = (g + r).view(-1, block)
    scale = c.abs().amax(dim=1, keepdim=True)        # max |c| of each block
    inv_step = torch.where(scale > 0, levels / scale, torch.zeros_like(scale))
    v = c * inv_step
    f = torch.floor(v)
    # Stochastic rounding: up with probability frac(v), so E[q * step] = c.
    # torch.rand stands in for our counter-based generator (same distribution).
    q = (f + (torch.rand_like(v) < (v - f)).to(v.dtype)).clamp(-levels, levels)
    t = q * (scale / levels)
    r.copy_((c - t).view(-1))
    return q.to(torch.int8), scale.view(-1)


def torch_topk_ef(g, r, k: int):
    c = g + r
    _, idx = torch.topk(c.abs(), k, sorted=False)
    values = c[idx]
    r.copy_(c)
    r.index_fill_(0, idx, 0.0)                       # what is sent leaves the residual
    return idx.to(torch.int32), values


def torch_fp16_ef(g, r):
    c = g + r
    h = c.to(torch.float16)                          # round to nearest even, as encode_half
    r.copy_(c - h.float())
    return h


def torch_bf16_ef(g, r):
    c = g + r
    h = c.to(torch.bfloat16)                         # round to nearest even, as encode_bf16
    r.copy_(c - h.float())
    return h


def torch_sign_decode_add(packed, scale, out, block: int):
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    neg = ((packed[:, None] >> shifts) & 1).view(-1, block).bool()
    t = torch.where(neg, -scale[:, None], scale[:, None])
    out.add_(t.view(-1))


def torch_int8_decode_add(q, scale, out, block: int, levels: int):
    step = (scale / levels)[:, None]
    out.add_((q.view(-1, block).float() * step).view(-1))


def torch_topk_decode_add(idx, values, out):
    out.index_add_(0, idx.long(), values)


def torch_half_decode_add(h, out):
    out.add_(h.float())


# ---------------------------------------------------------------------------
# Ours, through ctypes (bench/gpu/gpu_bench_api.h).

# Where a CUDA toolkit keeps its libraries, for a dependency of our library that
# the loader does not find (the library was linked on another machine).
TOOLKIT_LIB_DIRS = ("/usr/local/cuda/lib64", "/usr/local/cuda/lib",
                    "/usr/local/cuda/targets/x86_64-linux/lib")


def load_library(path: str):
    missing = set()
    while True:
        try:
            return ctypes.CDLL(path)
        except OSError as exc:
            # "libcudart.so.13: cannot open shared object file: ..."
            name = str(exc).split(":")[0].strip()
            found = [os.path.join(d, name) for d in TOOLKIT_LIB_DIRS
                     if os.path.isfile(os.path.join(d, name))]
            if name in missing or not name.startswith("lib") or not found:
                raise
            missing.add(name)
            log(f"ours: loading {found[0]} first (not on the loader's path)")
            ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)


class Ours:
    def __init__(self, path: str):
        self.lib = load_library(path)
        L = self.lib
        vp, sz, i32, u64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint64
        L.rf_last_error.restype = ctypes.c_char_p
        L.rf_last_error.argtypes = []
        L.rf_topk_workspace_bytes.restype = sz
        L.rf_topk_workspace_bytes.argtypes = [sz, sz]
        sigs = {
            "rf_stream_synchronize": [vp],
            "rf_sign_ef_encode": [vp, vp, sz, sz, vp, vp, vp],
            "rf_sign_decode_add": [vp, vp, sz, sz, vp, vp],
            "rf_int8_ef_encode": [vp, vp, sz, sz, u64, u64, vp, vp, vp],
            "rf_int8_decode_add": [vp, vp, sz, sz, i32, vp, vp],
            "rf_topk_ef_encode": [vp, vp, sz, sz, u64, u64, vp, vp, vp, sz, vp],
            "rf_topk_decode_add": [vp, vp, sz, sz, vp, vp],
            "rf_half_ef_encode": [i32, vp, vp, sz, vp, vp],
            "rf_half_decode_add": [i32, vp, sz, vp, vp],
        }
        for name, args in sigs.items():
            fn = getattr(L, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int

    def call(self, name: str, *args) -> None:
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            raise RuntimeError(f"{name} returned {rc}: {self.lib.rf_last_error().decode()}")


def stream_handle():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


# ---------------------------------------------------------------------------
# Timing.

class Timer:
    """CUDA events on the current stream (GPU time only); perf_counter on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.pending = []  # (key, start, stop)
        self.samples: dict[str, list[float]] = {}

    def time(self, key: str, fn, arg) -> None:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            stop.record()
            self.pending.append((key, start, stop))
        else:
            t = time.perf_counter()
            fn(arg)
            self.samples.setdefault(key, []).append((time.perf_counter() - t) * 1e3)

    def collect(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            for key, start, stop in self.pending:
                self.samples.setdefault(key, []).append(start.elapsed_time(stop))
            self.pending.clear()

    def median(self, key: str):
        s = self.samples.get(key)
        return statistics.median(s) if s else None


class CompileTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CompileTimeout()


# ---------------------------------------------------------------------------
# The bench: inputs, the three implementations of every row, checks, timing.

class Bench:
    def __init__(self, a, n: int, dev):
        self.a, self.n, self.dev = a, n, dev
        self.block = a.block
        self.nblocks = n // a.block
        self.k = max(1, math.ceil(a.topk_ratio * n))
        self.cuda = dev.type == "cuda"
        # Several input sets, never zeros; the residual of steady-state size.
        self.sets = []
        for _ in range(a.sets):
            g = torch.randn(n, device=dev)
            r0 = 0.1 * torch.randn(n, device=dev)
            self.sets.append({"g": g, "r0": r0, "r": r0.clone()})
        self.copy_dst = torch.empty(n, device=dev)
        self.acc0 = torch.randn(n, device=dev)     # decode-add accumulator, restored each call
        self.acc = self.acc0.clone()
        self.flush = None
        if self.cuda:
            l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 50 << 20
            self.flush = torch.empty(max(2 * l2, 64 << 20) // 4, device=dev)
        self.tp = {}           # PyTorch payloads by encoder, for the PyTorch decode rows
        self.ours = None
        self.o = {}
        self.step = 0          # our random streams' call counter (one per encode)

    # -- the untimed preparation before every call
    def restore(self, s) -> None:
        s["r"].copy_(s["r0"])
        self.acc.copy_(self.acc0)
        if self.flush is not None:
            self.flush.zero_()

    def attach_ours(self, ours: Ours, encoders) -> None:
        n, k, dev = self.n, self.k, self.dev
        self.ours = ours
        self.o = {
            "scales": torch.empty(self.nblocks, dtype=torch.float32, device=dev),
            "words": torch.empty((n + 31) // 32, dtype=torch.int32, device=dev),
            "qscales": torch.empty(self.nblocks, dtype=torch.float32, device=dev),
            "q": torch.empty(n, dtype=torch.int8, device=dev),
            "idx": torch.empty(k, dtype=torch.int32, device=dev),
            "vals": torch.empty(k, dtype=torch.float32, device=dev),
            "fp16": torch.empty(n, dtype=torch.float16, device=dev),
            "bf16": torch.empty(n, dtype=torch.bfloat16, device=dev),
        }
        ws = int(ours.lib.rf_topk_workspace_bytes(n, k)) if "topk" in encoders else 0
        self.o["ws"] = torch.empty(max(ws, 1), dtype=torch.uint8, device=dev)
        self.o["ws_bytes"] = ws

    # -- bytes the math needs, and their formula
    def bytes_of(self, row: str):
        n, k, nb = self.n, self.k, self.nblocks
        return {
            "sign": (12 * n + n // 8 + 4 * nb, "12n + n/8 + 4n/B"),
            "int8": (13 * n + 4 * nb, "13n + 4n/B"),
            "topk": (12 * n + 8 * k, "12n + 8k"),
            "fp16": (14 * n, "14n"),
            "bf16": (14 * n, "14n"),
            "sign-decode": (8 * n + n // 8 + 4 * nb, "8n + n/8 + 4n/B"),
            "int8-decode": (9 * n + 4 * nb, "9n + 4n/B"),
            "topk-decode": (16 * k, "16k"),
            "fp16-decode": (10 * n, "10n"),
            "bf16-decode": (10 * n, "10n"),
        }[row]

    # -- PyTorch: the function of a row, and how to call it on an input set
    @staticmethod
    def eager_fn(row: str):
        return {
            "sign": torch_sign_ef, "int8": torch_int8_ef, "topk": torch_topk_ef,
            "fp16": torch_fp16_ef, "bf16": torch_bf16_ef,
            "sign-decode": torch_sign_decode_add, "int8-decode": torch_int8_decode_add,
            "topk-decode": torch_topk_decode_add, "fp16-decode": torch_half_decode_add,
            "bf16-decode": torch_half_decode_add,
        }[row]

    def torch_call(self, row: str, fn):
        B, k, tp, acc = self.block, self.k, self.tp, self.acc
        if row == "sign":
            return lambda s: fn(s["g"], s["r"], B)
        if row == "int8":
            return lambda s: fn(s["g"], s["r"], B, LEVELS)
        if row == "topk":
            return lambda s: fn(s["g"], s["r"], k)
        if row in ("fp16", "bf16"):
            return lambda s: fn(s["g"], s["r"])
        if row == "sign-decode":
            return lambda s: fn(tp["sign"][0], tp["sign"][1], acc, B)
        if row == "int8-decode":
            return lambda s: fn(tp["int8"][0], tp["int8"][1], acc, B, LEVELS)
        if row == "topk-decode":
            return lambda s: fn(tp["topk"][0], tp["topk"][1], acc)
        if row in ("fp16-decode", "bf16-decode"):
            base = row.split("-")[0]
            return lambda s: fn(tp[base], acc)
        raise KeyError(row)

    # -- ours: how to call a row on an input set
    def ours_call(self, row: str):
        L, o, n, k, B, a = self.ours, self.o, self.n, self.k, self.block, self.a
        acc = self.acc
        S = stream_handle
        if row == "sign":
            return lambda s: L.call("rf_sign_ef_encode", s["g"].data_ptr(), s["r"].data_ptr(), n,
                                    B, o["scales"].data_ptr(), o["words"].data_ptr(), S())
        if row == "int8":
            def int8(s):
                self.step += 1
                L.call("rf_int8_ef_encode", s["g"].data_ptr(), s["r"].data_ptr(), n, B, a.seed,
                       self.step, o["qscales"].data_ptr(), o["q"].data_ptr(), S())
            return int8
        if row == "topk":
            def topk(s):
                self.step += 1
                L.call("rf_topk_ef_encode", s["g"].data_ptr(), s["r"].data_ptr(), n, k, a.seed,
                       self.step, o["idx"].data_ptr(), o["vals"].data_ptr(), o["ws"].data_ptr(),
                       o["ws_bytes"], S())
            return topk
        if row in ("fp16", "bf16"):
            bf = int(row == "bf16")
            return lambda s: L.call("rf_half_ef_encode", bf, s["g"].data_ptr(), s["r"].data_ptr(),
                                    n, o[row].data_ptr(), S())
        if row == "sign-decode":
            return lambda s: L.call("rf_sign_decode_add", o["scales"].data_ptr(),
                                    o["words"].data_ptr(), n, B, acc.data_ptr(), S())
        if row == "int8-decode":
            return lambda s: L.call("rf_int8_decode_add", o["q"].data_ptr(),
                                    o["qscales"].data_ptr(), n, B, LEVELS, acc.data_ptr(), S())
        if row == "topk-decode":
            return lambda s: L.call("rf_topk_decode_add", o["idx"].data_ptr(),
                                    o["vals"].data_ptr(), k, n, acc.data_ptr(), S())
        if row in ("fp16-decode", "bf16-decode"):
            base = row.split("-")[0]
            bf = int(base == "bf16")
            return lambda s: L.call("rf_half_decode_add", bf, o[base].data_ptr(), n,
                                    acc.data_ptr(), S())
        raise KeyError(row)

    # -- sanity checks of ours against the PyTorch reference (input set 0)
    def check_encoder(self, row: str) -> str:
        s = self.sets[0]
        c = s["g"] + s["r0"]
        self.restore(s)
        self.tp[row] = self.torch_call(row, self.eager_fn(row))(s)
        r_torch = s["r"].clone()
        if self.ours is None:
            return "-"
        self.restore(s)
        self.ours_call(row)(s)
        self.ours.call("rf_stream_synchronize", stream_handle())
        return check_encoded(row, c, s["r"], r_torch, self.tp[row], self.o, self.block, self.n,
                             self.k)

    def check_decoder(self, row: str) -> str:
        """Our decode-add of our payload against the PyTorch decode-add of it."""
        base, o, acc, B = row.split("-")[0], self.o, self.acc, self.block
        acc.copy_(self.acc0)
        self.ours_call(row)(self.sets[0])
        got = acc.clone()
        want = self.acc0.clone()
        if base == "sign":
            torch_sign_decode_add(o["words"].view(torch.uint8), o["scales"], want, B)
        elif base == "int8":
            # step = scale / L as an IEEE division, as ours: PyTorch's tensor /
            # Python scalar multiplies by the reciprocal (an ulp off at times).
            # The first H200 run, with that, differed in 2.7% of the elements,
            # about 7150 blocks' worth: what a per-block step difference gives.
            step = (o["qscales"] / torch.full_like(o["qscales"], float(LEVELS)))[:, None]
            want.add_((o["q"].view(-1, B).float() * step).view(-1))
        elif base == "topk":
            torch_topk_decode_add(o["idx"], o["vals"], want)
        else:
            torch_half_decode_add(o[base], want)
        acc.copy_(self.acc0)
        bad = int((got != want).sum())
        if bad == 0:
            return "ok (bit-exact)"
        worst = float((got - want).abs().max())
        ok = worst <= 1e-6 * float(want.abs().max())
        return f"{'ok' if ok else 'MISMATCH'}: {bad} differ, max abs diff {worst:.1e}"


def check_encoded(row, c, r_ours, r_torch, torch_out, o, block, n, k) -> str:
    """Exact where our math and PyTorch's are the same operations; bounds where not."""
    if row in ("fp16", "bf16"):
        bad = int((o[row].view(torch.int16) != torch_out.view(torch.int16)).sum())
        bad_r = int((r_ours != r_torch).sum())
        return "ok (bit-exact)" if bad == bad_r == 0 else \
            f"MISMATCH: {bad} {row} values, {bad_r} residuals differ"
    if row == "sign":
        packed_t, scale_t = torch_out
        bad_bits = int((o["words"].view(torch.uint8) != packed_t).sum())
        rel = float(((o["scales"] - scale_t).abs() / scale_t.abs().clamp_min(1e-30)).max())
        # r = c -+ scale: equal to the reference up to the scale's summation order.
        err = float(((r_ours - r_torch).view(-1, block).abs()
                     / scale_t[:, None].clamp_min(1e-30)).max())
        ok = bad_bits == 0 and rel < 1e-5 and err < 1e-5
        return (f"{'ok' if ok else 'MISMATCH'}: {bad_bits} bytes of bits differ, "
                f"scale rel err {rel:.1e}, residual err {err:.1e} of scale")
    if row == "int8":
        _, scale_t = torch_out
        rel = float(((o["qscales"] - scale_t).abs() / scale_t.abs().clamp_min(1e-30)).max())
        q = o["q"].view(-1, block).float()
        out_of_range = int((q.abs() > LEVELS).sum())
        step = (o["qscales"] / LEVELS)[:, None]
        # |c - q step| < step per element (rounding goes to a neighbour)...
        e = r_ours.view(-1, block) / step.clamp_min(1e-30)
        worst = float(e.abs().max())
        # ...and unbiased: e has mean 0 and a std of at most 1/2 per element.
        mean = float(e.mean())
        limit = 5.0 / (2.0 * math.sqrt(n))
        ok = rel == 0.0 and out_of_range == 0 and worst <= 1.0 + 1e-5 and abs(mean) < limit
        return (f"{'ok' if ok else 'MISMATCH'}: scale rel err {rel:.1e}, |c-t|/step max "
                f"{worst:.4f}, mean {mean:+.1e} (|.|<{limit:.0e}), {out_of_range} q out of range")
    if row == "topk":
        idx_t, _ = torch_out
        idx_o = o["idx"].long()
        mine = torch.zeros(n, dtype=torch.bool, device=c.device)
        mine[idx_o] = True
        theirs = torch.zeros(n, dtype=torch.bool, device=c.device)
        theirs[idx_t.long()] = True
        common = int((mine & theirs).sum())
        distinct = int(mine.sum())
        # Exact selection: every kept |c| >= every dropped |c|. Equal magnitudes
        # at the threshold are common at 64 Mi elements; we keep the lower
        # index, torch.topk either, so the sets may differ by such ties.
        mag = c.abs()
        kept_min = float(mag[idx_o].min())
        dropped_max = float(mag.masked_fill(mine, -1.0).max()) if distinct < n else -1.0
        sorted_ok = bool((idx_o[1:] > idx_o[:-1]).all()) if k > 1 else True
        vals_ok = bool(torch.equal(o["vals"], c[idx_o]))
        expect_r = c.clone()
        expect_r[idx_o] = 0.0
        r_bad = int((r_ours != expect_r).sum())
        ok = distinct == k and kept_min >= dropped_max and vals_ok and r_bad == 0 and sorted_ok
        return (f"{'ok' if ok else 'MISMATCH'}: {distinct}/{k} distinct"
                f"{'' if sorted_ok else ' (not increasing)'}, min kept |c| {kept_min:.6g} "
                f"{'>=' if kept_min >= dropped_max else '<'} max dropped {dropped_max:.6g}, "
                f"{common} as torch.topk, values {'=' if vals_ok else '!='} c[idx], "
                f"{r_bad} residuals wrong")
    raise KeyError(row)


# ---------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elements", type=parse_count, default=64 << 20,
                   help="fp32 elements per tensor (64Mi; K/M/G suffixes are binary)")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions (50)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (3)")
    p.add_argument("--sets", type=int, default=3, help="input sets rotated over reps (3)")
    p.add_argument("--block", type=int, default=256, help="sign and int8 block (256)")
    p.add_argument("--topk-ratio", type=float, default=0.01, help="top-k ratio (0.01)")
    p.add_argument("--kernels", default="sign,int8,topk,fp16",
                   help="compressors, of sign,int8,topk,fp16,bf16 (sign,int8,topk,fp16)")
    p.add_argument("--no-decode", action="store_true", help="leave out the decode-add rows")
    p.add_argument("--lib", default=None,
                   help="libringflow_gpu_bench.so (default: $RINGFLOW_GPU_BENCH_LIB, else "
                        "build/lib/ of this repository)")
    p.add_argument("--no-ours", action="store_true", help="PyTorch only, no library")
    p.add_argument("--no-compile", action="store_true", help="eager PyTorch only")
    p.add_argument("--compile-timeout", type=int, default=60,
                   help="seconds one torch.compile may take before it counts as failed (60)")
    p.add_argument("--budget", type=float, default=140.0,
                   help="seconds for the whole run: compiles are skipped past half of it, "
                        "repetitions stop at it (140)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None,
                   help="write the table of docs/gpu.md here (Markdown)")
    a = p.parse_args()

    encoders = [x.strip() for x in a.kernels.split(",") if x.strip()]
    unknown = sorted(set(encoders) - set(ENCODERS))
    if unknown:
        p.error(f"unknown kernel(s): {', '.join(unknown)}")
    if a.reps < 1 or a.sets < 1 or a.warmup < 0:
        p.error("--reps and --sets must be >= 1, --warmup >= 0")
    if a.block <= 0 or a.block % 32 != 0:
        p.error("--block must be a positive multiple of 32")
    if not 0.0 < a.topk_ratio <= 1.0:
        p.error("--topk-ratio must be in (0, 1]")
    # Whole blocks only, so that the PyTorch versions can view(-1, block).
    n = a.elements - a.elements % a.block
    if n == 0:
        p.error(f"--elements must be at least one block ({a.block})")
    if n != a.elements:
        log(f"elements rounded down to whole blocks: {a.elements} -> {n}")
    if a.device == "cuda" and not torch.cuda.is_available():
        print("compare_torch: no CUDA device visible to PyTorch", file=sys.stderr)
        return 77
    dev = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    torch.manual_seed(a.seed)
    device_name = torch.cuda.get_device_name(dev) if a.device == "cuda" else "cpu"

    rows = list(encoders)
    if not a.no_decode:
        rows += [f"{x}-decode" for x in encoders if x in DECODABLE]

    with torch.no_grad():
        bench = Bench(a, n, dev)
    log(f"{device_name}, torch {torch.__version__}, n = {human_count(n)} fp32 "
        f"({4 * n / 2**20:.0f} MiB per tensor), k = {bench.k}, block {a.block}, "
        f"reps {a.reps}, sets {a.sets}")

    ours_status = "not run (--no-ours)" if a.no_ours else "not run (cpu)"
    if not a.no_ours and a.device == "cuda":
        lib = a.lib or os.environ.get("RINGFLOW_GPU_BENCH_LIB") or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "lib",
            "libringflow_gpu_bench.so")
        try:
            bench.attach_ours(Ours(lib), encoders)
            ours_status = "ok"
            log(f"ours: {os.path.abspath(lib)}")
        except (OSError, AttributeError) as exc:
            ours_status = f"library not loaded: {exc}"
            log(f"ours: {ours_status}; timing PyTorch only")

    # -- checks: ours against PyTorch on input set 0, before any timing. An
    # encoder's check also leaves the PyTorch payload for its decode row and
    # our payload for ours.
    checks = {}
    with torch.no_grad():
        for row in rows:
            try:
                if row.endswith("-decode"):
                    checks[row] = bench.check_decoder(row) if bench.ours else "-"
                else:
                    checks[row] = bench.check_encoder(row)
            except Exception as exc:  # report and go on: the timing still says something
                # (a PyTorch payload that is missing now fails its decode row later)
                checks[row] = f"FAILED: {type(exc).__name__}: {str(exc).strip()[:200]}"
            if checks[row] != "-":
                log(f"check {row}: {checks[row]}")
        bench.restore(bench.sets[0])

    # -- torch.compile: every function compiled and run once on every input set
    # before any timing (same shapes: one compile each).
    compiled, compile_status, compile_s = {}, {}, {}
    for row in rows:
        if a.no_compile:
            compile_status[row] = "not run (--no-compile)"
            continue
        if time.monotonic() - T0 > a.budget / 2:
            compile_status[row] = f"compile skipped: past {a.budget / 2:.0f} s of the budget"
            log(f"{row}: {compile_status[row]}")
            continue
        t = time.monotonic()
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(a.compile_timeout)
        try:
            fn = torch.compile(bench.eager_fn(row))
            call = bench.torch_call(row, fn)
            with torch.no_grad():
                for s in bench.sets:
                    bench.restore(s)
                    call(s)
            if bench.cuda:
                torch.cuda.synchronize()
            compiled[row] = fn
            compile_status[row] = "ok"
        except CompileTimeout:
            compile_status[row] = f"compile failed: timeout after {a.compile_timeout} s"
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            compile_status[row] = f"compile failed: {type(exc).__name__}: {first}"
            if sum(v.startswith("compile failed") for v in compile_status.values()) == 1:
                traceback.print_exc(limit=4)  # the first failure's trace; the rest say the same
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        compile_s[row] = time.monotonic() - t
        log(f"torch.compile {row}: {compile_status[row]} ({compile_s[row]:.1f} s)")

    # -- the timed loop: every entry once per repetition, the order rotating.
    entries = [("copy", lambda s: bench.copy_dst.copy_(s["g"]))]
    for row in rows:
        if bench.ours is not None:
            entries.append((f"{row}/ours", bench.ours_call(row)))
        entries.append((f"{row}/eager", bench.torch_call(row, bench.eager_fn(row))))
        if row in compiled:
            entries.append((f"{row}/compiled", bench.torch_call(row, compiled[row])))
    failed = {}
    timer = Timer(bench.cuda)
    log(f"timing {len(entries)} entries x {a.reps} repetitions (+{a.warmup} warm-up)")
    done_reps = 0
    stopped = None
    try:
        with torch.no_grad():
            for rep in range(-a.warmup, a.reps):
                shift = rep % len(entries)
                order = entries[shift:] + entries[:shift]
                for j, (key, fn) in enumerate(order):
                    if key in failed:
                        continue
                    s = bench.sets[(rep + j) % len(bench.sets)]
                    bench.restore(s)
                    try:
                        if rep < 0:
                            fn(s)
                        else:
                            timer.time(key, fn, s)
                    except Exception as exc:
                        failed[key] = f"{type(exc).__name__}: {str(exc).strip()[:160]}"
                        log(f"{key} failed: {failed[key]}")
                timer.collect()
                if rep >= 0:
                    done_reps = rep + 1
                    if time.monotonic() - T0 > a.budget:
                        log(f"stopping after {done_reps} repetitions: past the budget")
                        break
    except Exception as exc:  # e.g. a sticky CUDA error: report what was measured
        stopped = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        log(f"timing stopped: {stopped}")
    for key in failed:
        timer.samples.pop(key, None)

    # -- report.
    copy_ms = timer.median("copy")
    copy_GBps = 8 * n / (copy_ms * 1e6) if copy_ms else None
    big = 4 * n >= 64 << 20

    def gbps(nbytes, ms):
        return nbytes / (ms * 1e6) if ms else None

    def pct(nbytes, ms):
        return 100.0 * gbps(nbytes, ms) / copy_GBps if ms and copy_GBps else None

    results = []
    for row in rows:
        nbytes, formula = bench.bytes_of(row)
        ours_ms = timer.median(f"{row}/ours")
        eager_ms = timer.median(f"{row}/eager")
        comp_ms = timer.median(f"{row}/compiled")
        speedup = comp_ms / ours_ms if ours_ms and comp_ms else None
        goal, met = "-", None
        if row in ("sign", "int8"):
            goal = ">=80% copy"
            if not big:
                met = "n/a <64MiB"
            elif pct(nbytes, ours_ms) is not None:
                met = "met" if pct(nbytes, ours_ms) >= 80.0 else "NOT met"
        elif row == "topk":
            goal = ">=4x compiled"
            if speedup is not None:
                met = "met" if speedup >= 4.0 else "NOT met"
        ours_note = failed.get(f"{row}/ours") or (None if bench.ours else ours_status)
        results.append({
            "kernel": row, "bytes": nbytes, "bytes_formula": formula,
            "bytes_per_element": nbytes / n,
            "ours_ms": ours_ms, "ours_GBps": gbps(nbytes, ours_ms),
            "ours_pct_copy": pct(nbytes, ours_ms), "ours_status": ours_note,
            "eager_ms": eager_ms, "eager_GBps": gbps(nbytes, eager_ms),
            "eager_pct_copy": pct(nbytes, eager_ms),
            "compiled_ms": comp_ms, "compiled_GBps": gbps(nbytes, comp_ms),
            "compiled_pct_copy": pct(nbytes, comp_ms),
            "compiled_status": failed.get(f"{row}/compiled") or compile_status.get(row, "-"),
            "compile_s": compile_s.get(row),
            "speedup_vs_compiled": speedup,
            "speedup_vs_eager": eager_ms / ours_ms if ours_ms and eager_ms else None,
            "goal": goal, "goal_met": met, "check": checks.get(row, "-"),
            "samples_ms": {w: timer.samples.get(f"{row}/{w}", [])
                           for w in ("ours", "eager", "compiled")},
        })
        if failed.get(f"{row}/eager"):
            results[-1]["eager_status"] = failed[f"{row}/eager"]

    report = {
        "device": device_name, "torch": torch.__version__, "elements": n, "k": bench.k,
        "block": a.block, "levels": LEVELS, "topk_ratio": a.topk_ratio,
        "reps": done_reps, "warmup": a.warmup, "sets": a.sets, "seed": a.seed,
        "ours": ours_status,
        "copy": {"ms": copy_ms, "GBps": copy_GBps, "bytes": 8 * n,
                 "samples_ms": timer.samples.get("copy", [])},
        "kernels": results, "timing_stopped": stopped, "wall_s": time.monotonic() - T0,
    }
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)
        log(f"wrote {a.json}")
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(markdown_table(report))
        log(f"wrote {a.markdown}")
    print_table(report)
    bad = [r["kernel"] for r in results if r["check"].startswith(("MISMATCH", "FAILED"))]
    return 1 if bad or failed or stopped else 0


def markdown_table(rep) -> str:
    """The results table of docs/gpu.md, filled in."""
    def num(v, f):
        return "-" if v is None else format(v, f)

    copy = rep["copy"]
    lines = [
        f"{rep['device']}, PyTorch {rep['torch']}, {human_count(rep['elements'])} fp32 "
        f"elements, k = {rep['k']}, median of {rep['reps']} repetitions"
        + (f"; copy {copy['ms']:.3f} ms = {copy['GBps']:.0f} GB/s" if copy["ms"] else ""),
        "",
        "| kernel | bytes/elt | ours ms | GB/s | % copy | eager ms | compiled ms | × compiled "
        "| goal | met | check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rep["kernels"]:
        compiled = num(r["compiled_ms"], ".3f")
        if r["compiled_ms"] is None and r["compiled_status"] not in ("ok", "-"):
            compiled = r["compiled_status"].split(":")[0]
        lines.append(
            f"| {r['kernel']} | {r['bytes_per_element']:.2f} | {num(r['ours_ms'], '.3f')} "
            f"| {num(r['ours_GBps'], '.0f')} | {num(r['ours_pct_copy'], '.0f')} "
            f"| {num(r['eager_ms'], '.3f')} | {compiled} "
            f"| {num(r['speedup_vs_compiled'], '.2f')} | {r['goal']} | {r['goal_met'] or '-'} "
            f"| {r['check'].split(':')[0].split(' (')[0]} |")
    return "\n".join(lines) + "\n"


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_table(rep) -> None:
    copy = rep["copy"]
    print()
    print(f"== compare_torch: {rep['device']}, torch {rep['torch']}, "
          f"{human_count(rep['elements'])} fp32, k={rep['k']}, median of {rep['reps']} reps")
    if copy["ms"]:
        print(f"copy (8n bytes): {copy['ms']:.3f} ms = {copy['GBps']:.0f} GB/s")
    head = (f"{'kernel':<12} {'B/elt':>6} {'ours ms':>8} {'GB/s':>6} {'%copy':>6} "
            f"{'eager ms':>9} {'comp ms':>8} {'x comp':>7} {'goal':>13} {'met':>10}  check")
    print(head)
    print("-" * len(head))
    notes = {}  # note -> kernels it applies to
    for r in rep["kernels"]:
        ours_gbps = "-" if r["ours_GBps"] is None else f"{r['ours_GBps']:.0f}"
        pct = "-" if r["ours_pct_copy"] is None else f"{r['ours_pct_copy']:.0f}%"
        sp = "-" if r["speedup_vs_compiled"] is None else f"{r['speedup_vs_compiled']:.2f}"
        check = r["check"].split(":")[0].split(" (")[0]
        print(f"{r['kernel']:<12} {r['bytes_per_element']:>6.2f} {fmt_ms(r['ours_ms']):>8} "
              f"{ours_gbps:>6} {pct:>6} {fmt_ms(r['eager_ms']):>9} "
              f"{fmt_ms(r['compiled_ms']):>8} {sp:>7} {r['goal']:>13} "
              f"{r['goal_met'] or '-':>10}  {check}")
        cs = r["compiled_status"]
        if cs not in ("ok", "-") and not cs.startswith("not run"):
            notes.setdefault(f"compiled: {cs}", []).append(r["kernel"])
        if r["ours_status"]:
            notes.setdefault(f"ours: {r['ours_status']}", []).append(r["kernel"])
        if r.get("eager_status"):
            notes.setdefault(f"eager: {r['eager_status']}", []).append(r["kernel"])
    print("  bytes: " + "; ".join(f"{r['kernel']} {r['bytes_formula']}" for r in rep["kernels"]
                                  if not r["kernel"].endswith("-decode"))
          + "; copy 8n; X-decode: payload + 8n (topk 16k); n elements, B block, k kept")
    if rep.get("timing_stopped"):
        notes.setdefault(f"timing stopped early: {rep['timing_stopped']}", []).extend(
            r["kernel"] for r in rep["kernels"])
    shown = 5  # the table must stay within the check script's tail
    for note, which in list(notes.items())[:shown]:
        who = "all" if len(which) == len(rep["kernels"]) > 1 else ", ".join(which)
        print(f"  note ({who}) {note}"[:160])
    if len(notes) > shown:
        print(f"  ({len(notes) - shown} more notes: see the log above and the JSON)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # the last line says why, for the check script's tail
        traceback.print_exc()
        print(f"compare_torch: FAILED: {type(exc).__name__}: {str(exc).strip()[:300]}")
        sys.exit(1)
