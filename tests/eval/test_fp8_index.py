"""The FP8 index-scoring study: its comparison of selections and its command line."""
import pytest
import torch

from msa.eval.fp8_index import compare
from msa.cli import main


def test_compare_counts_rows_and_measures_gaps_from_the_bf16_side():
    g = torch.Generator().manual_seed(0)
    qi = torch.randn(64, 2, 64, generator=g)
    ki = torch.randn(2048, 1, 64, generator=g)
    r = compare(qi, ki, block=64, topk=4)
    assert r["rows"] == 128 and 0 <= r["rows_equal"] <= 1 and 0 <= r["bf16_vs_fp32"] <= 1
    # a block only FP8 picked never outranks, in bf16, every block only bf16 picked
    assert 0 <= r["gap_median"] <= r["gap_max"]
    same = compare(qi, ki.expand(2048, 2, 64).contiguous(), block=64, topk=64)
    assert same["rows_equal"] == 1.0                     # top-64 of 32 blocks: all of them


def test_compare_reports_the_kernels_selection():
    """``kernels=True`` adds the GPU kernels' FP8 rows (interpreted on a CPU): equal to
    the bf16 selection here, as every measured source was."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(1)
    r = compare(torch.randn(16, 2, 64, generator=g), torch.randn(1024, 1, 64, generator=g),
                block=64, topk=4, kernels=True)
    assert r["kernel_rows_equal"] == r["rows_equal"] == 1.0
    # a key head per index head (self-indexing): one kernel call per head
    ki = torch.randn(512, 2, 64, generator=g)
    ki[:, 1] = -ki[:, 1] * 3                              # heads that select differently
    r = compare(torch.randn(4, 2, 64, generator=g), ki, block=64, topk=4, kernels=True)
    assert r["kernel_rows_equal"] == r["rows_equal"] == 1.0


def test_command_line_checks_sources_and_runs(capsys):
    with pytest.raises(SystemExit):
        main(["fp8-index", "--sources", "nope"])
    with pytest.raises(SystemExit):
        main(["fp8-index", "--length", "100", "--probe", "200"])
    if not torch.cuda.is_available():
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("TRITON_INTERPRET", raising=False)
            with pytest.raises(SystemExit):
                main(["fp8-index", "--kernels"])
        assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    assert main(["fp8-index", "--sources", "random", "--length", "2048", "--probe",
                 "32"]) == 0
    assert "random" in capsys.readouterr().out
