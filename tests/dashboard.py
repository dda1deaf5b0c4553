"""Render the calq dashboard's panels from two real /metrics scrapes, without Prometheus or Grafana.

A small evaluator for the PromQL the dashboard uses, and only that: selectors
with ``{label="value"}`` matchers, ``rate``/``increase``/``deriv`` over a range
(taken as the change between the two scrapes, so counters must not reset
between them), ``sum``/``max``/``min``/``count`` with ``by (...)``,
``histogram_quantile`` (Prometheus's interpolation within a bucket), and
``*``/``/`` with a number or between two vectors with the same labels. An
expression outside that subset raises ``ValueError``: the dashboard test
then says which query it could not render.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

Labels = tuple[tuple[str, str], ...]
Samples = Mapping[tuple[str, Labels], float]
Vector = dict[Labels, float]

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "calq.json"
_TOKEN = re.compile(r'\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_:][\w:]*)|(\{[^}]*\})|(\[[^\]]*\])|(.))')
_AGGREGATES = {"sum": sum, "max": max, "min": min, "count": len}
_RANGE = {"rate", "increase", "deriv"}


class Scrapes:
    """Two scrapes ``seconds`` apart: instant selectors read the second, range functions the change."""

    def __init__(self, first: Samples, second: Samples, seconds: float) -> None:
        self.first, self.second, self.seconds = first, second, seconds


def _tokens(expr: str) -> list[str]:
    out = []
    for match in _TOKEN.finditer(expr):
        token = next(g for g in match.groups() if g is not None)
        if token.strip():
            out.append(token)
    return out


class _Parser:
    def __init__(self, expr: str, scrapes: Scrapes) -> None:
        self.tokens, self.at, self.s, self.expr = _tokens(expr), 0, scrapes, expr

    def fail(self, why: str) -> ValueError:
        return ValueError(f"cannot render {self.expr!r}: {why}")

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise self.fail(f"expected {expected or 'more'} at {token!r}")
        self.at += 1
        return token

    def parse(self) -> Vector | float:
        value = self.binary()
        if self.peek() is not None:
            raise self.fail(f"unexpected {self.peek()!r}")
        return value

    def binary(self) -> Vector | float:
        left = self.term()
        while self.peek() in ("*", "/"):
            op, right = self.take(), self.term()
            left = _combine(left, right, op)
        return left

    def labels(self) -> list[str]:
        self.take("(")
        names = []
        while self.peek() != ")":
            name = self.take()
            if name != ",":
                names.append(name)
        self.take(")")
        return names

    def term(self) -> Vector | float:
        token = self.take()
        if re.fullmatch(r"\d+(?:\.\d+)?", token):
            return float(token)
        if token == "(":
            value = self.binary()
            self.take(")")
            return value
        if token in _AGGREGATES:
            by = self.labels() if self.peek() == "by" and self.take() else None
            self.take("(")
            inner = self.binary()
            self.take(")")
            if by is None and self.peek() == "by":
                self.take()
                by = self.labels()
            return _aggregate(token, _vector(inner, self), by or [])
        if token == "histogram_quantile":
            self.take("(")
            q = self.binary()
            self.take(",")
            inner = _vector(self.binary(), self)
            self.take(")")
            return _quantile(float(q), inner)
        if token in _RANGE:
            self.take("(")
            name, matchers = self.selector(self.take())
            if not (self.peek() or "").startswith("["):
                raise self.fail(f"{token} needs a range")
            self.take()
            self.take(")")
            first = _select(self.s.first, name, matchers)
            change = {ls: v - first.get(ls, 0.0) for ls, v in _select(self.s.second, name, matchers).items()}
            return change if token == "increase" else {ls: v / self.s.seconds for ls, v in change.items()}
        if re.fullmatch(r"[A-Za-z_:][\w:]*", token):
            name, matchers = self.selector(token)
            return _select(self.s.second, name, matchers)
        raise self.fail(f"unexpected {token!r}")

    def selector(self, name: str) -> tuple[str, dict[str, str]]:
        matchers: dict[str, str] = {}
        if (self.peek() or "").startswith("{"):
            body = self.take()[1:-1]
            for key, val in re.findall(r'(\w+)\s*=\s*"([^"]*)"', body):
                matchers[key] = val
        return name, matchers


def _vector(value: Vector | float, parser: _Parser) -> Vector:
    if not isinstance(value, dict):
        raise parser.fail("a vector was expected")
    return value


def _select(samples: Samples, name: str, matchers: Mapping[str, str]) -> Vector:
    return {ls: v for (n, ls), v in samples.items() if n == name and matchers.items() <= dict(ls).items()}


def _aggregate(op: str, vector: Vector, by: list[str]) -> Vector:
    groups: dict[Labels, list[float]] = {}
    for ls, v in vector.items():
        key = tuple((k, dict(ls)[k]) for k in sorted(by) if k in dict(ls))
        groups.setdefault(key, []).append(v)
    return {key: float(_AGGREGATES[op](values)) for key, values in groups.items()}


def _combine(left: Vector | float, right: Vector | float, op: str) -> Vector | float:
    def apply(a: float, b: float) -> float:
        if op == "*":
            return a * b
        return a / b if b else math.nan

    if isinstance(left, dict) and isinstance(right, dict):
        return {ls: apply(v, right[ls]) for ls, v in left.items() if ls in right}
    if isinstance(left, dict):
        return {ls: apply(v, float(right)) for ls, v in left.items()}
    if isinstance(right, dict):
        return {ls: apply(float(left), v) for ls, v in right.items()}
    return apply(float(left), float(right))


def _quantile(q: float, buckets: Vector) -> Vector:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket the rank falls in."""
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for ls, v in buckets.items():
        d = dict(ls)
        le = float(d.pop("le"))
        groups.setdefault(tuple(sorted(d.items())), []).append((le, v))
    out = {}
    for key, pairs in groups.items():
        pairs.sort()
        total = pairs[-1][1]
        if total <= 0:
            out[key] = math.nan
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for le, count in pairs:
            if count >= rank:
                if math.isinf(le):
                    out[key] = lower
                else:
                    out[key] = lower + (le - lower) * ((rank - below) / (count - below) if count > below else 0.0)
                break
            lower, below = le, count
    return out


def render(scrapes: Scrapes, dashboard: Path = DASHBOARD) -> list[tuple[str, str, Vector]]:
    """Every panel's every query, evaluated: ``(panel title, legend, {labels: value})``."""
    panels = json.loads(dashboard.read_text())["panels"]
    rendered = []
    for panel in panels:
        for target in panel["targets"]:
            value = _Parser(target["expr"], scrapes).parse()
            rendered.append((panel["title"], target.get("legendFormat", ""), value if isinstance(value, dict) else {(): value}))
    return rendered


def as_text(rendered: list[tuple[str, str, Vector]]) -> str:
    """The panels as lines of text: title, then one line per series (legend filled from its labels)."""
    lines, title_seen = [], None
    for title, legend, vector in rendered:
        if title != title_seen:
            lines.append(title)
            title_seen = title
        for ls, v in sorted(vector.items()):
            names = dict(ls)
            name = re.sub(r"\{\{(\w+)\}\}", lambda m, names=names: names.get(m.group(1), ""), legend) or "value"
            lines.append(f"  {name:<32} {v:.4g}")
        if not vector:
            lines.append(f"  {legend or 'value':<32} (no data)")
    return "\n".join(lines)
