"""The structure the README's Layout section describes, held where a test can hold it."""

import subprocess
import sys

import pytest


def imported_modules(statement: str) -> set[str]:
    """Every module a fresh interpreter imports to run `statement` (from -X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True,
                          check=True)
    return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("module", ["sfa_vivit.train", "sfa_vivit.tools.evaluate"])
def test_the_read_side_imports_no_write_side(module):
    """Training and evaluation read shards through data.manifest and data.reader: neither PyAV, the
    annotation parsers, prep, nor kfp comes with them."""
    modules = imported_modules(f"import {module}")
    assert "sfa_vivit.data.manifest" in modules
    forbidden = {"av", "sfa_vivit.data.prep.annotations", "sfa_vivit.data.prep", "sfa_vivit.data.prep.video",
                 "sfa_vivit.models.importers", "kfp"}
    assert not forbidden & modules, sorted(forbidden & modules)
