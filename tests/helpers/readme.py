"""The ```python block of a README.md section, for the tests that run README snippets as written."""
from __future__ import annotations

import re

from helpers import REPO

README = REPO / "README.md"


def readme_snippet(heading: str) -> str:
    """The first ```python block under `heading` (and before the next "## " heading)."""
    text = open(README, encoding="utf-8").read()
    assert heading in text, f"README.md has no {heading!r} section"
    section = text.split(heading, 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m is not None, f"no ```python block under {heading!r}"
    # It must be the section's own block, not one from a later section.
    assert "\n## " not in section[: m.start()], f"no ```python block under {heading!r}"
    return m.group(1)
