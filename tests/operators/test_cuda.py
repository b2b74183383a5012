"""Operators on CUDA give the CPU's result (DARE/DELLA masks included: they are drawn on the CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.operators.conftest import SAMPLE_PARAMS, randn, run_op
from workers.operators import OPERATORS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_cuda_matches_cpu(op: str) -> None:
    cpu = [randn(1, 64, 48), randn(2, 64, 48), randn(3, 64, 48)]
    expected = run_op(op, SAMPLE_PARAMS[op], cpu[0], cpu[1:], seed=5)
    gpu = [x.cuda() for x in cpu]
    got = run_op(op, SAMPLE_PARAMS[op], gpu[0], gpu[1:], seed=5)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
