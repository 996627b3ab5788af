"""README.md and docs/ against the code: flags, commands, links, install and test commands.

docs/cli.md's flag tables are generated from the parsers (`python -m experiments.cli_docs`); these
tests fail when a parser changes and the file is not regenerated, when any page shows a
`python -m` command with a flag that command lacks, or when a relative link points nowhere.
"""

import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from experiments import cli_docs

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w-])")
# Flags of other programs that the pages mention: pip's, lint-imports', the authors' evaluation script's.
FOREIGN = {"--no-deps", "--index-url", "--no-cache", "--color-channel"}
OURS = cli_docs.PACKAGES


@cache
def commands() -> dict[str, set[str]]:
    """Returns {module: every flag it takes}."""
    return {c.module: cli_docs.flags(c.parser) for c in cli_docs.commands()}


@cache
def shown() -> dict[str, set[str]]:
    """Returns {module: the flags its --help shows}."""
    return {c.module: cli_docs.flags(c.parser, hidden=False) for c in cli_docs.commands()}


@cache
def cli_text() -> str:
    return cli_docs.CLI_DOC.read_text(encoding="utf-8")


def test_cli_doc_is_what_the_parsers_generate():
    generated = cli_docs.render(cli_text(), cli_docs.commands())
    assert generated == cli_text(), "docs/cli.md is out of date: run python -m experiments.cli_docs"


def test_every_command_has_a_section_and_every_flag_is_its_own():
    intro, notes = cli_docs.split_sections(cli_text())
    assert list(notes) == list(commands()), "docs/cli.md's sections are not the commands, in order"
    sections = re.split(r"^## `python -m ([\w.]+)`\s*$", cli_text(), flags=re.M)[1:]
    every = set().union(*commands().values())
    for module, section in zip(sections[::2], sections[1::2], strict=True):
        own = shown()[module] - {"-h", "--help"}
        # The tables' first column documents the command's own flags: all of them, and no other.
        tabled = {f for cell in re.findall(r"^\| `([^`]*)`", section, re.M) for f in FLAG.findall(cell)}
        assert tabled == own, f"{module}: docs/cli.md documents {sorted(tabled - own)}, lacks {sorted(own - tabled)}"
        # The hand-written notes speak of this command's flags only.
        stray = set(FLAG.findall(notes[module])) - commands()[module]
        assert not stray, f"{module}: the notes in docs/cli.md name {sorted(stray)}, which it does not take"
        # Help texts may point to another command's flag, but to one that exists.
        unknown = set(FLAG.findall(section)) - every
        assert not unknown, f"{module}: docs/cli.md names {sorted(unknown)}, which no command takes"
    assert set(FLAG.findall(intro)) <= every, sorted(set(FLAG.findall(intro)) - every)


def _command_lines(text: str) -> list[str]:
    """Returns every `python -m MODULE ...` command shown in a page, continuation lines joined."""
    text = text.replace("\\\n", " ")
    found = []
    # A command ends at the end of its line or code span, at a comment, or where prose resumes.
    for match in re.finditer(r"python -m [\w.]*\w[^\n`);|]*", text):
        found.append(match.group(0).split(" #")[0])
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_shown_in_the_docs_exist_with_those_flags(page):
    for line in _command_lines(page.read_text(encoding="utf-8")):
        module = line.split()[2]
        if not module.startswith(tuple(f"{p}." for p in OURS)):
            continue  # pip, pytest, venv ...
        assert module in commands(), f"{page.name}: `{line}` names no command (known: {', '.join(commands())})"
        unknown = {f.split("=")[0] for f in FLAG.findall(line)} - commands()[module]
        assert not unknown, f"{page.name}: `{line}` uses {sorted(unknown)}, which {module} does not take"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_flag_a_page_names_exists(page):
    every = set().union(*commands().values()) | FOREIGN
    unknown = set(FLAG.findall(page.read_text(encoding="utf-8"))) - every
    assert not unknown, f"{page.name} names {sorted(unknown)}, which no command takes"


def _anchors(path: Path) -> set[str]:
    # GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens.
    out = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_to_existing_files_and_headings(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: the link {target} points to no file"
        if anchor:
            assert anchor in _anchors(file), f"{page.name}: the link {target} names no heading of {file.name}"


def test_readme_is_one_short_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; move detail into docs/"


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line.split("#")[0])
    except ValueError:  # prose with an apostrophe
        return []


def test_readme_installs_and_tests_as_ci_does():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    shown = {" ".join(_words(line)) for line in readme.splitlines()}
    for line in ci.splitlines():
        words = _words(line)
        if words[:2] == ["pip", "install"]:
            command = " ".join(w for w in words if w not in ("--quiet", "-q"))
            # README may add flags after CI's (an --index-url for the CPU wheel), never drop a step.
            assert any(f"{line} ".startswith(f"{command} ") for line in shown), f"README lacks CI's `{command}`"
        if words[:3] == ["python", "-m", "pytest"]:
            assert " ".join(words) in shown, f"README's test command is not CI's `{' '.join(words)}`"


CODE_PATH = re.compile(r"`((?:vitnt_jax|converters|experiments|tests)/[\w./-]+\.\w+)`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_files_named_in_the_docs_exist(page):
    for path in CODE_PATH.findall(page.read_text(encoding="utf-8")):
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"


def test_module_map_names_every_module():
    named = set(CODE_PATH.findall((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")))
    modules = {
        p.relative_to(ROOT).as_posix()
        for package in OURS
        for p in (ROOT / package).glob("*.py")
        if p.name != "__init__.py" or package == "vitnt_jax"
    }
    assert not modules - named, f"docs/architecture.md's module map lacks {sorted(modules - named)}"
