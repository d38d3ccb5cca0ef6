"""``seediff report OUT -o report.html``: one self-contained HTML page for checking a dataset by eye: per-class
counts and failure reasons, per-class distributions of mask area, SeeDiff seeds, ignore fraction and mask confidence
(matplotlib), the weakest and strongest samples of each class as overlay thumbnails, and the run's settings. Images
and plots are inlined as data URIs; the page loads nothing from the network and runs no script.

Per-sample quality numbers come from the shard parquets when they hold them (``class_ids`` with
``class_pixel_fractions`` / ``class_scores`` / ``class_seeds``, and ``ignore_fraction``); otherwise from each
sample's metadata and label map in the tars (mask area and ignore fraction measured on ``mask.png``, seeds and
confidence from the ``mask_stat_*`` fields)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from seediff.pipeline import fonts
from seediff.pipeline.readers import MASK_FIELD, raw_samples, shard_urls
from seediff.pipeline.review import IGNORE, _read_parquets, inspect_dataset, read_run, render_overlay
from seediff.pipeline.summary import human_bytes
from seediff.schemas.config import flatten_settings
from seediff.schemas.records import SUCCESS, decode_mask, failure_reason
from seediff.storage import output_fs

THUMBNAILS = 4  # weakest and strongest samples shown per class
THUMBNAIL_PX = 160
METRICS = {  # quality number -> its plot's axis label
    "area": "mask area (fraction of the image labelled with the class)",
    "seeds": "SeeDiff seeds (coarse cells above Otsu)",
    "ignore": "ignore fraction (pixels labelled 255)",
    "confidence": "mask confidence (mean soft score inside minus outside)",
}


@dataclass(frozen=True)
class Quality:
    """One class in one sample. ``None`` where the output does not record the number."""

    key: str
    shard: int
    class_id: int
    class_name: str
    area: float | None
    seeds: float | None
    ignore: float | None
    confidence: float | None

    def rank(self) -> float:
        """Weak to strong: the confidence when recorded, else the mask area."""
        value = self.confidence if self.confidence is not None else self.area
        return -math.inf if value is None else value


def write_report_page(out_url: str, path: str) -> dict[str, Any]:
    """Build the page for the output at ``out_url`` and write it to ``path`` (any fsspec URL). Returns what it
    covered: classes, samples, failures, bytes of the page."""
    info = inspect_dataset(out_url)
    _, config = read_run(out_url)
    names = {c["class_id"]: c["class_name"] for c in info["classes"]}  # every class, by the run's class table
    committed = [c for c in range(info["expected_shards"]) if c not in info["missing_shards"]]
    tables = list(_read_parquets(out_url, config, committed).values())
    failures = _failures_by_class(tables)
    quality = list(
        _quality_from_parquets(tables, names) if _has_quality_columns(tables) else _quality_from_tars(out_url)
    )
    by_class: dict[tuple[int, str], list[Quality]] = defaultdict(list)
    for q in quality:
        by_class[(q.class_id, q.class_name)].append(q)
    chosen = {cls: _weakest_and_strongest(rows) for cls, rows in by_class.items()}
    thumbnails = _thumbnails(out_url, [q for pair in chosen.values() for side in pair for q in side])
    page = _page(info, failures, by_class, chosen, thumbnails)
    fs, fs_path = output_fs(path)
    with fs.open(fs_path, "wb") as f:
        f.write(page.encode("utf-8"))
    return {"classes": len(info["classes"]), "samples": info["samples"], "failures": info["failures"],
            "bytes": len(page.encode("utf-8"))}


# ---- reading ------------------------------------------------------------------------------------------------------


def _failures_by_class(tables: list[pa.Table]) -> dict[int, Counter]:
    """class id -> failure reason -> count, over every class a failed sample was to label."""
    failures: dict[int, Counter] = defaultdict(Counter)
    for table in tables:
        columns = [c for c in ("class_id", "class_ids", "status", "error") if c in table.column_names]
        for row in table.select(columns).to_pylist():
            if row["status"] != SUCCESS:
                for class_id in row.get("class_ids") or [row["class_id"]]:
                    failures[class_id][failure_reason(row["error"] or "")] += 1
    return failures


def _has_quality_columns(tables: list[pa.Table]) -> bool:
    return bool(tables) and all("class_pixel_fractions" in t.column_names for t in tables)


def _quality_from_parquets(tables: list[pa.Table], names: dict[int, str]) -> Iterator[Quality]:
    """Every class of every successful sample, named by ``names`` (class id -> name)."""
    for table in tables:
        for row in table.to_pylist():
            if row["status"] != SUCCESS:
                continue
            for i, class_id in enumerate(row.get("class_ids") or [row["class_id"]]):
                yield Quality(
                    row["key"], row["shard"], class_id, names.get(class_id, f"class {class_id}"),
                    _at(row.get("class_pixel_fractions"), i), _at(row.get("class_seeds"), i),
                    row.get("ignore_fraction"), _at(row.get("class_scores"), i),
                )


def _at(values: list[Any] | None, i: int) -> Any:
    return values[i] if values is not None and i < len(values) else None


def _quality_from_tars(out_url: str) -> Iterator[Quality]:
    for sample in raw_samples(out_url):
        meta = json.loads(sample["json"])
        labels = decode_mask(sample[MASK_FIELD])
        ignore = float(np.mean(labels == IGNORE))
        per_class = meta.get("classes") or [{"class_id": meta["class_id"], "class_name": meta["class_name"]}]
        for c in per_class:
            yield Quality(
                meta["key"], _shard_id(sample["__url__"]), c["class_id"], c["class_name"],
                float(np.mean(labels == c["class_id"])),
                c.get("num_seeds", meta.get("mask_stat_num_seeds")),
                ignore,
                c.get("score", meta.get("mask_stat_soft_contrast")),
            )


def _shard_id(url: str) -> int:
    """``.../seediff-000012.tar`` -> 12."""
    return int(url.rsplit("-", 1)[-1].split(".")[0])


def _weakest_and_strongest(rows: list[Quality]) -> tuple[list[Quality], list[Quality]]:
    ranked = sorted(rows, key=lambda q: (q.rank(), q.key))
    half = min(THUMBNAILS, (len(ranked) + 1) // 2)  # a small class splits its samples between the two ends
    return ranked[:half], ranked[half:][::-1][:THUMBNAILS]


def _thumbnails(out_url: str, samples: list[Quality]) -> dict[str, str]:
    """key -> PNG data URI of the sample's overlay, reading only the shards that hold them."""
    keys, shards = {q.key for q in samples}, {q.shard for q in samples}
    found: dict[str, str] = {}
    if not keys:
        return found
    for sample in raw_samples([url for url in shard_urls(out_url) if _shard_id(url) in shards]):
        if sample["__key__"] in keys:
            found[sample["__key__"]] = _data_uri(render_overlay(sample, THUMBNAIL_PX), "JPEG")
            if len(found) == len(keys):
                break
    return found


