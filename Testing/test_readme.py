"""README.md is for users: short, no dated diary (that is docs/benchmarks.md), and every command it shows exists.

Every ``masksam ...`` and ``python -m masksam_core.X ...`` line in the README's shell code blocks must name a real
door (and sub-command), and each option on it must be one that the door's own ``--help`` lists; the doors are run
in subprocesses from this checkout. A line may end with ``# (pending: --opt, ...)`` for options that another change
adds: those options are checked only once the door has them, and a marker whose options all exist fails, so that
it is removed.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Set, Tuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
MAX_LINES = 260
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
#: the diary that moved to docs/benchmarks.md
DIARY = [r"\b20\d\d-\d\d-\d\d\b", r"\bcalm (phase|machine)\b", r"\bslow phase\b", r"\bnot kept\b",
         r"\bthis (change|session|evening|morning)\b", r"\b(this|the same) (evening|night|morning|afternoon)\b",
         r"\bprevious bundled model\b", r"\bbefore this change\b", r"\buntil this change\b", r"\bA/B\b",
         r"\bmeasured and not kept\b", r"\bthe latest code\b"]
PENDING = re.compile(r"#\s*\(pending:\s*([^)]*)\)")
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(language: Set[str]) -> List[str]:
    """The README's fenced code blocks in one of ``language``."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", readme_text(), flags=re.MULTILINE | re.DOTALL)
    return [body for lang, body in blocks if lang in language]


def shell_commands() -> List[Tuple[str, Set[str]]]:
    """(command line, pending options) for each command of the shell blocks, continuation lines joined."""
    commands = []
    for block in code_blocks(SHELL_LANGUAGES):
        for line in block.replace("\\\n", " ").splitlines():
            pending = PENDING.search(line)
            names = set(OPTION.findall(pending.group(1))) if pending else set()
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append((line.strip(), names))
    return commands


def door_of(tokens: List[str]) -> Optional[Tuple[List[str], List[str]]]:
    """(python -m arguments that name the door, the rest of the command line), or None for another program."""
    for k, token in enumerate(tokens):
        if token == "masksam" and k == 0:
            return ["masksam_core"] + tokens[1:2], tokens[2:]
        if token == "-m" and k + 1 < len(tokens) and tokens[k + 1].startswith("masksam_core"):
            return [tokens[k + 1]], tokens[k + 2:]
    return None


def split_command(line: str) -> List[str]:
    """Shell words of the first command of ``line`` (comments dropped; ``a && b``: each part counted separately by
    :func:`masksam_invocations`)."""
    return shlex.split(line, comments=True, posix=True)


def masksam_invocations() -> List[Tuple[str, List[str], List[str], Set[str]]]:
    """(line, door, arguments, pending options) for every invocation of the engine in the README's shell blocks."""
    found = []
    for line, pending in shell_commands():
        words = split_command(line)
        parts: List[List[str]] = [[]]
        for word in words:
            if word in ("&&", "||", ";", "|"):
                parts.append([])
            else:
                parts[-1].append(word)
        for part in parts:
            door = door_of(part)
            if door:
                found.append((line, door[0], door[1], pending))
    return found


def _environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@functools.lru_cache(maxsize=None)
def door_help(door: Tuple[str, ...]) -> Tuple[int, str]:
    """Exit code and output of ``python -m DOOR --help`` from this checkout."""
    run = subprocess.run([sys.executable, "-m", *door, "--help"], capture_output=True, text=True, cwd=REPO_ROOT,
                         env=_environment(), timeout=300)
    return run.returncode, run.stdout + run.stderr


def door_options(door: Tuple[str, ...]) -> Set[str]:
    code, text = door_help(door)
    assert code == 0, f"python -m {' '.join(door)} --help failed:\n{text[-2000:]}"
    return set(OPTION.findall(text))


def _full_door(door: List[str], args: List[str]) -> Tuple[Tuple[str, ...], List[str]]:
    """The model door's sub-command is part of the door: its options are the sub-command's."""
    model = door == ["masksam_core", "model"] or door == ["masksam_core.model"]
    if model and args and not args[0].startswith("-"):
        return tuple(door + args[:1]), args[1:]
    return tuple(door), args


