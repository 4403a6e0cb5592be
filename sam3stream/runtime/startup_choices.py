"""The torch backend's start-up choices between two forms of a step: the MLPs' activations in
their GEMMs' epilogues (runtime/fused_mlp.py) and the DETR encoder's attention through our
kernel (runtime/attention_kernel.py). Each is forced by an option, else taken as an earlier start
recorded it (runtime/compile_cache.py), else timed on the device at the step's shape."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from sam3stream.errors import BackendUnavailableError, InputError

if TYPE_CHECKING:
    import torch

__all__ = ["StartupChoices"]

log = structlog.get_logger(__name__)


def _swapped_by_another_backend(forced: bool | None, what: str) -> bool:
    """For a rewrite that a backend built earlier from the same model already made to the
    modules they share: this backend has it too (True), unless it was forced off."""
    if forced is False:
        raise InputError(
            f"this model's {what} by another backend built from the same model; load the model "
            "again for a backend without it"
        )
    log.info("rewrite already in place", what=what, reason="shared model")
    return True


class StartupChoices:
    """The choices of one backend on ``device`` at ``dtype``; ``recorded``: an earlier start's
    (names of runtime/compile_cache.CHOICES); ``timed``: those this one timed, to record;
    ``stream``: the CUDA stream the timings capture their graphs on (one the backend holds)."""

    def __init__(
        self, device: torch.device, dtype: torch.dtype, recorded: dict[str, bool], stream: Any = None
    ) -> None:
        self.device, self.dtype, self.recorded, self.stream = device, dtype, recorded, stream
        self.timed: dict[str, bool] = {}

    def attention_kernel(self, forced: bool | None, rows: int, attention: Any, tokens: int) -> bool:
        """Whether the DETR encoder's self-attention runs through our Triton kernel: as forced,
        else as an earlier start recorded (where the kernel can run), else by timing it against
        SDPA on ``rows`` x heads x ``tokens`` (CUDA with Triton). As with the MLPs, a model whose
        attention another backend already swapped keeps it."""
        import torch

        from sam3stream.runtime import attention_kernel
        from sam3stream.runtime.decoder_rewrite import KernelAttention

        if isinstance(attention, KernelAttention):
            return _swapped_by_another_backend(
                forced, "DETR encoder attention was already swapped for the kernel"
            )
        if forced and self.dtype == torch.float32:
            raise InputError("attention_kernel=True needs precision bf16 or fp16, not fp32")
        usable = self.device.type == "cuda" and attention_kernel.available()
        if forced and not usable:
            raise BackendUnavailableError(
                "attention_kernel=True needs Triton and a CUDA device: `pip install triton` on a "
                "CUDA machine, or leave attention_kernel unset to use it only where it is faster"
            )
        heads, dim = int(attention.num_attention_heads), int(attention.head_dim)
        if forced and not attention_kernel.supports(dim):
            raise InputError(f"attention_kernel=True: the DETR encoder's head dim {dim} is not 32 or 64")
        if forced is not None:
            return forced
        if not usable or self.dtype == torch.float32 or not attention_kernel.supports(dim):
            return False
        recorded = self.recorded.get("attention_kernel")
        if recorded is not None:
            return recorded
        pays, sdpa_ms, kernel_ms = attention_kernel.kernel_pays(
            rows, heads, tokens, dim, self.dtype, stream=self.stream
        )
        self.timed["attention_kernel"] = pays
        log.info(
            "attention kernel timed",
            shape=[rows, heads, tokens, dim],
            sdpa_ms=round(sdpa_ms, 4),
            kernel_ms=round(kernel_ms, 4),
        )
        return pays

    def epilogue(self, forced: bool | None, mlp: Any, activation: str, tokens: int) -> bool:
        """Whether an MLP's activation goes into its first GEMM's epilogue: as forced, else as
        an earlier start recorded, else by timing both forms on ``tokens`` tokens (CUDA; on the
        CPU the op is plain addmm + act).

        Backends built from one model share its modules: if another backend already fused
        them, so is this one (they cannot be timed again, nor unfused under the other)."""
        from sam3stream.runtime.fused_mlp import FusedMLP, fused_mlp_pays

        if isinstance(mlp, FusedMLP):
            return _swapped_by_another_backend(forced, f"{activation.upper()} MLPs were already fused")
        if forced is not None:
            return forced
        recorded = self.recorded.get(f"fused_{activation}")
        if recorded is not None:
            return recorded
        if self.device.type != "cuda":
            return False
        pays, plain_ms, fused_ms = fused_mlp_pays(mlp, activation, tokens, stream=self.stream)
        self.timed[f"fused_{activation}"] = pays
        log.info(
            "MLP epilogue timed",
            activation=activation,
            tokens=tokens,
            separate_ms=round(plain_ms, 4),
            fused_ms=round(fused_ms, 4),
        )
        return pays
