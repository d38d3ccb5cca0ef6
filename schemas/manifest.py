"""Manifest: the classes to generate, read from a table (CSV, TSV, JSONL, Parquet) or a text file, validated
before any model is loaded. Errors name the file, the line (or row) and the field."""

from __future__ import annotations

from dataclasses import dataclass


class ManifestError(ValueError):
    """Bad manifest input. The message starts with ``<file>:<line>: <field>:`` where a line applies."""


@dataclass(frozen=True)
class ClassRow:
    class_name: str
    class_id: int  # 1..254 (0 = background, 255 = ignore in masks)
    num_samples: int
    prompt: str  # final prompt text (template already applied); always contains class_name
    negative_prompt: str  # "" when none
    line: int  # 1-based line (text/CSV/TSV/JSONL) or row number (Parquet) in the source, for messages


@dataclass(frozen=True)
class Manifest:
    source: str  # path or URL as given
    rows: tuple[ClassRow, ...]
    sha256: str  # of the source bytes, recorded in dataset metadata

    @property
    def num_samples(self) -> int:
        return sum(r.num_samples for r in self.rows)
