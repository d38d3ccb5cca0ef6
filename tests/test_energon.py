"""``seediff export OUT --layout energon``: Megatron-Energon's index written in place beside the tars. Checked with
energon itself: ``energon lint`` passes, its loader yields the tars' images, label maps and records as
``SegmentationSample``s, skips the samples the QualityFilter excluded, and a saved loader state restores to the same
next sample."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import seediff
from seediff.pipeline.cli import main
from seediff.pipeline.readers import segmentation_dataset
from seediff.pipeline.verify import verify_dataset
from tests.test_readers import build_synthetic_dataset

energon = pytest.importorskip("megatron.energon")  # the dev extra installs it; export needs it only here

QUALITY = ["min_confidence=0.15"]  # the synthetic records' confidence is 0.1 * (sample id % 4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    written = build_synthetic_dataset(str(tmp_path_factory.mktemp("energon") / "out"))
    tars = {p.name: p.read_bytes() for p in Path(written["root"]).glob("*.tar")}
    assert main(["export", written["root"], "--layout", "energon", "--quality", *QUALITY]) == 0
    assert {p.name: p.read_bytes() for p in Path(written["root"]).glob("*.tar")} == tars  # in place, untouched
    return written


def loader_samples(root: str) -> list:
    config = energon.WorkerConfig(rank=0, world_size=1, num_workers=0)
    return list(energon.get_loader(energon.get_val_dataset(root, split_part="train", worker_config=config,
                                                           batch_size=None)))


def test_energon_lint_passes_and_the_index_is_what_prepare_writes(exported: dict) -> None:
    meta = Path(exported["root"]) / ".nv-meta"
    assert {".info.json", "index.sqlite", "index.uuid", "split.yaml", "dataset.yaml"} <= {p.name for p in meta.iterdir()}
    info = yaml.safe_load((meta / ".info.json").read_text())
    assert info["shard_counts"] == {f"seediff-{i:06d}.tar": n for i, n in enumerate((4, 4, 3))}  # 5 failed
    from click.testing import CliRunner
    from megatron.energon.tools.lint import command as energon_lint  # `energon lint OUT`, in this process

    done = CliRunner().invoke(energon_lint, [exported["root"]])
    assert done.exit_code == 0, done.output[-3000:]
    assert verify_dataset(exported["root"]) == []  # seediff's own checks ignore energon's files


def test_energon_loader_reads_the_tars_and_skips_the_excluded_samples(exported: dict) -> None:
    kept = {meta["key"]: (image, mask, meta) for image, mask, meta in segmentation_dataset(
        exported["root"], shuffle_shards=0, quality=seediff.QualityFilter(min_confidence=0.15))}
    samples = loader_samples(exported["root"])
    assert 0 < len(kept) < len(exported["keys"])
    assert sorted(s.__key__ for s in samples) == sorted(kept)
    for sample in samples:
        assert type(sample).__name__ == "SegmentationSample"
        image, mask, meta = kept[sample.__key__]
        assert torch.equal(sample.image, image)  # energon's default decoder: float [3, H, W] in [0, 1]
        assert sample.mask.dtype == torch.uint8 and torch.equal(sample.mask, mask.to(torch.uint8))  # label values
        assert sample.metadata == meta


def test_energon_restores_a_saved_state_to_the_same_next_sample(exported: dict) -> None:
    def train_loader():
        config = energon.WorkerConfig(rank=0, world_size=1, num_workers=0)
        return energon.get_savable_loader(energon.get_train_dataset(
            exported["root"], batch_size=None, shuffle_buffer_size=None, max_samples_per_sequence=None,
            worker_config=config))

    loader = train_loader()
    stream = iter(loader)
    seen = [next(stream).__key__ for _ in range(3)]
    state = loader.save_state_rank()
    following = [next(stream).__key__ for _ in range(3)]
    restored = train_loader()
    restored.restore_state_rank(state)
    again = iter(restored)
    assert [next(again).__key__ for _ in range(3)] == following and len(set(seen + following)) == 6


def test_export_layouts_refuse_a_wrong_directory(exported: dict, tmp_path: Path, capsys) -> None:
    assert main(["export", exported["root"], str(tmp_path / "x"), "--layout", "energon"]) == 2
    assert main(["export", exported["root"], "--layout", "voc"]) == 2
    assert main(["export", exported["root"], "--layout", "energon", "--quality", "min_area=1"]) == 2
    assert "--quality" in capsys.readouterr().err
