"""scripts/bench_dp_step.py and scripts/bench_aggregator.py: report helpers (fast), the aggregator benchmark on a tiny
network (seconds), and the --smoke modes end to end with memory (slow; the DP step one takes minutes)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_adpfl.common.benchmarking import update_section

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_dp_step.py"
AGGREGATOR_SCRIPT = SCRIPT.with_name("bench_aggregator.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_dp_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_sweep():
    spec = importlib.util.spec_from_file_location("dp_step_sweep", SCRIPT.with_name("dp_step_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_sweep_times_every_variant_against_the_standard_step(monkeypatch, tmp_path):
    sweep = _load_sweep()
    monkeypatch.setitem(sweep.NETWORKS, 2, ((2, 4), (8, 8), (2, 3)))  # tiny network, B = 2 and 3
    args = _load_script().build_parser().parse_args(
        ["--sweep", "2d", "--engines", "auto,loop,hooks/c1+bf16", "--rounds", "1", "--sweep-warmup", "0"])
    written = []
    section = sweep.run_sweep(args, lambda msg: None, "test machine", "the command", written.append)
    assert len(written) == 2 and written[-1] == section  # the section is rewritten after each B
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| 2D |")]
    auto_chunk = re.compile(r"ghost \(chunk (\d+)\)")  # the default --chunk auto, resolved at the first step
    got = [(r[1].strip(), r[2].strip(), auto_chunk.sub("ghost (chunk auto)", r[3].strip()) if r[2].strip() == "auto"
            else r[3].strip()) for r in rows]
    assert got == [
        (b, v, e) for b in ("2", "3") for v, e in (("standard", "-"), ("auto", "ghost (chunk auto)"), ("loop", "loop"),
                                                   ("hooks/c1+bf16", "hooks (chunk 1), bf16 autocast"))]
    assert all(int(auto_chunk.match(r[3].strip()).group(1)) >= 3 for r in rows if r[2].strip() == "auto")
    for r in rows:
        assert float(r[4]) > 0 and float(r[6]) >= 0
        assert r[5].strip() == "reference" or float(r[5]) > 0
    assert "load average" in section and "`the command`" in section and "parameters, patch [8, 8]" in section
    assert sweep.marks(args) == ("<!-- bench_dp_sweep_2d:start -->", "<!-- bench_dp_sweep_2d:end -->")
    with pytest.raises(SystemExit):
        sweep.parse_variant("hooks/cx")
    with pytest.raises(SystemExit):
        sweep.parse_batches("2,0", 2)
    assert sweep.parse_batches("4,8", 3) == [4, 8] and sweep.parse_batches(None, 3) == [2, 4, 8, 16, 32]


def test_section_replaced_between_markers_only(tmp_path):
    marks = _load_script().MARKS["cpu"]
    doc = tmp_path / "docs" / "BENCHMARKS.md"
    update_section(doc, "first", marks)
    doc.write_text("# Benchmarks\n\nintro\n\n" + doc.read_text().split("\n", 2)[2] + "\nafter\n")
    update_section(doc, "second", marks)
    text = doc.read_text()
    assert "first" not in text and "second" in text
    assert text.startswith("# Benchmarks\n\nintro\n") and text.rstrip().endswith("after")
    assert text.count(marks[0]) == text.count(marks[1]) == 1


def test_summary_uses_per_round_ratios():
    bench = _load_script()
    times = {"standard": [1.0, 2.0, 4.0], "dpsgd": [2.0, 3.0, 12.0]}  # per-round ratios 2, 1.5, 3
    rows = bench.summarise(times, {"standard": 100.0, "dpsgd": 150.0}, {"dpsgd": "flat clipping"})
    dp = next(r for r in rows if r["variant"] == "dpsgd")
    assert dp["ratio"] == pytest.approx(2.0)
    assert dp["median_s"] == pytest.approx(3.0) and dp["mem_ratio"] == pytest.approx(1.5)
    table = bench.markdown_table(rows)
    assert "| dpsgd | nnUNetTrainerDPSGD | loop | 3.000 |" in table
    assert "| standard | nnUNetTrainer | - | 2.000 |" in table
    assert table.splitlines()[-1].endswith("| flat clipping |")


def test_variant_selection_covers_every_dp_trainer():
    bench = _load_script()
    trainers = {t for t, _, _ in bench.VARIANTS.values()}
    assert trainers >= {"nnUNetTrainerDPSGD", "nnUNetTrainerAutoS", "nnUNetTrainerNSGD", "nnUNetTrainerPSAC",
                        "nnUNetTrainerDPMorph", "nnUNetTrainerDPMorphAdaptive", "nnUNetTrainerDPFL",
                        "nnUNetTrainerADPFL"}
    assert bench.selected_variants("adpfl, dpsgd") == ["standard", "dpsgd", "adpfl"]
    assert bench.selected_variants(bench.build_parser().parse_args([]).variants) == list(bench.VARIANTS)
    with pytest.raises(SystemExit):
        bench.selected_variants("dpsgd,nope")


def test_sections_of_both_scripts_coexist(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    marks = ("<!-- bench_aggregator:start -->", "<!-- bench_aggregator:end -->")
    update_section(doc, "dp step", _load_script().MARKS["cpu"])
    update_section(doc, "dp step on gpu", _load_script().MARKS["cuda"])
    update_section(doc, "aggregator 1", marks)
    update_section(doc, "aggregator 2", marks)
    text = doc.read_text()
    assert "dp step\n" in text and "dp step on gpu" in text  # a GPU run keeps the CPU section
    assert "aggregator 2" in text and "aggregator 1" not in text


def _aggregator_rows(stdout: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if re.match(r"\| (dense|sparse) \|", line)]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def _run_aggregator(tmp_path, *extra):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.run([sys.executable, str(AGGREGATOR_SCRIPT), "--smoke", "--tmp-dir", str(scratch), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not any(scratch.iterdir()), "temporary federations left behind"
    return proc.stdout


def test_aggregator_bench_sparse_uploads_shrink_by_the_density_factor(tmp_path):
    rows = _aggregator_rows(_run_aggregator(tmp_path, "--skip-memory", "--density", "0.1"))
    dense_bytes = int(rows["dense"][2].replace(",", ""))
    sparse_bytes = int(rows["sparse"][2].replace(",", ""))
    # tiny network: 351,329 float32 = 1.4 MB dense; top-10% as int64 index + float32 value: 1 / (3 * 0.1) smaller,
    # less the per-tensor header entries and the manifest
    assert dense_bytes > 4 * 351_329
    assert 2.8 < dense_bytes / sparse_bytes < 1 / 0.3
    assert float(rows["sparse"][3]) == pytest.approx(dense_bytes / sparse_bytes, abs=0.01)
    assert float(rows["dense"][4]) > 0 and float(rows["sparse"][4]) > 0 and float(rows["sparse"][6]) > 0
    assert rows["sparse"][7] == "not measured"


@pytest.mark.slow
def test_aggregator_bench_smoke_with_memory_and_docs(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    rows = _aggregator_rows(_run_aggregator(tmp_path, "--output", str(out)))
    assert float(rows["dense"][7]) > 0 and float(rows["sparse"][8]) > 0
    text = out.read_text()
    assert "<!-- bench_aggregator:start -->" in text and "| sparse | 0.1 |" in text and "Command:" in text


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work-dir", str(tmp_path / "work"),
                           "--variants", "dpsgd,adpfl", "--output", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| dpsgd |" in proc.stdout and "| adpfl | nnUNetTrainerADPFL | loop |" in proc.stdout
    # ADP-FL's defaults (since 7d3dc1b): adaptive clipping, no step mask (adpfl_step_sparsity 'none')
    assert "batch size" in proc.stdout and "adaptive clip on" in proc.stdout and "step mask" not in proc.stdout
    text = out.read_text()
    assert "<!-- bench_dp_step:start -->" in text and "| adpfl |" in text
