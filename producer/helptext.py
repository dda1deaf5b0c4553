"""``--help`` that tells the truth: every ``calq`` command's help is drawn by :class:`CalqCommand`.

Three things typer would otherwise get wrong for calq:

- **defaults in force.** An option's help may name a value from the settings
  in braces, ``"(default: CALQ_SAMPLER__WARMUP, now {sampler.warmup})"``;
  the braces are filled in when the help is drawn, from
  :func:`~shared.contract.settings.get_settings` (so ``CALQ_SAMPLER__WARMUP=50
  calq calibrate --help`` says 50). ``{regimes}`` lists the synthetic regimes
  of :mod:`shared.data.regimes`. The settings are read only to draw help.
- **plain names.** Arguments read ``DATASET`` and ``[OUT.nc]`` in the usage
  line (typer writes ``{DATASET}``), and a flag such as ``--json`` has no
  value placeholder (typer writes ``--json <bool>``).
- **no reST.** A command's docstring may quote code as ````x````; help shows
  ``'x'``.

:func:`install` makes every command registered on the app a CalqCommand; the
app itself is a :class:`CalqGroup`.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

_RST_LITERAL = re.compile(r"``([^`]+)``")


def _regimes() -> str:
    from shared.data.regimes import REGIMES

    return "; ".join(f"{r.name} ({r.description})" for r in REGIMES.values())


class _Now(dict):
    """The values a help template names: attributes of the settings in force, and ``regimes``."""

    def __missing__(self, key: str) -> Any:
        if key == "regimes":
            return _regimes()
        from shared.contract.settings import get_settings

        return getattr(get_settings(), key)


def filled(template: str) -> str:
    """``template`` with its ``{settings.path}`` fields filled in from the settings in force."""
    if "{" not in template:
        return template
    try:
        return template.format_map(_Now())
    except Exception:  # settings that do not load: the help still shows, naming the variable
        return re.sub(r"\{[^}]*\}", "?", template)


def plain(text: str | None) -> str | None:
    """Help text without reST literals: ````x```` becomes ``'x'``."""
    return _RST_LITERAL.sub(r"'\1'", text) if text else text


def _plain_params(params: list) -> list:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # a flag takes no value: no "<bool>" beside it
        elif isinstance(param, TyperArgument) and param.metavar is None:
            param.metavar = param.name.upper()  # JOB_ID, as the usage line shows it
    return params


class CalqGroup(TyperGroup):
    """The ``calq`` group itself: its flags (``--debug``, ``--version``) without value placeholders."""

    def get_params(self, ctx: typer.Context) -> list:
        return _plain_params(super().get_params(ctx))


class CalqCommand(TyperCommand):
    """A typer command whose help is drawn as the module docstring says."""

    def get_params(self, ctx: typer.Context) -> list:
        return _plain_params(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        for param in self.get_params(ctx):
            template = getattr(param, "calq_help_template", None) or getattr(param, "help", None)
            if template:
                param.calq_help_template = template
                param.help = plain(filled(template))
        super().format_help(ctx, formatter)


def install(app: typer.Typer) -> None:
    """Draw the help of every command registered on ``app`` so far with :class:`CalqCommand`.

    Sub-apps (``calq token …``) become :class:`CalqGroup` groups of CalqCommands.
    """
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = CalqCommand
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = plain(inspect.cleandoc(info.callback.__doc__))
    for group in app.registered_groups:
        if getattr(group.cls, "value", group.cls) in (None, TyperGroup):  # typer's default placeholder
            group.cls = CalqGroup
        if group.typer_instance is not None:
            install(group.typer_instance)


__all__ = ["CalqCommand", "CalqGroup", "filled", "install", "plain"]
