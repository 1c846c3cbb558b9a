"""The layers hold: the import-linter contract in pyproject.toml passes (imports inside functions counted),
and docs/ARCHITECTURE.md's module map lists the layers in the contract's order."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _contract() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    return contract


def test_no_import_goes_up_the_layers():
    """`lint-imports` keeps the contract (`make test` runs it too; here a plain pytest run checks it)."""
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]


def test_the_module_map_lists_the_contracts_layers_bottom_up():
    """Every layer of the contract has rows in the module map, in the contract's order read bottom up (a
    layer's rows may only import the rows above them); every row of the package belongs to a layer."""
    contract = _contract()
    assert contract["type"] == "layers" and contract["containers"] == ["salf_engine"]
    assert contract["exhaustive"] is True  # a new subpackage needs a layer (and a row) to pass the check
    layers = [frozenset(part.strip() for part in layer.split("|")) for layer in reversed(contract["layers"])]
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    seen: list[str] = []
    for row in re.findall(r"^\| (?:\*\*)?`([^`]+)`", table, flags=re.M):
        if row.startswith(("kernels/", "bench/", "csrc/")):  # outside the package folder (the design's)
            continue
        unit = row.split("/", 1)[0].removesuffix(".py")
        if not seen or seen[-1] != unit:
            seen.append(unit)
    assert len(seen) == len(set(seen)), f"a layer's rows are split up in the module map: {seen}"
    assert "__main__" not in seen  # the entry point: the contract's top layer, no row of its own
    i = 0
    for layer in layers:
        if layer == {"__main__"}:
            continue
        assert set(seen[i:i + len(layer)]) == layer, (seen[i:], sorted(layer))
        i += len(layer)
    assert i == len(seen), f"rows of no layer: {seen[i:]}"
