"""The README and docs/ cannot go stale silently: links resolve, the Python names they import
exist, the flags their command examples use are real flags, and the README stays short."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

import lwlora

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_imported_names_exist(page):
    missing = []
    for language, code in FENCE.findall(page.read_text(encoding="utf-8")):
        if language != "python":
            continue
        for match in re.finditer(r"^from lwlora import ([\w, ]+)$", code, re.M):
            missing += [name.strip() for name in match.group(1).split(",") if not hasattr(lwlora, name.strip())]
    assert not missing, f"{page.name}: `from lwlora import` of names lwlora does not export: {missing}"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from lwlora.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _commands(code: str):
    """Each ``lwlora <command> ...`` line of a shell block (continuations joined, comments cut)."""
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        line = re.sub(r"^(\.venv/bin/|.*&& \.venv/bin/)", "", line)
        if line.startswith("lwlora "):
            yield shlex.split(line)


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "cli.md", ROOT / "docs" / "training.md", ROOT / "docs" / "selection.md"], ids=lambda p: p.name)
def test_example_commands_use_real_flags(page):
    parsers = _subparsers()
    unknown = []
    for language, code in FENCE.findall(page.read_text(encoding="utf-8")):
        if language not in ("bash", "sh", ""):
            continue
        for words in _commands(code):
            if len(words) < 2 or words[1] not in parsers:
                continue
            known = {s for a in parsers[words[1]]._actions for s in a.option_strings}
            unknown += [f"{words[1]} {w}" for w in words[2:] if w.startswith("--") and w.split("=")[0] not in known]
    assert not unknown, f"{page.name}: example commands with flags that do not exist: {unknown}"
