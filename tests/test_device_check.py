"""bench/device_check.sh's CPU tiny mode: the one command a GPU session runs works before a GPU is lent."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_device_check():
    spec = importlib.util.spec_from_file_location("device_check", BENCH / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_mode_measures_both_backends_into_one_table(tmp_path):
    out = tmp_path / "device_check.md"
    assert load_device_check().main(["--tiny", "--parts", "pipeline", "--dtypes", "fp32", "--batches", "1",
                                     "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(row["what"], row["dtype"], row["batch"]) for row in rows] == [("ridfr", "fp32", 1),
                                                                           ("restorerid", "fp32", 1)]
    assert all(row["seconds_per_face"] > 0 and row["faces_per_s"] > 0 and row["peak_gb"] > 0 for row in rows)
    assert all("non-finite" not in row["note"] for row in rows)
    table = out.read_text()
    assert "| part | backend / workflow | dtype | batch | s per face | faces/s | peak RSS (GB) | note |" in table
    assert table.count("| pipeline |") == 2
