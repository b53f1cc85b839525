"""transformers integration on a tiny random Llama (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from msa.integrations.transformers import enable_msa  # noqa: E402


def _models():
    def cfg():                                   # one config object per model
        return transformers.LlamaConfig(vocab_size=200, hidden_size=256,
                                        intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=64, max_position_embeddings=4096)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg()).eval()
    dense.set_attn_implementation("sdpa")
    torch.manual_seed(0)
    sparse = enable_msa(transformers.LlamaForCausalLM(cfg()).eval(), block_size=64, topk=4)
    assert dense.config._attn_implementation == "sdpa"
    return dense, sparse


def test_short_prompt_matches_dense_and_generate_agrees():
    dense, sparse = _models()
    ids = torch.randint(0, 200, (2, 200))        # 4 blocks of 64: top-4 selects everything
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, rtol=1e-4,
                                   atol=1e-4)
        g_dense = dense.generate(ids, max_new_tokens=12, do_sample=False)
        g_sparse = sparse.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(g_dense, g_sparse)


def test_static_cache_generates_what_the_dynamic_cache_does():
    """A static cache holds more slots than tokens: only the written ones are keys."""
    _, sparse = _models()
    ids = torch.randint(0, 200, (1, 700), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = sparse.generate(ids, max_new_tokens=12, do_sample=False)
        got = sparse.generate(ids, max_new_tokens=12, do_sample=False,
                              cache_implementation="static")
    assert torch.equal(got, want)


def test_long_prompt_runs_sparse_and_generates():
    dense, sparse = _models()
    ids = torch.randint(0, 200, (1, 1500))      # 24 blocks, top-4: genuinely sparse
    with torch.no_grad():
        logits_s = sparse(ids).logits
        logits_d = dense(ids).logits
        out = sparse.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits_s).all() and out.shape == (1, 1504)
    assert (logits_s - logits_d).abs().max() > 1e-3          # sparsity changes late tokens
    torch.testing.assert_close(logits_s[:, :256], logits_d[:, :256], rtol=1e-4, atol=1e-4)


def test_enable_msa_validates_arguments():
    _, sparse = _models()
    with pytest.raises(ValueError, match="block_size"):
        enable_msa(sparse, block_size=100)


def test_left_padded_batch_equals_rows_alone():
    _, sparse = _models()
    ids = torch.randint(0, 200, (2, 600))
    mask = torch.ones(2, 600, dtype=torch.long)
    mask[0, :150] = 0                             # row 0: 450 real tokens, left padded
    with torch.no_grad():
        batch = sparse(ids, attention_mask=mask).logits
        alone = sparse(ids[:1, 150:]).logits
        gen = sparse.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        gen0 = sparse.generate(ids[:1, 150:], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(batch[0, 150:], alone[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(gen[0, 600:], gen0[0, 450:])


def test_index_projections_start_as_self_indexing_and_train_by_kl():
    from msa.integrations.transformers import add_index_projections, indexer_kl_loss
    _, self_idx = _models()
    _, trained = _models()
    add_index_projections(trained)
    ids = torch.randint(0, 200, (1, 1500))
    with torch.no_grad():
        torch.testing.assert_close(trained(ids).logits, self_idx(ids).logits, rtol=1e-4,
                                   atol=1e-4)
        out_t = trained.generate(ids[:, :700], max_new_tokens=6, do_sample=False)
        out_s = self_idx.generate(ids[:, :700], max_new_tokens=6, do_sample=False)
    assert torch.equal(out_t, out_s)                 # index-key cache follows the KV cache
    index_params = [p for n, p in trained.named_parameters() if "msa_index" in n]
    assert len(index_params) == 4                    # 2 layers x (q, k) weights
    for n, p in trained.named_parameters():
        p.requires_grad_("msa_index" in n)
    trained.config.msa_mode = "dense"                # warm-up: teacher = dense attention
    torch.manual_seed(3)
    with torch.no_grad():                            # start far from the teacher
        for p in index_params:
            p.normal_(0, 0.3)
    opt = torch.optim.Adam(index_params, lr=1e-2)
    kls = []
    for _ in range(6):
        logits = trained(ids[:, :400]).logits
        kls.append(indexer_kl_loss(trained).item())
        opt.zero_grad()
        logits.sum().mul(0).backward()               # only the attached KL has gradient
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in index_params)
        opt.step()
    assert kls[-1] < 0.7 * kls[0], kls


def test_index_projection_kl_does_not_reach_the_backbone():
    from msa.integrations.transformers import add_index_projections
    _, model = _models()
    add_index_projections(model)
    model.config.msa_mode = "dense"
    logits = model(torch.randint(0, 200, (1, 300))).logits
    logits.sum().mul(0).backward()                   # only the attached KL has gradient
    for n, p in model.named_parameters():
        moved = p.grad is not None and p.grad.abs().sum() > 0
        assert moved == ("msa_index" in n), n       # stop-gradient on the index input


@pytest.mark.gpu
def test_long_prompt_generate_on_gpu():
    dense, sparse = (m.cuda().to(torch.bfloat16) for m in _models())
    ids = torch.randint(0, 200, (1, 32768), device="cuda")    # 512 blocks, top-4
    with torch.no_grad():
        out = sparse.generate(ids, max_new_tokens=8, do_sample=False)
        logits_s = sparse(ids[:, :4096]).logits
        logits_d = dense(ids[:, :4096]).logits
    assert out.shape == (1, 32776) and torch.isfinite(logits_s).all()
    torch.testing.assert_close(logits_s[:, :256].float(), logits_d[:, :256].float(),
                               rtol=2e-2, atol=2e-2)   # all blocks selected there (bf16)


def test_add_index_projections_rejects_bad_models():
    from msa.integrations.transformers import add_index_projections
    with pytest.raises(ValueError, match="no attention modules"):
        add_index_projections(torch.nn.Linear(2, 2))
    _, model = _models()
    add_index_projections(model)
    with pytest.raises(ValueError, match="already has index projections"):
        add_index_projections(model)


def test_cache_kwarg_reads_the_name_from_the_signature():
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; a forward given the
    other name ignores it (``**kwargs``), so the name comes from the signature."""
    from msa.integrations.transformers.compat import cache_kwarg

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):
            return input_ids

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return input_ids
    assert cache_kwarg(New()) == "cache" and cache_kwarg(Old()) == "past_key_values"
