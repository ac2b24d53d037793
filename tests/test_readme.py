"""The README stays true: its Python code is the source's, its config table is the dataclass, its commands
parse, its test command is the one CI runs, and every make target and script it names exists.

`python tests/test_readme.py` prints the config table as the README must hold it.
"""

import ast
import json
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

from sentiment.cli import parse
from sentiment.config import Config, field_docs
from sentiment.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SOURCES = sorted((REPO / "sentiment").glob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
ELISION = "..."  # the one line a Python block may hold that is not a source line: "lines left out here"


def fenced_blocks(language: str) -> list[tuple[int, list[str]]]:
    """(line number of the opening fence, the lines inside) of every ```language block in the README."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(README.splitlines(), 1):
        if current is None and line.strip() == f"```{language}":
            current, start = [], number
        elif current is not None and line.strip() == "```":
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"README.md: the ```{language} block opened at line {start} is never closed"
    return blocks


def section_lines(title: str) -> tuple[int, int]:
    """First and last line numbers of the README's section under the heading `title` (up to the next
    heading of the same or a higher level; headings inside code blocks do not count)."""
    lines, in_code, start, level = README.splitlines(), False, None, 0
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"(#+) (.*)", line)
        if heading and start is not None and len(heading.group(1)) <= level:
            return start, number - 1
        if heading and start is None and heading.group(2).strip() == title:
            start, level = number + 1, len(heading.group(1))
    assert start is not None, f"README.md has no heading {title!r}"
    return start, len(lines)


def section(title: str) -> str:
    """The README text under the heading `title`."""
    first, last = section_lines(title)
    return "\n".join(README.splitlines()[first - 1:last])


# ------------------------------------------------------------------------------ Python blocks


def stripped_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def in_order(shown: list[str], source: list[str]) -> bool:
    """True if `shown` is a subsequence of `source`: the same lines, in the same order, gaps allowed."""
    rest = iter(source)
    return all(any(line == candidate for candidate in rest) for line in shown)


def test_python_blocks_are_verbatim_source():
    """Every non-blank line of a ```python block is a line of sentiment/*.py or scripts/*.py (leading and
    trailing whitespace aside), in the source's order, all from one file; `...` alone stands for lines
    left out."""
    blocks = fenced_blocks("python")
    assert blocks, "README.md shows no ```python block (Read the loop should show the step loop)"
    by_file = {path: stripped_lines(path) for path in SOURCES}
    every_line = {line for lines in by_file.values() for line in lines}
    for start, block in blocks:
        shown = [line.strip() for line in block if line.strip() and line.strip() != ELISION]
        unknown = [line for line in shown if line not in every_line]
        assert not unknown, (f"README.md, ```python block at line {start}: these lines are in no source file "
                             f"(copy them from the source, or write `...` for lines left out): {unknown}")
        assert any(in_order(shown, lines) for lines in by_file.values()), (
            f"README.md, ```python block at line {start}: its lines are source lines, but not in the order of "
            "one file; show an excerpt of one file, in order")


def test_read_the_loop_shows_the_step_loop_of_train_py():
    """Read the loop shows steps()'s step loop from sentiment/train.py, with every GradScaler line in it."""
    first, last = section_lines("Read the loop")
    blocks = [[line.strip() for line in block if line.strip() and line.strip() != ELISION]
              for start, block in fenced_blocks("python") if first <= start <= last]
    loops = [lines for lines in blocks if "for step in range(start_step, job.total_steps):" in lines]
    assert loops, "Read the loop shows no Python block with `for step in range(start_step, job.total_steps):`"
    train = stripped_lines(REPO / "sentiment" / "train.py")
    assert in_order(loops[0], train), "Read the loop's step loop is not an in-order excerpt of sentiment/train.py"
    hidden = [line for line in train if line.startswith("scaler.") and line not in loops[0]]
    assert not hidden, f"Read the loop leaves out the step's mixed-precision lines {hidden}"


# ------------------------------------------------------------------------------ config table


def config_source_rows() -> list[tuple[str, str, str]]:
    """(group, field, meaning) for each Config field, in order: `config.field_docs()`, read from the source of
    Config (the `# group` line above each block of fields, each field's trailing comment)."""
    docs = field_docs()
    missing = [f.name for f in fields(Config) if f.name not in docs]
    assert not missing, f"Config fields without a trailing comment saying what they are: {missing}"
    return [(docs[f.name][0], f.name, docs[f.name][1]) for f in fields(Config)]


