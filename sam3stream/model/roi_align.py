"""RoIAlign in plain torch, with torchvision's exact semantics and static shapes.

transformers' ``Sam3GeometryEncoder._encode_boxes`` pools box prompts with
``torchvision.ops.roi_align(features, list_of_xyxy_boxes, 7)``. torchvision is not always usable
(not installed, or its compiled ops built against another torch), and its op is a custom kernel
that exports to ONNX only through a dedicated symbolic. This module reimplements it with ordinary
tensor ops so the geometry graph runs and exports anywhere.

Semantics follow torchvision's CPU kernel (``csrc/ops/cpu/roi_align_kernel.cpp`` and
``roi_align_common.h``) to the letter, for every box:

- ``roi_start = x1 * spatial_scale - (0.5 if aligned else 0)``; the roi size is clamped to >= 1 when
  not aligned; ``bin = roi / pooled``.
- The per-bin sample grid is ``sampling_ratio`` when > 0, else ``ceil(roi / pooled)`` (adaptive).
- Sample ``iy`` of bin ``ph`` sits at ``roi_start + ph * bin + (iy + 0.5) * bin / grid``.
- A sample with y < -1, y > H, x < -1 or x > W (or NaN) contributes 0; otherwise negative coordinates
  clamp to 0, a sample at or past the last row/column uses that row/column alone, and the rest is
  ordinary bilinear interpolation.
- Each bin is the sum of its samples divided by ``max(grid_h * grid_w, 1)``.

How the data-dependent adaptive grid becomes static:

Bilinear weights factor into a y part and an x part, and the out-of-range rule is a product of a
y test and an x test, so every pooled value is ``Ay[ph, :] @ X @ Ax[pw, :]^T / count`` where
``Ay`` [pooled_h, H] holds, for each output row, the summed interpolation weights of its samples
over the input rows (likewise ``Ax``). We evaluate a fixed number ``G`` of candidate samples per
bin and dimension, keep those whose index is below that box's adaptive grid (and that pass the
range test), and divide by the adaptive count: the same samples, the same weights, the same
divisor as torchvision, with shapes that depend only on H, W and the pooled size.

For boxes inside the map the adaptive grid never exceeds ``ceil(H / pooled)``. Boxes may reach
past the map (a user's box prompt is free-form), so instead of a margin we bound how many samples
of a bin can pass the range test at all: with an adaptive grid the sample spacing ``bin / ceil(bin)``
is more than 0.5 px whenever a bin holds more than one sample, so at most ``2 * H + 2`` of them fall
in [-1, H]. We start each bin's candidates just before its first in-range sample (a closed-form
index) and take ``G = 2 * H + 5`` of them. Every sample torchvision counts is therefore evaluated,
for any finite box whose coordinates float32 still resolves to a fraction of a pixel
(|coordinate| up to ~1e5 pixels); beyond that both implementations are dominated by rounding.
The weight tables are [boxes, pooled, G, H] and cheap; the pooling itself is two small matmuls.

Fixed ``sampling_ratio > 0`` needs no bound: G is the ratio itself.

Coordinates and weights are computed in float32 (float64 for float64 inputs); half and bfloat16
inputs are pooled in float32 and cast back, which is at least as accurate as torchvision's half
kernel. Results are the same on CPU and CUDA up to matmul accumulation order (~1e-7) and match
torchvision's CPU kernel to ~2e-7. torchvision's CUDA kernel is compiled with FMA contraction, so
its sample positions differ by an ulp and it disagrees with its own CPU kernel (and with this)
by up to ~2e-5 on N(0, 1) feature maps.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

__all__ = ["install_into_transformers", "roi_align", "torchvision_roi_align_works"]

_MODELING_SAM3 = "transformers.models.sam3.modeling_sam3"


def _pair(output_size: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    size = tuple(int(s) for s in output_size)
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or (height, width), got {output_size!r}")
    return size[0], size[1]


def _axis_weights(
    start: Tensor,
    end: Tensor,
    pooled: int,
    size: int,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor]:
    """Interpolation weights along one axis.

    ``start``/``end`` are [...] box edges already scaled and offset. Returns ``weights``
    [..., pooled, size] (samples of each bin summed per input index, out-of-grid and out-of-range
    samples excluded) and ``grid`` [...] (the per-box sample count along this axis, as a float,
    possibly <= 0 for empty aligned boxes, exactly as the C++ kernel's int).
    """
    dtype = start.dtype
    roi = end - start
    if not aligned:
        # torchvision: "Force malformed ROIs to be 1x1".
        roi = torch.clamp(roi, min=1.0)
    # Divide by a tensor, not a Python number: on CUDA, division by a scalar is done as
    # multiplication by its reciprocal, which is off by an ulp and would flip ceil() for rois
    # that are exact multiples of the pooled size.
    pooled_t = torch.full_like(roi, float(pooled))
    bin_size = roi / pooled_t
    if sampling_ratio > 0:
        grid = torch.full_like(roi, float(sampling_ratio))
        candidates = sampling_ratio
    else:
        grid = torch.ceil(roi / pooled_t)
        candidates = 2 * size + 5

    ph = torch.arange(pooled, dtype=dtype, device=start.device)
    # [..., pooled, 1]: where each bin begins (same operation order as the kernel).
    bin_start = (start[..., None] + ph * bin_size[..., None])[..., None]
    bin_e = bin_size[..., None, None]
    grid_e = grid[..., None, None]

    j = torch.arange(candidates, dtype=dtype, device=start.device)
    if sampling_ratio > 0:
        iy = j.expand(*bin_start.shape[:-1], candidates)
    else:
        # Skip to just before the first sample at or above -1: the samples of a bin are
        # bin_start + (iy + 0.5) * bin / grid, so that index is ceil((-1 - bin_start) * grid / bin - 0.5).
        # Two indices of slack absorb rounding; earlier samples fail the range test like in the kernel.
        # bin > 0 whenever grid >= 1 here; the where() keeps empty boxes (bin <= 0) from dividing by 0.
        safe_bin = torch.where(bin_e > 0, bin_e, torch.ones_like(bin_e))
        first = torch.ceil((-1.0 - bin_start) * grid_e / safe_bin - 0.5) - 2.0
        first = torch.clamp(first, min=0.0)
        first = torch.where(torch.isfinite(first), first, torch.zeros_like(first))
        iy = first + j

    # The kernel's expression: roi_start + ph * bin + (iy + .5) * bin / grid.
    y = bin_start + (iy + 0.5) * bin_e / grid_e
    used = (iy < grid_e) & (y >= -1.0) & (y <= float(size))  # NaN fails both comparisons: unused

    y = torch.clamp(y, min=0.0)
    y = torch.where(used, y, torch.zeros_like(y))  # keeps NaN/inf out of the integer casts
    low = torch.floor(y)
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, float(size - 1)), low)
    y = torch.where(at_end, low, y)
    high = torch.where(at_end, low, low + 1.0)
    frac_high = y - low
    frac_low = 1.0 - frac_high
    zero = torch.zeros_like(y)
    w_low = torch.where(used, frac_low, zero)
    w_high = torch.where(used, frac_high, zero)

    # Scatter the two taps of each sample onto the input axis with one-hot comparisons (exports
    # as Equal/Where, no ScatterND), then sum the samples of each bin.
    index = torch.arange(size, dtype=dtype, device=start.device)
    onehot_low = low[..., None] == index
    onehot_high = high[..., None] == index
    taps = torch.where(onehot_low, w_low[..., None], torch.zeros_like(w_low[..., None])) + torch.where(
        onehot_high, w_high[..., None], torch.zeros_like(w_high[..., None])
    )
    weights = taps.sum(dim=-2)  # [..., pooled, size]
    return weights, grid


def _pool_weights(
    boxes: Tensor,
    height: int,
    width: int,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``boxes`` [..., 4] xyxy -> (Ay [..., pooled_h, H], Ax [..., pooled_w, W], count [...])."""
    offset = 0.5 if aligned else 0.0
    scaled = boxes * spatial_scale - offset
    x1, y1, x2, y2 = scaled.unbind(-1)
    ay, grid_h = _axis_weights(y1, y2, pooled_h, height, sampling_ratio, aligned)
    ax, grid_w = _axis_weights(x1, x2, pooled_w, width, sampling_ratio, aligned)
    # The kernel's int product (grids can be <= 0 for empty aligned boxes; then nothing is sampled).
    count = torch.clamp(grid_h * grid_w, min=1.0)
    return ay, ax, count


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int] | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """torchvision.ops.roi_align, in plain torch with static shapes.

    ``input`` is [N, C, H, W]. ``boxes`` is one of:

    - a list/tuple of N' <= N tensors [K_i, 4] (xyxy, box i pools from image i), as torchvision;
    - a tensor [R, 5] of (batch_index, x1, y1, x2, y2), as torchvision;
    - a tensor [N, K, 4]: K boxes for each image (output rows are image-major, like the list form).

    Returns [R, C, out_h, out_w] with R the total number of boxes, in ``input.dtype``.
    """
    if torch.jit.is_tracing():  # type: ignore[attr-defined,no-untyped-call]
        # Under the TorchScript tracer (torch.onnx.export(dynamo=False)) each shape read below
        # becomes a constant and warns that the trace may not generalize. Static shapes are the
        # point of this implementation, so those warnings carry no information here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
            return _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    return _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


