"""GraphedDecoder: the same greedy tokens as transformers' eager generate, and a decode
step that reads nothing back to the host (what CUDA-graph capture needs)."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("transformers.models.minimax_m3_vl")

from msa.integrations.transformers import GraphedDecoder  # noqa: E402
from msa.integrations.transformers.compat import cache_kwarg  # noqa: E402
from tests.integrations.test_minimax_m3 import _models  # noqa: E402


@pytest.mark.parametrize("name,batch,chunk", [("G4-B64", 2, 100), ("G2-B128", 1, None)])
def test_greedy_tokens_equal_eager(name, batch, chunk):
    eager, model = _models(name)
    ids = torch.randint(3, 300, (batch, 205), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = eager.generate(ids, max_new_tokens=24, do_sample=False)
    dec = GraphedDecoder(model, max_cache_len=300, batch_size=batch)
    assert dec.max_cache_len % model.config.index_block_size == 0
    assert torch.equal(dec.generate(ids, max_new_tokens=24, chunk_size=chunk), want)
    assert dec.length == 205 + 23


def test_fp8_cache_gives_the_tokens_of_generate_with_it():
    from msa.integrations.transformers import fp8_static_cache
    from msa.ops.quant import E4M3
    _, model = _models("G4-B64")
    ids = torch.randint(3, 300, (2, 205), generator=torch.Generator().manual_seed(6))
    for index_dtype in (None, E4M3):
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=12, do_sample=False, **{
                cache_kwarg(model): fp8_static_cache(model, 320, index_dtype)})
        dec = GraphedDecoder(model, max_cache_len=300, batch_size=2, kv_dtype=E4M3,
                             index_dtype=index_dtype)
        assert dec.cache.layers[1].keys is None or dec.cache.layers[1].keys.dtype == E4M3
        assert torch.equal(dec.generate(ids, max_new_tokens=12, chunk_size=100), want)
        assert dec.cache.layers[1].keys.dtype == E4M3
    with pytest.raises(ValueError, match="kv_dtype"):
        GraphedDecoder(model, max_cache_len=256, kv_dtype=torch.float16)
    with pytest.raises(ValueError, match="index_dtype goes with"):
        GraphedDecoder(model, max_cache_len=256, index_dtype=E4M3)


def test_stops_at_eos_and_names_bad_arguments():
    _, model = _models("G2-B128")
    with pytest.raises(ValueError, match="max_cache_len"):
        GraphedDecoder(model, max_cache_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        GraphedDecoder(model, max_cache_len=256, batch_size=True)
    dec = GraphedDecoder(model, max_cache_len=256)
    with pytest.raises(ValueError, match="prefill"):
        dec.step(torch.tensor([5]))
    with pytest.raises(ValueError, match="input_ids must be"):
        dec.prefill(torch.ones(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="cache holds 256"):
        dec.prefill(torch.ones(1, 256, dtype=torch.long))
    ids = torch.randint(3, 300, (1, 100), generator=torch.Generator().manual_seed(3))
    first = GraphedDecoder(model, max_cache_len=256).generate(ids, max_new_tokens=4)
    eos = int(first[0, 101])                 # the second new token is "eos"
    out = dec.generate(ids, max_new_tokens=20, eos_token_id=eos)
    assert out.shape[1] == 102 and int(out[0, -1]) == eos
    with pytest.raises(ValueError, match="empty cache"):
        dec.prefill(ids)


def test_eager_model_and_other_families_are_rejected():
    eager, _ = _models("G2-B128")
    with pytest.raises(ValueError, match="enable_msa"):
        GraphedDecoder(eager, max_cache_len=256)
    from tests.integrations.test_transformers import _models as llama_models
    _, llama = llama_models()
    with pytest.raises(ValueError, match="MiniMax-M3"):
        GraphedDecoder(llama, max_cache_len=256)


class _HostRead(RuntimeError):
    pass


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_step_reads_nothing_back_to_the_host(monkeypatch, fp8):
    """The fused decoder (Triton interpreter) and the device-side masks: a decode step
    with the static cache never calls item / bool / int / tolist / nonzero on a tensor,
    so on CUDA it can be captured."""
    pytest.importorskip("triton")
    from tests.helpers import DEVICE
    from msa.integrations.transformers import decode
    calls = []
    fused = decode.fused_decode
    monkeypatch.setattr(decode, "fused_decode",
                        lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    _, model = _models("G2-B128", backend="triton")
    model = model.to(DEVICE)
    model.config._experts_implementation = "batched_mm"     # as GraphedDecoder captures
    from msa.ops.quant import E4M3
    dec = GraphedDecoder(model, max_cache_len=384, kv_dtype=E4M3 if fp8 else None,
                         index_dtype=E4M3 if fp8 else None)
    ids = torch.randint(3, 300, (1, 200), generator=torch.Generator().manual_seed(4))
    dec.prefill(ids.to(DEVICE))
    forward = dec._forward

    def guarded(*a):
        def fail(*_a, **_k):
            raise _HostRead("host read inside a decode step")
        names = ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero")
        saved = {n: getattr(torch.Tensor, n) for n in names}
        try:
            for n in names:
                setattr(torch.Tensor, n, fail)
            return forward(*a)
        finally:
            for n, f in saved.items():
                setattr(torch.Tensor, n, f)
    dec._forward = guarded
    logits = dec.step(torch.tensor([7], device=DEVICE))
    assert logits.shape == (1, 300) and torch.isfinite(logits).all()
    assert len(calls) == (3 if DEVICE == "cuda" else 1)  # CUDA: two warm-ups, the capture
