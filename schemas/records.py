"""Records of the data plane: which sample is which (``SampleSpec``, ``ShardSpec``), shard file names, per-sample
metadata, the per-shard parquet schema and shard stats. No torch."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.manifest import ClassRow

KEY_DIGITS = 12  # 254 classes x 10^9 samples fit in 12 digits


def sample_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_DIGITS}d}"


@dataclass(frozen=True)
class SampleSpec:
    sample_id: int
    class_index: int  # position of the class row in the manifest
    index_in_class: int
    seed: int
    row: ClassRow

    @property
    def key(self) -> str:
        return sample_key(self.sample_id)


@dataclass(frozen=True)
class ShardSpec:
    shard_id: int
    start: int  # first sample id
    stop: int  # one past the last sample id
    samples: tuple[SampleSpec, ...]

    def __len__(self) -> int:
        return self.stop - self.start
