"""The deterministic plan: global sample ids in manifest order, each with its manifest row, index within the row
and seed (the sample's prompt is rendered from these, ``SampleSpec.prompt``); shards are arithmetic id progressions.
Computed lazily from the per-row counts, so planning 10^8 samples costs O(rows) memory and a lookup O(log rows).

Shard layouts (``RunConfig.shard_layout``, recorded in run.json):

* ``interleaved`` (generate's default): with S shards, shard s holds the ids s, s + S, s + 2S, ... Sample ids follow
  manifest order, so every shard holds each row's samples in proportion (a row of n samples puts floor(n/S) or
  ceil(n/S) of them in every shard): a shard is a class-mixed draw of the whole manifest, not one class.
* ``contiguous``: shard s holds ids [s*P, (s+1)*P). Annotate keeps it (an output shard reads one run of its input),
  and so do outputs written before the layout was recorded.

Either way a shard is one ``range`` (start, stop, step), which is all that travels to the actor; the sample id still
decides the seed, the prompt and the key, so no sample's bytes depend on the layout or the shard size."""

from __future__ import annotations

import bisect
import hashlib
from itertools import accumulate

from seediff.schemas.manifest import ManifestRow
from seediff.schemas.records import SampleSpec, ShardSpec

SHARD_LAYOUTS = ("interleaved", "contiguous")


def sample_seed(global_seed: int, sample_id: int) -> int:
    """A fixed 63-bit hash of (global seed, sample id): stable across Python versions, processes and machines."""
    digest = hashlib.blake2b(
        global_seed.to_bytes(8, "little") + sample_id.to_bytes(8, "little"), digest_size=8, person=b"seediff-seed"
    ).digest()
    return int.from_bytes(digest, "little") >> 1


def shard_count(num_samples: int, samples_per_shard: int) -> int:
    return -(-num_samples // samples_per_shard)


class SampleRanges:
    """Sample ids over groups of known sizes (manifest rows, annotate's input units), in group order, cut into shards
    of the layout: ``locate`` finds an id's group, ``shard`` / ``shard_range`` / ``shard_of`` are the arithmetic of
    the ids alone, so anything that knows the sample count (``verify``, from run.json) cuts the same shards."""

    def __init__(self, sizes: list[int] | tuple[int, ...], samples_per_shard: int, layout: str = "contiguous"):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        if layout not in SHARD_LAYOUTS:
            raise ValueError(f"shard layout must be one of {SHARD_LAYOUTS}, got {layout!r}")
        self.samples_per_shard = samples_per_shard
        self.layout = layout
        # ends[i] = one past the last sample id of group i
        self._ends = list(accumulate(sizes))
        self.num_samples = self._ends[-1] if self._ends else 0
        # Both layouts have the same shard count, so at most samples_per_shard per shard (interleaved: every shard
        # holds floor or ceil of num_samples / num_shards).
        self.num_shards = shard_count(self.num_samples, samples_per_shard)

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(group index, index of the sample within its group)."""
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"sample id {sample_id} outside [0, {self.num_samples})")
        ci = bisect.bisect_right(self._ends, sample_id)
        return ci, sample_id - (self._ends[ci - 1] if ci else 0)

    def shard(self, shard_id: int) -> ShardSpec:
        if not 0 <= shard_id < self.num_shards:
            raise IndexError(f"shard id {shard_id} outside [0, {self.num_shards})")
        if self.layout == "interleaved":
            return ShardSpec(shard_id, shard_id, self.num_samples, self.num_shards)
        start = shard_id * self.samples_per_shard
        return ShardSpec(shard_id, start, min(start + self.samples_per_shard, self.num_samples))

    def shard_range(self, shard_id: int) -> range:
        """The sample ids of a shard, in the order its tar holds them."""
        return self.shard(shard_id).ids

    def shard_of(self, sample_id: int) -> int:
        """The shard holding ``sample_id``."""
        self.locate(sample_id)  # range check
        if self.layout == "interleaved":
            return sample_id % self.num_shards
        return sample_id // self.samples_per_shard


class Plan(SampleRanges):
    """The generate plan: the manifest's rows as the groups; a sample's spec (row, index, seed) from its id."""

    kind = "generate"  # the actor's choice of how a batch gets its images (workers/actor.py)

    def __init__(self, rows: tuple[ManifestRow, ...] | list[ManifestRow], global_seed: int, samples_per_shard: int,
                 layout: str = "contiguous"):
        super().__init__([r.num_samples for r in rows], samples_per_shard, layout)
        self.rows = tuple(rows)
        self.global_seed = global_seed

    def sample(self, sample_id: int) -> SampleSpec:
        ci, index = self.locate(sample_id)
        return SampleSpec(sample_id, ci, index, sample_seed(self.global_seed, sample_id), self.rows[ci])

    def samples(self, shard: ShardSpec) -> tuple[SampleSpec, ...]:
        return tuple(self.sample(i) for i in shard.ids)

    def example_ids(self) -> list[int]:
        """The samples the dry run shows: the first three and the last (never a set of all ids)."""
        return sorted({i for i in (0, 1, 2, self.num_samples - 1) if 0 <= i < self.num_samples})
