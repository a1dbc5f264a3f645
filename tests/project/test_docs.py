"""The architecture page and the README's Layout table name only what exists, and leave out
no package."""
from __future__ import annotations

import os
import re

from helpers import REPO

ARCHITECTURE = os.path.join(REPO, "docs", "ARCHITECTURE.md")
README = os.path.join(REPO, "README.md")

# Top-level folders the Layout table must list (besides minlora/'s packages).
TOP_LEVEL = ("csrc/", "scripts/", "bench/", "tests/", "docs/", "third_party/")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _code_spans(text: str) -> list[str]:
    """The contents of the inline `code` spans of a Markdown text (fenced blocks left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def _repo_paths(spans: list[str]) -> list[str]:
    """The spans that name a file or folder of the repository's code (minlora/..., csrc/...)."""
    return [s for s in spans if re.fullmatch(r"(minlora|csrc)/[\w./-]*", s)]


def _subpackages() -> list[str]:
    """minlora's packages, one level down: "minlora/pool/", ..."""
    base = os.path.join(REPO, "minlora")
    return sorted(f"minlora/{d}/" for d in os.listdir(base)
                  if os.path.isfile(os.path.join(base, d, "__init__.py")))


def _modules() -> list[str]:
    """minlora's top-level modules, the package's own two files aside."""
    base = os.path.join(REPO, "minlora")
    return sorted(f"minlora/{f}" for f in os.listdir(base)
                  if f.endswith(".py") and f not in ("__init__.py", "__main__.py"))


def _layout_rows() -> list[str]:
    """The first cell of each row of the README's Layout table."""
    section = _read(README).split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows and rows[0].startswith("| path |"), "the Layout section has no | path | what | table"
    return [row.split("|")[1] for row in rows[1:]]


def test_every_path_the_architecture_page_names_exists():
    paths = _repo_paths(_code_spans(_read(ARCHITECTURE)))
    assert len(paths) > 50, f"the page names only {len(paths)} paths: did the span syntax change?"
    missing = [p for p in paths if not os.path.exists(os.path.join(REPO, p))]
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_the_architecture_page_names_every_package_and_module():
    text = _read(ARCHITECTURE)
    named = set(_repo_paths(_code_spans(text)))
    # The layer diagram is a fenced block: its lines start with the paths.
    named |= set(re.findall(r"^(minlora/[\w./]+)", text, flags=re.M))
    missing = [p for p in _subpackages() + _modules() if p not in named]
    assert not missing, f"docs/ARCHITECTURE.md does not mention {missing}"


def test_the_readme_layout_rows_exist_and_cover_every_package():
    rows = _layout_rows()
    listed = [p for cell in rows for p in _code_spans(cell)]
    missing = [p for p in listed if not os.path.exists(os.path.join(REPO, p))]
    assert not missing, f"the README's Layout table lists paths that do not exist: {missing}"
    left_out = [p for p in _subpackages() + list(TOP_LEVEL) if p not in listed]
    assert not left_out, f"the README's Layout table leaves out {left_out}"


def test_the_readme_links_the_architecture_page():
    assert "docs/ARCHITECTURE.md" in _read(README)
