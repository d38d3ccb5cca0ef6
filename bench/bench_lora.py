"""A LoRA fused into the weights versus kept active (peft layers adding their low-rank update on every call), against
the model without an adapter, measured in one run: pipeline calls on the same inputs, interleaved, median of each.

    python bench/bench_lora.py                       # the tiny model, 256 px, 4 steps, CPU, one thread
    python bench/bench_lora.py --device cuda --resolution 512 --model PATH --lora FILE
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seediff.schemas.config import RunConfig  # noqa: E402
from seediff.workers import adapters  # noqa: E402
from seediff.workers.models import load_model  # noqa: E402
from tests.test_adapters import make_lora  # noqa: E402  (the suite's random LoRA of the tiny UNet)


def kept_active(pipe, config: RunConfig) -> None:
    """``apply_adapters`` without the fuse and unload: the adapters stay peft layers."""
    names = [f"lora_{i}" for i in range(len(config.lora))]
    for name, adapter in zip(names, config.lora):
        pipe.load_lora_weights(str(adapters.adapter_file(adapter, config, name)), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[a.weight for a in config.lora])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--lora", help="adapter file (default: a random rank-4 LoRA of the tiny UNet)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    device = torch.device(args.device)
    lora = args.lora or str(make_lora(Path(tempfile.mkdtemp()), seed=0))
    base = RunConfig(model=args.model, resolution=args.resolution, steps=args.steps)
    with_lora = adapters.check_adapters(RunConfig(model=args.model, resolution=args.resolution, steps=args.steps,
                                                  lora=[lora]))
    pipes = {"none": load_model(base, device), "fused": load_model(with_lora, device)}
    active = load_model(base, device)
    kept_active(active, with_lora)
    pipes["active"] = active

    def call(pipe) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(1)
        return pipe(prompt=["a photo of a cat"] * args.batch, height=args.resolution, width=args.resolution,
                    num_inference_steps=args.steps, generator=generator, output_type="pt").images

    difference = (call(pipes["fused"]) - call(pipes["active"])).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            started = time.perf_counter()
            call(pipe)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:6s} median {median[name]:.3f} s  (min {min(t):.3f}, max {max(t):.3f})")
    print(f"active / fused {median['active'] / median['fused']:.2f}x; "
          f"fused / none {median['fused'] / median['none']:.2f}x; "
          f"largest image difference fused vs active {difference:.2e}")


if __name__ == "__main__":
    main()