def format_default(value: object) -> str:
    """A default as the table prints it: Python literals, strings in double quotes, 5e-05 as 5e-5."""
    if isinstance(value, str):
        return json.dumps(value)
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2), repr(value))


def format_meaning(comment: str) -> str:
    """A trailing comment as a table cell: `a | b` alternatives become `a / b` (a bare | would split the cell)."""
    return comment.replace(" | ", " / ")


def config_table() -> str:
    """The README's config table, generated from sentiment/config.py."""
    defaults = {f.name: f.default for f in fields(Config)}
    out, group = ["| field | default | meaning |", "|---|---|---|"], None
    for row_group, name, comment in config_source_rows():
        if row_group != group:
            group = row_group
            out.append(f"| **{group}** | | |")
        out.append(f"| `{name}` | `{format_default(defaults[name])}` | {format_meaning(comment)} |")
    return "\n".join(out)


def readme_config_rows() -> list[tuple[str, str, str, str]]:
    """(group, field, default as printed, meaning) for each row of the table(s) under the Config heading."""
    rows, group = [], ""
    for line in section("Config").splitlines():
        if heading := re.fullmatch(r"\| \*\*(.+?)\*\* \|(?: *\|)+", line.strip()):
            group = heading.group(1)
        elif row := re.fullmatch(r"\| `(\w+)` \| `(.*?)` \| (.*) \|", line.strip()):
            rows.append((group, *row.groups()))
    return rows


def test_config_table_has_exactly_the_config_fields():
    documented = [name for _, name, _, _ in readme_config_rows()]
    declared = [f.name for f in fields(Config)]
    missing = [name for name in declared if name not in documented]
    stale = [name for name in documented if name not in declared]
    twice = sorted({name for name in documented if documented.count(name) > 1})
    problems = [f"lacks {missing}" if missing else "", f"lists {stale}, which Config does not have" if stale else "",
                f"lists {twice} more than once" if twice else ""]
    problems = [p for p in problems if p] or ([] if documented == declared else ["is not in Config's field order"])
    assert not problems, f"README's config table {'; '.join(problems)} (`python tests/test_readme.py` prints it)"


def test_config_table_defaults_are_the_dataclass_defaults():
    shown = {name: default for _, name, default, _ in readme_config_rows()}
    for f in fields(Config):
        if f.name in shown:
            assert shown[f.name] == format_default(f.default), (
                f"README's config table gives {f.name} the default {shown[f.name]}; Config's is "
                f"{format_default(f.default)}")
            assert ast.literal_eval(shown[f.name]) == f.default


def test_config_table_meanings_are_the_config_comments():
    shown = {name: (group, meaning) for group, name, _, meaning in readme_config_rows()}
    for group, name, comment in config_source_rows():
        if name in shown:
            assert shown[name] == (group, format_meaning(comment)), (
                f"README's config row for {name} is {shown[name]}; sentiment/config.py says "
                f"{(group, format_meaning(comment))} (group, trailing comment)")


# ------------------------------------------------------------------------------ commands


def shell_commands(lines: list[str]) -> list[str]:
    """The commands of a bash block: backslash continuations joined, blank and comment-only lines dropped."""
    commands, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def words(command: str) -> list[str]:
    """A command's words as the shell splits them (comments dropped), shell variables and $(...) replaced by a
    placeholder path, leading VAR=value assignments dropped."""
    while "$(" in command:  # command substitutions, nested parentheses included
        start = end = command.index("$(")
        depth = 0
        for end in range(start + 1, len(command)):
            depth += {"(": 1, ")": -1}.get(command[end], 0)
            if depth == 0:
                break
        command = command[:start] + "/placeholder" + command[end + 1:]
    command = re.sub(r"\$\{?\w+\}?", "/placeholder", command)
    split = shlex.split(command, comments=True)
    while split and re.fullmatch(r"\w+=.*", split[0]):
        split = split[1:]
    return split


