"""msa.inference.step_graphs: a key's first call launches, its second captures a graph and
replays it, later calls replay it; least recently used graphs go past the capacity; the
key tells tensors apart by address, shape, strides and dtype; a capture CUDA refuses
leaves plain launches (with a warning), an error of the launch itself is raised. (The
graphs themselves, against plain launches on a GPU: tests/ops/decode/test_triton.py.)"""
import pytest
import torch

from msa.inference.step_graphs import CaptureFailed, StepGraphs, tensor_key


class _Graph:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def replay(self):
        self.log.append(("replay", self.name))


def _graphs(capacity, log):
    sg = StepGraphs(torch.device("cpu"), capacity=capacity)

    def capture(launch):                # stands in for the CUDA capture (GPU only)
        sg.captured += 1
        log.append(("capture", len(log)))
        return _Graph(log, sg.captured)
    sg._capture = capture
    return sg


def test_first_call_launches_second_captures_then_replays():
    log = []
    sg = _graphs(4, log)
    for _ in range(4):
        sg.run("a", lambda: log.append(("launch", "a")))
    assert log == [("launch", "a"), ("capture", 1), ("replay", 1), ("replay", 1),
                   ("replay", 1)]
    assert sg.captured == 1


def test_least_recently_used_graphs_are_dropped_past_the_capacity():
    log = []
    sg = _graphs(2, log)
    for key in ("a", "a", "b", "b", "a", "c", "c"):       # "c" evicts "b", not "a"
        sg.run(key, lambda: log.append(("launch", key)))
    assert list(sg.graphs) == ["a", "c"]
    log.clear()
    sg.run("b", lambda: log.append(("launch", "b")))     # met anew: launched again
    assert log == [("launch", "b")] and list(sg.graphs) == ["c", "b"]


def test_tensor_key_tells_address_shape_strides_and_dtype_apart():
    x = torch.zeros(4, 6)
    keys = {tensor_key(t) for t in (x, x[1:], x[:, :3], x.t(), x.view(6, 4),
                                    x.to(torch.float64))}
    assert len(keys) == 6
    assert tensor_key(x) == tensor_key(x.view(4, 6)) and tensor_key(None) == ()


def test_a_failed_capture_warns_once_and_leaves_plain_launches():
    log = []
    sg = StepGraphs(torch.device("cpu"))

    def capture(launch):
        raise CaptureFailed("operation not permitted when stream is capturing")
    sg._capture = capture
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        for _ in range(2):
            sg.run("a", lambda: log.append("launch"))
    sg.run("a", lambda: log.append("launch"))
    assert log == ["launch"] * 3 and sg.failed and not sg.graphs


def test_an_error_of_the_launch_itself_is_raised_not_swallowed():
    sg = StepGraphs(torch.device("cpu"))
    sg._capture = lambda launch: launch()

    def launch():
        raise ValueError("q must be [2, 4, 64]")
    with pytest.raises(ValueError, match="q must be"):
        sg.run("a", launch)
    with pytest.raises(ValueError, match="q must be"):
        sg.run("a", launch)
    assert sg.failed is None
