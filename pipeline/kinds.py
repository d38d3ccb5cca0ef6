"""The two kinds of run, and the one place a run's kind is decided (``kind_of``): ``generate`` samples images from a
manifest's prompts; ``annotate`` labels an input's own images (``eval`` is an annotate run). A run is an annotate run
exactly when its config carries annotate settings: ``Annotate.settled`` sets them (``api.annotate_config``) and
run.json records them, so a command and a later resume, verify or inspect of its output agree; before its config is
settled, a run's input says its kind (``kind_of_input``).

Everything the driver does differently for the two kinds is a member of the kind's ``RunKind`` here: what run.json
records of the input and how it is read back, the plan, the dry run's description of the input, the backbone calls a
capture window counts, the rules that tie the settings to the input, the fields every stored sample holds, what
``inspect`` shows of the input. The actors choose how a batch gets its images by the plan's ``kind``
(workers/actor.py); nothing else branches on the kind."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from seediff.pipeline.plan import Plan
from seediff.pipeline.sources import AnnotatePlan, ImageInput, annotate_input
from seediff.schemas.config import AnnotateConfig, ConfigError, RunConfig
from seediff.schemas.manifest import Manifest, load_manifest
from seediff.schemas.records import ANNOTATION_FIELD, MASK_FIELD
from seediff.tokens import context_check

MANIFEST_FIELD = "manifest_sha256"  # run.json: the manifest's bytes (generate)
CLASSES_FIELD = "classes_sha256"  # run.json: the resolved class rows (generate)
INPUT_FIELD = "input_sha256"  # run.json: the annotate input's units and classes
CLASS_NAMES_FIELD = "class_names"  # run.json: class id (a string, as JSON keys are) -> name, for the QA tools


class RunKind:
    """What differs between the kinds on the driver. ``name`` is the plan's ``kind`` the actors choose by;
    ``fingerprints``: the run.json fields of the input a resume must match; ``required_fields``: the tar fields every
    stored sample holds besides its image (one of ``IMAGE_FIELDS``, for both kinds); ``input_fields``: what ``inspect`` shows of the
    input, from run.json."""

    name: str
    fingerprints: tuple[str, ...]
    required_fields: tuple[str, ...]
    input_fields: tuple[str, ...]

    def settled(self, config: RunConfig) -> RunConfig:
        """``config`` as a run of this kind takes it."""
        raise NotImplementedError

    def plan(self, source: Any, config: RunConfig) -> Any:
        raise NotImplementedError

    def source_record(self, source: Any) -> dict[str, Any]:
        """What identifies the run's input in run.json."""
        raise NotImplementedError

    def recorded_source(self, record: dict[str, Any], config: RunConfig, where: str) -> Any:
        """The input recorded in run.json (``where`` names it in errors)."""
        raise NotImplementedError

    def describe(self, source: Any) -> str:
        """The dry run's line about the input."""
        raise NotImplementedError

    def backbone_calls(self, config: RunConfig) -> tuple[int, tuple[str, str]]:
        """How many backbone calls a sample's attention is read from (``mask.capture_steps`` indexes them), and the
        setting that makes them with the words that say so ("steps", "2 makes")."""
        raise NotImplementedError

    def input_problems(self, config: RunConfig, source: Any) -> list[str]:
        """The cross-field rules between the settings and the input (``validate.check_run``)."""
        raise NotImplementedError

    def input_summary(self, fields: dict[str, Any]) -> str:
        """One line about the input from its ``input_fields`` in run.json, for ``inspect`` and ``report``."""
        raise NotImplementedError


class Generate(RunKind):
    name = "generate"
    fingerprints = (MANIFEST_FIELD, CLASSES_FIELD)
    required_fields = (MASK_FIELD, "cls", "txt", "json")
    input_fields = ("manifest_source", MANIFEST_FIELD, "num_classes")

    def settled(self, config: RunConfig) -> RunConfig:
        return config

    def plan(self, source: Manifest, config: RunConfig) -> Plan:
        return Plan(source.rows, config.seed, config.samples_per_shard, config.shard_layout)

    def source_record(self, source: Manifest) -> dict[str, Any]:
        return {
            MANIFEST_FIELD: source.sha256,
            "manifest_source": source.source,
            "samples_per_class": source.samples_per_class,
            "classes_source": source.classes_source,
            "prompts_source": source.prompts_source,
            "num_classes": len(source.classes),
            CLASS_NAMES_FIELD: {str(c.class_id): c.name for c in source.classes},
            "num_samples": source.num_samples,
            CLASSES_FIELD: classes_sha256(source),
        }

    def recorded_source(self, record: dict[str, Any], config: RunConfig, where: str) -> Manifest:
        if not record.get("manifest_source"):
            raise ConfigError(f"{where}: manifest_source: not recorded")
        return manifest_of(record["manifest_source"], config, record.get("samples_per_class"),
                           record.get("classes_source"), record.get("prompts_source"))

    def describe(self, source: Manifest) -> str:
        return (f"manifest: {source.source} ({len(source.rows)} rows, {len(source.classes)} classes, "
                f"sha256 {source.sha256[:12]})")

    def backbone_calls(self, config: RunConfig) -> tuple[int, tuple[str, str]]:
        return config.steps, ("steps", f"{config.steps} makes")

    def input_problems(self, config: RunConfig, source: Manifest) -> list[str]:
        # its templates were checked against the text encoder's context as it loaded (``manifest_of``)
        from seediff.pipeline.validate import negative_prompt_problems

        return negative_prompt_problems(config, source)

    def input_summary(self, fields: dict[str, Any]) -> str:
        return (f"manifest {fields['manifest_source']} ({fields['num_classes']} classes, sha256 "
                f"{(fields[MANIFEST_FIELD] or '')[:12]})")


