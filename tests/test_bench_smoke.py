"""scripts/bench_dp_step.py: report helpers (fast) and the --smoke mode end to end (slow, about 2 minutes)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_dp_step.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_dp_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_section_replaced_between_markers_only(tmp_path):
    bench = _load_script()
    doc = tmp_path / "docs" / "BENCHMARKS.md"
    bench.update_section(doc, "first")
    doc.write_text("# Benchmarks\n\nintro\n\n" + doc.read_text().split("\n", 2)[2] + "\nafter\n")
    bench.update_section(doc, "second")
    text = doc.read_text()
    assert "first" not in text and "second" in text
    assert text.startswith("# Benchmarks\n\nintro\n") and text.rstrip().endswith("after")
    assert text.count(bench.MARK_START) == text.count(bench.MARK_END) == 1


def test_summary_uses_per_round_ratios():
    bench = _load_script()
    times = {"standard": [1.0, 2.0, 4.0], "dp-loop": [2.0, 3.0, 12.0]}  # per-round ratios 2, 1.5, 3
    rows = bench.summarise(times, {"standard": 100.0, "dp-loop": 150.0})
    dp = next(r for r in rows if r["variant"] == "dp-loop")
    assert dp["ratio"] == pytest.approx(2.0)
    assert dp["median_s"] == pytest.approx(3.0) and dp["mem_ratio"] == pytest.approx(1.5)
    table = bench.markdown_table(rows)
    assert "| dp-loop | 3.000 |" in table and "| standard | 2.000 |" in table


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work-dir", str(tmp_path / "work"),
                           "--engines", "loop", "--output", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| dp-loop |" in proc.stdout and "batch size" in proc.stdout
    text = out.read_text()
    assert "<!-- bench_dp_step:start -->" in text and "| dp-loop |" in text
