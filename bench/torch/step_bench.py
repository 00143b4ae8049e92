"""PyTorch peer of bench/programs/ad_step_bench.cpp: the same model, batch,
loss and optimizer (AdamW lr 1e-3, weight decay 1e-4), random data, one
process, torch.set_num_threads(N). Prints the same one-line format.

    python step_bench.py [--model mlp|cnn] [--threads 1] [--batch 128] [--steps 300] [--warmup 30]
"""
import argparse
import time

import torch


def build(name):
    if name == "mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(784, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 10)), (784,)
    if name == "cnn":  # train_fashion_mnist --model cnn
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * 7 * 7, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 10)), (1, 28, 28)
    raise SystemExit(f"step_bench.py: --model expects mlp or cnn, got '{name}'")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    model, in_shape = build(a.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = [(torch.rand(a.batch, *in_shape) * 2 - 1, torch.randint(0, 10, (a.batch,)))
               for _ in range(8)]

    def step(i):
        x, y = batches[i % len(batches)]
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return loss

    for i in range(a.warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(a.steps):
        loss = step(i)
    s = time.perf_counter() - t0
    print(f"model={a.model} threads={a.threads} batch={a.batch} "
          f"samples_per_s={a.steps * a.batch / s:.0f} step_ms={1e3 * s / a.steps:.4f} "
          f"loss={loss.item():.4f} backend=torch {torch.__version__}")


if __name__ == "__main__":
    main()
