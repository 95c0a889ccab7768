"""The documentation runs as written: every example with --tiny, every ```python block of README.md and
docs/*.md (a file's blocks in order, as one script; ```python no-run blocks are skipped), and the README's
table of config fields and defaults matches the dataclasses."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moelora import LoraConfig, MiLoraConfig, MixLoraConfig
from moelora.config import LLAMA_PROJECTIONS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = (MixLoraConfig, MiLoraConfig, LoraConfig)
BOOKKEEPING = ("base_model_name_or_path", "task_type", "peft_type")  # named in a sentence under the table
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.M | re.S)


def _run(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(cwd), "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_with_tiny(script, tmp_path):
    proc = _run([sys.executable, str(script), "--tiny"], tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip(), "the example printed nothing"


def test_every_example_has_its_command_in_its_docstring():
    assert EXAMPLES, "examples/ is empty"
    for script in EXAMPLES:
        assert f"python examples/{script.name} --tiny" in script.read_text(), script.name


def python_blocks(path: Path) -> tuple[list[str], int]:
    """(the runnable ```python blocks, how many are marked no-run)."""
    blocks = BLOCK.findall(path.read_text(encoding="utf-8"))
    runnable = [code for info, code in blocks if "no-run" not in info]
    return runnable, len(blocks) - len(runnable)


DOCS_WITH_CODE = [p for p in DOCS if python_blocks(p)[0]]


def test_readme_and_docs_have_code_and_few_no_run_blocks():
    assert ROOT / "README.md" in DOCS_WITH_CODE
    skipped = sum(python_blocks(p)[1] for p in DOCS)
    assert skipped <= 3, f"{skipped} blocks are marked no-run: keep them for GPU-only or download snippets"


@pytest.mark.parametrize("doc", DOCS_WITH_CODE, ids=[p.name for p in DOCS_WITH_CODE])
def test_python_blocks_run(doc, tmp_path):
    code, _ = python_blocks(doc)
    script = tmp_path / f"{doc.stem}_blocks.py"
    script.write_text("\n\n".join(code), encoding="utf-8")
    proc = _run([sys.executable, str(script)], tmp_path, timeout=300)
    assert proc.returncode == 0, f"{doc.name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


# --- the README's config table ------------------------------------------------------------------------------


def render_default(f: dataclasses.Field) -> str:
    """How the README's config table writes a field's default."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value == LLAMA_PROJECTIONS:
        return "all 7 ¹"
    return f"`{value!r}`"


def config_rows() -> dict[str, list[str]]:
    """field -> [default in MixLoraConfig, MiLoraConfig, LoraConfig] ('-' where a class lacks the field)."""
    rows: dict[str, list[str]] = {}
    for column, cls in enumerate(CONFIGS):
        for f in dataclasses.fields(cls):
            if f.name in BOOKKEEPING:
                continue
            rows.setdefault(f.name, ["-"] * len(CONFIGS))[column] = render_default(f)
    return rows


def readme_config_table() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    header = "| field | `MixLoraConfig` | `MiLoraConfig` | `LoraConfig` | meaning |"
    assert header in text, "the README has no config table"
    rows = {}
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells[1:4]
    return rows


def test_readme_config_table_lists_every_field():
    assert sorted(readme_config_table()) == sorted(config_rows())
    for cls in CONFIGS:
        assert {f.name for f in dataclasses.fields(cls)} <= {*config_rows(), *BOOKKEEPING}, cls.__name__


def test_readme_names_the_bookkeeping_fields_and_their_defaults():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    defaults = {f.name: f.default for f in dataclasses.fields(MixLoraConfig) if f.name in BOOKKEEPING}
    assert f"`base_model_name_or_path` (`{defaults['base_model_name_or_path']!r}`)" in text
    assert f"`task_type` (`{defaults['task_type']!r}`)" in text
    assert "`peft_type`" in text


@pytest.mark.parametrize("field", sorted(config_rows()))
def test_readme_config_table_default(field):
    assert readme_config_table().get(field) == config_rows()[field]
