"""Test setup: Triton kernels run in Triton's interpreter where there is no GPU; tests
marked ``gpu`` skip without one. ``SLOW`` lists the cases that take several seconds each
on a CPU (interpreter cases and model cases, most repeating a default case at another
shape or mode): they carry the ``slow`` marker, run by
``python -m pytest -q -m slow`` (the default run deselects them, ``.ci/run`` runs both;
on a GPU machine run ``-m "slow or not slow"``)."""
import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU (set before triton loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one intra-op thread per xdist worker: the workers already use every core, and a second
# thread each oversubscribes them (a 2 s model test took 20 s in the suite on 2 cores)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


SLOW = {
    "tests/ops/decode/test_rescore.py::"
    "test_rescored_decode_of_requests_with_few_or_no_earlier_blocks",
    "tests/ops/indexer/test_fp8.py::"
    "test_triton_fp8_kernel_matches_the_fp8_reference[q_lens2-k_lens2-2-64-3]",
    "tests/integrations/test_graphs.py::test_decode_step_reads_nothing_back_to_the_host[False]",
    "tests/ops/attention/test_union.py::test_union_forward_matches_reference_fp32[fragments-shared]",
    "tests/ops/kl/test_deferred.py::test_kl_in_backward_equals_the_kl_of_the_forward[read_first]",
    "tests/ops/decode/test_int4.py::test_int4_copy_rescored_like_the_reference[2-1]",
    "tests/ops/decode/test_int4.py::test_int4_copy_rescored_like_the_reference[1-2]",
    "tests/ops/decode/test_fp8.py::test_fp8_index_copy_rescored_like_the_reference[2-None-2]",
    "tests/ops/decode/test_fp8.py::test_fp8_index_copy_rescored_like_the_reference[2-4-2]",
    "tests/ops/decode/test_fp8.py::test_fp8_index_copy_rescored_like_the_reference[1-8-1]",
    "tests/ops/indexer/test_two_pass.py::"
    "test_fp8_indexer_on_the_two_pass_scan_matches_the_fp8_reference[4-32-16]",
    "tests/ops/indexer/test_two_pass.py::"
    "test_fp8_indexer_on_the_two_pass_scan_matches_the_fp8_reference[2-64-4]",
    "tests/ops/indexer/test_two_pass.py::test_chunks_of_block_maxima_do_not_change_the_rows",
    "tests/ops/indexer/test_fp8.py::"
    "test_triton_fp8_kernel_matches_the_fp8_reference[q_lens1-k_lens1-4-128-16]",
    "tests/ops/indexer/test_fp8.py::"
    "test_triton_fp8_kernel_matches_the_fp8_reference[q_lens3-k_lens3-3-64-4]",
    "tests/ops/indexer/test_fp8.py::"
    "test_triton_fp8_kernel_matches_the_fp8_reference[q_lens0-k_lens0-2-64-4]",
    "tests/eval/test_fp8_index.py::test_compare_reports_the_kernels_selection",
    "tests/ops/indexer/test_two_pass.py::test_zero_key_rows_do_not_flatten_small_keys",
    "tests/ops/indexer/test_two_pass.py::"
    "test_selection_sorts_the_stored_maxima[q_lens2-k_lens2-8-6-32-2]",
    "tests/ops/kl/test_triton.py::test_triton_kl_matches_reference[G12-Hkv2-Hi1-deterministic]",
    "tests/ops/kl/test_triton.py::test_triton_kl_smallest_launch_matches_reference"
    "[index-keys-per-tile-Hi=Hkv-fragments-split-deterministic]",
    "tests/ops/kl/test_triton.py::test_triton_kl_smallest_launch_matches_reference"
    "[index-keys-once-Hi=Hkv-fragments-split-deterministic]",
    "tests/integrations/test_m3_fp8_cache.py::"
    "test_fused_decoder_reads_the_fp8_cache_in_place[None]",
    "tests/ops/test_plan.py::test_one_plan_and_no_topk_validation_per_training_step"
    "[False-packed]",
    "tests/ops/decode/test_triton.py::"
    "test_selection_merges_ranked_lists[700-lengths0-2-None-88-None]",
    "tests/ops/decode/test_triton.py::"
    "test_selection_merges_ranked_lists[512-lengths1-1-32-16-None]",
    "tests/ops/decode/test_triton.py::"
    "test_selection_merges_ranked_lists[40-lengths2-8-None-20-None]",
    "tests/ops/decode/test_triton.py::test_decoder_matches_reference[lengths3-8-2-False]",
    "tests/ops/decode/test_triton.py::test_decoder_matches_reference[lengths2-16-2-True]",
    "tests/ops/decode/test_fp8.py::test_fp8_pages_decode_like_their_dequantized_copy"
    "[lengths1-4]",
    "tests/integrations/test_vllm.py::test_attention_takes_the_geometry_the_index_top_k_read",
    "tests/ops/attention/test_backward.py::"
    "test_triton_backward_matches_reference_fp32[fragments-shared-kv-fast]",
    "tests/ops/attention/test_backward.py::"
    "test_triton_backward_matches_reference_fp32[fragments-shared-kv-deterministic]",
    "tests/api/test_cases.py::test_1024_single_query_documents_equal_dense_within_the_block",
    "tests/integrations/test_minimax_m3.py::test_logits_and_greedy_tokens_equal_eager[G4-B64]",
    "tests/ops/kl/test_triton.py::"
    "test_triton_kl_matches_reference[Hi=Hkv-fragments-split-deterministic]",
    "tests/ops/attention/test_forward.py::"
    "test_triton_forward_matches_reference_fp32[fragments-shared]",
    "tests/ops/kl/test_triton.py::"
    "test_dense_warmup_kl_triton_matches_reference[Hi=Hkv-fragments-split-7]",
    "tests/api/test_cases.py::"
    "test_views_of_fused_projections_get_the_reference_gradients[deterministic]",
    "tests/api/test_cases.py::"
    "test_batched_views_of_a_fused_projection_get_the_reference_gradients[deterministic]",
    "tests/integrations/test_graphs.py::test_decode_step_reads_nothing_back_to_the_host[True]",
    "tests/integrations/test_m3_fp8_cache.py::"
    "test_fused_decoder_reads_the_fp8_cache_in_place[index_dtype1]",
    "tests/integrations/test_vllm.py::"
    "test_prefill_selection_and_attention_equal_the_reference[q_lens0-k_lens0]",
    "tests/ops/test_plan.py::test_one_plan_and_no_topk_validation_per_training_step"
    "[True-batched]",
    "tests/ops/test_plan.py::test_one_plan_and_no_topk_validation_per_training_step"
    "[False-batched]",
    "tests/ops/test_plan.py::test_one_plan_and_no_topk_validation_per_training_step"
    "[True-packed]",
    "tests/ops/attention/test_backward.py::test_deterministic_backward_is_bitwise_repeatable",
    "tests/ops/attention/test_backward.py::"
    "test_public_api_backend_triton_uses_triton_backward[False]",
    "tests/ops/attention/test_backward.py::test_triton_backward_key_sub_blocks[16-fast]",
    "tests/ops/attention/test_backward.py::"
    "test_triton_backward_key_sub_blocks[16-deterministic]",
    "tests/ops/attention/test_forward.py::"
    "test_query_major_kernel_matches_reference[fragments-shared]",
    "tests/ops/attention/test_forward.py::"
    "test_triton_forward_key_sub_blocks_match_reference_fp32[fragments-shared]",
    "tests/ops/indexer/test_triton.py::test_triton_indexer_ranks_groups_of_tied_blocks[64]",
    "tests/ops/decode/test_triton.py::test_decoder_matches_reference[lengths2-16-2-True]",
    "tests/ops/decode/test_triton.py::test_selection_merges_ranked_lists[32-lengths4-8-16-2-None]",
    "tests/ops/decode/test_triton.py::test_selection_merges_ranked_lists[24-lengths5-16-1-24-None]",
    "tests/ops/decode/test_triton.py::"
    "test_selection_merge_takes_runs_from_one_list[one_chunk-16-140]",
    "tests/ops/decode/test_triton.py::"
    "test_selection_merge_takes_runs_from_one_list[two_chunks-8-140]",
    "tests/api/test_cases.py::test_single_fragment_q65_k2304",
    "tests/api/test_cases.py::test_fragment_indices_and_temperature",
    "tests/api/test_cases.py::test_packed_varlen_33_segments",
    "tests/test_distributed.py::test_two_ranks_equal_single_process[sparse-packed-docs]",
    "tests/ops/kl/test_triton.py::"
    "test_msa_attention_triton_backend_trains_like_the_reference[sparse]",
    "tests/ops/attention/test_forward.py::"
    "test_query_major_kernel_matches_reference[G2-varlen-chunked-B64]",
    "tests/integrations/test_minimax_m3.py::test_triton_path_in_the_interpreter",
    "tests/ops/attention/test_backward.py::"
    "test_public_api_backend_triton_uses_triton_backward[True]",
    "tests/test_distributed.py::test_two_ranks_equal_single_process[sparse]",
    "tests/ops/attention/test_backward.py::test_triton_backward_key_sub_blocks[32-fast]",
    "tests/ops/attention/test_backward.py::"
    "test_triton_backward_key_sub_blocks[32-deterministic]",
    "tests/ops/attention/test_forward.py::"
    "test_triton_forward_key_sub_blocks_match_reference_fp32[G2-varlen-chunked-B64]",
    "tests/ops/indexer/test_triton.py::test_triton_indexer_ranks_groups_of_tied_blocks[16]",
    "tests/ops/kl/test_triton.py::test_triton_kl_smallest_launch_matches_reference"
    "[index-keys-per-tile-G16-one-token-docs-deterministic]",
    "tests/ops/kl/test_triton.py::test_triton_kl_smallest_launch_matches_reference"
    "[index-keys-once-G16-one-token-docs-fast]",
    "tests/ops/attention/test_forward.py::"
    "test_triton_forward_half_within_official_tolerance[dtype1-G2-varlen-chunked-B64]",
    "tests/ops/attention/test_union.py::test_union_forward_matches_reference_fp32[K64-B64]",
    "tests/ops/attention/test_union.py::"
    "test_union_forward_by_tma_matches_reference[G2-varlen-chunked-B64]",
    "tests/ops/attention/test_union.py::test_union_plan_equals_direct_count[1-False-64]",
    "tests/ops/attention/test_union.py::test_union_plan_equals_direct_count[4-True-64]",
    "tests/integrations/test_minimax_m3.py::test_left_padded_batch_equals_rows_alone",
    # 4-11 s each on a slow 2-core machine; each keeps sibling cases in the default run
    "tests/test_distributed.py::test_two_ranks_equal_single_process[dense]",
    "tests/ops/attention/test_union.py::test_union_forward_by_tma_matches_reference[fragments-shared]",
    "tests/ops/attention/test_union.py::test_union_plan_equals_direct_count[16-True-64]",
    "tests/ops/attention/test_union.py::test_union_forward_matches_reference_fp32[G2-varlen-chunked-B64]",
    "tests/ops/attention/test_union.py::test_union_forward_shared_selections_every_group[8-2]",
    "tests/ops/attention/test_backward.py::"
    "test_triton_backward_half_precision[dtype0-G16-D256-B64-True]",
    "tests/ops/attention/test_backward.py::"
    "test_triton_backward_half_precision[dtype1-G16-D256-B64-True]",
    "tests/ops/attention/test_backward.py::"
    "test_triton_backward_matches_reference_fp32[G2-varlen-split-items-deterministic]",
    "tests/ops/attention/test_lse_grad.py::test_triton_lse_gradient_matches_exact_formula[True]",
    "tests/ops/decode/test_rescore.py::"
    "test_rescore_ranks_the_listed_keys_few_compared_keys_exceed[8-True-False-True-16-264]",
    "tests/ops/decode/test_rescore.py::"
    "test_rescore_ranks_the_listed_keys_few_compared_keys_exceed[4-True-False-False-128-264]",
    "tests/ops/decode/test_triton.py::test_decoder_matches_reference[lengths1-4-1-False]",
    "tests/ops/indexer/test_triton.py::"
    "test_selected_lse_over_query_chunks[fragments-spec-3.1-K6]",
}


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    if not any("::" in str(a) for a in config.args):     # whole files collected
        ids = {item.nodeid for item in items}
        files = {i.split("::")[0] for i in ids}
        stale = sorted(s for s in SLOW if s.split("::")[0] in files and s not in ids)
        if stale:                   # a renamed case would silently leave the slow job
            raise pytest.UsageError(
                f"tests/conftest.py SLOW names tests that do not exist: {stale}")
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip)
