"""``batcher status --markdown``: a GitHub-flavoured summary of a run for
``$GITHUB_STEP_SUMMARY``: counts, spend, failure reasons, and (given a manifest with assets)
the assets without an ok variant and those nobody has picked yet."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from batcher.providers.prices import cost_text

LISTED = 50  # names listed per group; the rest as a count


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _spent(row: Mapping[str, Any]) -> str:
    if row["cost_usd"] is None and not row["cost_unknown"]:
        return "-"
    return cost_text(row["cost_usd"], row["cost_unknown"])


def render_markdown(report: Mapping[str, Any], assets: Mapping[str, Any] | None) -> str:
    lines = [f"### batcher: {_cell(report['output'])}", "",
             f"**{report['ok']} ok**, {report['failed']} failed, {report['pending']} pending "
             f"of {report['total']}; spent {_spent(report)} on the ok tasks", ""]
    if report.get("running"):
        lines += ["_A run is writing to this output now; the counts are changing._", ""]
    lines += ["| job | model | ok | failed | pending | spent |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {_cell(r['job'])} | {_cell(r['model'])} | {r['ok']} | {r['failed']} | "
              f"{r['pending']} | {_spent(r)} |" for r in report["models"]]
    if report["failures"]:
        lines += ["", "#### Failures by reason", "", "| tasks | reason |", "| ---: | --- |"]
        lines += [f"| {item['count']} | {_cell(item['reason'])} |"
                  for item in report["failures"]]
    if assets is not None:
        lines += ["", "#### Assets", "",
                  f"{assets['total']} assets: {assets['total'] - len(assets['without_ok'])} "
                  f"with a variant to publish, {len(assets['without_ok'])} without an ok "
                  f"unrejected variant, {len(assets['undecided'])} undecided (no pick)"]
        lines += _names("Without an ok unrejected variant", assets["without_ok"])
        lines += _names("Undecided", assets["undecided"])
    return "\n".join(lines) + "\n"


def _names(title: str, names: Iterable[str]) -> list[str]:
    names = list(names)
    if not names:
        return []
    shown = ", ".join(f"`{_cell(name)}`" for name in names[:LISTED])
    more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
    return ["", f"<details><summary>{title} ({len(names)})</summary>", "", shown + more, "",
            "</details>"]