# ---- drawing ------------------------------------------------------------------------------------------------------


def _data_uri(image: Any, kind: str) -> str:
    """A PIL image as an inline data URI (JPEG for photos keeps a page of many thumbnails small)."""
    buffer = io.BytesIO()
    image.save(buffer, format=kind, quality=85)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot(metric: str, by_class: dict[tuple[int, str], list[Quality]]) -> str | None:
    """Horizontal box plots of one quality number, one row per class; None when no class records it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    series = [(name, [v for q in rows if (v := getattr(q, metric)) is not None])
              for (_, name), rows in sorted(by_class.items())]
    series = [(name, values) for name, values in series if values]
    if not series:
        return None
    with plt.rc_context({"font.family": fonts.matplotlib_families(), "font.size": 9}):
        fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * len(series)), dpi=100)
        ax.boxplot([v for _, v in series], orientation="horizontal", showmeans=True)
        ax.set_yticks(range(1, len(series) + 1), [name for name, _ in series])
        ax.set_xlabel(METRICS[metric])
        ax.invert_yaxis()
        fig.tight_layout()
        fig.canvas.draw()
        image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
        plt.close(fig)
    return _data_uri(image, "PNG")


def _page(info: dict[str, Any], failures: dict[str, Counter], by_class: dict[tuple[int, str], list[Quality]],
          chosen: dict[tuple[int, str], tuple[list[Quality], list[Quality]]], thumbnails: dict[str, str]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>seediff report: {e(info['out_url'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>seediff report</h1><p class=sub>{e(info['out_url'])}</p>",
        "<section><h2>Overview</h2><table>",
        _row("model", info["model"] + (f" @ {info['revision']}" if info["revision"] else "")),
        _row("samples", f"{info['samples']} written, {info['failures']} failed, {info['attempted']} attempted of "
                        f"{info['planned_samples']} planned"),
        _row("shards", f"{info['shards']} of {info['expected_shards']} committed"),
        _row("bytes", f"{human_bytes(info['bytes']['total'])} (tar {human_bytes(info['bytes']['tar'])}, parquet "
                      f"{human_bytes(info['bytes']['parquet'])})"),
        _row("failures", ", ".join(f"{k}: {v}" for k, v in info["failures_by_reason"].items()) or "none"),
        "</table></section>",
        "<section><h2>Classes</h2><table><tr><th>id</th><th>class</th><th>samples</th><th>mean pixel fraction</th>"
        "<th>failed</th>"
        "<th>failure reasons</th></tr>",
    ]
    for c in info["classes"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(failures.get(c["class_id"], {}).items())) or "-"
        fraction = "-" if c["pixel_fraction"] is None else f"{c['pixel_fraction']:.3f}"
        parts.append(f"<tr><td>{c['class_id']}</td><td class=name>{e(c['class_name'])}</td><td>{c['samples']}</td>"
                     f"<td>{fraction}</td><td>{c['failures']}</td><td>{e(reasons)}</td></tr>")
    parts.append("</table></section><section><h2>Distributions per class</h2>")
    for metric, label in METRICS.items():
        uri = _plot(metric, by_class)
        parts.append(f'<figure><img alt="{e(label)}" src="{uri}"><figcaption>{e(label)}</figcaption></figure>'
                     if uri else f"<p>{e(label)}: not recorded in this output</p>")
    parts.append("</section><section><h2>Weakest and strongest samples per class</h2>"
                 "<p>Ranked by mask confidence (by mask area where confidence is not recorded).</p>")
    for (class_id, name), (weakest, strongest) in sorted(chosen.items()):
        parts.append(f"<h3>{e(name)} <span class=sub>(class {class_id})</span></h3><div class=strip>")
        for label, side in (("weakest", weakest), ("strongest", strongest)):
            for q in side:
                if q.key in thumbnails:
                    parts.append(f'<figure><img alt="{e(q.key)}" src="{thumbnails[q.key]}"><figcaption>{label} '
                                 f"{e(q.key)}<br>{_numbers(q)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</section><section><h2>Run settings</h2><table>")
    parts.append(_row("input", info["input_summary"]))
    for key, value in sorted(flatten_settings(info["settings"]).items()):
        parts.append(_row(key, value))
    parts.append("</table></section></body></html>")
    return "\n".join(parts)


def _row(key: str, value: Any) -> str:
    return f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"


def _numbers(q: Quality) -> str:
    shown = [(name, getattr(q, name)) for name in ("confidence", "area", "seeds") if getattr(q, name) is not None]
    return html.escape(", ".join(f"{name} {value:.3g}" for name, value in shown))


STYLE = """
body { font-family: "DejaVu Sans", "Noto Sans", "Noto Sans CJK JP", sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0 } .sub { color: #666; font-weight: normal }
table { border-collapse: collapse; margin: 0.5em 0 } th, td { border: 1px solid #ccc; padding: 3px 8px;
text-align: left } figure { display: inline-block; margin: 4px; vertical-align: top }
figcaption { font-size: 12px; color: #444 } .strip { display: flex; flex-wrap: wrap }
"""
