"""benchmarks/gpu_model.py: the GPU time model a session without a GPU ranks speed levers with. Its parts must hold:
CUDA's autocast rules on CPU tensors, the roofline arithmetic, and a modelled step that counts what a real step
computes (the FLOPs of step_time's fake-tensor count)."""
import contextlib
import io
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import gpu_model  # noqa: E402
import step_time  # noqa: E402


def test_cuda_autocast_rules_run_norms_and_softmax_in_float32_on_cpu():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        h = F.linear(x, w)
        assert F.layer_norm(h, (8,)).dtype == torch.bfloat16  # CPU autocast's own rule
        with gpu_model.CudaAutocastRules():
            assert F.linear(x, w).dtype == torch.bfloat16  # matmuls stay in the autocast dtype, as on CUDA
            norm = F.layer_norm(h, (8,))
            assert norm.dtype == torch.float32
            assert torch.equal(norm, F.layer_norm(h.float(), (8,)))
            assert F.log_softmax(h, -1).dtype == torch.float32
            assert F.gelu(h).dtype == torch.bfloat16  # not on CUDA's float32 list
            assert h.sum(dtype=torch.bfloat16).dtype == torch.bfloat16  # an explicit dtype is kept


def test_kernels_cost_their_flops_or_their_bytes():
    costs = gpu_model.KernelCosts(peak_flops=1e12, attention_flops=1e12, bandwidth=1e9, min_kernel_s=1e-6)
    a, b = torch.randn(256, 512), torch.randn(512, 128)
    big = torch.randn(1000, 1000)
    with costs:
        a.view(-1).view(512, 256).t()[1:]  # views: no kernel
        assert sum(costs.launches.values()) == 0
        a @ b
        big + big
    assert costs.launches == {'gemm': 1, 'elementwise': 1}
    assert costs.flops == 2 * 256 * 512 * 128
    gemm_bytes = 4 * (256 * 512 + 512 * 128 + 256 * 128)
    assert costs.seconds['gemm'] == pytest.approx(max(costs.flops / 1e12, gemm_bytes / 1e9))
    assert costs.seconds['elementwise'] == pytest.approx(3 * 4e6 / 1e9)  # two reads, one write
    assert costs.total_s == pytest.approx(costs.seconds['gemm'] + costs.seconds['elementwise'])


@pytest.fixture(scope='module')
def modelled():
    with contextlib.redirect_stdout(io.StringIO()):
        shape = ['--scale', 'tiny', '--batch', '2', '--frames', '50', '--cases', 'full,lora_fast']
        model = gpu_model.main(shape + ['--detail', '200'])
        counted = step_time.main(['--count-only', '--dtype', 'bfloat16'] + shape)['results']
    return model, counted


def test_modelled_step_computes_what_the_counted_step_does(modelled):
    model, counted = modelled
    for case in ('full', 'lora_fast'):
        matmul = sum(v for k, v in model[case]['gflop_by_kind'].items() if k != 'attention')
        assert matmul == pytest.approx(counted[case]['gflop'], rel=1e-9), case
        assert model[case]['gflop_by_kind']['attention'] > 0  # counted here, not by torch's counter on CPU
    # the frozen base skips its weight-gradient GEMMs: fewer FLOPs and less modelled GEMM time
    assert model['lora_fast']['gflop_by_kind']['gemm'] < model['full']['gflop_by_kind']['gemm']


def test_modelled_step_keeps_the_dtypes_of_a_cuda_step(modelled):
    model, _ = modelled
    calls = ' | '.join(model['lora_fast']['top_calls_ms'])
    assert 'native_layer_norm float32' in calls
    assert 'native_layer_norm bfloat16' not in calls
    # the adapters' float32 gradients come from the GEMM as on CUDA (out_dtype): no bf16 -> fp32 cast of a [r, in]
    # or [out, r] gradient after it
    rank = step_time.RANK
    assert not [c for c in model['lora_fast']['top_calls_ms'] if c.startswith('_to_copy bfloat16')
                and (f'[{rank}, ' in c or f', {rank}]' in c)]


def test_foreach_ops_count_the_launches_of_cuda_multi_tensor_apply():
    small = [torch.zeros(16, 16) for _ in range(300)]
    assert gpu_model.kernel_launches('add', [small[0], small[1]]) == 1
    assert gpu_model.kernel_launches('slice_backward', [small[0]]) == 2  # a zero fill, then the copy
    assert gpu_model.kernel_launches('_foreach_copy_', [small, small]) == 5  # 300 tensors, 64 a launch (2 lists)
    assert gpu_model.kernel_launches('_foreach_mul_', [small, 0.5]) == 3  # 110 a launch (1 list)
    assert gpu_model.kernel_launches('_foreach_norm', [small, 2]) == 4  # and one more to reduce the totals
    big = [torch.zeros(1, 0) for _ in range(3)] + [torch.empty(320 * 65536 + 1)]  # (shapes only: no data needed)
    assert gpu_model.kernel_launches('_foreach_add_', [big, big]) == 2  # over 320 blocks of 65,536
    lists = [small[:40]] * 5  # fused AdamW: params, grads, exp_avgs, exp_avg_sqs, steps: 36 a launch
    assert gpu_model.kernel_launches('_fused_adamw_', lists) == 2


def test_modelled_lora_step_takes_its_adapter_casts_from_one_foreach_copy(modelled):
    model, _ = modelled
    calls = model['lora_fast']['top_calls_ms']
    rank = step_time.RANK
    # no cast of a float32 [r, in] / [out, r] adapter weight at a projection: one foreach copy for them all
    assert not [c for c in calls if c.startswith('_to_copy float32') and (f'[{rank}, ' in c or f', {rank}]' in c)]
    assert [c for c in calls if c.startswith('_foreach_copy_')]