def _roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int] | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got shape {tuple(input.shape)}")
    pooled_h, pooled_w = _pair(output_size)
    if pooled_h <= 0 or pooled_w <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    # The batch stays symbolic (int() would freeze it in exported graphs); the map size is static.
    n = input.shape[0]
    channels, height, width = (int(s) for s in input.shape[1:])
    compute = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
    feats = input.to(compute)

    per_image: Tensor | None = None
    rois: Tensor | None = None
    if isinstance(boxes, Tensor):
        if boxes.dim() == 3 and boxes.shape[-1] == 4:
            if boxes.shape[0] != n:
                raise ValueError(f"boxes [N, K, 4] has N={boxes.shape[0]} but input has N={n}")
            per_image = boxes
        elif boxes.dim() == 2 and boxes.shape[-1] == 5:
            rois = boxes
        else:
            raise ValueError(f"boxes tensor must be [K, 5] or [N, K, 4], got shape {tuple(boxes.shape)}")
    else:
        box_list = list(boxes)
        for b in box_list:
            if b.dim() != 2 or b.shape[-1] != 4:
                raise ValueError(f"each boxes[i] must be [K_i, 4], got shape {tuple(b.shape)}")
        if len(box_list) > n:
            raise ValueError(f"{len(box_list)} box tensors for a batch of {n} images")
        if len(box_list) == n and n > 0 and all(b.shape == box_list[0].shape for b in box_list):
            # The common case (transformers passes features.unbind(0) of [N, K, 4]): no gather needed.
            per_image = torch.stack(box_list)
        else:
            ids = [torch.full_like(b[:, :1], float(i)) for i, b in enumerate(box_list)]
            if box_list:
                rois = torch.cat([torch.cat(ids), torch.cat(box_list)], dim=1)
            else:
                rois = feats.new_zeros((0, 5))

    if per_image is not None:
        ay, ax, count = _pool_weights(
            per_image.to(compute), height, width, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
        )
        k = int(per_image.shape[1])
        # [N, K, 1, Ph, H] @ [N, 1, C, H, W] -> [N, K, C, Ph, W]; then @ [N, K, 1, W, Pw].
        rows = ay.unsqueeze(2) @ feats.unsqueeze(1)
        out = rows @ ax.unsqueeze(2).transpose(-1, -2)
        out = out / count[..., None, None, None]
        return out.reshape(n * k, channels, pooled_h, pooled_w).to(input.dtype)

    assert rois is not None
    rois = rois.to(compute)
    batch_index = rois[:, 0].to(torch.int64)
    ay, ax, count = _pool_weights(
        rois[:, 1:], height, width, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
    )
    gathered = feats.index_select(0, batch_index)  # [R, C, H, W]
    out = ay.unsqueeze(1) @ gathered @ ax.unsqueeze(1).transpose(-1, -2)
    out = out / count[:, None, None, None]
    return out.to(input.dtype)


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        # Not only ImportError: a torchvision built for another torch raises RuntimeError
        # ("operator torchvision::nms does not exist") while registering its op stubs.
        return False
    return True


