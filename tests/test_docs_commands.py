"""Every ``lmgate <command> [<subcommand>]`` that the docs, the deploy files, the example config
and the messages of gateway/ and middleware/ name is one the parser knows.

``lmgate keys hash`` was named in the configuration reference, the example file, the schema and the
auth error message before it existed. Commands are read where a reader would copy them from: inline
code spans, shell code blocks (not ```` ```text ```` output), ``ExecStart=`` lines, and the
indented usage lines and code spans of ``gateway/`` strings.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
WORD = r"([a-z][a-z-]*)(?=$|[\s`'\")\]])"
# The command as typed: `lmgate ...`, a path to it (`/opt/.../bin/lmgate ...`), or `python -m gateway ...`.
INVOCATION = rf"(?:\S*/)?(?:lmgate|python3? -m gateway)\"?\s+{WORD}(?:\s+{WORD})?"
IN_SPAN = re.compile(rf"^{INVOCATION}")
# In a shell block: at the start of a line (after an optional prompt) or after && ; |.
IN_SHELL = re.compile(rf"(?:^\s*(?:\$\s+)?|&&\s*|;\s*|\|\s*)(?<![\w/-]){INVOCATION}")
ON_PATH = re.compile(rf"(?:^|=|\s)\S*/lmgate\"?\s+{WORD}(?:\s+{WORD})?")
INDENTED = re.compile(rf"^\s+{INVOCATION}")
SPAN = re.compile(r"`+([^`\n]+)`+")
FENCE = re.compile(r"^\s*```(\S*)")
SHELL_LANGUAGES = {"", "sh", "bash", "shell", "console"}

Mention = tuple[str, str, str | None]  # where, command, subcommand


def spans(where: str, text: str) -> Iterator[Mention]:
    for match in SPAN.finditer(text):
        found = IN_SPAN.match(match.group(1).strip())
        if found:
            yield where, found.group(1), found.group(2)


def markdown(name: str, text: str) -> Iterator[Mention]:
    language: str | None = None  # None: outside a fenced block
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{name}:{number}"
        fence = FENCE.match(line)
        if fence:
            language = fence.group(1) if language is None else None
        elif language is None:
            yield from spans(where, line)
        elif language in SHELL_LANGUAGES:
            for found in IN_SHELL.finditer(line):
                yield where, found.group(1), found.group(2)


def plain(name: str, text: str) -> Iterator[Mention]:
    """Deploy files (systemd units, NGINX configs) and YAML: code spans in comments, and paths."""
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{name}:{number}"
        yield from spans(where, line)
        for found in ON_PATH.finditer(line):
            yield where, found.group(1), found.group(2)


def python_strings(name: str, text: str) -> Iterator[Mention]:
    """String constants (docstrings, messages, help texts): code spans, and indented usage lines."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            where = f"{name}:{node.lineno}"
            yield from spans(where, node.value)
            # cleandoc: a function's docstring is indented as a whole; only lines indented within it
            # are usage lines (its prose may well start a line with "lmgate is ...").
            for line in inspect.cleandoc(node.value).splitlines():
                found = INDENTED.match(line)
                if found:
                    yield where, found.group(1), found.group(2)


def mentions() -> list[Mention]:
    found: list[Mention] = []

    def read(paths: list[Path], reader: Callable[[str, str], Iterator[Mention]]) -> None:
        for path in sorted(paths):
            if path.is_file():
                found.extend(reader(str(path.relative_to(ROOT)), path.read_text()))

    read([*ROOT.glob("docs/**/*.md"), ROOT / "README.md", *ROOT.glob("deploy/**/*.md")], markdown)
    read([p for p in ROOT.glob("deploy/**/*") if p.suffix != ".md"] + [*ROOT.glob("lmgate*.yaml")], plain)
    read([*ROOT.glob("gateway/**/*.py"), *ROOT.glob("middleware/**/*.py")], python_strings)
    return found


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_command_the_docs_name_exists() -> None:
    commands = subcommands(_parser())
    unknown = []
    for where, command, subcommand in mentions():
        if command not in commands:
            unknown.append(f"{where}: lmgate {command}")
            continue
        known = subcommands(commands[command])
        if known and subcommand is not None and subcommand not in known:
            unknown.append(f"{where}: lmgate {command} {subcommand}")
    assert unknown == []


def test_the_reader_finds_the_commands_where_they_are_named() -> None:
    found = {(command, subcommand) for _, command, subcommand in mentions()}
    # A code span in the example config, a usage line in gateway/cli/__init__.py, an ExecStart= line, a
    # README shell block: if the reader stopped finding these, the test above would pass on nothing.
    assert {("keys", "hash"), ("config", "check"), ("config", "schema"), ("simulate", None)} <= found
    where = {w.split(":")[0] for w, command, _ in mentions() if command == "serve"}
    assert {"README.md", "deploy/systemd/lmgate.service", "gateway/cli/__init__.py"} <= where


def test_output_blocks_are_not_read_as_commands() -> None:
    text = "```text\nlmgate listening on http://127.0.0.1:8080\n```\n```\nlmgate frobnicate --now\n```\n"
    assert list(markdown("x.md", text)) == [("x.md:5", "frobnicate", None)]
