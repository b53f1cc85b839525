"""``msa.bench.timeline.summarize``: busy and idle time, kernels by total time and the
longest idle gaps of a device timeline (CPU, synthetic chrome-trace events); on a GPU,
``gpu_timeline`` of a real call."""
import pytest
import torch

from msa.bench.timeline import describe, gpu_timeline, summarize


def ev(name, ts, dur, cat="kernel"):
    return dict(name=name, ts=ts, dur=dur, cat=cat)


def test_overlaps_count_once_and_gaps_name_their_neighbours():
    events = [
        ev("copy", 0, 10, "gpu_memcpy"),
        ev("a", 10, 100),            # 10-110
        ev("b", 50, 100),            # 50-150, overlaps a (two streams)
        ev("c", 60, 20),             # inside b: changes neither the end nor the gap names
        ev("host", 155, 5, "cpu_op"),   # not a device event
        dict(name="process_name", ph="M", args={}),    # metadata: no cat, ts or dur
        ev("a", 400, 50),            # idle 150-400
        ev("d", 460, 40),            # idle 450-460
    ]
    s = summarize(reversed(events))  # any order
    assert s["span_ms"] == pytest.approx(0.5)
    assert s["busy_ms"] == pytest.approx((150 + 50 + 40) / 1e3)
    assert s["idle_ms"] == pytest.approx((250 + 10) / 1e3)
    assert s["kernels_ms"] == pytest.approx(dict(a=0.15, b=0.1, d=0.04, c=0.02, copy=0.01))
    assert list(s["kernels_ms"])[:2] == ["a", "b"]
    assert s["idle_gaps"] == [dict(ms=pytest.approx(0.25), after="b", before="a"),
                              dict(ms=pytest.approx(0.01), after="a", before="d")]


def test_limits_and_an_empty_timeline():
    events = [ev(f"k{i}", 10 * i, 5) for i in range(20)]
    s = summarize(events, kernels=3, gaps=2, name_chars=2)
    assert len(s["kernels_ms"]) == 3 and all(len(n) <= 2 for n in s["kernels_ms"])
    assert len(s["idle_gaps"]) == 2 and s["idle_ms"] == pytest.approx(19 * 5 / 1e3)
    assert summarize([ev("x", 0, 1, "cpu_op")]) == dict(span_ms=0.0, busy_ms=0.0,
                                                        idle_ms=0.0, kernels_ms={},
                                                        idle_gaps=[])


def test_describe_gives_busy_idle_and_the_largest_kernels():
    s = summarize([ev("bwd", 0, 3000), ev("fwd", 3500, 1000), ev("sum", 4500, 250)])
    assert describe(s, kernels=2) == "busy 4.2 ms, idle 0.5 ms; bwd 3.0, fwd 1.0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="profiles CUDA kernels")
def test_gpu_timeline_of_a_call_with_a_host_wait():
    a = torch.randn(2048, 2048, device="cuda")

    def call():
        b = a @ a
        b.sum().item()                 # the host waits; the next kernel comes after it
        (b @ a).relu_()
    s = gpu_timeline(call)
    assert s["kernels_ms"] and all(t > 0 for t in s["kernels_ms"].values())
    assert 0 < s["busy_ms"] <= s["span_ms"] + 1e-9
    assert s["idle_ms"] == pytest.approx(s["span_ms"] - s["busy_ms"])
    assert s["idle_gaps"] and s["idle_gaps"][0]["ms"] > 0
