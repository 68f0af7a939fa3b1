"""The decode dispatcher with the Triton executor (TRITON_INTERPRET=1 on CPU, small shapes)
gives what the torch executor gives."""
import pytest
import torch

from sparse_infer.decode import decode_attention
from sparse_infer.kernels import triton_available
from tests.decode.test_selectors import make_rt

pytestmark = pytest.mark.triton


def _interpreted_or_cuda():
    if not triton_available():
        return False
    if torch.cuda.is_available():
        return True
    import importlib

    from triton.runtime.interpreter import InterpretedFunction
    mod = importlib.import_module("sparse_infer.kernels.sparse_decode")
    return isinstance(mod._sparse_decode_split_kernel, InterpretedFunction)


@pytest.mark.skipif(not _interpreted_or_cuda(), reason="needs CUDA or TRITON_INTERPRET=1 before triton import")
@pytest.mark.parametrize("rule", [
    {"method": "quest", "page": 8, "budget": 24, "sink": 2, "local": 8},
    {"method": "token_select", "budget": 20, "sink": 2, "local": 8},
])
def test_triton_backend_matches_torch(rule):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, 32, generator=g).to(device)
    k = torch.randn(2, 2, 90, 32, generator=g).to(device)
    v = torch.randn(2, 2, 90, 32, generator=g).to(device)
    mask = torch.ones(2, 1, 1, 90, dtype=torch.bool, device=device)
    mask[1, ..., :17] = False
    outs = []
    for backend in ("torch", "triton"):
        rt = make_rt(rule)
        rt.backend = backend
        outs.append(decode_attention(rt, None, q, k, v, mask, 32 ** -0.5, {}))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
