"""The deterministic plan: global sample ids in manifest order, each with its manifest row, index within the row
and seed (the sample's prompt is rendered from these, ``SampleSpec.prompt``); shards are contiguous id ranges. Computed lazily from the per-class counts, so planning 10^8 samples
costs O(classes) memory and a lookup costs O(log classes)."""

from __future__ import annotations

import bisect
import hashlib
from itertools import accumulate

from seediff.schemas.manifest import ManifestRow
from seediff.schemas.records import SampleSpec, ShardSpec


def sample_seed(global_seed: int, sample_id: int) -> int:
    """A fixed 63-bit hash of (global seed, sample id): stable across Python versions, processes and machines."""
    digest = hashlib.blake2b(
        global_seed.to_bytes(8, "little") + sample_id.to_bytes(8, "little"), digest_size=8, person=b"seediff-seed"
    ).digest()
    return int.from_bytes(digest, "little") >> 1


def shard_count(num_samples: int, samples_per_shard: int) -> int:
    return -(-num_samples // samples_per_shard)


class Plan:
    kind = "generate"  # the actor's choice of how a batch gets its images (workers/actor.py)

    def __init__(self, rows: tuple[ManifestRow, ...] | list[ManifestRow], global_seed: int, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.rows = tuple(rows)
        self.global_seed = global_seed
        self.samples_per_shard = samples_per_shard
        # ends[i] = one past the last sample id of class i
        self._ends = list(accumulate(r.num_samples for r in self.rows))
        self.num_samples = self._ends[-1] if self._ends else 0
        self.num_shards = shard_count(self.num_samples, samples_per_shard)

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(row index, index of the sample within its row)."""
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"sample id {sample_id} outside [0, {self.num_samples})")
        ci = bisect.bisect_right(self._ends, sample_id)
        return ci, sample_id - (self._ends[ci - 1] if ci else 0)

    def sample(self, sample_id: int) -> SampleSpec:
        ci, index = self.locate(sample_id)
        return SampleSpec(sample_id, ci, index, sample_seed(self.global_seed, sample_id), self.rows[ci])

    def shard_range(self, shard_id: int) -> range:
        if not 0 <= shard_id < self.num_shards:
            raise IndexError(f"shard id {shard_id} outside [0, {self.num_shards})")
        start = shard_id * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.num_samples))

    def shard(self, shard_id: int) -> ShardSpec:
        ids = self.shard_range(shard_id)
        return ShardSpec(shard_id, ids.start, ids.stop)

    def samples(self, shard: ShardSpec) -> tuple[SampleSpec, ...]:
        return tuple(self.sample(i) for i in range(shard.start, shard.stop))
