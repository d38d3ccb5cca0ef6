"""What a finished generation run reports: ``RunSummary`` (counts, failures, bytes, rates, paths), returned by
``seediff.generate`` and printed by the command line, and the byte units it shares with ``inspect`` (binary: KiB,
MiB). No Ray here: the summary is built from the dispatcher's plain records."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from seediff.schemas.config import RuntimeOptions

DEFAULT_MAX_FAILED_FRACTION = RuntimeOptions.model_fields["max_failed_fraction"].default  # one source: the option


def human_bytes(n: float) -> str:
    """Binary units, as ``inspect`` and ``report`` show sizes: ``512 B``, ``1.5 KiB``, ``2.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class FailedShard:
    shard_id: int
    attempts: int
    error: str


@dataclass(frozen=True)
class ActorRate:
    """Samples an actor finished and the time it spent on them (from each shard's start on the actor to its end)."""

    host: str
    samples: int
    busy_s: float

    @property
    def images_per_s(self) -> float:
        return self.samples / self.busy_s if self.busy_s > 0 else 0.0


@dataclass(frozen=True)
class RunSummary:
    """One ``generate`` (or ``resume``) call. Counts, bytes and rates are of the shards this call generated; the
    ``dataset_*`` fields describe the whole output after it (earlier runs' shards included)."""

    out: str
    samples_written: int  # in the tars
    samples_failed: int  # attempted, recorded as failed in the parquets (e.g. blanked by the safety checker)
    shards_generated: int
    shards_skipped: int  # already committed by an earlier run
    failed_shards: tuple[FailedShard, ...]  # still failed after their retries; a rerun generates them
    retried_shards: dict[int, int]  # shard id -> attempts, for shards that committed after more than one
    tar_bytes: int
    parquet_bytes: int
    wall_s: float  # the whole call (the API's quiet(): checks, starting Ray, dispatch, index); the dispatch's alone here
    actors: dict[str, ActorRate]  # actor id -> its rate
    dataset_samples: int
    dataset_shards: int
    paths: dict[str, str] = field(default_factory=dict)  # run_json, sizes_json, dataset_json
    failures_by_stage: dict[str, int] = field(default_factory=dict)  # this call's failed samples by stage
    dataset_failed: int = 0  # failed samples recorded in every committed shard (earlier runs' too)
    missing_shards: tuple[int, ...] = ()  # planned shards not committed after this call
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION

    @property
    def failed_fraction(self) -> float:
        """Failed samples of the whole output per attempted sample."""
        attempted = self.dataset_samples + self.dataset_failed
        return self.dataset_failed / attempted if attempted else 0.0

    @property
    def ok(self) -> bool:
        """The planned dataset is there: every planned shard committed and at most ``max_failed_fraction`` of its
        samples failed (the command's exit status 0)."""
        return not self.failed_shards and not self.missing_shards and self.failed_fraction <= self.max_failed_fraction

    @property
    def bytes_written(self) -> int:
        return self.tar_bytes + self.parquet_bytes

    @property
    def images_per_s(self) -> float:
        """Samples attempted in this run per second of wall time, starting Ray and the actors and loading the model
        included."""
        attempted = self.samples_written + self.samples_failed
        return attempted / self.wall_s if self.wall_s > 0 else 0.0

    @classmethod
    def from_dispatch(cls, out: str, result: Any, skipped_shards: int, index: dict[str, Any],
                      paths: dict[str, str], max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> "RunSummary":
        """From a ``DispatchResult`` (seediff.pipeline.dispatch) and the index that ``write_index`` returned."""
        done = result.completed
        stages: Counter[str] = Counter()
        for r in done:
            stages.update(r.stats.get("failures_by_reason", {}))
        actors: dict[str, ActorRate] = {}
        for r in done:
            prior = actors.get(r.actor_id, ActorRate(r.stats.get("host", "?"), 0, 0.0))
            actors[r.actor_id] = ActorRate(prior.host, prior.samples + r.num_samples, prior.busy_s + (r.run_s or 0.0))
        return cls(
            out=out,
            samples_written=sum(r.stats["successes"] for r in done),
            samples_failed=sum(r.stats["failures"] for r in done),
            shards_generated=len(done),
            shards_skipped=skipped_shards,
            failed_shards=tuple(
                FailedShard(r.shard_id, r.attempts, r.error or "") for r in sorted(result.failed, key=lambda r: r.shard_id)
            ),
            retried_shards={r.shard_id: r.attempts for r in sorted(done, key=lambda r: r.shard_id) if r.attempts > 1},
            tar_bytes=sum(r.stats["tar_bytes"] for r in done),
            parquet_bytes=sum(r.stats["parquet_bytes"] for r in done),
            wall_s=result.wall_s,
            actors=actors,
            dataset_samples=index["num_samples"],
            dataset_shards=index["committed_shards"],
            paths={"sizes_json": index["sizes_json"], "dataset_json": index["dataset_json"], **paths},
            failures_by_stage=dict(stages.most_common()),
            dataset_failed=index.get("failures", sum(r.stats["failures"] for r in done)),
            missing_shards=tuple(index.get("missing_shards", ())),
            max_failed_fraction=max_failed_fraction,
        )

    def format(self) -> str:
        """The summary the command line prints: what was written, the two rates and what each one measures."""
        lines = [
            f"summary: {self.samples_written} samples written, {self.samples_failed} failed (recorded in the parquet), "
            f"{self.shards_generated} shards generated, {self.shards_skipped} already committed, "
            f"{len(self.failed_shards)} failed",
            f"  {human_bytes(self.bytes_written)} written (tar {human_bytes(self.tar_bytes)}, parquet "
            f"{human_bytes(self.parquet_bytes)}) in {tqdm.format_interval(self.wall_s)}",
        ]
        if self.actors:
            lines.append(
                f"  {self.images_per_s:.2f} img/s overall: samples / wall time, which includes starting Ray and the actors "
                f"and loading the model on each of the {len(self.actors)}"
            )
            lines.append("  per actor: samples / time spent generating its shards (what one more actor would add)")
        for actor_id, rate in sorted(self.actors.items()):
            lines.append(
                f"    actor {actor_id[:8]} on {rate.host}: {rate.images_per_s:.2f} img/s "
                f"({rate.samples} samples in {rate.busy_s:.1f} s)"
            )
        lines.append(
            f"  dataset: {self.dataset_shards} committed shards, {self.dataset_samples} samples "
            f"({self.paths['sizes_json']}, {self.paths['dataset_json']})"
        )
        if self.retried_shards:
            retried = ", ".join(f"shard {i} ({n} attempts)" for i, n in self.retried_shards.items())
            lines.append(f"  retried and committed: {retried}")
        for failed in self.failed_shards:
            lines.append(f"  FAILED shard {failed.shard_id} after {failed.attempts} attempts: {failed.error}")
        if self.failures_by_stage:
            top = ", ".join(f"{stage} {n}" for stage, n in list(self.failures_by_stage.items())[:3])
            lines.append(f"  failed samples by stage: {top}")
        if self.failed_fraction > self.max_failed_fraction:
            lines.append(
                f"  FAILED: {self.dataset_failed} of {self.dataset_samples + self.dataset_failed} samples failed "
                f"({self.failed_fraction:.1%} > --max-failed-fraction {self.max_failed_fraction:g}); the failed rows "
                "name each sample's stage and source in the parquets' error column"
            )
        if self.failed_shards:
            lines.append("  rerun the same command (or `seediff resume OUT`) to generate the failed shards; "
                         "committed shards are kept")
        return "\n".join(lines)
