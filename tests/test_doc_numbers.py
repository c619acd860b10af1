"""Every decimal number in the results pages comes from a committed results file.

Each page is backed by the results files its numbers are generated from (``BACKING``):

* ``README.md``: ``benchmarks/results/`` and ``docs/results/`` (its main-job numbers are checked
  more strictly against the fresh-clone run in ``tests/test_readme_numbers.py``);
* ``benchmarks/README.md``: ``benchmarks/results/`` (JSON written by ``benchmarks/run.py`` and
  ``benchmarks/bench_allocator.py``, and the Markdown tables those scripts write beside them);
* ``docs/RESULTS.md``: ``docs/results/`` (the Table 1 study's ``results_<preset>.jsonl``,
  ``summary_<preset>.json``, ``spread_curves_<preset>.json`` and ``manifold_structure_<preset>.json``
  written by ``benchmarks/reproduce_table1.py``; ``mnist_classifier.json`` by
  ``scripts/eval_mnist_classifier.py``).

A page's number with k decimals matches a number of its backing files that rounds to it at k
decimals (a page rounds what a results file stores in full), or that is written the same way.
The generated blocks of ``docs/RESULTS.md`` (means, standard deviations and geometric means over
seeds) are checked more strictly: each must be exactly what ``reproduce_table1.render_tables``
writes from the committed results files. Its hand-written text may also quote the study's
settings, checked against the code that sets them (``SETTINGS``).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]

BACKING: dict[str, list[str]] = {
    "README.md": ["benchmarks/results", "docs/results"],
    "benchmarks/README.md": ["benchmarks/results"],
    "docs/RESULTS.md": ["docs/results"],
}

#: code that sets the study's settings quoted in the hand-written text of a page (λ of Q-WGAN)
SETTINGS: dict[str, list[str]] = {
    "docs/RESULTS.md": ["qmm_plugin/paper/gan_families.py"],
}
GENERATED = re.compile(r"<!-- BEGIN generated:(\w+) -->.*?<!-- END generated:\1 -->", re.S)

#: a decimal number: digits, a point, digits, optionally an exponent (1.5, 0.000247, 6.48e-06)
DECIMAL = re.compile(r"(?<![\w.])(\d+\.\d+(?:e[-+]?\d+)?)(?![\w.]*\d)")
ANY_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _json_numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _json_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _json_numbers(v)]
    if isinstance(value, str):
        return [float(m) for m in ANY_NUMBER.findall(value)]
    return []


def backing_numbers(doc: str) -> tuple[list[float], str]:
    """All numbers in the results files backing ``doc``, and their text."""
    numbers: list[float] = []
    texts: list[str] = []
    for folder in BACKING[doc]:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix == ".json":
                numbers += _json_numbers(json.loads(path.read_text()))
            elif path.suffix == ".jsonl":
                for line in path.read_text().splitlines():
                    if line.strip():
                        numbers += _json_numbers(json.loads(line))
            elif path.suffix == ".md":
                text = path.read_text()
                texts.append(text)
                numbers += [float(m) for m in ANY_NUMBER.findall(text)]
    return numbers, "\n".join(texts)


def _half_unit(token: str) -> float:
    """Half a unit in the last written digit of ``token`` (0.5e-3 for '1.021', 0.5e-8 for '6.48e-06')."""
    mantissa, _, exponent = token.partition("e")
    decimals = len(mantissa.split(".")[1])
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def unbacked(doc: str) -> list[str]:
    """The decimal numbers of ``doc`` outside generated blocks that no backing file holds."""
    numbers, text = backing_numbers(doc)
    text += "\n".join((ROOT / f).read_text() for f in SETTINGS.get(doc, []))
    page = GENERATED.sub("", (ROOT / doc).read_text())
    missing = []
    for token in sorted(set(DECIMAL.findall(page))):
        value, tol = float(token), _half_unit(token) * (1 + 1e-9)
        if re.search(rf"(?<![\w.]){re.escape(token)}(?![\d])", text):
            continue
        if not any(math.isclose(x, value, rel_tol=0, abs_tol=tol) or math.isclose(100 * x, value, rel_tol=0, abs_tol=tol)
                   for x in numbers):
            missing.append(token)
    return missing


@pytest.mark.parametrize("doc", sorted(BACKING))
def test_every_decimal_number_comes_from_a_results_file(doc: str) -> None:
    missing = unbacked(doc)
    assert not missing, (f"{doc} quotes numbers that no results file in {BACKING[doc]} holds: {missing}; "
                         "quote the committed results (or commit the results file that holds them)")


def test_an_invented_number_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a number no results file holds is reported, a rounded one is not."""
    page = tmp_path / "page.md"
    results = tmp_path / "results"
    results.mkdir()
    (results / "r.json").write_text(json.dumps({"ratio": 1.02137, "tiny": 6.4815e-06}))
    page.write_text("median 1.021 (6.48e-06), interval ±1.2%, fast 0.3 ms\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setitem(BACKING, "page.md", ["results"])
    assert unbacked("page.md") == ["0.3", "1.2"]


def _reproduce_table1():  # noqa: ANN202 - the study's package, benchmarks/table1
    """``benchmarks/table1`` as the study's script imports it (from the script's folder)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import table1.config
    import table1.reporting

    return SimpleNamespace(Budget=table1.config.Budget, MODELS=table1.config.MODELS,
                           render_tables=table1.reporting.render_tables, replace_block=table1.reporting.replace_block)


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_results_blocks_are_rendered_from_the_committed_results(preset: str) -> None:
    """Each generated block of docs/RESULTS.md is what the study's report writes from
    ``docs/results/results_<preset>.jsonl``, ``summary_<preset>.json`` (budget) and
    ``manifold_structure_<preset>.json``."""
    rt = _reproduce_table1()
    folder = ROOT / "docs" / "results"
    page = (ROOT / "docs" / "RESULTS.md").read_text()
    rows = [json.loads(line) for line in (folder / f"results_{preset}.jsonl").read_text().splitlines() if line.strip()]
    budget = rt.Budget(**json.loads((folder / f"summary_{preset}.json").read_text())["budget"])
    structure = json.loads((folder / f"manifold_structure_{preset}.json").read_text())
    models = [m for m in rt.MODELS if any(r["model"] == m for r in rows)]
    assets = {"results": f"results/results_{preset}.jsonl"}
    for png in sorted(folder.glob(f"*_{preset}.png")):  # the keys report() gives its assets
        key = png.stem if png.stem.startswith("generalize_") else png.stem[: -len(preset) - 1]
        assets[key] = f"results/{png.name}"
    block = re.search(rf"<!-- BEGIN generated:{preset} -->.*?<!-- END generated:{preset} -->", page, re.S)
    assert block is not None, f"docs/RESULTS.md has no generated block for {preset}"
    command = re.search(r"Command: `([^`]*)`", block.group(0))
    assert command is not None
    body = rt.render_tables(rows, budget, models, ROOT, assets, command.group(1), structure)
    assert rt.replace_block(page, preset, body) == page, (
        f"the {preset} block of docs/RESULTS.md differs from what its results files render; rerun "
        f"python benchmarks/reproduce_table1.py {'--quick ' if preset == 'quick' else ''}--report-only")
