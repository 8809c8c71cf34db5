"""The benchmark script runs in its CI-sized CPU mode and writes a valid report."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", "cpu", "--small",
                           "--frames", "4", "--size", "32x32", "--repeats", "1", "--chunk", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["decode 4f chunks of 2", "encode 4f"]
    for r in rows:
        assert r["vaecli_s"] > 0 and r["diffusers_s"] > 0 and r["speedup"] > 0 and r["nonfinite"] == 0
        assert r["vaecli_max_abs"] <= 1e-4 and r["diffusers_max_abs"] <= 1e-4  # same numbers as the fp32 reference
    assert "speedup" in done.stdout
