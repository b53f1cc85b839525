"""``msa.bench.common``: ``over_shapes`` writes the results after every row, so a run
stopped part-way (a time limit, an error) keeps the rows it finished (CPU, stand-in runs);
on a GPU, ``timed_behind_work`` hides the host's lead."""
import argparse
import json
import time

import pytest
import torch

from msa.bench import common as C


def test_a_run_stopped_part_way_keeps_the_rows_it_finished(tmp_path):
    path = tmp_path / "out.json"
    args = argparse.Namespace(shape="m3,g8", lengths=[1024, 2048], quick=False,   # parsed
                              json=str(path))
    results = dict(meta=dict(case="training", gpu="NVIDIA Test GPU", date="2026-12-05"),
                   shapes={})

    def run_length(T, cfg, name):
        if name == "g8" and T == 2048:
            raise RuntimeError("stopped")
        return dict(T=T, ms=float(T))
    with pytest.raises(RuntimeError, match="stopped"):
        C.over_shapes(args, results, lambda cfg: dict(passed=True), run_length, "", "")
    saved = json.loads(path.read_text())
    assert [r["T"] for r in saved["shapes"]["m3"]["rows"]] == [1024, 2048]
    assert [r["T"] for r in saved["shapes"]["g8"]["rows"]] == [1024]
    assert saved["shapes"]["g8"]["config"]["num_kv_heads"] == 8


def test_write_names_the_file_after_case_gpu_and_date(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(json=None, png=None)
    results = dict(meta=dict(case="prefill", gpu="NVIDIA H200", date="2026-12-05"), shapes={})
    assert C.write(results, args) == "bench_prefill_h200_2026-12-05.json"
    assert json.loads((tmp_path / "bench_prefill_h200_2026-12-05.json").read_text()) == results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times CUDA kernels")
def test_behind_other_work_the_host_lead_is_hidden():
    """A call whose host waits 10 ms before its one kernel: ``timed`` counts the wait,
    ``timed_behind_work`` (the host ahead of the GPU) only the kernel."""
    a = torch.randn(1024, 1024, device="cuda")

    def call():
        time.sleep(0.01)
        a.mul_(1.0)
    assert C.timed(call, reps=5) > 9
    assert C.timed_behind_work(call, reps=5) < 3
