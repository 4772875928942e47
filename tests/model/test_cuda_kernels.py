"""flashinfer's paged decode kernel: the page layout we hand it (no GPU needed), and the
kernel against the PyTorch path where CUDA and flashinfer are both present."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvserve.model.cuda_kernels import flashinfer_decode_kernel, paged_kv_layout


def test_page_layout_is_csr_over_the_blocks_in_use():
    tables = torch.tensor([[4, 9, 0], [7, 0, 0], [1, 2, 3]])
    lens = torch.tensor([17, 16, 33])
    indptr, indices, last = paged_kv_layout(tables, lens, 16)
    assert indptr.tolist() == [0, 2, 3, 6]
    assert indices.tolist() == [4, 9, 7, 1, 2, 3]
    assert last.tolist() == [1, 16, 1]
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32


def test_no_kernel_off_cuda_or_in_float32():
    assert flashinfer_decode_kernel(9, 3, 64, torch.bfloat16, torch.device("cpu")) is None
    assert flashinfer_decode_kernel(9, 3, 64, torch.float32, torch.device("cuda")) is None


@pytest.mark.skipif(not torch.cuda.is_available()
                    or importlib.util.find_spec("flashinfer") is None,
                    reason="needs CUDA and flashinfer")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flashinfer_matches_torch_path(dtype):
    from test_cpu_kernels import make_case, torch_reference  # pytest puts tests/model on the path

    kernel = flashinfer_decode_kernel(9, 3, 64, dtype, torch.device("cuda"))
    assert kernel is not None  # it passed its own self-check
    q, kc, vc, tables, lens = (t.cuda() for t in make_case(dtype, 9, 3, 64, [1, 16, 17, 100]))
    expected = torch_reference(q, kc, vc, tables, lens, 0.125)
    got = kernel(q, kc, vc, tables, lens, 16, 0.125)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_self_check_accepts_a_correct_kernel_and_names_a_wrong_one():
    """The self-check that guards flashinfer, run on the CPU with stand-in kernels."""
    from kvserve.model import cpu_kernels
    from kvserve.model.cuda_kernels import self_check

    cpu = torch.device("cpu")
    good = cpu_kernels.paged_decode_kernel(num_threads=1)
    if good is None:
        pytest.skip("needs g++ for the CPU kernel")
    assert self_check(good, 9, 3, 64, torch.bfloat16, cpu) is None

    def wrong(q, *args):
        return torch.zeros_like(q)

    assert "max abs error" in self_check(wrong, 9, 3, 64, torch.bfloat16, cpu)
