"""The one validation step (pipeline/validate.py): every cross-field rule, for generate, annotate, resume and eval,
exits 2 before any model loads or Ray starts, naming the flags and config keys, and writes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from seediff.pipeline.validate import check_run
from seediff.schemas.config import AnnotateConfig, ConfigError, MaskConfig, RunConfig, RuntimeOptions
from seediff.schemas.manifest import load_manifest
from tests.e2e_support import HANG_GUARD_S, REPO, cli_env

PROBE = """
import sys
from pathlib import Path
from seediff.pipeline.cli import main
from tests.annotate_support import write_image_folder
tmp = Path(sys.argv[1])
(tmp / "m.csv").write_text("class_name,num_samples\\ncat,2\\n")
write_image_folder(tmp / "images")
tiny = ["--model", "tiny", "--resolution", "64"]
names = ",".join(f"class{i:02d}" for i in range(12))  # one token per byte: the listing passes 77 tokens
runs = {
    "window": ["generate", str(tmp / "m.csv"), "--out", str(tmp / "o1"), *tiny, "--steps", "2",
               "--mask-capture-steps", "5", "6"],
    "listing": ["annotate", str(tmp / "images"), "--out", str(tmp / "o2"), *tiny, "--classes", names],
    "band": ["generate", str(tmp / "m.csv"), "--out", str(tmp / "o3"), *tiny, "--mask-refine", "none",
             "--mask-threshold", "0.25"],
    "window-annotate": ["annotate", str(tmp / "images"), "--out", str(tmp / "o4"), *tiny, "--classes", "dog",
                        "--timestep", "100", "--mask-capture-steps", "0", "2"],
    "window-annotate-dry-run": ["annotate", str(tmp / "images"), "--out", str(tmp / "o5"), *tiny, "--classes", "dog",
                                "--timestep", "100", "--mask-capture-steps", "0", "2", "--dry-run"],
}
for name, args in runs.items():
    print("RC", name, main(args))
print("LOADED", [m for m in ("seediff.workers.models", "diffusers") if m in sys.modules])
print("RAY STARTED", "ray" in sys.modules and sys.modules["ray"].is_initialized())
print("WRITTEN", sorted(p.name for p in tmp.iterdir()))
"""


def test_cross_field_errors_exit_2_before_ray_naming_the_flags(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    for name in ("window", "listing", "band", "window-annotate", "window-annotate-dry-run"):
        assert f"RC {name} 2" in done.stdout, done.stdout + done.stderr
    err = done.stderr
    assert "--mask-capture-steps (mask.capture_steps) 5 6: the window [start, stop) of UNet calls to average must " \
           "lie within the 2 calls --steps (steps) 2 makes" in err
    assert "--classes with --prompt-template (prompt_template): the prompt listing 12 classes does not fit" in err
    assert "--mask-ignore-band (mask.ignore_band) 0.3 is not below --mask-threshold (mask.threshold) 0.25" in err
    assert err.count("within the 1 calls --timestep (annotate.timesteps) gives") == 2  # the run and its dry run
    assert "Traceback" not in err
    assert "LOADED []" in done.stdout and "RAY STARTED False" in done.stdout  # no model code, no Ray
    assert "WRITTEN ['images', 'm.csv']" in done.stdout  # nothing written


def test_every_problem_is_reported_at_once():
    config = RunConfig(steps=2, mask=MaskConfig(capture_steps=(1, 3), refine="pamr", pamr_output_threshold=0.3))
    with pytest.raises(ConfigError) as error:
        check_run(config, RuntimeOptions(min_actors=4, max_actors=2))
    lines = str(error.value).splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("--mask-ignore-band (mask.ignore_band) 0.3 is not below --mask-pamr-output-threshold "
                               "(mask.pamr_output_threshold) 0.3")
    assert lines[2] == "--min-actors (min_actors) 4 is above --max-actors (max_actors) 2"
    check_run(RunConfig(steps=3, mask=MaskConfig(capture_steps=(1, 3))), RuntimeOptions(min_actors=2))  # fine
    annotate = RunConfig(annotate=AnnotateConfig(timesteps=(100, 300)), mask=MaskConfig(capture_steps=(0, 2)))
    check_run(annotate)  # two timesteps, two UNet calls


def test_prompt_template_takes_the_manifest_syntax():
    assert RunConfig(prompt_template="a [photo|painting] of a {puppy:class_name}").prompt_template
    with pytest.raises(ValueError, match=r"must contain \{class_name\} \(or \{phrase:class_name\}\)"):
        RunConfig(prompt_template="a photo of a dog")
    with pytest.raises(ValueError, match="column"):
        RunConfig(prompt_template="a [photo of a {class_name}")


def test_a_negative_prompt_the_model_would_ignore_is_refused(tmp_path):
    """Flux.1 runs no classifier-free guidance and a guidance scale of 1 or less switches it off: a negative prompt
    given then would generate as if absent. The config's names its flag; a manifest row's names its file and line."""
    path = tmp_path / "m.csv"
    path.write_text("class_name,num_samples,negative_prompt\ncat,2,\ndog,2,blurry\n")
    manifest = load_manifest(str(path))
    with pytest.raises(ConfigError, match=r"m\.csv line 3: negative_prompt: the flux family runs no classifier-free"):
        check_run(RunConfig(family="flux", guidance_scale=3.5), None, manifest)
    with pytest.raises(ConfigError, match=r"--negative-prompt \(negative_prompt\): --guidance-scale \(guidance_scale\) "
                                          r"1 runs no classifier-free guidance \(it needs > 1\)"):
        check_run(RunConfig(family="sd1", guidance_scale=1, negative_prompt="blurry"), None, manifest)
    check_run(RunConfig(family="sd1", negative_prompt="blurry"), None, manifest)  # guided: it acts
    (tmp_path / "plain.csv").write_text("class_name,num_samples\ncat,2\n")
    check_run(RunConfig(family="flux", guidance_scale=3.5), None, load_manifest(str(tmp_path / "plain.csv")))
