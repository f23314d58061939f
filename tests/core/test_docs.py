"""The documentation: the README stays a front page with CI's set-up commands, and the MkDocs site builds strictly.

`mkdocs build --strict` fails on any warning, and mkdocs.yml's `validation` turns every broken link and
anchor into one; measured tables are rendered from benchmarks/results/*.json by docs/hooks/figures.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKER = re.compile(r"^<!-- figures: ([a-z0-9_]+) -->", re.MULTILINE)


def figures_hook():
    spec = importlib.util.spec_from_file_location("_cfdeploy_docs_figures", DOCS / "hooks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ci_setup_commands() -> list[str]:
    """The command lines .ci/run runs as 'the README's' commands: the first command line after each `# README` comment."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = []
    for number, line in enumerate(lines):
        if line.startswith("# README"):
            following = (
                candidate
                for candidate in lines[number + 1 :]
                if candidate.strip() and not candidate.startswith(("#", "set "))
            )
            commands.append(next(following))
    return commands


def test_the_readme_stays_a_front_page_of_at_most_260_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move reference material into docs/"


def test_the_readme_holds_the_set_up_commands_exactly_as_ci_runs_them():
    commands = ci_setup_commands()
    assert len(commands) == 2, commands
    assert commands[0].startswith("python3 -m venv") and commands[1].endswith("python -m pytest -q -n 2"), commands
    readme_lines = README.read_text().splitlines()
    for command in commands:
        assert command in readme_lines, f"README.md no longer has CI's set-up command as a line of its own: {command}"


def test_every_relative_link_in_the_readme_points_at_a_file_that_exists():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    relative = [target for target in targets if not re.match(r"[a-z]+:", target)]
    assert any(target.startswith("docs/") for target in relative)
    missing = [target for target in relative if not (ROOT / target).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_every_docs_page_is_linked_from_the_readme_and_listed_in_the_navigation():
    readme, config = README.read_text(), (ROOT / "mkdocs.yml").read_text()
    for page in sorted(DOCS.glob("*.md")):
        assert re.search(rf"^\s*- .*: {re.escape(page.name)}$", config, re.MULTILINE), (
            f"{page.name} is not in mkdocs.yml's nav"
        )
        if page.name != "index.md":
            assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


def test_every_benchmark_json_is_rendered_on_some_page_and_every_marker_renders():
    hook = figures_hook()
    markers = {name for page in DOCS.glob("*.md") for name in MARKER.findall(page.read_text())}
    assert markers <= set(hook.FIGURES), f"unknown figures markers: {markers - set(hook.FIGURES)}"
    rendered_files = set()
    for name in sorted(markers):
        rendered = hook.figures(name)
        assert "|" in rendered or re.search(r"not measured (on a GPU )?yet", rendered), name
        rendered_files.update(re.findall(r"`benchmarks/results/([a-z0-9_]+\.json)`", rendered))
    committed = {path.name for path in (ROOT / "benchmarks" / "results").glob("*.json")}
    assert committed <= rendered_files, f"benchmark JSON not rendered on any page: {sorted(committed - rendered_files)}"


def test_the_figures_hook_renders_the_json_and_names_its_source():
    hook = figures_hook()
    rendered = hook.figures("cpu_256")
    report = hook.load("cpu_256.json")
    generator_ms = 1000 * report["backends"][0]["results"][0]["stages_s"]["generator"]["median"]
    assert f"| {generator_ms:.0f} |" in rendered
    assert "*Rendered from `benchmarks/results/cpu_256.json`" in rendered and report["machine"]["cpu"] in rendered
    with pytest.raises(KeyError, match="unknown figures marker"):
        hook.figures("no_such_figures")


def test_the_photo_cold_start_figures_say_not_measured_yet_until_measured_then_show_the_targets():
    encoder = figures_hook().benchmark("encoder")
    assert "not measured yet" in encoder.render_cold_start({"settings": {"size": 1024}})

    def mode(wall: float, cache: object) -> dict:
        return {
            "median_s": wall,
            "samples_s": [wall],
            "stages_median_s": {"encoder": wall / 2},
            "session_cache": [cache],
        }

    part = {
        "machine": {"cpu": "a CPU", "logical_cpus": 2},
        "size": 1024,
        "runs": 1,
        "photo": {"width": 1600, "height": 1200, "faces": 1},
        "backend": ["onnxruntime"],
        "stages": ["encoder"],
        "modes": {
            "cache_empty": mode(11.0, {"encoder": "miss"}),
            "cache_filled": mode(3.5, {"encoder": "hit"}),
            "no_cache": mode(10.0, "off"),
        },
        "target": {"size": 1024, "cache_filled_max_s": 4.0},
    }
    rendered = encoder.render_cold_start({"cold_start": part})
    assert "| cache filled (a second process) | hit | 3.50 | 1.75 | 1.75 | ≤ 4 s: **met** |" in rendered
    assert "no slower than no cache: 1.10x, **not met** |" in rendered and "only indicate" not in rendered


def test_the_docs_name_modules_and_files_that_exist():
    text = README.read_text() + "".join(page.read_text() for page in DOCS.glob("*.md"))
    stale = []
    for dotted in set(re.findall(r"`(cfdeploy(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text)):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            base = ROOT.joinpath(*parts[:cut])
            source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if source.is_file():
                break
        else:
            stale.append(dotted)
            continue
        if cut < len(parts) - 1:  # at most one attribute after the module: a name it defines
            stale.append(dotted)
        elif cut == len(parts) - 1:
            name = re.escape(parts[cut])
            defined = rf"^(?:(?:async )?def {name}\b|class {name}\b|{name}\s*[:=]|from \S+ import .*\b{name}\b)"
            if not re.search(defined, source.read_text(), re.MULTILINE):
                stale.append(dotted)
    for path in set(re.findall(r"`((?:cfdeploy|benchmarks|export|tests|docs)/[A-Za-z0-9_./*-]+)", text)):
        path = path.rstrip("/.")
        if path.startswith("tests/") and path.endswith(".py"):
            exists = any((ROOT / "tests").rglob(Path(path).name))  # test modules may live in sub-folders
        else:
            exists = (ROOT / path).parent.is_dir() if "*" in path else (ROOT / path).exists()
        if not exists:
            stale.append(path)
    assert not stale, f"the docs name modules or files that do not exist: {sorted(stale)}"


def test_the_docs_build_strictly_with_no_warnings_and_without_torch(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[dev]' brings mkdocs-material)")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[dev]' brings it)")
    # The docs build in a light environment: a `torch` that cannot be imported proves the hook never needs it.
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the docs build must not import torch')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")])),
        "NO_MKDOCS_2_WARNING": "1",
    }
    site = tmp_path / "site"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = built.stdout + built.stderr
    assert built.returncode == 0, output
    assert "WARNING" not in output, output
    pages = {path.relative_to(site).as_posix(): path.read_text() for path in site.rglob("index.html")}
    assert not [name for name, page in pages.items() if "<!-- figures:" in page]
    assert (
        "Rendered from" in pages["performance/index.html"]
        and "not measured on a GPU yet" in pages["performance/index.html"]
    )
    assert "open_backend" in pages["python-api/index.html"], (
        "the README's Python API example is included in python-api.md"
    )
