"""The benchmark (``benchmarks/bench.py``) runs every row and writes its chart and report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("ranger_benchmarks_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_quick_run_times_every_row_and_writes_chart_and_report(tmp_path, capsys):
    bench = _load_bench()
    chart, report = tmp_path / "bench.png", tmp_path / "docs" / "performance.md"
    report.parent.mkdir()
    report.write_text(
        f"# Performance\n\nKept above.\n\n{bench.REPORT_BEGIN}\nold figures\n{bench.REPORT_END}\n"
        "\nKept below.\n"
    )
    threads = torch.get_num_threads()
    try:
        run = bench.main(
            ["--quick", "--rounds", "1", "--threads", "1", "--device", "cpu"]
            + ["--output", str(chart), "--report", str(report)]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out

    assert [w.name for w in run.workloads] == list(bench.WORKLOAD_NAMES)
    expected_rows = [row.name for row in bench.build_rows(include_fused=True)]
    for workload in run.workloads:
        assert [row.name for row in workload.rows] == expected_rows  # every row timed
        assert not workload.skipped
        assert workload.floor_ms > 0
        for row in workload.rows:
            assert row.ms > 0 and row.x_floor > 0
        assert {peer for _, peer, speedup in workload.gc_speedups if speedup > 0} == {
            "pytorch_optimizer.Ranger (GC)"
        }
        ours = [row.name for row in workload.rows if row.kind == "ours"]
        assert sorted(workload.memory) == sorted(ours)
        for state_bytes, peak in workload.memory.values():
            assert state_bytes == 3 * workload.param_bytes
            assert peak >= 0
    assert [label for label, _, _ in run.epochs] == [
        "fastai Learner epoch, ranger_plugins.fastai.ranger (no GC, fastai's default)",
        "fastai Learner epoch, ranger_plugins.fastai.ranger(fused=True)",
        "fastai Learner epoch, fastai.optimizer.ranger (no GC)",
        "Lightning epoch, ranger_plugins.lightning.ranger_optimizers (GC on)",
        "Lightning epoch, ranger_optimizers(use_gc=False) (like the peer)",
        "Lightning epoch, ranger_optimizers(fused=True) (GC on)",
        "Lightning epoch, torch_optimizer.Ranger (no GC; + closure call)",
    ]
    for label, seconds, note in run.epochs:
        assert seconds is not None and seconds > 0, (label, note)  # timed, not skipped
        assert f"{label} " in out

    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    # The generated part is rewritten between its markers; the text around it is kept.
    assert text.startswith("# Performance\n\nKept above.\n\n" + bench.REPORT_BEGIN)
    assert text.endswith(bench.REPORT_END + "\n\nKept below.\n")
    assert "old figures" not in text
    assert f"- torch: {torch.__version__}" in text
    assert "- CPU threads: 1" in text
    assert "`python benchmarks/bench.py --quick --rounds 1 --threads 1" in text
    assert "](../bench.png)" in text  # the chart, relative to the report
    for name in expected_rows + [label for label, _, _ in run.epochs]:
        assert f"| {name} |" in text or f"| **{name}** |" in text, name

    # The family rows, each variant beside its peer, into the family part of the same report.
    threads = torch.get_num_threads()
    try:
        family = bench.main(
            ["--quick", "--family", "--rounds", "1", "--threads", "1", "--device", "cpu"]
            + ["--workloads", "bert,small800", "--report", str(report)]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    check_family_run(bench, family, out, report, ranger_part=text)


def check_family_run(bench, run, out, report, ranger_part):
    expected = [
        "ours RangerQH",
        "torch_optimizer.RangerQH",
        "ours RangerVA",
        "torch_optimizer.RangerVA",
        "ours Ranger21",
        "pytorch_optimizer.Ranger21",
        "ours RangerLars",
    ]
    assert [row.name for row in bench.build_family_rows()] == expected
    assert [w.name for w in run.workloads] == ["bert", "small800"]
    for workload in run.workloads:
        assert [row.name for row in workload.rows] == expected  # every family row timed
        assert not workload.skipped
        for row in workload.rows:
            assert row.ms > 0
            assert (row.x_floor > 0) == (row.variant in ("RangerQH", "RangerVA")), row.name
        # Each variant with a peer is compared with it (peer time / ours); RangerLars has none.
        assert [(v, o, p) for v, o, p, _ in workload.pairs] == [
            ("RangerQH", "ours RangerQH", "torch_optimizer.RangerQH"),
            ("RangerVA", "ours RangerVA", "torch_optimizer.RangerVA"),
            ("Ranger21", "ours Ranger21", "pytorch_optimizer.Ranger21"),
        ]
        assert all(speedup > 0 for *_, speedup in workload.pairs)
        # State bytes per param: m, v, slow (QH, Lars); + max v (VA); + the second momentum
        # buffer (Ranger21); the peers' alike.
        per_param = {name: b / workload.numel for name, b in workload.state_bytes.items()}
        assert per_param == dict(zip(expected, [12.0, 12.0, 16.0, 16.0, 20.0, 20.0, 12.0]))
        assert not workload.memory and not workload.gc_speedups
    for variant, ours, peer, _ in run.workloads[0].pairs:
        assert f"{variant}: {ours} is " in out and f"x as fast as {peer}" in out

    text = report.read_text()
    # The Ranger part and the text around it are kept; the family part follows, titled.
    assert text.startswith(ranger_part.rstrip() + "\n\n" + bench.FAMILY_TITLE + "\n\n")
    assert text.endswith(bench.FAMILY_END + "\n")
    family_part = text[text.index(bench.FAMILY_BEGIN) :]
    assert "`python benchmarks/bench.py --quick --family --rounds 1" in family_part
    for label in [
        "| RangerQH: **ours** vs torch_optimizer.RangerQH | **",
        "| RangerVA: **ours** vs torch_optimizer.RangerVA | **",
        "| Ranger21: **ours** vs pytorch_optimizer.Ranger21 | **",
        "| RangerLars: **ours** (no installed peer) | **",
        "| **ours RangerQH** | 28 | ",
        "| torch_optimizer.RangerVA | 36 | ",
        "| Ranger21 | lr 0.001, betas (0.9, 0.999), eps 1e-08, weight_decay 0.0001, k 5",
    ]:
        assert label in family_part, label
    assert "| **ours Ranger21** |" not in family_part  # no one-pass floor: not in that table
    assert "no installed peer" in family_part

    # A second family run rewrites the family part in place, the rest kept.
    bench.write_family_report(run, report)
    assert report.read_text() == text


@pytest.mark.slow
def test_benchmark_low_memory_quick_run_measures_every_precision(tmp_path, capsys):
    bench = _load_bench()
    report = tmp_path / "performance.md"
    report.write_text(
        f"# Performance\n\nKept above.\n\n{bench.LOW_MEMORY_BEGIN}\nold figures\n"
        f"{bench.LOW_MEMORY_END}\n\nKept below.\n"
    )
    threads = torch.get_num_threads()
    try:
        run = bench.main(
            ["--quick", "--low-memory", "--rounds", "1", "--threads", "1", "--device", "cpu"]
            + ["--workloads", "bert,small800", "--report", str(report)]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out

    # The fused low-memory rows are there exactly when the kernel runs them here (detected).
    fused, _ = bench.low_memory_fused_precisions(torch.device("cpu"))
    expected = [row.name for row in bench.build_low_memory_rows(fused)]
    assert expected[:2] == ["Ranger full, default", "Ranger full, fused"]
    assert {"Ranger 16bit, default", "Ranger 8bit, default", bench.ADAMW} <= set(expected)
    # The 8-bit peers are optional: timed where importable, else named with the reason.
    peers = {name for name, _ in bench.EIGHT_BIT_PEERS}
    assert [w.name for w in run.workloads] == ["bert", "small800"]
    for workload in run.workloads:
        timed = [row.name for row in workload.rows]
        skipped = [name for name, _ in workload.skipped]
        assert sorted(timed + skipped) == sorted(expected)
        assert set(skipped) <= peers
        for row in workload.rows:
            assert row.ms > 0 and row.x_floor > 0, row.name
            state, peak = workload.memory[row.name]
            assert state > 0 and peak >= 0, row.name
        check_low_memory_state(bench, workload)
        assert f"{workload.rows[0].name:<28}" in out  # the printed table, a line per row
    text = report.read_text()
    for name, note in run.workloads[0].skipped:  # a skipped peer's row says why
        assert f"| {name} | not measured: {note.removeprefix('skipped: ')} |" in text
    assert text.startswith("# Performance\n\nKept above.\n\n" + bench.LOW_MEMORY_BEGIN)
    assert text.endswith(bench.LOW_MEMORY_END + "\n\nKept below.\n")
    assert "old figures" not in text
    assert "`python benchmarks/bench.py --quick --low-memory --rounds 1" in text
    for name in expected:
        assert f"| **{name}** |" in text or f"| {name} |" in text, name
    for kind in bench.LOW_MEMORY_FLOORS:  # a sentence per kind of row, saying its floor
        assert f"- {kind}: " in text


def check_low_memory_state(bench, workload):
    """State bytes per param, from the benchmark's own allocator measurement: 12 / 6 / about
    4.03 on the params of at least 4096 elements for full / 16bit / 8bit, whatever the path;
    over the whole workload, the 8-bit row pays the 16bit layout's 6 on its small params."""
    floors = {"full": 28, "16bit": 24}
    for row in workload.rows:
        if not row.name.startswith("Ranger "):
            continue
        precision = row.name.split()[1].rstrip(",")
        large = workload.large_state[row.name]
        whole = workload.memory[row.name][0] / workload.numel
        if precision == "8bit":
            assert 4.0 < large <= 4.1, row.name
            assert large < whole < 6.0, row.name
            assert 20 < row.floor_bytes < 24, row.name  # weighted: 20 large, 24 small
        else:
            expected = {"full": 12.0, "16bit": 6.0}[precision]
            assert large == pytest.approx(expected, abs=1e-3), row.name
            assert whole == pytest.approx(expected, abs=1e-3), row.name
            assert row.floor_bytes == floors[precision], row.name
    adamw = workload.large_state[bench.ADAMW]
    assert adamw == pytest.approx(8.0, abs=0.01)  # m and v in fp32 (and a scalar step)
