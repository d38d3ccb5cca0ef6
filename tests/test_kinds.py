"""A run's kind (generate or annotate) is decided in one place, ``pipeline/kinds.py``: everything else asks its
``RunKind`` (driver) or chooses by the plan's ``kind`` once (the actor), and never branches on the mode itself."""

from __future__ import annotations

import re

from seediff.api import annotate_config, annotate_input, dry_run
from seediff.pipeline.kinds import ANNOTATE, GENERATE, kind_of
from seediff.pipeline.plan import SampleRanges
from seediff.schemas.config import RunConfig
from tests.annotate_support import write_image_folder
from tests.e2e_support import REPO

# a branch on the mode: the config's annotate settings tested for presence, a type test of a kind's input, plan or
# sample, or a comparison with a kind
MODE_CHECK = re.compile(
    r"\.annotate is (not )?None|if [^\n]*\bconfig\.annotate\b(?!\.)|\bconfig\.annotate (else|and|or)\b"
    r"|isinstance\([^)]*\b(ImageInput|Manifest|Plan|AnnotatePlan|SampleSpec|InputSpec|InputSample)\b"
    r"|\bis (not )?(GENERATE|ANNOTATE)\b|[=!]= \"(annotate|generate)\""
)
SOURCE_FOLDERS = ("pipeline", "workers", "schemas", "seediff")


def test_the_kind_is_decided_in_one_place():
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for folder in SOURCE_FOLDERS for path in sorted((REPO / folder).rglob("*.py"))
        if path != REPO / "pipeline" / "kinds.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if MODE_CHECK.search(line)
    ]
    assert found == []


def test_the_kind_follows_the_config_as_run_json_records_it(tmp_path):
    config = annotate_config(None, tmp_path / "out")
    assert kind_of(config) is ANNOTATE and kind_of(RunConfig()) is GENERATE
    recorded = RunConfig.from_json(config.model_dump_json(), source="run.json")
    assert kind_of(recorded) is ANNOTATE  # resume, verify and inspect of the output see the kind the run had
    assert ANNOTATE.backbone_calls(config)[0] == len(config.annotate.timesteps)
    assert GENERATE.backbone_calls(RunConfig(steps=7))[0] == 7


def test_both_plans_and_verify_cut_the_same_shards():
    """Verify plans from run.json's sample count alone: the same ranges the run's own plan cut from its groups."""
    for layout in ("contiguous", "interleaved"):
        grouped, counted = SampleRanges([3, 0, 5, 2], 4, layout), SampleRanges([10], 4, layout)
        assert grouped.num_shards == counted.num_shards == 3
        assert [grouped.shard_range(i) for i in range(3)] == [counted.shard_range(i) for i in range(3)]
    assert SampleRanges([3, 0, 5, 2], 4).locate(3) == (2, 0)  # the empty group holds no id


def test_the_dry_run_of_opened_images_describes_annotate_with_any_config(tmp_path):
    """``dry_run(ImageInput, ...)`` describes what ``annotate`` would do, also with a config that has no annotate
    settings yet (the kind of a run over opened images is annotate; ``RunKind.settled`` gives its config)."""
    write_image_folder(tmp_path / "images")
    settings = {"model": "tiny", "resolution": 64}
    image_input = annotate_input(tmp_path / "images", annotate_config(settings, tmp_path / "out"), ["dog"])
    text = dry_run(image_input, tmp_path / "out", settings)
    assert text.startswith(f"input: {image_input.source} (")
    assert "classes: dog)" in text.splitlines()[0]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
