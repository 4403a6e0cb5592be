"""On a CUDA device: the compiled Triton attention kernel, in bf16, is as close to a float32
reference as PyTorch's own bf16 SDPA is, at SAM 3's shapes (1008: 72 x 72 tokens)."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from sam3stream.runtime.attention_kernel import attention_reference, config_for, launch  # noqa: E402

SHAPES = {"detr_encoder": (4, 8, 5184, 32), "vit_global": (1, 16, 5184, 64), "odd": (2, 8, 1000, 32)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(("fast_exp", "sum_by_dot"), [(False, False), (True, False), (False, True)])
def test_kernel_is_as_close_to_fp32_as_sdpa(shape: str, fast_exp: bool, sum_by_dot: bool) -> None:
    batch, heads, tokens, dim = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, tokens, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        for _ in range(3)
    )
    scale = dim**-0.5
    exact = attention_reference(q.float(), k.float(), v.float(), scale)
    sdpa_err = (attention_reference(q, k, v, scale).float() - exact).abs().max().item()
    cfg = replace(config_for(dim), fast_exp=fast_exp, sum_by_dot=sum_by_dot)
    err = (launch(q, k, v, scale, cfg).float() - exact).abs().max().item()
    assert err <= max(2 * sdpa_err, 2e-3), (err, sdpa_err)
