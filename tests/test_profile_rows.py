"""bench/profile_rows.py's split of profiled operators into kinds, over hand-made profiler events."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import profile_rows  # noqa: E402


def test_kind_of_names_each_operator():
    expect = {"aten::mm": "matrix products", "aten::addmm": "matrix products", "aten::bmm": "matrix products",
              "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
              "aten::_softmax_backward_data": "attention", "aten::cat": "copies, gathers and cats",
              "aten::index_select": "copies, gathers and cats", "aten::_to_copy": "copies, gathers and cats",
              "aten::slice_backward": "copies, gathers and cats", "aten::_foreach_mul_": "optimizer",
              "aten::_fused_adamw_": "optimizer", "aten::mul": profile_rows.REST,
              "aten::rsqrt": profile_rows.REST, "aten::silu_backward": profile_rows.REST}
    assert {name: profile_rows.kind_of(name) for name in expect} == expect


def test_by_kind_sums_self_time_and_calls_of_aten_events():
    def event(key, us, count):
        return SimpleNamespace(key=key, self_cpu_time_total=us, count=count)

    events = [event("aten::mm", 3000.0, 10), event("aten::addmm", 1000.0, 4), event("aten::cat", 500.0, 7),
              event("aten::mul", 250.0, 5), event("autograd::engine::evaluate_function: MmBackward0", 9e6, 3)]
    seconds, calls = profile_rows.by_kind(events)
    assert seconds["matrix products"] == 0.004 and seconds["copies, gathers and cats"] == 0.0005
    assert seconds[profile_rows.REST] == 0.00025 and seconds["attention"] == 0.0
    assert calls == 26  # the autograd event is not an operator call
