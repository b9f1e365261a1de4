"""The documents stay true to the repository: the configuration reference is what the code's help says,
every relative link resolves, and the README's Quick start names only files and modules that exist."""
import importlib.util
import re
from pathlib import Path

import pytest

from llmemb_dist import config_reference

from conftest import REPO

DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def test_configuration_reference_is_current():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == config_reference.markdown(), (
        f"docs/configuration.md is stale; regenerate it with: {config_reference.COMMAND}")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    targets = LINK.findall(FENCE.sub("", doc.read_text()))
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    broken = [t for t in relative if not (doc.parent / t.split("#", 1)[0]).exists()]
    assert not broken, f"{doc.relative_to(REPO)} links to missing files: {broken}"


def quick_start_commands() -> str:
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", readme, re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '## Quick start' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", section[1], re.DOTALL | re.MULTILINE)
    assert blocks, "README.md's Quick start has no bash block"
    return "\n".join(blocks)


def test_quick_start_names_only_files_and_modules_that_exist():
    commands = quick_start_commands()
    paths = re.findall(r"(?:launch/\S+\.py|scripts/\S+\.sh|configs/\S+\.yaml)", commands)
    modules = re.findall(r"python3?\s+-m\s+([\w.]+)", commands)
    assert {"scripts/install.sh", "launch/pipeline.py", "configs/default.yaml"} <= set(paths)
    assert "pytest" in modules
    missing = [p for p in paths if not (REPO / p).is_file()]
    assert not missing, f"README.md's Quick start names files that do not exist: {missing}"
    unknown = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not unknown, f"README.md's Quick start runs modules that cannot be found: {unknown}"


def test_quick_start_markers_are_registered():
    """`-m "not slow"` selects by a marker: an unregistered one would silently select every test."""
    markers = re.findall(r'-m\s+"(?:not\s+)?(\w+)"', quick_start_commands())
    pyproject = (REPO / "pyproject.toml").read_text()
    assert markers and all(re.search(rf'^\s*"{m}:', pyproject, re.MULTILINE) for m in markers)
