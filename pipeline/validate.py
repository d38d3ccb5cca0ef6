"""The one validation step of a run (diffusers' ``check_inputs``, img2dataset's ``arguments_validator``): every rule
that ties settings to each other or to the run's input, checked together for ``generate``, ``resume``, ``annotate``
and ``eval`` before any model loads or Ray starts. A rule about one field alone lives on its settings model
(``schemas/config.py``); the model's family, size and layers are ``workers/families.resolve``'s; a manifest's own
templates are checked as it loads. Every problem found is reported at once, each naming the flags and config keys
involved; the command line exits 2 (``ConfigError``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from seediff.pipeline.flags import flag_name
from seediff.pipeline.kinds import RunKind, kind_of
from seediff.schemas.config import ConfigError, RunConfig, RuntimeOptions
from seediff.schemas.prompts import class_template
from seediff.tokens import context_check

if TYPE_CHECKING:
    from seediff.pipeline.sources import ImageInput
    from seediff.schemas.manifest import Manifest

# Settings whose flag is not generated from their field (pipeline/cli.py adds it itself).
OWN_FLAGS = {"annotate.timesteps": "--timestep"}


def check_run(config: RunConfig, runtime: RuntimeOptions | None = None, source: Any = None) -> None:
    """Raise ``ConfigError`` listing every cross-field problem of a run: ``config`` as resolved against the model,
    ``runtime`` when known, and the run's input (``source``: the manifest or annotate's ``ImageInput``) when
    known."""
    kind = kind_of(config)
    problems = [*_capture_window(config, kind), *_ignore_band(config)]
    if runtime is not None:
        problems += _actor_bounds(runtime)
    if source is not None:
        problems += kind.input_problems(config, source)
    if problems:
        raise ConfigError("\n".join(problems))


def named(field: str) -> str:
    """A setting as the user may have written it: ``--mask-ignore-band (mask.ignore_band)``."""
    model: type[BaseModel] = RunConfig if field.split(".")[0] in RunConfig.model_fields else RuntimeOptions
    *parents, leaf = field.split(".")
    for parent in parents:
        model = _nested_model(model.model_fields[parent].annotation)
    flag = OWN_FLAGS.get(field) or flag_name(field, model.model_fields[leaf])
    return f"{flag} ({field})" if flag else field


def _nested_model(annotation: object) -> type[BaseModel]:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    raise AssertionError(f"not a settings model: {annotation!r}")


def _capture_window(config: RunConfig, kind: RunKind) -> list[str]:
    """The capture window names backbone calls the run makes: one per denoising step, or one per annotate
    timestep."""
    window = config.mask.capture_steps
    if window is None:
        return []
    calls, (setting, counted) = kind.backbone_calls(config)
    if window[1] <= calls:
        return []
    return [f"{named('mask.capture_steps')} {window[0]} {window[1]}: the window [start, stop) of UNet calls to "
            f"average must lie within the {calls} calls {named(setting)} {counted}"]


def _ignore_band(config: RunConfig) -> list[str]:
    """Background is what scores below threshold - ignore_band: a band as wide as the threshold leaves none."""
    mask = config.mask
    threshold = "mask.pamr_output_threshold" if mask.refine == "pamr" else "mask.threshold"
    level = mask.pamr_output_threshold if mask.refine == "pamr" else mask.threshold
    if mask.ignore_band < level:
        return []
    return [f"{named('mask.ignore_band')} {mask.ignore_band:g} is not below {named(threshold)} {level:g} "
            f"(with {named('mask.refine')} {mask.refine}): no pixel could be background"]


def _actor_bounds(runtime: RuntimeOptions) -> list[str]:
    caps = [(name, value) for name, value in (("num_actors", runtime.num_actors), ("max_actors", runtime.max_actors))
            if value is not None]
    return [f"{named('min_actors')} {runtime.min_actors} is above {named(name)} {value}"
            for name, value in caps if runtime.min_actors > value]


def negative_prompt_problems(config: RunConfig, manifest: Manifest) -> list[str]:
    """A negative prompt acts only through classifier-free guidance: a family that runs none (Flux.1, guidance-
    distilled) or a guidance scale of 1 or less would generate as if it were not there."""
    from seediff.workers.families import family  # the family table: config files only, no torch

    if config.family is None:
        return []
    runs_cfg = family(config.family).cfg
    if runs_cfg and config.guidance_scale > 1:
        return []
    row = next((r for r in manifest.rows if r.negative_prompt), None)
    if config.negative_prompt:
        given = named("negative_prompt")
    elif row is not None:
        given = f"{manifest.source} line {row.line}: negative_prompt"
    else:
        return []
    why = (f"the {config.family} family runs no classifier-free guidance" if not runs_cfg else
           f"{named('guidance_scale')} {config.guidance_scale:g} runs no classifier-free guidance (it needs > 1)")
    return [f"{given}: {why}, so the negative prompt would be ignored"]


def listing_problems(config: RunConfig, image_input: ImageInput) -> list[str]:
    """Where every image of a group shares one prompt listing its classes (the ``--classes`` vocabulary for every
    image, or each file's own classes, as ``eval`` gives them), that prompt must place every class phrase within
    the text encoder's context: otherwise every sample of the group would fail alike."""
    from seediff.pipeline.sources import listing  # the prompt annotate builds, exactly
    from seediff.schemas.manifest import LabelledClass
    from seediff.tokens import PhrasePositionError

    settings = config.annotate
    if settings.caption_field or settings.classes_field and not image_input.class_table:
        return []  # captions are checked as the input is read; listed names differ per sample
    groups = {u.classes or image_input.class_names for u in image_input.units}
    if settings.classes_field:  # indexes into the table: at most every class of it
        groups = {image_input.class_names}
    template, check = class_template(config.prompt_template), context_check(config, exact=False)
    for names in sorted(groups, key=len, reverse=True):
        try:
            check(listing(template, [LabelledClass(n, i + 1) for i, n in enumerate(names)]))
        except PhrasePositionError as e:
            flags = "--classes-field with --classes" if settings.classes_field else "--classes"
            return [f"{flags} with {named('prompt_template')}: the prompt listing {len(names)} classes does not fit "
                    f"the text encoder's context: {e}"]
    return []
