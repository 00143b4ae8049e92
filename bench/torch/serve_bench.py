"""PyTorch peer of bench/programs/serve_bench.cpp: loads the same fp32 weights
from a ringflow model file (DIR/fp32.rfmodel, parsed here: docs/inference.md
has the layout), builds the nn.Sequential, and times batch forwards of the
Fashion-MNIST test images in fp32 and after
torch.ao.quantization.quantize_dynamic (int8 weights, activations quantized
per batch at run time), one thread. Prints serve_bench's line format.

    python serve_bench.py [--model-dir serve-models] [--batch 128] [--iters 200] [--threads 1]
"""
import argparse
import gzip
import os
import struct
import time
import warnings

import numpy as np
import torch

ACTS = {0: None, 1: torch.nn.ReLU, 2: lambda: torch.nn.GELU(approximate="tanh"), 3: torch.nn.Tanh,
        4: torch.nn.Sigmoid}


def read_fp32_model(path):
    b = open(path, "rb").read()
    assert b[:8] == b"RFLOWMDL", "not a ringflow model file"
    version, = struct.unpack_from("<I", b, 8)
    assert version == 1, f"model file version {version}"
    pos = 32
    count, = struct.unpack_from("<I", b, pos); pos += 4
    layers = []
    for _ in range(count):
        n_in, n_out, act, wtype, sparse, _r = struct.unpack_from("<QQBBBB", b, pos); pos += 20
        assert wtype == 0, "serve_bench.py reads fp32 models only"
        bias = np.frombuffer(b, np.float32, n_out, pos); pos += 4 * n_out
        if sparse:
            nbits = n_in * n_out
            bitmap = np.frombuffer(b, np.uint8, (nbits + 7) // 8, pos); pos += (nbits + 7) // 8
            nnz, = struct.unpack_from("<Q", b, pos); pos += 8
            vals = np.frombuffer(b, np.float32, nnz, pos); pos += 4 * nnz
            mask = np.unpackbits(bitmap, bitorder="little")[:nbits].astype(bool)
            w = np.zeros(nbits, np.float32); w[mask] = vals
        else:
            w = np.frombuffer(b, np.float32, n_in * n_out, pos).copy(); pos += 4 * n_in * n_out
        layers.append((n_in, n_out, act, w.reshape(n_in, n_out), bias.copy()))
    return layers


def build(layers):
    mods = []
    for n_in, n_out, act, w, bias in layers:
        lin = torch.nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            lin.bias.copy_(torch.from_numpy(bias))
        mods.append(lin)
        if ACTS[act] is not None:
            mods.append(ACTS[act]())
    return torch.nn.Sequential(*mods).eval()


def idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack_from(">I", data, 0)
    dims = magic & 0xff
    shape = struct.unpack_from(">" + "I" * dims, data, 4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def find(d, stem):
    for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise SystemExit(f"serve_bench.py: {stem} not found in {d}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default="serve-models")
    p.add_argument("--data-dir", default=os.environ.get("RINGFLOW_DATA_DIR", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    # quantize_dynamic is deprecated in favour of torchao but still what
    # PyTorch users run; its warnings would only clutter the line format.
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    x = idx(find(a.data_dir, "t10k-images-idx3-ubyte")).reshape(-1, 784).astype(np.float32) / 255.0
    x = (x - 0.2860406) / 0.3530242
    labels = idx(find(a.data_dir, "t10k-labels-idx1-ubyte")).astype(np.int64)
    x = torch.from_numpy(x)
    fp32 = build(read_fp32_model(os.path.join(a.model_dir, "fp32.rfmodel")))
    int8 = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    batch = x[: a.batch]
    for name, m in (("fp32", fp32), ("int8", int8)):
        with torch.inference_mode():
            for _ in range(10):
                m(batch)
            ms = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(a.iters):
                    m(batch)
                ms.append(1e3 * (time.perf_counter() - t0) / a.iters)
            acc = (m(x).argmax(1).numpy() == labels).mean()
        ms.sort()
        print(f"model={name} batch={a.batch} ms={ms[2]:.4f} accuracy={acc:.4f} "
              f"engine={torch.backends.quantized.engine} torch={torch.__version__}")


if __name__ == "__main__":
    main()
