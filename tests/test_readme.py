"""README: short, its install and test commands are exactly what CI runs, its links resolve."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _block_after(text, heading):
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()


def test_readme_is_short_and_starts_with_install_run_test():
    text = _read("README.md")
    assert len(text.splitlines()) < 200
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:3] == ["Install", "Run", "Test"]
    assert _block_after(text, "Install") == ["pip install torch==2.13.0", "pip install -e .[test]"]
    assert _block_after(text, "Run") == ["python run_finetune.py -m MISSRec -d demo"]
    assert _block_after(text, "Test") == ["python -m pytest -q"]


def test_ci_runs_the_readme_commands_literally():
    readme, ci = _read("README.md"), _read(".ci/run").splitlines()
    for line in _block_after(readme, "Install") + _block_after(readme, "Test"):
        assert line in ci, line


def test_every_link_and_figure_resolves():
    for page in ["README.md"] + [f"docs/{p}" for p in os.listdir(os.path.join(ROOT, "docs")) if p.endswith(".md")]:
        base = os.path.dirname(os.path.join(ROOT, page))
        for target in re.findall(r"\]\(([^)#\s]+)\)", _read(page)):
            if not target.startswith(("http://", "https://")):
                assert os.path.exists(os.path.join(base, target)), f"{page}: {target}"
    # every figure and results table stays reachable from the README or a page it links
    reachable = _read("README.md") + "".join(_read(f"docs/{p}") for p in os.listdir(os.path.join(ROOT, "docs")))
    for f in os.listdir(os.path.join(ROOT, "results")):
        if f.endswith((".png", ".md")):
            assert f"results/{f}" in reachable, f