def torchvision_roi_align_works() -> bool:
    """Whether ``torchvision.ops.roi_align`` imports and runs here."""
    if importlib.util.find_spec("torchvision") is None or not _torchvision_imports():
        return False
    try:
        import torchvision

        out = torchvision.ops.roi_align(torch.zeros(1, 1, 2, 2), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])], 1)
        return tuple(out.shape) == (1, 1, 1, 1)
    except Exception:
        # Whatever the op raises (typically "Couldn't load custom C++ ops"), it is not usable.
        return False


def _hide_broken_torchvision() -> None:
    """Make this process treat an installed but unimportable torchvision as absent.

    transformers decides that torchvision is available from ``find_spec`` alone (and caches the
    answer), then imports it at module level in ``image_utils`` and ``modeling_sam3``: with a
    torchvision whose import raises, modeling_sam3 could not be imported at all. A ``None`` entry in
    ``sys.modules`` makes ``find_spec`` report it missing and any ``import torchvision`` raise a
    plain ImportError, which is what transformers knows how to do without.
    """
    sys.modules["torchvision"] = None  # type: ignore[assignment]
    utils = sys.modules.get("transformers.utils.import_utils")
    check = getattr(utils, "is_torchvision_available", None)
    cache_clear = getattr(check, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


def install_into_transformers() -> bool:
    """Make transformers' SAM 3 use this roi_align when torchvision's does not work here.

    ``modeling_sam3`` looks the op up as the module global ``torchvision`` at call time
    (``torchvision.ops.roi_align(...)`` inside ``_encode_boxes``), and only binds that name when
    torchvision is installed. Rebinding the global to a namespace whose ``.ops.roi_align`` is ours
    lets ``Sam3Model`` run (and export) without torchvision, with identical results.

    Returns True when it installed, False when torchvision's own op works and was left alone.
    Idempotent. When torchvision is installed but fails to import, it is hidden from the whole
    process first (see :func:`_hide_broken_torchvision`); call this before anything imports
    transformers' image code in that case.
    """
    if torchvision_roi_align_works():
        return False
    if importlib.util.find_spec("torchvision") is not None and not _torchvision_imports():
        _hide_broken_torchvision()
    modeling = importlib.import_module(_MODELING_SAM3)
    modeling.torchvision = SimpleNamespace(ops=SimpleNamespace(roi_align=roi_align))  # type: ignore[attr-defined]
    return True
