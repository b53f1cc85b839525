"""Programmatic dependent launch between a decode step's kernels (``msa.ops.pdl``): off
on the CPU; compiled for sm_90, each kernel launched after one of the step's waits for it
before its first global load, and the scans release the next kernel."""
import pytest
import torch

pytest.importorskip("triton")

from msa.ops import pdl  # noqa: E402
from tests.helpers import compiled_ptx  # noqa: E402

PROGRAM = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from msa.ops.decode import rescore as R, select as S, triton as T
PTR = {"CAND": "*i64", "EXACT": "*i64", "COUNTS": "*i32", "QI": "*bf16", "KI": "*bf16",
       "KIS": "*fp32", "PAGE_TABLE": "*i32", "SEQ_LENS": "*i32", "TOPK_INDICES": "*i32",
       "Q": "*bf16", "K": "*bf16", "V": "*bf16", "KS": "*fp32", "VS": "*fp32",
       "OUT": "*bf16", "LSE": "*fp32", "PO": "*fp32", "PL": "*fp32", "DONE": "*i32"}
CASES = [
    (R.rescore_candidates_kernel, dict(LS=32, KR=32, NL_PAD=256, TOP=1, NC=79, NC_PAD=128,
                                       MAXC=2528, MAXC_PAD=4096)),
    (R.rescore_pages_kernel, dict(NQ=1, DI=128, BS=128, SLOTS=2, MAXC=2528, MAXC_PAD=4096,
                                  SMALL=128, TOPK=16, TOPK_PAD=16, PRECISION="tf32",
                                  UPCAST=False)),
    (S.paged_merge_kernel, dict(NQ=1, BS=128, LS=16, KR=16, NL_PAD=64, TOPK=16, TOPK_PAD=16)),
    (T.paged_decode_attn_kernel, dict(NQ=1, HKV=4, HS=4, G=16, G_PAD=16, D=128, BS=128,
                                      TOPK=16, TOPK_PAD=16, PER_SPLIT=1, PER_PAD=1, NSPLIT=16,
                                      PRECISION="tf32", UPCAST=False, MERGE=False, LS=1,
                                      KR=1, NL_PAD=1, FP8=False, STAGES=2)),
    (S.paged_scan_kernel, dict(NQ=1, HI=4, ROWS=16, DI=128, BS=128, PAGES=16, KR=16,
                               PRECISION="tf32", UPCAST=False, RANK=True, MASK_TAIL=False,
                               FP8=False, INT4=False))]
for fn, const in CASES:
    for on in (True, False):
        c = {**const, "PDL": on}
        sig = {n: PTR.get(n, "i64" if n.startswith("stride") else
                          "fp32" if n.startswith("scale") else "i32")
               for n in fn.arg_names if n not in c}
        sig.update({k: "constexpr" for k in c})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=c),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        print(k.asm["ptx"])
        print("=== end of kernel ===")
"""


def test_pdl_is_off_on_the_cpu_and_unless_asked_for(monkeypatch):
    monkeypatch.delenv("MSA_PDL", raising=False)
    assert not pdl.enabled(torch.zeros(1))
    monkeypatch.setenv("MSA_PDL", "1")
    assert not pdl.enabled(torch.zeros(1))
    assert pdl.launch(False) == {} and pdl.launch(True) == {"launch_pdl": True}


def test_step_kernels_wait_before_their_first_load_and_scans_release():
    """With ``PDL``: the waiting kernels release the next one and wait before any global
    load; the scan only releases; without it, neither instruction."""
    ptxs = compiled_ptx(PROGRAM).split("=== end of kernel ===\n")[:-1]
    assert len(ptxs) == 10
    for i, ptx in enumerate(ptxs):
        on, scan = i % 2 == 0, i >= 8
        assert ("griddepcontrol.launch_dependents" in ptx) == on, i
        assert ("griddepcontrol.wait" in ptx) == (on and not scan), i
        if on and not scan:
            assert ptx.index("griddepcontrol.launch_dependents") < \
                ptx.index("griddepcontrol.wait") < ptx.index("ld.global"), i