class Annotate(RunKind):
    name = "annotate"
    fingerprints = (INPUT_FIELD,)
    required_fields = (MASK_FIELD, ANNOTATION_FIELD)  # beside the input's own fields, passed through
    input_fields = ("input_source", INPUT_FIELD, "classes")

    def settled(self, config: RunConfig) -> RunConfig:
        # contiguous output shards: each reads one run of its input, so every input tar is read once across them
        return config.model_copy(update={"annotate": config.annotate or AnnotateConfig(), "shard_layout": "contiguous"})

    def plan(self, source: ImageInput, config: RunConfig) -> AnnotatePlan:
        return AnnotatePlan(source, config)

    def source_record(self, source: ImageInput) -> dict[str, Any]:
        return {
            INPUT_FIELD: source.fingerprint(),
            "input_source": source.source,
            "num_samples": source.num_samples,
            "classes": list(source.class_names),
            "class_table": source.class_table,  # classes is the table a classes_field indexes: resume passes it back
            CLASS_NAMES_FIELD: {str(i): name for i, name in enumerate(source.class_names, start=1)},
        }

    def recorded_source(self, record: dict[str, Any], config: RunConfig, where: str) -> ImageInput:
        if not record.get("input_source"):
            raise ConfigError(f"{where}: input_source: not recorded")
        # the list given (alone, a caption run's first ids, or the table a classes_field indexes), else found again
        classes = None if config.annotate.classes_field and not record.get("class_table") else record.get("classes")
        return annotate_input(record["input_source"], config, classes)

    def describe(self, source: ImageInput) -> str:
        classes = ", ".join(source.class_names) or "from each sample"
        return f"input: {source.source} ({len(source.units)} files, {source.num_samples} images; classes: {classes})"

    def backbone_calls(self, config: RunConfig) -> tuple[int, tuple[str, str]]:
        return len(config.annotate.timesteps), ("annotate.timesteps", "gives")

    def input_problems(self, config: RunConfig, source: ImageInput) -> list[str]:
        from seediff.pipeline.validate import listing_problems  # the rule lives with the other cross-field rules

        return listing_problems(config, source)

    def input_summary(self, fields: dict[str, Any]) -> str:
        return f"images {fields['input_source']} ({len(fields['classes'] or ())} classes, annotated)"


GENERATE, ANNOTATE = Generate(), Annotate()


def kind_of(config: RunConfig) -> RunKind:
    """The run's kind, from its config (a recorded run's too): the one place it is decided."""
    return ANNOTATE if config.annotate is not None else GENERATE


def kind_of_input(source: Any) -> RunKind:
    """The kind of a run over ``source`` before its config is settled (``RunKind.settled``): annotate for opened
    images (an ``ImageInput``), generate for a manifest or its path."""
    return ANNOTATE if isinstance(source, ImageInput) else GENERATE


def manifest_of(url: str, config: RunConfig, samples_per_class: int | None, classes: str | None,
                prompts: str | None, check_tokens: bool = False) -> Manifest:
    """The manifest at ``url`` (its files' URLs absolute: run.json records them for resume), each distinct labelled
    template checked against the text encoder's context (``tokens.context_check``; ``check_tokens``: the dry run's
    exact check)."""
    return load_manifest(url, samples_per_class=samples_per_class, prompt_template=config.prompt_template,
                         classes=classes, prompts=prompts, check_prompt=context_check(config, exact=check_tokens))


def classes_sha256(manifest: Manifest) -> str:
    """Fingerprint of the resolved class rows. The manifest's bytes alone miss flags that change the plan
    (``--samples-per-class`` filling counts, the prompt template), which would silently shift sample ids."""
    rows = [
        [[[c.name, c.class_id] for c in r.classes], r.num_samples, [t.source for t in r.prompts], r.negative_prompt]
        for r in manifest.rows
    ]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()
