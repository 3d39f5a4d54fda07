"""The report's Diagnosis section: the training doctor's findings (rule, layer, step, figure, remedy) and its
per-layer figures against the step, from the train record's diagnosis.json (core/training/diagnostics.py)."""

from __future__ import annotations

from typing import Any

from trainflow.core.records import TrainResult
from trainflow.core.report.blocks import Image, Section, Sources, Table, Text, facts, fmt
from trainflow.core.report.plots import layer_figures_png

PANELS = [
    ("grad_norm", "gradient norm (after clipping)"),
    ("update_ratio", "update / weight norm"),
    ("out_std", "output std"),
    ("act_zero_share", "share of its activations near zero (next layer's input)"),
]


def diagnosis_section(summary: dict[str, Any], sources: Sources) -> Section:
    """Findings and per-layer plots of the train stage's record; a line when training did not run here or the
    doctor was off."""
    section = Section("Diagnosis")
    info = summary["stages"].get("train")
    if info is None:
        why = summary["skipped"].get("train", "this flow run ended before train")
        return section.add(Text(f"No training in this run ({why})."))
    r = TrainResult.model_validate({k: v for k, v in info.items() if k not in ("seconds", "cached")})
    if r.diagnosis_uri is None:
        return section.add(Text("The training doctor was off (train.diagnostics.enabled: false)."))
    if r.findings:
        rows = [[f.rule, f.layer or "", str(f.step), fmt(f.figure) if f.figure is not None else "not finite",
                 fmt(f.threshold), f.message, f.remedy] for f in r.findings]  # fmt: skip
        section.add(Text(f"{len(r.findings)} finding(s), each once per rule and layer: the step first seen, the worst "
                         "figure."),
                    Table(["rule", "layer", "step", "figure", "threshold", "finding", "remedy"], rows))  # fmt: skip
    else:
        section.add(Text("No findings: no rule fired over the training (docs/doctor.md lists them)."))
    data = sources.json(r.diagnosis_uri, "diagnosis.json", section)
    if not isinstance(data, dict):
        return section
    measurements = data.get("measurements") or []
    settings = data.get("settings") or {}
    section.add(facts({"measured steps": len(measurements), "every_steps": settings.get("every_steps"),
                       "on_finding": settings.get("on_finding"), "diagnosis.json": r.diagnosis_uri}))  # fmt: skip
    series = _series(measurements)
    if series:
        png = sources.kept("diagnosis_layers.png", r.model_dump(mode="json"), lambda: layer_figures_png(series, PANELS))
        if png is not None:
            section.add(Image("diagnosis_layers", png, "Doctor: per-layer figures at the measured steps"))
    return section


def _series(measurements: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """figure -> layer -> (step, value) pairs, layers in the order first measured, non-finite values left out."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for m in measurements:
        for layer, figures in (m.get("layers") or {}).items():
            for key, value in figures.items():
                if isinstance(value, int | float):
                    out.setdefault(key, {}).setdefault(layer, []).append((int(m["step"]), float(value)))
    return out
