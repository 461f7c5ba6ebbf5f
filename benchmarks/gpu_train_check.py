"""The issue's training example on the GPU: the p0 = 0.499 Bernoulli toy,
200 Adam steps (lr 0.1, 20 samples) per estimator, on ``device="cuda"``.
Prints the final p = sigmoid(t) and the time per step (RELAX's optimum is
p -> 0; on the CPU relax, rloo and disarm end at 0.003-0.006)."""

from __future__ import annotations

import math
import sys
import time

import torch

import storch_nb as sn

TOY = "t = param(0.0)\nb ~ Bernoulli(logits=t)\ncost (b - 0.499)**2\n"

if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here")
    for est in ["relax", "rebar", "rloo", "disarm", "score"]:
        story = sn.Story(TOY)
        t0 = time.perf_counter()
        hist = story.train(steps=200, lr=0.1, estimator=est, samples=20, seed=0, device=device)
        dt = time.perf_counter() - t0
        t = hist.params["t"].item()
        print(f"{est:7s} {device}: sigmoid(t) = {1 / (1 + math.exp(-t)):.4f}  {1000 * dt / 200:.2f} ms/step  "
              f"param on {story.params['t'].device}")
