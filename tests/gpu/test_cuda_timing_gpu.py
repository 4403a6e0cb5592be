"""On a CUDA device: cuda_graphed captures on the stream it is given and replays the captured
work on the inputs as they are at replay time (so timing replays times the real work), and the
start-up timings built on it return times for both forms and a choice that agrees with them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from sam3stream.runtime.cuda_timing import cuda_graphed  # noqa: E402
from sam3stream.runtime.fused_mlp import fused_mlp_pays  # noqa: E402


def test_a_graphed_call_replays_its_work_on_the_inputs_of_the_moment() -> None:
    x = torch.ones(64, 64, device="cuda")
    out = torch.empty_like(x)
    side = torch.cuda.Stream()
    streams = []

    def step() -> None:
        streams.append(torch.cuda.current_stream())
        torch.matmul(x, x, out=out)

    replay = cuda_graphed(step, side)
    # Two warm-up calls and the capture, all on the stream given (cuBLAS keeps a workspace per
    # stream it runs on); replays run no Python.
    assert streams == [side] * 3
    x.fill_(2.0)
    replay()
    torch.cuda.synchronize()
    assert len(streams) == 3
    assert torch.equal(out, torch.full_like(out, 2.0 * 2.0 * 64))


class _MLP(torch.nn.Module):
    """Shaped like transformers' Sam3MLP (fc1, activation_fn, fc2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(256, 1024, device="cuda", dtype=torch.bfloat16)
        self.fc2 = torch.nn.Linear(1024, 256, device="cuda", dtype=torch.bfloat16)
        self.activation_fn = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


def test_the_mlp_epilogue_timing_picks_the_form_it_timed_faster() -> None:
    pays, plain_ms, fused_ms = fused_mlp_pays(_MLP(), "relu", tokens=4096, rounds=2, repeats=5)
    assert plain_ms > 0 and fused_ms > 0
    assert pays == (fused_ms < plain_ms)
