"""The package layout: ``import qmm_plugin`` loads the plugin only (the paper kit,
``qmm_plugin.paper``, is imported on demand), and the examples and benchmarks import the package
as installed, without editing ``sys.path`` or loading scripts by file path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the plugin: the modules directly in qmm_plugin/ (subpackages such as the paper kit are not)
PLUGIN = {"qmm_plugin"} | {f"qmm_plugin.{f.stem}" for f in (ROOT / "qmm_plugin").glob("*.py") if f.stem != "__init__"}
#: what edits the import path or imports a file by its location
PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)|\[|\+?=)|spec_from_file_location|runpy\.")


def _loaded_after(code: str) -> list[str]:
    script = f"{code}; import sys, json; print(json.dumps(sorted(m for m in sys.modules if m.startswith('qmm_plugin'))))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_qmm_plugin_loads_only_the_plugin() -> None:
    loaded = set(_loaded_after("import qmm_plugin"))
    assert {"qmm_plugin", "qmm_plugin.convert", "qmm_plugin.inversion"} <= loaded
    assert loaded <= PLUGIN, f"import qmm_plugin also loads {sorted(loaded - PLUGIN)}"


def test_the_paper_kit_imports_on_demand() -> None:
    loaded = set(_loaded_after("import qmm_plugin.paper.data, qmm_plugin.paper.training"))
    assert {"qmm_plugin.paper", "qmm_plugin.paper.data", "qmm_plugin.paper.training"} <= loaded


@pytest.mark.parametrize("folder", ["examples", "benchmarks"])
def test_no_script_edits_the_import_path(folder: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    offenders = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
                 for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
                 if PATH_EDIT.search(line.split("#", 1)[0])]
    assert not offenders, "import the package instead of editing sys.path:\n" + "\n".join(offenders)


def test_the_path_pattern_catches_the_usual_edits() -> None:
    for line in ("sys.path.insert(0, str(HERE))", "sys.path.append('x')", "sys.path[:0] = [d]",
                 "spec = importlib.util.spec_from_file_location(name, path)", "sys.path += ['x']"):
        assert PATH_EDIT.search(line), line
    assert not PATH_EDIT.search("import sys")