def sentiment_argv(command: str) -> list[str] | None:
    """The argv the sentiment CLI gets from `command`, or None if it does not run the CLI: `sentiment ...`,
    `.venv/bin/sentiment ...`, `python -m sentiment ...`, `torchrun ... -m sentiment ...`, and
    `make train|ddp ... ARGS="..."` (both run `sentiment train $(ARGS)`)."""
    split = words(command)
    if not split:
        return None
    if Path(split[0]).name == "sentiment":
        return split[1:]
    for i in range(len(split) - 1):
        if split[i] == "-m" and split[i + 1] == "sentiment":
            return split[i + 2:]
    if split[0] == "make" and len(split) > 1 and split[1] in ("train", "ddp"):
        args = [word[len("ARGS="):] for word in split if word.startswith("ARGS=")]
        return ["train"] + (shlex.split(args[0]) if args else [])
    return None


def readme_cli_commands() -> list[tuple[str, list[str]]]:
    """(command, argv) of every command line that runs the sentiment CLI: in bash blocks, and in inline code
    spans that start with a command (`sentiment ...`, `python -m sentiment ...`, `make train ...`)."""
    commands = [command for _, block in fenced_blocks("bash") for command in shell_commands(block)]
    inline = re.findall(r"`((?:sentiment|python -m sentiment|make train|make ddp) [^`]*)`", README)
    commands += [c for c in inline if not re.fullmatch(r"sentiment \w+", c)]  # `sentiment evaluate` names it
    found = [(command, sentiment_argv(command)) for command in commands]
    return [(command, [w for w in argv if w != ELISION]) for command, argv in found if argv is not None]


def test_readme_commands_parse():
    """Every sentiment command in the README parses with the CLI itself: no unknown or misspelt flag, no
    value the config refuses."""
    commands = readme_cli_commands()
    assert {argv[0] for _, argv in commands if argv} >= {"train", "evaluate", "predict"}, (
        "the README should show `sentiment train`, `sentiment evaluate` and `sentiment predict` commands")
    for command, argv in commands:
        try:
            parse(argv)
        except ConfigError as e:
            pytest.fail(f"README command `{command}` does not parse: {e}")
        except SystemExit as e:  # --help prints and exits 0
            assert "--help" in argv and e.code == 0, command


def ci_command() -> str:
    """The one command .ci/run runs (besides `set` options and the `cd` to the repository)."""
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]
    assert len(commands) == 1, f".ci/run should run one command, the README's test command; it runs {commands}"
    return " ".join(shlex.split(commands[0]))


def test_readme_test_command_is_what_ci_runs():
    """The command the README gives for the test suite (a `make test` or pytest line in a bash block) is
    exactly the one CI runs on a fresh clone."""
    runs_tests = [" ".join(words(command)) for _, block in fenced_blocks("bash") for command in shell_commands(block)
                  if words(command)[:2] == ["make", "test"] or "pytest" in words(command)]
    assert runs_tests, "README.md shows no test command in a bash block"
    assert set(runs_tests) == {ci_command()}, (
        f"README.md tells users to run {sorted(set(runs_tests))}; .ci/run runs {ci_command()!r}")


def test_make_test_runs_the_whole_suite():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert recipe and re.search(r"-m pytest\b.*\btests\b", recipe.group(1)), "`make test` should run pytest on tests/"


# ------------------------------------------------------------------------------ names


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_lead_somewhere():
    prose = re.sub(r"^```.*?^```", "", README, flags=re.M | re.S)
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.*)$", prose, flags=re.M)}
    anchors |= set(re.findall(r'<a id="([^"]+)">', README))
    for target in re.findall(r"\]\(#([^)]+)\)", README):
        assert target in anchors, f"README links to #{target}, which no heading or <a id> in it defines"
    for target in re.findall(r"\]\((?!#|https?:)([^)]+)\)", README):
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"


def test_documented_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    for target in set(re.findall(r"`make ([a-z][a-z-]*)", README)):
        assert target in targets, f"README mentions `make {target}`, the Makefile has no such target"


def test_documented_scripts_exist():
    for script in set(re.findall(r"scripts/[\w.]+\.(?:py|sbatch)", README)):
        assert (REPO / script).is_file(), f"README mentions {script}, which does not exist"


if __name__ == "__main__":
    print(config_table())
