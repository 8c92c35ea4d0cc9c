"""The README stays true to the tree: every path it names exists, and its Layout section
names every package of the serving core, the Serve glue and the local stack."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TOP = ("serve_app", "deployments", "devstack", "bench", "tests", "ops", "docs", "notebooks")


def _layout_section() -> str:
    return README.split("\n## Layout", 1)[1].split("\n## ", 1)[0]


def test_every_path_the_readme_names_exists() -> None:
    paths = set(re.findall(rf"\b((?:{'|'.join(TOP)})/[\w./-]*\w)", README))
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names paths that do not exist: {missing}"


def test_layout_names_every_package() -> None:
    layout = _layout_section()
    packages = [
        p.parent.relative_to(ROOT).as_posix()
        for top in ("serve_app", "deployments", "devstack")
        for p in (ROOT / top).rglob("__init__.py")
    ]
    unnamed = sorted(p for p in packages if f"{p.rsplit('/', 1)[-1]}/" not in layout)
    assert not unnamed, f"README's Layout section leaves out: {unnamed}"
