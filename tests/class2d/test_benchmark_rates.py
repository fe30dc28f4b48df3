"""The E-step rate figures of ``scripts/benchmark_class2d.py`` (direct and executed GEMMs)."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_class2d.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "benchmark_class2d_under_test", SCRIPT
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_executed_flops_are_half_the_direct_ones_with_half_turns(bench):
    b, t_c, p_c, k, r_c = 8, 5, 40, 3, 6
    direct = 2.0 * b * t_c * 2 * p_c * k * r_c + 2.0 * b * p_c * k * r_c
    assert bench.estep_gemm_flops((b, t_c, p_c, k, r_c)) == direct
    assert bench.estep_gemm_flops((b, t_c, p_c, k, r_c, 1)) == direct
    assert bench.estep_gemm_flops((b, t_c, p_c, k, r_c, 1), executed=True) == direct / 2
    assert bench.estep_gemm_flops((b, t_c, p_c, k, r_c, 0), executed=True) == direct
    # old probe records (no half-turn flag) are read as direct GEMMs
    assert bench.estep_gemm_flops((b, t_c, p_c, k, r_c), executed=True) == direct


def test_run_rate_reports_both_fractions(bench):
    shape = [16, 5, 40, 3, 6, 1]
    probe = {
        "estep": [[0.01, *shape], [0.02, *shape], [0.01, *shape[:5]]],
        "statistics_seconds": [0.5, 0.25],
        "sampled": [[0.02, 0.01, 0.004]],
        "probe_seconds": 0.1,
        "precision": "fp32",
    }
    figures = bench.run_estep_rate(probe, "cpu")
    assert figures["estep_calls"] == 3
    assert figures["estep_half_turn_calls"] == 2
    assert figures["estep_seconds_total"] == pytest.approx(0.04)
    assert figures["statistics_seconds_total"] == pytest.approx(0.75)
    assert figures["estep_fraction_of_matmul_sampled_in_run"] == pytest.approx(0.5)
    assert figures["estep_fraction_of_matmul_executed_sampled_in_run"] == pytest.approx(
        0.2
    )
    flops = sum(bench.estep_gemm_flops(c[1:]) for c in probe["estep"])
    assert figures["estep_gemm_gflops"] == pytest.approx(flops / 0.04 / 1e9)
    executed = sum(bench.estep_gemm_flops(c[1:], True) for c in probe["estep"])
    assert figures["estep_executed_gemm_gflops"] == pytest.approx(executed / 0.04 / 1e9)
    for key in (
        "estep_fraction_of_matmul_same_shapes",
        "estep_fraction_of_matmul_executed_same_shapes",
    ):
        assert figures[key] > 0
    assert bench.run_estep_rate({"estep": []}) == {}
