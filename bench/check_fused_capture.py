"""GPU check of the fused Triton capture kernel against the chunked torch path (fp32 reference), and their speed.

Run on a CUDA machine: python bench/check_fused_capture.py
Prints, per SD1.5 self-attention shape (batch 8, 8 heads), the max abs error of fp16 and bf16 inputs against an
fp64 reference, and the time of the kernel versus the chunked torch ops it replaces.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seediff.workers.attention_kernels import add_head_summed_probabilities  # noqa: E402


def reference(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax((q.double() * scale) @ k.double().transpose(-1, -2), dim=-1).sum(1)


def chunked_torch(q, k, scale, acc, chunk=1024):
    key_t = k.transpose(-1, -2)
    for start in range(0, q.shape[2], chunk):
        rows = slice(start, start + chunk)
        acc[:, rows] += torch.softmax((q[:, :, rows] * scale) @ key_t, dim=-1, dtype=torch.float32).sum(1)


def timed_ms(fn, repeats=20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'tokens':>6} {'dim':>4} {'dtype':>8} {'max err':>10} {'kernel ms':>10} {'torch ms':>9} {'speedup':>8}")
    for side, dim in ((16, 160), (32, 80), (64, 40)):
        n = side * side
        for dtype in (torch.float16, torch.bfloat16):
            torch.manual_seed(side)
            q = torch.randn(8, 8, n, dim, device=device, dtype=dtype)
            k = torch.randn(8, 8, n, dim, device=device, dtype=dtype)
            scale = dim**-0.5
            acc = torch.zeros(8, n, n, device=device)
            weight = torch.ones((), device=device)
            add_head_summed_probabilities(q, k, scale, weight, acc)
            err = (acc.double() - reference(q, k, scale)).abs().max().item()
            kernel = timed_ms(lambda: add_head_summed_probabilities(q, k, scale, weight, acc))
            eager = timed_ms(lambda: chunked_torch(q, k, scale, acc))
            print(f"{n:>6} {dim:>4} {str(dtype)[6:]:>8} {err:>10.2e} {kernel:>10.3f} {eager:>9.3f} {eager / kernel:>7.1f}x")


if __name__ == "__main__":
    main()
