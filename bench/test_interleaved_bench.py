"""bench.interleaved: round-robin timing of e2e providers (no speed asserted: what runs, in which order)."""

from __future__ import annotations

import pytest

from bench import interleaved


def test_rounds_run_every_provider_once_each_in_order():
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = interleaved.time_round_robin(steps, rounds=3)
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] * 3  # one untimed call each, then the rounds
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_tiny_preset_prints_a_line_per_provider(capsys):
    times = interleaved.main(
        ["--preset", "tiny", "--rounds", "1", "--threads", "1", "--providers", "peft-lora,moelora-milora-reference"]
    )
    assert set(times) == {"peft-lora", "moelora-milora-reference"}
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["generate peft-lora", "generate moelora-milora-reference"]
    assert lines[0].split(", ")[1].startswith("1.00x peft-lora; rounds: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--providers", "nope"], "unknown provider 'nope'", id="unknown-provider"),
        pytest.param(["--providers", "peft-lora-mixed8", "--mode", "train"], "has no 'train' mode", id="no-mode"),
        pytest.param(["--rounds", "0"], "--rounds must be >= 1", id="no-rounds"),
    ],
)
def test_bad_arguments_exit_with_the_reason(argv, message):
    with pytest.raises(SystemExit, match=message):
        interleaved.main(argv)
