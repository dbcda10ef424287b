"""The README stays a short front door that tells the truth about the tree, the pipeline file and
the CLI; the docs' links and the code's citations of docs/DESIGN.md point at things that exist;
benchmarks/RESULTS.md is what benchmarks/page.py builds from the result sections."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from benchmarks.page import write_results_page
from flexkd.cli import build_parser
from flexkd.pipeline.stages import STAGE_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
MAX_README_LINES = 200


def _section(text: str, heading: str) -> str:
    """The ``## `` section whose heading starts with ``heading``, up to the next ``## ``."""
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _code_blocks(text: str, language: str = "") -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def layout_paths(block: str) -> list[Path]:
    """Paths named by the layout tree: each line's first word, under the nearest less-indented folder."""
    parents: list[tuple[int, Path]] = []
    paths = []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = (parents[-1][1] if parents else Path()) / name.rstrip("/")
        paths.append(path)
        if name.endswith("/"):
            parents.append((indent, path))
    return paths


def test_the_readme_is_at_most_200_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/ or benchmarks/"


def test_every_path_in_the_readme_layout_exists():
    [block] = _code_blocks(_section(README.read_text(), "Layout"))
    paths = layout_paths(block)
    assert Path("flexkd/method") in paths and Path("flexkd/cli.py") in paths and Path("tests") in paths
    assert [str(path) for path in paths if not (REPO_ROOT / path).exists()] == []
    # Every package of the library has its line, and the stages link is what the tree says it is.
    packages = {path.parent.relative_to(REPO_ROOT) for path in (REPO_ROOT / "flexkd").glob("*/__init__.py")}
    assert sorted(str(package) for package in packages - set(paths) - {Path("flexkd/stages")}) == []
    assert (REPO_ROOT / "flexkd" / "stages").is_symlink()
    assert (REPO_ROOT / "flexkd" / "stages").resolve() == (REPO_ROOT / "stages").resolve()
    docs_line = next(line for line in block.splitlines() if line.startswith("docs/"))
    assert [name for name in re.findall(r"[\w-]+\.md", docs_line) if not (REPO_ROOT / "docs" / name).is_file()] == []


def test_the_layout_parser_nests_indented_lines_under_their_folder():
    block = "a/   x\n  b/     y\n    c.py  z\n  d.py  w\ne/\n"
    assert layout_paths(block) == [Path("a"), Path("a/b"), Path("a/b/c.py"), Path("a/d.py"), Path("e")]


def test_the_explained_pipeline_file_is_the_shipped_quickstart():
    [explained] = _code_blocks(
        _section(README.read_text(), "A pipeline file, explained: `pipelines/quickstart.yaml`"), "yaml"
    )
    assert yaml.safe_load(explained) == yaml.safe_load((REPO_ROOT / "pipelines" / "quickstart.yaml").read_text())


def test_the_readme_shows_every_subcommand_and_the_test_command():
    parser = build_parser()
    [subcommands] = [action for action in parser._actions if action.dest == "command"]
    cli = _section(README.read_text(), "The CLI")
    assert [name for name in subcommands.choices if f"flexkd {name} " not in cli] == []
    assert " ".join(STAGE_NAMES) in cli  # what --stages and --force take, in the order they run
    assert "make test " in _section(README.read_text(), "The two commands")  # CI's .ci/run calls it


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda path: path.name)
def test_relative_links_point_at_files_that_exist(page):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    local = [target for target in targets if "://" not in target]
    assert [target for target in local if not (page.parent / target).exists()] == []


def test_citations_of_the_design_doc_name_sections_it_has():
    numbered = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (REPO_ROOT / "docs" / "DESIGN.md").read_text(), re.M))
    cited = {}
    for path in sorted((REPO_ROOT / "flexkd").rglob("*.py")):
        if "stages" in path.relative_to(REPO_ROOT).parts:
            continue  # the same files as stages/, through the link
        for citation in re.findall(r"DESIGN\.md sections? ([\d.,\sand]+\d)", path.read_text()):
            cited[path.name] = re.findall(r"\d+(?:\.\d+)?", citation)
        assert "DESIGN.md" not in path.read_text() or "docs/DESIGN.md" in path.read_text(), path
    assert cited, "the method cites the design doc"
    assert {name: [s for s in sections if s not in numbered] for name, sections in cited.items()} == {
        name: [] for name in cited
    }


def test_the_results_page_is_built_from_the_sections_and_holds_the_timings(tmp_path):
    built = write_results_page(page=tmp_path / "RESULTS.md").read_text()
    assert "## Timings: the quickstart, the test tiers and the slow tests" in built
    committed = (REPO_ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert committed == built, "benchmarks/RESULTS.md is stale: rebuild it with benchmarks.page.write_results_page()"
