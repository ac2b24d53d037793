"""The README stays true: every config field, Makefile target and script it promises exists."""

import re
from dataclasses import fields
from pathlib import Path

from sentiment.config import Config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_every_config_field_is_documented():
    missing = [f.name for f in fields(Config) if f"`{f.name}`" not in README]
    assert not missing, f"README's config table lacks {missing}"


def test_documented_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    for target in set(re.findall(r"`make ([a-z][a-z-]*)", README)):
        assert target in targets, f"README mentions `make {target}`, the Makefile has no such target"


def test_documented_scripts_exist():
    for script in set(re.findall(r"scripts/[\w.]+\.(?:py|sbatch)", README)):
        assert (REPO / script).is_file(), f"README mentions {script}, which does not exist"


def test_ci_runs_the_readme_test_command():
    assert "make test" in README
    assert "make test" in (REPO / ".ci" / "run").read_text()
