"""MiniMax-M3 in transformers on msa: tiny random configs against transformers' eager
implementation (logits, greedy generation, caches, padding) and the indexer KL."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
m3 = pytest.importorskip("transformers.models.minimax_m3_vl")

from msa.integrations.transformers import enable_msa, indexer_kl_loss  # noqa: E402
from msa.integrations.transformers.compat import cache_kwarg  # noqa: E402

# id: (heads, kv heads, index heads, block, top-k, layer types)
CONFIGS = {
    "G4-B64": (8, 2, 2, 64, 3, ("full_attention", "minimax_m3_sparse", "minimax_m3_sparse")),
    "G2-B128": (4, 2, 2, 128, 2, ("minimax_m3_sparse", "full_attention")),
    "G16-B64-Hi1": (16, 1, 1, 64, 4, ("minimax_m3_sparse", "minimax_m3_sparse")),
}


def _config(name, **kw):
    hq, hkv, hi, block, topk, types = CONFIGS[name]
    args = dict(vocab_size=300, hidden_size=128, intermediate_size=32,
                num_hidden_layers=len(types),
                num_attention_heads=hq, num_key_value_heads=hkv, head_dim=64,
                dense_intermediate_size=64, shared_intermediate_size=32, num_local_experts=4,
                num_experts_per_tok=2, index_n_heads=hi, index_head_dim=64,
                index_block_size=block, index_topk_blocks=topk, layer_types=list(types),
                mlp_layer_types=["dense"] + ["sparse"] * (len(types) - 1),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5},
                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    args.update(kw)
    return m3.MiniMaxM3VLTextConfig(**args)


def _models(name, **kw):
    torch.manual_seed(0)
    eager = m3.MiniMaxM3VLForCausalLM(_config(name)).eval()
    eager.set_attn_implementation("eager")
    torch.manual_seed(0)
    model = enable_msa(m3.MiniMaxM3VLForCausalLM(_config(name)).eval(), **kw)
    return eager, model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_tokens_equal_eager(name):
    eager, model = _models(name)
    block = CONFIGS[name][3]
    ids = torch.randint(3, 300, (2, 6 * block + 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids).logits - eager(ids).logits).abs().max().item()
        assert diff <= 1e-4, diff
        prompt = ids[:, :3 * block + 5]
        want = eager.generate(prompt, max_new_tokens=32, do_sample=False)
        assert torch.equal(model.generate(prompt, max_new_tokens=32, do_sample=False), want)
        # chunked prefill and a static cache reach the same tokens
        got = model.generate(prompt, max_new_tokens=32, do_sample=False, prefill_chunk_size=70)
        assert torch.equal(got, want)
        got = model.generate(prompt, max_new_tokens=32, do_sample=False,
                             cache_implementation="static")
        assert torch.equal(got, want)


def test_selection_is_sparse_and_the_model_really_uses_it():
    """A layer whose indexer sees other weights changes the output: the selection of the
    model's own indexer is what the attention uses (top-3 of 11 blocks)."""
    eager, model = _models("G4-B64")
    ids = torch.randint(3, 300, (1, 700), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        model.model.layers[1].self_attn.indexer.k_proj.weight.mul_(-1)
        after = model(ids).logits
    assert (before - after).abs().max() > 1e-3
    assert torch.allclose(before[:, :192], after[:, :192], atol=1e-5)   # <= 3 blocks: all kept


def test_fp8_index_scoring_reaches_the_indexer(monkeypatch):
    """``enable_msa(index_precision="fp8")``: the model's prefill ranks with the FP8 scan
    and re-scores its candidates (the reference's ``refine`` runs), and its logits equal
    the default's where the selections agree (here: every row)."""
    import msa.ops.indexer.naive as naive
    calls = []
    inner = naive.refine

    def spy(*args, **kw):
        calls.append(1)
        return inner(*args, **kw)
    monkeypatch.setattr(naive, "refine", spy)
    _, plain = _models("G4-B64")
    _, fp8 = _models("G4-B64", index_precision="fp8")
    ids = torch.randint(3, 300, (1, 700), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain(ids).logits
        assert not calls
        got = fp8(ids).logits
    assert calls
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="index_precision"):
        _models("G4-B64", index_precision="fp9")
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        enable_msa(torch.nn.Linear(2, 2))


def test_left_padded_batch_equals_rows_alone():
    _, model = _models("G4-B64")
    g = torch.Generator().manual_seed(3)
    a = torch.randint(3, 300, (1, 400), generator=g)
    b = torch.randint(3, 300, (1, 250), generator=g)
    ids = torch.zeros(2, 400, dtype=torch.long)
    mask = torch.zeros(2, 400, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 150:], mask[1, 150:] = b[0], 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        alone_a = model.generate(a, max_new_tokens=12, do_sample=False)
        alone_b = model.generate(b, max_new_tokens=12, do_sample=False)
        logits = model(ids, attention_mask=mask).logits
        logits_b = model(b).logits
    assert torch.equal(batch[0, 400:], alone_a[0, 400:])
    assert torch.equal(batch[1, 400:], alone_b[0, 250:])
    torch.testing.assert_close(logits[1, 150:], logits_b[0], rtol=1e-4, atol=1e-4)


def test_tokens_in_between_padding_are_rejected():
    _, model = _models("G4-B64")
    ids = torch.randint(3, 300, (2, 300))
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, 100:120] = 0                           # a hole before real tokens
    with torch.no_grad(), pytest.raises(ValueError, match="not in between"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_indexer_kl_trains_only_the_index_projections(mode):
    _, model = _models("G4-B64", train_indexer=True, mode=mode)
    model.train()
    (getattr(model, "activation_checkpointing_enable", None) or
     model.gradient_checkpointing_enable)()
    ids = torch.randint(3, 300, (1, 500), generator=torch.Generator().manual_seed(4))
    out = model(ids, labels=ids)
    kl = indexer_kl_loss(model)
    assert kl is not None and kl > 0
    out.logits.sum().mul(0).backward()            # only the attached KL has gradient
    for n, p in model.named_parameters():
        moved = p.grad is not None and p.grad.abs().sum() > 0
        index_branch = ".indexer." in n and ("q_proj" in n or "k_proj" in n or "norm" in n)
        assert moved == index_branch, n
    model.zero_grad()
    model(ids, labels=ids).loss.backward()        # LM loss: everything trains
    assert model.model.layers[1].self_attn.indexer.k_proj.weight.grad.abs().sum() > 0


def test_triton_path_in_the_interpreter(monkeypatch):
    """Prefill through the Triton indexer and attention, decoding through the fused
    decoder reading the cache tensors in place (batch 1, any length)."""
    pytest.importorskip("triton")
    from msa.integrations.transformers import decode
    calls = []
    fused = decode.fused_decode
    monkeypatch.setattr(decode, "fused_decode",
                        lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    from tests.helpers import DEVICE
    eager, model = (m.to(DEVICE) for m in _models("G2-B128", backend="triton"))
    ids = torch.randint(3, 300, (1, 300), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():                          # 3 blocks, top-2: sparse
        diff = (model(ids).logits - eager(ids).logits).abs().max().item()
        assert diff <= 1e-4, diff
        want = eager.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), want)
    assert len(calls) == 2                         # 2 decode steps x 1 sparse layer


def test_enable_msa_rejects_what_msa_does_not_implement():
    torch.manual_seed(0)
    with pytest.raises(NotImplementedError, match="index_local_blocks=2"):
        enable_msa(m3.MiniMaxM3VLForCausalLM(_config("G4-B64", index_local_blocks=2)))
    with pytest.raises(ValueError, match="leave block_size and topk out"):
        enable_msa(m3.MiniMaxM3VLForCausalLM(_config("G4-B64")), block_size=64)
    with pytest.raises(ValueError, match="mode"):
        enable_msa(m3.MiniMaxM3VLForCausalLM(_config("G4-B64")), mode="fast")


def test_multimodal_model_switches_its_text_model_only():
    text = dict(vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64, intermediate_size=32,
                dense_intermediate_size=64, shared_intermediate_size=32, num_local_experts=4,
                num_experts_per_tok=2, index_n_heads=2, index_head_dim=64,
                index_block_size=64, index_topk_blocks=3,
                layer_types=["full_attention", "minimax_m3_sparse"], bos_token_id=1,
                eos_token_id=2)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, image_size=56, patch_size=14)

    def cfg():                                   # one config object per model
        return m3.MiniMaxM3VLConfig(text_config=text, vision_config=vision,
                                    projector_hidden_size=128, image_token_index=5,
                                    video_token_index=6)
    torch.manual_seed(0)
    eager = m3.MiniMaxM3SparseForConditionalGeneration(cfg()).eval()
    eager.set_attn_implementation("eager")
    torch.manual_seed(0)
    model = enable_msa(m3.MiniMaxM3SparseForConditionalGeneration(cfg()).eval())
    assert model.config.text_config._attn_implementation == "msa"
    assert model.config.vision_config._attn_implementation != "msa"
    ids = torch.randint(10, 300, (1, 500), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - eager(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    from msa.integrations.transformers import fp8_static_cache        # its text layers
    cache = fp8_static_cache(model, 512)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, **{cache_kwarg(model): cache}).logits).all()
    assert cache.layers[1].keys.dtype == torch.float8_e4m3fn
    assert int(cache.layers[1].get_seq_length()) == 500