def test_readme_is_short():
    lines = len(readme_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; history goes to docs/benchmarks.md"


@pytest.mark.parametrize("pattern", DIARY)
def test_readme_has_no_dated_diary(pattern):
    hits = [line for line in readme_text().splitlines() if re.search(pattern, line, flags=re.IGNORECASE)]
    assert not hits, f"diary wording ({pattern}) belongs in docs/benchmarks.md: {hits[:3]}"


def test_readme_keeps_one_numbers_section():
    headings = re.findall(r"^## (.+)$", readme_text(), flags=re.MULTILINE)
    assert headings.count("Numbers") == 1, headings
    assert "docs/benchmarks.md" in readme_text()


def test_readme_shows_every_door():
    doors = {tuple(_full_door(door, args)[0]) for _, door, args, _ in masksam_invocations()}
    for name in ("predict", "train", "evaluate"):
        assert ("masksam_core", name) in doors, f"README shows no `masksam {name}` command"
    assert any(d[:2] == ("masksam_core", "model") for d in doors), "README shows no `masksam model` command"


def test_masksam_command_lists_the_readmes_subcommands():
    code, text = door_help(("masksam_core",))
    assert code == 0, text
    for _, door, _, _ in masksam_invocations():
        if door[0] == "masksam_core" and len(door) == 2:
            assert re.search(rf"^\s+{re.escape(door[1])}\s", text, flags=re.MULTILINE), \
                f"`masksam {door[1]}` is not a command of masksam (masksam --help):\n{text}"


def _invocation_ids():
    return [line[:80] for line, _, _, _ in masksam_invocations()]


@pytest.mark.parametrize("line,door,args,pending", masksam_invocations(), ids=_invocation_ids())
def test_readme_command_uses_real_options(line, door, args, pending):
    full, rest = _full_door(door, args)
    accepted = door_options(full)
    used = {word.split("=", 1)[0] for word in rest if OPTION.fullmatch(word.split("=", 1)[0])}
    unknown = sorted(o for o in used - accepted if o not in pending)
    assert not unknown, f"{line!r}: `python -m {' '.join(full)}` has no option {unknown}"


def test_pending_markers_are_still_pending():
    for line, door, args, pending in masksam_invocations():
        if pending:
            full, _ = _full_door(door, args)
            missing = pending - door_options(full)
            assert missing, f"{line!r}: {sorted(pending)} exist now; remove the '# (pending: ...)' marker"


def test_quickstart_test_command_is_what_ci_runs():
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_tests = [line.strip() for line in ci.splitlines() if re.match(r"\s*python\S* -m pytest\b", line)]
    assert len(ci_tests) == 1, ci_tests
    readme_tests = [line for line, _ in shell_commands() if re.match(r"python\S* -m pytest\b", line)]
    assert readme_tests == ci_tests


def test_quickstart_installs_and_runs_the_demo():
    first = shell_commands()[0][0]
    assert "pip install" in first and first.endswith("python -m masksam_core.predict --demo"), first


def test_readme_python_imports_exist():
    import importlib

    blocks = code_blocks({"python"})
    assert blocks, "README shows no Python API example"
    for block in blocks:
        for module, names in re.findall(r"^from (masksam_core[\w.]*) import (.+)$", block, flags=re.MULTILINE):
            imported = importlib.import_module(module)
            for name in (n.strip() for n in names.split(",")):
                assert hasattr(imported, name), f"README imports {name} from {module}, which has no such name"


def test_readme_links_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#\s]+)\)", readme_text()):
        if "://" not in target:
            assert (REPO_ROOT / target).exists(), f"README links to {target}, which does not exist"
    for path in re.findall(r"`((?:masksam_core|docs|benchmarks|Testing)/[\w./-]+)`", readme_text()):
        assert (REPO_ROOT / path).exists(), f"README names {path}, which does not exist"
