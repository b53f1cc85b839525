"""The reference path is pure PyTorch: the package imports and runs without triton, and
importing it is quick (no triton, no torch._dynamo)."""
import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_reference_and_layer_run_without_triton():
    out = _run("""
        import sys
        sys.modules["triton"] = None          # import triton now fails, find_spec gives None
        import torch, msa, msa.nn, msa.inference, msa.integrations.transformers
        from msa.nn import MSAttention, KVCache
        cfg = msa.MSAConfig(num_heads=4, num_kv_heads=2, head_dim=64, block_size=64, topk=2)
        layer = MSAttention(128, cfg)
        x = torch.randn(1, 200, 128)
        layer(x).sum().backward()
        with torch.no_grad():
            cache = KVCache()
            layer.eval()(x[:, :150], cache=cache)
            layer(x[:, 150:151], cache=cache)
        try:
            msa.msa_indexer(torch.randn(1, 10, 2, 64), torch.randn(1, 10, 1, 64),
                            block_size=64, topk=2, backend="triton")
        except RuntimeError as e:
            print("error:", e)
        print("ok", "triton" in [m for m in sys.modules if sys.modules[m] is not None])
        """)
    assert "ok False" in out
    assert "error: backend='triton' needs the triton package" in out


def test_import_loads_neither_triton_nor_dynamo():
    out = _run("""
        import sys
        import msa, msa.nn, msa.inference, msa.integrations.transformers
        print(sorted(m for m in ("triton", "torch._dynamo", "transformers")
                     if m in sys.modules))
        """)
    assert out.strip() == "[]"


def test_import_msa_and_cli_help_load_no_torch():
    out = _run("""
        import sys
        import msa
        print("torch" in sys.modules, msa.__version__)
        from msa.cli import build_parser
        build_parser()
        print("torch" in sys.modules)
        print(msa.MSAConfig().topk, "torch" in sys.modules)
        print(callable(msa.msa_attention), "torch" in sys.modules)
        """)
    assert out.split() == ["False", "0.1.0", "False", "16", "False", "True", "True"]
