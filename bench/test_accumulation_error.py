"""bench.accumulation_error runs, and its emulated orders keep the ranking the kernels' fp32 K loops rely on."""

from bench.accumulation_error import errors


def test_blocked_sum_errs_less_than_one_fma_chain():
    e = errors(K=1024, T=64)
    assert set(e) == {"one chain", "per 32-block", "torch cpu"}
    assert 0 < e["per 32-block"] < e["one chain"] / 2
