"""The package's metadata: license, citation, changelog, and a build without warnings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ranger_plugins

tomllib = pytest.importorskip("tomllib")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_is_apache_2_as_declared():
    assert PROJECT["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def _readme_citations() -> list[str]:
    """The titles quoted in the README's Citations section (every paper it names)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Citations") :]
    titles = re.findall(r'"([^"]+)"', " ".join(section.split()))
    return [title.rstrip(".") for title in titles]


def test_citation_cites_the_package_and_every_paper():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert citation["version"] == PROJECT["version"] == ranger_plugins.__version__
    assert citation["license"] == PROJECT["license"]
    assert "ranger_plugins" in citation["title"]
    referenced = {" ".join(ref["title"].split()) for ref in citation["references"]}
    titles = _readme_citations()
    # RAdam, Lookahead, Gradient Centralization, Mish, and Less Wright's Ranger repository
    assert len(titles) == 5 and "Ranger-Deep-Learning-Optimizer" in titles
    assert set(titles) <= referenced
    assert all(ref["authors"] for ref in citation["references"])


def test_changelog_has_the_current_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "keepachangelog.com" in changelog
    assert "## [Unreleased]" in changelog
    assert f"## [{PROJECT['version']}] - " in changelog


@pytest.mark.slow
def test_wheel_builds_without_deprecation_warnings(tmp_path):
    """A build of a copy of the sources (pip builds in place; the tree stays as it is)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "ranger_plugins",
        source / "ranger_plugins",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v"]
        + [str(source), "-w", str(tmp_path / "wheels")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert not re.search(r"deprecat", output, re.IGNORECASE), [
        line for line in output.splitlines() if "deprecat" in line.lower()
    ]
    (wheel,) = (tmp_path / "wheels").glob("ranger_plugins-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert b"License-Expression: Apache-2.0" in metadata
    assert b"License-File: LICENSE" in metadata
