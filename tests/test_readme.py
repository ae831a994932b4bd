"""The README and docs/ cannot rot: the README's python blocks run as written on a CPU, its backend
tables match the generated ones, the files it names exist, and every citation of docs/ in the repository
(page, `#anchor` or `, "Section"`) resolves."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# Runs the blocks in order in one namespace; a failure names the block and its line in README.md.
_RUNNER = textwrap.dedent("""
    import re, sys
    text = open(sys.argv[1]).read()
    namespace = {"__name__": "__main__"}
    for m in re.finditer(r"^```python\\n(.*?)^```", text, re.S | re.M):
        line = text.count("\\n", 0, m.start(1)) + 1
        code = compile("\\n" * (line - 1) + m.group(1), "README.md", "exec")
        print(f"README.md: block at line {line}", file=sys.stderr, flush=True)
        exec(code, namespace)
""")


def _blocks(lang):
    return [m.group(2) for m in FENCE.finditer(README.read_text()) if m.group(1) == lang]


def test_readme_python_blocks_run_on_a_cpu(tmp_path):
    assert len(_blocks("python")) >= 3
    # A clean CPU environment: no backend forced, no GPU, files written into a scratch folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith("M1_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    run = subprocess.run([sys.executable, "-c", _RUNNER, str(README)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"a README python block failed:\n{run.stderr[-6000:]}"


def _readme_tables():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import readme_tables
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return readme_tables


def test_readme_backend_tables_are_generated():
    text = README.read_text()
    assert _readme_tables().rewritten(text) == text, \
        "README.md's backend tables differ from lightning_ops/moe_ops BACKENDS: run python scripts/readme_tables.py"


def test_readme_table_check_fails_on_a_stale_table():
    readme_tables = _readme_tables()
    text = README.read_text()
    fresh = readme_tables.rewritten(text)
    assert readme_tables.rewritten(fresh.replace("| `torch` |", "| `torch-old` |", 1)) == fresh
    assert "| `triton` |" in fresh and "| `cuda` |" in fresh and "| `torch` |" in fresh
    with pytest.raises(ValueError, match="markers"):
        readme_tables.rewritten(text.replace(readme_tables.END, ""))


def test_readme_names_files_that_exist():
    text = README.read_text()
    linked = re.findall(r"\]\(([^)#]+)", text)
    named = re.findall(r"`((?:scripts|tests|bench|docs|csrc|model|lightning_ops|moe_ops|\.ci)/[\w/-]*\.\w+)`", text)
    missing = [p for p in dict.fromkeys(linked + named) if not (ROOT / p).exists()]
    assert not missing, f"README.md names files that do not exist: {missing}"
    for block in _blocks("bash"):
        for script in re.findall(r"bash (scripts/\S+\.sh)", block):
            assert (ROOT / script).is_file(), script


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(page):
    return [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]


_SOURCES = (".py", ".md", ".sh", ".cu", ".cuh", ".cpp", ".h", ".toml", ".txt")
_SKIP = {".git", ".venv", "build", "results", "results-cpu", "__pycache__", ".notes", ".hypothesis"}


def test_docs_citations_resolve():
    """`docs/<page>.md`, `docs/<page>.md#anchor` and `docs/<page>.md, "Section"` anywhere in the repository, and
    relative links between the pages of docs/, point at pages and headings that exist."""
    cite = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+)|,\s*\"([^\"]+)\")?")
    link = re.compile(r"\]\(([\w-]+\.md)(?:#([\w-]+))?\)")
    broken = []
    for path in ROOT.rglob("*"):
        if not path.is_file() or path.suffix not in _SOURCES or _SKIP & set(path.relative_to(ROOT).parts):
            continue
        text = path.read_text(errors="replace")
        found = [(m, ROOT / "docs") for m in cite.finditer(text)]
        if path.parent == ROOT / "docs":
            found += [(m, path.parent) for m in link.finditer(text)]
        for m, folder in found:
            page, anchor, section = folder / m.group(1), m.group(2), m.group(3) if m.re is cite else None
            where = f"{path.relative_to(ROOT)}: {m.group(0)}"
            if not page.is_file():
                broken.append(f"{where} (no such page)")
            elif anchor and anchor not in {_slug(h) for h in _headings(page)}:
                broken.append(f"{where} (no heading with that anchor)")
            elif section and not any(section.lower() in h.lower() for h in _headings(page)):
                broken.append(f"{where} (no heading containing {section!r})")
    assert not broken, "broken citations of docs/:\n" + "\n".join(broken)
