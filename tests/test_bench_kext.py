"""benchmarks/bench_kext.py: the K-extended GEMMs it times compute what today's two passes
compute (its CPU smoke run checks that), and it writes its JSON."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_kext", ROOT / "benchmarks" / "bench_kext.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_mode_checks_the_math_and_writes_json(tmp_path):
    bench = _load()
    out = tmp_path / "kext.json"
    result = bench.main(["--tiny", "--columns", "16,64", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert [r["C"] for r in result["runs"]] == [16, 64]
    for run in result["runs"]:
        assert run["max_rel_err"] < 1e-5  # [x | h] @ [W | B]^T == x @ W^T + h @ B^T
        assert set(run["per_projection"]) == {"q", "k", "v", "o", "gate", "up", "down"}
        assert all(t > 0 for t in run["layer_ms"].values())
