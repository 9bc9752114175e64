"""The README and the docs stay a working front door: every relative link and image points at a file
that exists (and at a heading that exists), every ``medsteer`` command they show is a real subcommand
with real flags, and the README stays short."""

from __future__ import annotations

import argparse
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "web" / "docs").glob("*.md")])
PAGE_IDS = [p.relative_to(ROOT).as_posix() for p in PAGES]

FENCE = re.compile(r"^(```|~~~)[^\n]*\n.*?^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)
INLINE_CODE = re.compile(r"`([^`]+)`")
# `medsteer <command>` or `python -m medsteer_core.headless.cli <command>` (also under torchrun / accelerate)
COMMAND = re.compile(r"(?<![\w/.-])(?:medsteer|-m medsteer_core\.headless\.cli)\s+([a-z][a-z0-9-]*|--?[a-z][\w-]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])")


def _without_code(text: str) -> str:
    """The page without fenced blocks and inline code: headings and links in prose only."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", page.read_text()), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return frozenset(found)


def link_problems(page: Path) -> list[str]:
    """Every relative link or image of ``page`` that points at nothing, as 'target: why'."""
    text = _without_code(page.read_text())
    problems = []
    for target in LINK.findall(text) + HTML_SRC.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            problems.append(
                f"{target}: no such file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}"
            )
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: {linked.name} has no heading with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_and_image_exists(page):
    problems = link_problems(page)
    assert not problems, f"{page.relative_to(ROOT)} has broken links: fix the path or the heading: {problems}"


def test_a_broken_link_is_caught(tmp_path):
    # The check itself: a missing file, a missing heading and a good link to a heading.
    (tmp_path / "other.md").write_text("# Other page\n\n## Real heading (yes)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[gone](missing.md) ![gone](img/none.png) [bad](other.md#no-such-heading)\n"
        "[ok](other.md#real-heading-yes) [self](#page) [web](https://example.com/x.md)\n"
        "```bash\n# not a heading [not a link](nowhere.md)\n```\n"
    )
    problems = link_problems(page)
    assert [p.split(":")[0] for p in problems] == ["missing.md", "img/none.png", "other.md#no-such-heading"]


# --------------------------------------------------------------------------- shown commands
@cache
def cli_flags() -> dict[str, set[str]]:
    """Every ``medsteer`` subcommand with its flags (``demo``: its own parser's), from the real parsers."""
    from medsteer_core.headless.cli_parser import build_parser
    from medsteer_core.mini.demo_cli import build_parser as build_demo_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {name: {o for a in sub._actions for o in a.option_strings} for name, sub in commands.choices.items()}
    flags["demo"] = {o for a in build_demo_parser()._actions for o in a.option_strings}
    flags[""] = {o for a in parser._actions for o in a.option_strings}  # `medsteer --help`, `--version`
    return flags


def _shell_commands(block: str) -> list[str]:
    """A fenced shell block as commands: continuation lines joined, comments dropped, and
    ``NAME="..."`` variables (the recipes' ``$M``, ``$S``) expanded where they are used."""
    variables: dict[str, str] = {}
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        assignment = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", line)
        if assignment:
            try:
                (value,) = shlex.split(assignment.group(2)) or [""]
            except ValueError:
                value = assignment.group(2)
            variables[assignment.group(1)] = value
            continue
        line = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(0)), line)
        commands.extend(part.strip() for part in re.split(r"&&|\|\||;|\|", line) if part.strip())
    return commands


def shown_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(subcommand, flags)`` for every ``medsteer`` command in the page's code (fenced and inline)."""
    snippets = []
    for match in FENCE.finditer(text):
        body = match.group(0).split("\n", 1)[1].rsplit("\n", 1)[0]
        snippets.extend(_shell_commands(body))
    snippets.extend(INLINE_CODE.findall(FENCE.sub("", text)))
    found = []
    for snippet in snippets:
        for match in COMMAND.finditer(snippet):
            word = match.group(1)
            rest = snippet[match.end() :]
            nxt = COMMAND.search(rest)
            rest = rest[: nxt.start()] if nxt else rest
            if word.startswith("-"):
                found.append(("", [word]))
            else:
                found.append((word, FLAG.findall(rest)))
    return found


def command_problems(page: Path) -> list[str]:
    flags = cli_flags()
    problems = []
    for command, used in shown_commands(page.read_text()):
        if command not in flags:
            problems.append(f"`medsteer {command}`: no such subcommand (there are {sorted(c for c in flags if c)})")
            continue
        unknown = [f for f in used if f not in flags[command]]
        if unknown:
            problems.append(f"`medsteer {command or '--option'}` has no {unknown}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_shown_medsteer_command_and_flag_exists(page):
    problems = command_problems(page)
    assert not problems, f"{page.relative_to(ROOT)} shows commands the CLI does not have: {problems}"


def test_the_command_check_reads_blocks_variables_and_inline_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        '```bash\nS="--strength 2 --no-such-flag"\nmedsteer generate $S \\\n  --vector v.safetensors  # --comment\n'
        "medsteer inspect v.safetensors && medsteer frobnicate\n```\n"
        "Inline: `medsteer heatmap --seed 1 --bogus`, `medsteer demo --quick`, `medsteer --version`.\n"
    )
    assert shown_commands(page.read_text()) == [
        ("generate", ["--strength", "--no-such-flag", "--vector"]),
        ("inspect", []),
        ("frobnicate", []),
        ("heatmap", ["--seed", "--bogus"]),
        ("demo", ["--quick"]),
        ("", ["--version"]),
    ]
    problems = command_problems(page)
    assert len(problems) == 3 and "--no-such-flag" in problems[0] and "frobnicate" in problems[1]
    assert "--bogus" in problems[2]


def test_the_docs_show_every_subcommand():
    # So the command check above has something to check: the CLI page names every subcommand.
    shown = {command for command, _ in shown_commands((ROOT / "docs" / "cli.md").read_text())}
    assert {c for c in cli_flags() if c} <= shown, sorted({c for c in cli_flags() if c} - shown)


# --------------------------------------------------------------------------- the front door
def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move details into docs/ and link them"
    )


def test_readme_gives_the_test_command_ci_runs():
    # .ci/run runs "the test command README.md gives"; docs/development.md explains it.
    command = "python -m pytest -q -n auto --dist loadfile"
    for page in ("README.md", "docs/development.md", ".ci/run"):
        assert command in (ROOT / page).read_text(), f"{page} does not give the test command {command!r}"


def test_readme_links_every_node_help_page():
    readme = (ROOT / "README.md").read_text()
    pages = sorted((ROOT / "web" / "docs").glob("*.md"))
    missing = [p.name for p in pages if f"(web/docs/{p.name})" not in readme]
    assert pages and not missing, f"README.md's node table does not link {missing}"
