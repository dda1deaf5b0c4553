"""A reference for every JSON output of ``calq``: JSON Schema from the pydantic models, and its docs page.

``calq schema summary|job|evaluation|calibration`` prints the JSON Schema of an output
(``model_json_schema()``); ``calq schema all --markdown`` writes
``docs/json-outputs.md``, one table per output listing every field path with
its type and its description (meaning and unit), taken from the models'
``Field(description=...)``. ``tests/test_newcomer.py`` keeps the page equal
to what this module generates, and checks that the evaluation model accepts a
record :class:`producer.evaluate.Evaluation` builds and refuses any key it
does not declare.

The summary and the job record are the contract's own models
(:class:`~shared.contract.summary.CalibrationSummary`,
:class:`~shared.contract.job.JobStatus`), a calibrated forecast is
:class:`~shared.fit.apply.CalibratedProbability`. ``calq evaluate --json`` prints
plain dicts (:mod:`producer.evaluate`, :mod:`shared.stats.oos`); the models
below describe them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from shared.contract.job import JobStatus
from shared.contract.summary import CalibrationSummary, ForecastScores
from shared.fit.apply import CalibratedProbability


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Interval(_Output):
    """A per-row improvement (raw − calibrated) and its 90 % bootstrap interval over races."""

    mean: float | None = Field(description="raw minus calibrated score per row (positive: calibration helped)")
    low: float | None = Field(description="lower end of the 90% interval (bootstrap over races)")
    high: float | None = Field(description="upper end of the 90% interval")


def _nullable(model: type[BaseModel], name: str, doc: str) -> type[BaseModel]:
    """An output model with ``model``'s fields and descriptions, a float field also null (a score over nothing)."""
    fields = {
        key: (field.annotation | None if field.annotation is float else field.annotation, Field(description=field.description))
        for key, field in model.model_fields.items()
    }
    return create_model(name, __base__=_Output, __doc__=doc, **fields)


Scores = _nullable(
    ForecastScores, "Scores",
    "Scores of one set of probabilities against the outcomes: the summary's ForecastScores, each score also null "
    "(an archetype × event with no scored row has no score).",
)


class Comparison(_Output):
    """Raw against calibrated on a set of out-of-sample rows."""

    races: int = Field(description="races scored")
    rows: int = Field(description="race × driver rows scored")
    raw: Scores = Field(description="scores of the raw forecast probabilities p")
    calibrated: Scores = Field(description="scores of the calibrated probabilities q (posterior mean)")
    log_loss_improvement: Interval = Field(description="log loss, raw − calibrated, per row, in nats")
    brier_improvement: Interval = Field(description="Brier score, raw − calibrated, per row")


class Band(_Output):
    """How wide the calibrated probabilities' credible band was."""

    level: float = Field(description="the band's credibility, 0.94")
    mean_width: float | None = Field(description="mean width of the band over the rows, in probability")


class _Race(_Output):
    race: str = Field(description="the race id")
    date: str = Field(description="the race date, YYYY-MM-DD")
    track: str = Field(description="the race's track")


class UnscoredRace(_Race):
    """A race of the range that no earlier converged fit could score."""

    reason: str = Field(description="why it was not scored")


class RaceScores(_Race):
    """One scored race: its rows and score sums, and the fit that scored it."""

    job_id: str = Field(description="the fit (job) that scored it: the newest converged one on earlier races")
    rows: int = Field(description="driver rows scored in the race")
    raw_log_loss: float = Field(description="sum of the raw log losses over its rows, in nats")
    cal_log_loss: float = Field(description="sum of the calibrated log losses over its rows, in nats")
    raw_brier: float = Field(description="sum of the raw squared errors over its rows")
    cal_brier: float = Field(description="sum of the calibrated squared errors over its rows")


class EvaluationRecord(Comparison):
    """One archetype × event of ``calq evaluate --json`` (the output is a list of these)."""

    archetype: str = Field(description="the archetype")
    event: str = Field(description="the event, e.g. top_5")
    tracks: dict[str, Comparison] = Field(description="track → the same comparison on that track's rows")
    unscored_races: int = Field(description="races of the range left unscored")
    unscored: list[UnscoredRace] = Field(description="each unscored race, with why")
    band: Band = Field(description="the calibrated band's level and mean width")
    per_race: list[RaceScores] = Field(description="each scored race, in date order")


#: Each JSON output: its model, and the commands that print it.
OUTPUTS: dict[str, tuple[Any, str]] = {
    "summary": (CalibrationSummary, "calq calibrate, wait, result, latest, demo --json (a list for several jobs)"),
    "job": (JobStatus, "calq status --json; each of calq jobs --json's jobs"),
    "evaluation": (list[EvaluationRecord], "calq evaluate --json: one record per archetype × event"),
    "calibration": (list[CalibratedProbability], "calq apply --json: one item per forecast p (client.calibrate returns the same)"),
}


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of output ``name`` (one of :data:`OUTPUTS`), as its serialised JSON."""
    model, _ = OUTPUTS[name]
    return TypeAdapter(model).json_schema(mode="serialization")


def fields(schema: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every field of a JSON Schema as ``(path, type, description)``, depth first.

    Paths read as in the JSON: ``diagnostics.max_rhat``, ``attempts[].seed``,
    ``tracks.*.rows`` (``*``: any key), ``[]`` for a top-level list.
    """
    defs = schema.get("$defs", {})
    out: list[tuple[str, str, str]] = []

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        return node

    def walk(node: dict[str, Any], path: str, trail: tuple[str, ...]) -> None:
        for option in node.get("anyOf", []) + node.get("allOf", []):
            walk(option, path, trail)
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name not in trail:
                walk(resolve(node), path, (*trail, name))
            return
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]", trail)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*" if path else "*", trail)
        for key, sub in node.get("properties", {}).items():
            child = f"{path}.{key}" if path else key
            out.append((child, _type(sub, resolve), sub.get("description") or resolve(sub).get("description", "")))
            walk(sub, child, trail)

    walk(schema, "", ())
    return out


def _type(node: dict[str, Any], resolve) -> str:
    if "anyOf" in node:
        return " or ".join(dict.fromkeys(_type(option, resolve) for option in node["anyOf"]))
    if "$ref" in node:
        return "object"
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type(node.get('items', {}), resolve)}"
    if "enum" in node:
        return "one of " + ", ".join(str(v) for v in node["enum"])
    fmt = node.get("format")
    return f"{kind} ({fmt})" if fmt else kind


def markdown() -> str:
    """``docs/json-outputs.md``: each output's fields with type and meaning (generated: do not edit by hand)."""
    lines = [
        "# JSON outputs",
        "",
        "Every `--json` output of `calq`, field by field. Generated from the pydantic models by",
        "`calq schema all --markdown > docs/json-outputs.md` (a test keeps this page and the models in step);",
        "`calq schema summary|job|evaluation|calibration` prints the JSON Schema itself. A path `a.b` is field `b` of",
        "object `a`; `a[]` an item of list `a`; `a.*` any key of mapping `a`. Times are UTC; a",
        "non-finite number (an R-hat of a stuck chain) is the string `inf` or `NaN`.",
    ]
    for name, (_, where) in OUTPUTS.items():
        lines += ["", f"## {name}", "", f"Printed by {where}.", "", "| field | type | meaning |", "| --- | --- | --- |"]
        for path, kind, description in fields(json_schema(name)):
            lines.append(f"| `{path}` | {kind} | {description.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


__all__ = ["OUTPUTS", "EvaluationRecord", "fields", "json_schema", "markdown"]
