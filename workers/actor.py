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
from seediff.schemas.records import InputSample, SampleFailure, SampleOutcome, SampleSpec, ShardSpec
from seediff.storage import DEVICE, failure_kind, sweep_staging
from seediff.workers.annotate import AnnotatedSample, annotate_batch, warm_up_annotation
from seediff.workers.encode import encode_annotated, encode_sample
from seediff.workers.generate import GeneratedSample, generate_batch, install_capture, warm_up_generation
from seediff.workers.models import load_model, resolve_device
from seediff.workers.shards import ShardWriter


class ShardActor:
    """``ShardActor(config, runtime, plan, torch_threads=, progress=, run_id=)``; ``generate_shard(shard, attempt)``
    writes and commits one shard, expanding its sample-id range from ``plan`` (``seediff.pipeline.plan.Plan``,
    O(classes); for annotate ``seediff.pipeline.sources.AnnotatePlan``, which reads the shard's input images here).
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
        self.config, self.plan, self.run_id = config, plan, run_id
        self.progress = progress
        self.device = resolve_device(runtime.device)
        sweep_staging()  # uploads staged by actors killed on this machine earlier
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        started = time.perf_counter()
        self.pipe = load_model(config, self.device)
        self.load_s = time.perf_counter() - started
        warm_up = warm_up_annotation if config.annotate is not None else warm_up_generation
        self.capture, self.compile_s = install_capture(self.pipe, config, warm_up)
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
                encoding = [self.encoder.submit(self._encode, sample) for sample in generated]
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

    def _generate(self, batch: tuple[SampleSpec, ...] | tuple[InputSample, ...]) -> list[Any]:
        """One batch: generated from SampleSpecs, or labelled from InputSamples (annotate). The batch functions
        return the samples that failed in a per-sample stage as failed samples; anything they raise is the shard's."""
        if self.config.annotate is not None:
            return annotate_batch(self.pipe, batch, self.config, self.capture)
        return generate_batch(self.pipe, batch, self.config, self.capture)

    def _drain(self, writer: ShardWriter, encoding: list[Future[SampleOutcome]], shard_id: int) -> None:
        for future in encoding:
            writer.add(future.result())
        if encoding and self.progress is not None:
            self.progress.report.remote(shard_id, writer.added)

    def _encode(self, sample: GeneratedSample | AnnotatedSample) -> SampleOutcome:
        try:
            return self._encoded(sample)
        except SampleFailure as error:  # its label map: the sample's own failure
            item = sample.sample if isinstance(sample, AnnotatedSample) else sample.spec
            return self._encoded(_failed(item, str(error)))

    def _encoded(self, sample: GeneratedSample | AnnotatedSample) -> SampleOutcome:
        if isinstance(sample, AnnotatedSample):
            return encode_annotated(
                sample.sample, sample.labels, sample.cross_labels, sample.mask_stats, sample.error, self.config
            )
        return encode_sample(sample.spec, sample.image, sample.labels, sample.mask_stats, sample.error, self.config)


def _failed(item: SampleSpec | InputSample, error: str) -> GeneratedSample | AnnotatedSample:
    """A failed sample of a generate batch (a SampleSpec) or of an annotate batch (an InputSample)."""
    if isinstance(item, InputSample):
        return AnnotatedSample(item, None, None, {}, error)
    return GeneratedSample(item, None, None, {}, error)


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
