"""The documentation's numbers: each measured figure sits in a section that says on which machine and
when it was measured (a machine of the register in docs/performance.md), so no two pages quote one
speed for different machines; the README quotes none (it links to the pages)."""

from __future__ import annotations

import re

from tests.support import ROOT

DOCS = ROOT / "docs"
# A measured figure: a speed, a latency, a size of memory, a speed-up.
MEASURED = re.compile(r"\b\d[\d,]*(?:\.\d+)? ?(?:images/s|files/s|ms\b|MB\b|GB\b|MiB\b|s p50|x\)|x faster|x of)")
# "before DATE" where only an upper bound of the date is known (runs made before the history was kept).
TAG = re.compile(r"\[measured on ([a-z0-9-]+), ((?:before )?\d{4}-\d{2}-\d{2})\]")


def _register() -> dict[str, str]:
    """Machine id -> its description, from the register table of docs/performance.md."""
    page = (DOCS / "performance.md").read_text()
    section = page.split("## Machines the numbers were measured on", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| ([^|]+) \|", section, flags=re.M)
    return dict(rows)


def _sections(text: str) -> list[str]:
    return re.split(r"\n(?=#{2,4} )", text)


def test_every_measured_figure_names_its_machine_and_date():
    register = _register()
    assert len(register) >= 3, register
    untagged, tags = [], 0
    for page in sorted(DOCS.glob("*.md")):
        for section in _sections(page.read_text()):
            if "## Machines the numbers were measured on" in section:
                continue
            # Figures in a section that measures (a benchmark, "measured", a percentile) are measurements;
            # limits and sizes worked out by hand (44 bytes an image) are not.
            measures = re.search(r"measured|bench/|\bp50\b|\bp99\b|peaked", section, flags=re.I)
            figures = MEASURED.findall(section) if measures else []
            found = TAG.findall(section)
            for machine, _ in found:
                assert machine in register, f"{page.name}: [{machine}] is not in the register of docs/performance.md"
            tags += len(found)
            if figures and not found:
                untagged.append(f"{page.name}: {section.splitlines()[0][:70]!r} quotes {figures[:3]}")
    assert not untagged, "sections with measured figures but no [measured on MACHINE, DATE]:\n" + "\n".join(untagged)
    assert tags >= 5


def test_the_readme_quotes_no_measured_figure():
    readme = (ROOT / "README.md").read_text()
    assert not MEASURED.findall(readme), "numbers live once, on the docs pages, with their machine"
    assert len(readme.splitlines()) <= 160
