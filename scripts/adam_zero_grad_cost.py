"""Why abstraction_block_identity cost 1.1-1.5x bp per step on the MLP (issue "Records you can trust" #8).

Under M = I_block only 49 of l1's 392 units ever get a gradient, so 88% of l1's Adam second moments stay
exactly zero, and torch's per-op (foreach) Adam takes sqrt of them; on this CPU build sqrt of exact zeros
is several times slower than of positive numbers. Prints, on one 392x784 weight: sqrt on zeros vs
positives, and one Adam step (foreach and fused) with 0% / 88% zero-gradient rows (10th percentile of 300
timings, one thread). The fused kernel (conf/optim/adam.yaml `fused: true`) has no such path.

    python scripts/adam_zero_grad_cost.py
"""
from __future__ import annotations

import time

import torch


def p10(fn, n: int = 300) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 10] * 1e3


def adam_step_ms(zero_rows: float, fused: bool) -> float:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(392, 784) * 0.05)
    opt = torch.optim.Adam([p], 1e-4, fused=fused)
    mask = (torch.rand(392, 1) >= zero_rows).float()
    grads = [torch.randn(392, 784) * 1e-3 * mask for _ in range(8)]
    i = iter(range(10 ** 9))

    def step():
        p.grad = grads[next(i) % 8]
        opt.step()
    return p10(step)


def main() -> None:
    torch.set_num_threads(1)
    n = 392 * 784
    pos, zero = torch.rand(n) * 1e-6 + 1e-7, torch.zeros(n)
    print(f"sqrt of {n} floats: positive {p10(lambda: torch.sqrt(pos)):.3f} ms, exact zeros "
          f"{p10(lambda: torch.sqrt(zero)):.3f} ms")
    for fused in (False, True):
        print(f"Adam step, fused={fused}: " + ", ".join(
            f"{int(z * 100)}% zero-gradient rows {adam_step_ms(z, fused):.3f} ms" for z in (0.0, 0.88)))


if __name__ == "__main__":
    main()
