"""Reports people look at: self-contained HTML and markdown pages with the plots that show whether calibration worked.

- :mod:`producer.report.page`: the page builder (title, sections with figures,
  tables and captions), escaping done once at render time;
  :mod:`~producer.report.html` and :mod:`~producer.report.markdown` render it;
- :mod:`producer.report.plots`: matplotlib Figures from arrays and summaries
  (Agg backend), usable in a notebook;
- :mod:`producer.report.forecasts`: the raw forecasts of a dataset
  (``calq report DATASET``);
- :mod:`producer.report.calibration`: one calibration, or the latest of every
  archetype (``calq report --posterior/--job/--latest``);
- :mod:`producer.report.command`: the ``calq report`` command.
"""

from producer.report.page import Page, Section, escape_html, escape_markdown

__all__ = ["Page", "Section", "escape_html", "escape_markdown"]
