"""The shard worker: loads the diffusers pipeline once, then turns whole shards into committed shard files and
returns only the small stats dict (no image bytes travel through Ray). A plain class, so it runs and tests without
Ray; the driver wraps it with ``ray.remote`` (pipeline/run.py). The only module in workers/ that touches Ray, and
only to name itself in the stats."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray
import torch

from seediff.schemas.config import RunConfig, RuntimeOptions
from seediff.schemas.records import InputSample, SampleOutcome, SampleSpec, ShardSpec
from seediff.storage import DEVICE, failure_kind, sweep_staging
from seediff.workers.annotate import ANNOTATION
from seediff.workers.batch import install_capture, label_batch
from seediff.workers.encode import LabelledSample, encode_sample
from seediff.workers.generate import GENERATION
from seediff.workers.models import load_model, resolve_device
from seediff.workers.shards import ShardWriter


class ShardActor:
    """``ShardActor(config, runtime, plan, torch_threads=, progress=, run_id=)``; ``generate_shard(shard, attempt)``
    writes and commits one shard, expanding its sample-id range from ``plan`` (``seediff.pipeline.plan.Plan``,
    O(classes); for annotate ``seediff.pipeline.sources.AnnotatePlan``, which reads the shard's input images here);
    the plan's ``kind`` chooses how a batch gets its images and attention (``IMAGES``).
    ``torch_threads`` caps intra-op threads so several CPU actors on one machine do not oversubscribe it.
    ``progress``: a Ray actor handle of ``seediff.pipeline.progress.PartialCounts`` told the samples written after every
    batch (fire-and-forget), so the driver's bar moves between shard commits. ``run_id`` and the attempt number go into
    the shard stats."""

    def __init__(
        self,
        config: RunConfig,
        runtime: RuntimeOptions,
        plan: Any,
        *,
        torch_threads: int | None = None,
        progress: Any = None,
        run_id: str | None = None,
    ):
        self.device = resolve_device(runtime.device)
        # Records name the dtype computed in (run.json's device record), never "auto" (C15).
        config = config.model_copy(update={"dtype": config.resolved_dtype(self.device.type)})
        self.config, self.plan, self.run_id = config, plan, run_id
        self.progress = progress
        sweep_staging()  # uploads staged by actors killed on this machine earlier
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        started = time.perf_counter()
        self.pipe = load_model(config, self.device)
        self.load_s = time.perf_counter() - started
        self.images = IMAGES[plan.kind]  # chosen once: how a batch gets its images and captured attention
        self.capture, self.compile_s = install_capture(self.pipe, config, self.images)
        # Encoding (PIL/zlib release the GIL) of batch k runs here while batch k+1 is generated.
        self.encoder = ThreadPoolExecutor(max_workers=runtime.encode_threads, thread_name_prefix="encode")
        self.identity = _identity(self.device, torch.get_num_threads())
        self.device_fault: str | None = None  # set by a device error: this process computes nothing more

    def generate_shard(self, shard: ShardSpec, attempt: int = 1) -> dict[str, Any]:
        """Write and commit one shard. Only errors of a per-sample stage (``SampleFailure``) become failed rows;
        any other error fails the whole shard (nothing commits) and reaches the driver, which retries it elsewhere.
        After a device error (a sticky CUDA error) this process refuses every further shard: only a fresh one
        recovers, and the driver retires it."""
        if self.device_fault is not None:
            raise RuntimeError(f"this actor's device failed earlier: {self.device_fault}")
        try:
            return self._generate_shard(shard, attempt)
        except Exception as error:
            if failure_kind(error) == DEVICE:
                self.device_fault = f"{type(error).__name__}: {error}"
            raise

    def _generate_shard(self, shard: ShardSpec, attempt: int) -> dict[str, Any]:
        started = time.perf_counter()
        generate_s = drain_s = 0.0
        with ShardWriter(self.config, shard, retry=attempt > 1) as writer:
            encoding: list[Future[SampleOutcome]] = []
            for batch in _batches(self.plan.samples(shard), self.config.batch_size):
                t0 = time.perf_counter()
                generated = self._generate(batch)
                t1 = time.perf_counter()
                self._drain(writer, encoding, shard.shard_id)  # the previous batch, encoded meanwhile
                generate_s, drain_s = generate_s + t1 - t0, drain_s + time.perf_counter() - t1
                encoding = [self.encoder.submit(encode_sample, sample, self.config) for sample in generated]
            self._drain(writer, encoding, shard.shard_id)
            runtime_info = {
                **self.identity,
                "run_id": self.run_id,
                "attempt": attempt,
                "load_s": self.load_s,
                "compile_s": self.compile_s,  # once per actor, null without --compile
                "generate_s": generate_s,
                "encode_wait_s": drain_s,
                "shard_s": time.perf_counter() - started,
            }
            return writer.commit(runtime_info)

    def _generate(self, batch: tuple[SampleSpec, ...] | tuple[InputSample, ...]) -> list[LabelledSample]:
        """One batch through ``self.images`` and the label step: the samples that failed in a per-sample stage come
        back as failed samples; anything raised is the shard's."""
        return label_batch(self.pipe, batch, self.config, self.images, self.capture)

    def _drain(self, writer: ShardWriter, encoding: list[Future[SampleOutcome]], shard_id: int) -> None:
        for future in encoding:
            writer.add(future.result())
        if encoding and self.progress is not None:
            self.progress.report.remote(shard_id, writer.added)


IMAGES = {"generate": GENERATION, "annotate": ANNOTATION}  # plan kind -> how its batches get their images


def _batches(samples: tuple[SampleSpec, ...], size: int) -> Iterator[tuple[SampleSpec, ...]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def _identity(device: torch.device, threads: int) -> dict[str, Any]:
    """Where this worker runs, for the stats file (never for the data files)."""
    context = ray.get_runtime_context() if ray.is_initialized() else None
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "node_id": context.get_node_id() if context else None,
        "actor_id": context.get_actor_id() if context else None,
        "device": str(device),
        "torch_threads": threads,
    }
