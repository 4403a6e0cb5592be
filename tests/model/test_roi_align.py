"""sam3stream.model.roi_align against a loop-by-loop port of torchvision's CPU kernel."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

torch = pytest.importorskip("torch")

from sam3stream.model.roi_align import (  # noqa: E402
    install_into_transformers,
    roi_align,
    torchvision_roi_align_works,
)

f32 = np.float32


def _reference(
    feats: npt.NDArray[np.float32],
    rois: npt.NDArray[np.float32],
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> npt.NDArray[np.float32]:
    """torchvision/csrc/ops/cpu/roi_align_kernel.cpp with T = float, transcribed loop by loop.

    Scalar arithmetic is done in np.float32 so every rounding step matches the C++ kernel.
    """
    _, channels, height, width = feats.shape
    out = np.zeros((rois.shape[0], channels, pooled_h, pooled_w), dtype=np.float32)
    scale = f32(spatial_scale)
    for n in range(rois.shape[0]):
        r = rois[n]
        batch = int(r[0])
        offset = f32(0.5) if aligned else f32(0.0)
        roi_start_w = f32(r[1] * scale - offset)
        roi_start_h = f32(r[2] * scale - offset)
        roi_end_w = f32(r[3] * scale - offset)
        roi_end_h = f32(r[4] * scale - offset)
        roi_width = f32(roi_end_w - roi_start_w)
        roi_height = f32(roi_end_h - roi_start_h)
        if not aligned:
            roi_width = max(roi_width, f32(1.0))
            roi_height = max(roi_height, f32(1.0))
        bin_h = f32(roi_height / f32(pooled_h))
        bin_w = f32(roi_width / f32(pooled_w))
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(f32(roi_height / f32(pooled_h)))
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(f32(roi_width / f32(pooled_w)))
        count = f32(max(grid_h * grid_w, 1))

        # pre_calc_for_bilinear_interpolate
        pre: list[tuple[int, int, int, int, np.float32, np.float32, np.float32, np.float32]] = []
        for ph in range(pooled_h):
            for pw in range(pooled_w):
                for iy in range(grid_h):
                    yy = f32(
                        f32(roi_start_h + f32(f32(ph) * bin_h))
                        + f32(f32(f32(f32(iy) + f32(0.5)) * bin_h) / f32(grid_h))
                    )
                    for ix in range(grid_w):
                        xx = f32(
                            f32(roi_start_w + f32(f32(pw) * bin_w))
                            + f32(f32(f32(f32(ix) + f32(0.5)) * bin_w) / f32(grid_w))
                        )
                        x = xx
                        y = yy
                        if not (y >= -1.0 and y <= height and x >= -1.0 and x <= width):
                            pre.append((0, 0, 0, 0, f32(0), f32(0), f32(0), f32(0)))
                            continue
                        if y <= 0:
                            y = f32(0)
                        if x <= 0:
                            x = f32(0)
                        y_low = int(y)
                        x_low = int(x)
                        if y_low >= height - 1:
                            y_high = y_low = height - 1
                            y = f32(y_low)
                        else:
                            y_high = y_low + 1
                        if x_low >= width - 1:
                            x_high = x_low = width - 1
                            x = f32(x_low)
                        else:
                            x_high = x_low + 1
                        ly = f32(y - f32(y_low))
                        lx = f32(x - f32(x_low))
                        hy = f32(f32(1.0) - ly)
                        hx = f32(f32(1.0) - lx)
                        pre.append(
                            (
                                y_low * width + x_low,
                                y_low * width + x_high,
                                y_high * width + x_low,
                                y_high * width + x_high,
                                f32(hy * hx),
                                f32(hy * lx),
                                f32(ly * hx),
                                f32(ly * lx),
                            )
                        )

        for c in range(channels):
            plane = feats[batch, c].reshape(-1)
            index = 0
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    val = f32(0.0)
                    for _iy in range(grid_h):
                        for _ix in range(grid_w):
                            p1, p2, p3, p4, w1, w2, w3, w4 = pre[index]
                            val = f32(
                                val + (w1 * plane[p1] + w2 * plane[p2] + w3 * plane[p3] + w4 * plane[p4])
                            )
                            index += 1
                    out[n, c, ph, pw] = f32(val / count)
    return out


def _random_boxes(rng: np.random.Generator, k: int, height: int, width: int) -> npt.NDArray[np.float32]:
    """A mix of ordinary, partly outside, tiny (< 1 px), whole-map, degenerate and huge boxes."""
    boxes = []
    for i in range(k):
        kind = i % 7
        if kind == 0:  # ordinary, inside
            x1, y1 = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
            x2, y2 = rng.uniform(x1, width), rng.uniform(y1, height)
        elif kind == 1:  # partly outside
            x1, y1 = rng.uniform(-0.6 * width, 0.5 * width), rng.uniform(-0.6 * height, 0.5 * height)
            x2, y2 = rng.uniform(0.5 * width, 1.7 * width), rng.uniform(0.5 * height, 1.7 * height)
        elif kind == 2:  # tiny
            x1, y1 = rng.uniform(-1, width), rng.uniform(-1, height)
            x2, y2 = x1 + rng.uniform(0, 0.9), y1 + rng.uniform(0, 0.9)
        elif kind == 3:  # exactly the whole map
            x1, y1, x2, y2 = 0.0, 0.0, float(width), float(height)
        elif kind == 4:  # beyond the whole map on every side
            x1, y1 = -rng.uniform(1, 3 * width), -rng.uniform(1, 3 * height)
            x2, y2 = width + rng.uniform(1, 3 * width), height + rng.uniform(1, 3 * height)
        elif kind == 5:  # degenerate: reversed or zero size
            x1, y1 = rng.uniform(0, width), rng.uniform(0, height)
            x2, y2 = x1 - rng.uniform(0, 3), y1
        else:  # entirely outside
            x1, y1 = width + rng.uniform(2, 5), rng.uniform(0, height)
            x2, y2 = x1 + rng.uniform(1, 6), y1 + rng.uniform(1, 6)
        boxes.append((x1, y1, x2, y2))
    return np.asarray(boxes, dtype=np.float32)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize(("height", "width", "pooled"), [(9, 13, (3, 3)), (12, 7, (2, 4)), (6, 6, (7, 7))])
def test_matches_kernel_reference(
    aligned: bool, sampling_ratio: int, height: int, width: int, pooled: tuple[int, int]
) -> None:
    rng = np.random.default_rng(height * 100 + width + 7 * aligned + sampling_ratio)
    feats = rng.standard_normal((2, 3, height, width)).astype(np.float32)
    boxes = [_random_boxes(rng, 9, height, width), _random_boxes(rng, 5, height, width)]
    rois = np.concatenate(
        [np.concatenate([np.full((len(b), 1), i, np.float32), b], axis=1) for i, b in enumerate(boxes)]
    )
    expected = _reference(feats, rois, *pooled, 1.0, sampling_ratio, aligned)

    got_list = roi_align(
        torch.from_numpy(feats),
        [torch.from_numpy(b) for b in boxes],
        pooled,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    np.testing.assert_allclose(got_list.numpy(), expected, rtol=0, atol=1e-5)

    got_rois = roi_align(
        torch.from_numpy(feats),
        torch.from_numpy(rois),
        pooled,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    np.testing.assert_allclose(got_rois.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
def test_batched_tensor_boxes_and_spatial_scale(aligned: bool) -> None:
    rng = np.random.default_rng(3)
    height, width = 10, 8
    feats = rng.standard_normal((3, 4, height, width)).astype(np.float32)
    # Boxes given in the coordinates of a 4x larger image, pooled with spatial_scale 0.25.
    boxes = np.stack([_random_boxes(rng, 7, height, width) for _ in range(3)]) * 4.0
    rois = np.concatenate(
        [np.concatenate([np.full((7, 1), i, np.float32), b], axis=1) for i, b in enumerate(boxes)]
    )
    expected = _reference(feats, rois, 7, 7, 0.25, -1, aligned)

    got = roi_align(torch.from_numpy(feats), torch.from_numpy(boxes), 7, spatial_scale=0.25, aligned=aligned)
    assert got.shape == (21, 4, 7, 7)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)


def test_uneven_list_and_fewer_lists_than_images() -> None:
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((3, 2, 8, 8)).astype(np.float32)
    boxes = [_random_boxes(rng, 3, 8, 8), _random_boxes(rng, 0, 8, 8).reshape(0, 4)]
    rois = np.concatenate([np.concatenate([np.full((3, 1), 0, np.float32), boxes[0]], axis=1)])
    expected = _reference(feats, rois, 7, 7, 1.0, -1, False)
    got = roi_align(torch.from_numpy(feats), [torch.from_numpy(b) for b in boxes], 7)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)


def test_empty_and_dtypes() -> None:
    feats = torch.randn(1, 3, 5, 5)
    assert roi_align(feats, torch.zeros(1, 0, 4), 7).shape == (0, 3, 7, 7)
    assert roi_align(feats, torch.zeros(0, 5), 7).shape == (0, 3, 7, 7)
    box = torch.tensor([[[0.5, 0.5, 4.0, 3.0]]])
    ref = roi_align(feats, box, 7)
    half = roi_align(feats.half(), box.half(), 7)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, atol=2e-2, rtol=0)
    double = roi_align(feats.double(), box.double(), 7)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), ref, atol=1e-5, rtol=0)


def test_rejects_bad_shapes() -> None:
    feats = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError):
        roi_align(feats, torch.zeros(3, 4), 7)
    with pytest.raises(ValueError):
        roi_align(feats, torch.zeros(3, 2, 4), 7)
    with pytest.raises(ValueError):
        roi_align(feats, [torch.zeros(2, 5)], 7)
    with pytest.raises(ValueError):
        roi_align(feats[0], torch.zeros(2, 1, 4), 7)


class _Pool(torch.nn.Module):
    def __init__(self, aligned: bool) -> None:
        super().__init__()
        self.aligned = aligned

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        # transformers hands the boxes over as boxes.unbind(0); keep that path in the graph.
        return roi_align(feats, boxes.unbind(0), 7, aligned=self.aligned)


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("aligned", [False, True])
def test_onnx_export_matches(tmp_path: Path, dynamo: bool, aligned: bool) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(11)
    height, width = 12, 10
    feats = torch.from_numpy(rng.standard_normal((2, 8, height, width)).astype(np.float32))
    boxes = torch.from_numpy(np.stack([_random_boxes(rng, 7, height, width) for _ in range(2)]))
    module = _Pool(aligned).eval()
    path = tmp_path / "roi_align.onnx"
    torch.onnx.export(
        module,
        (feats, boxes),
        str(path),
        input_names=["features", "boxes"],
        output_names=["pooled"],
        opset_version=18,
        dynamo=dynamo,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = module(feats, boxes).numpy()

    # Fresh data with the traced shapes: the graph must not have baked in the example's grid sizes.
    feats2 = rng.standard_normal((2, 8, height, width)).astype(np.float32)
    boxes2 = np.stack([_random_boxes(rng, 7, height, width)[::-1].copy() for _ in range(2)])
    for f, b in ((feats.numpy(), boxes.numpy()), (feats2, boxes2)):
        (got,) = session.run(None, {"features": f, "boxes": b})
        want = module(torch.from_numpy(f), torch.from_numpy(b)).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert expected.shape == (14, 8, 7, 7)


class _PoolBatched(torch.nn.Module):
    def forward(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return roi_align(feats, boxes, 7)


def test_onnx_export_dynamic_batch(tmp_path: Path) -> None:
    """The [N, K, 4] form with a symbolic batch (how the geometry graph is exported)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(13)
    height, width = 12, 10

    def example(n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        feats = rng.standard_normal((n, 8, height, width)).astype(np.float32)
        return feats, np.stack([_random_boxes(rng, 5, height, width) for _ in range(n)])

    feats, boxes = example(2)
    batch = torch.export.Dim("batch", min=1, max=16)
    path = tmp_path / "roi_align_dynamic.onnx"
    torch.onnx.export(
        _PoolBatched(),
        (torch.from_numpy(feats), torch.from_numpy(boxes)),
        str(path),
        input_names=["features", "boxes"],
        dynamic_shapes={"feats": {0: batch}, "boxes": {0: batch}},
        opset_version=18,
        dynamo=True,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        feats, boxes = example(n)
        (got,) = session.run(None, {"features": feats, "boxes": boxes})
        want = roi_align(torch.from_numpy(feats), torch.from_numpy(boxes), 7).numpy()
        assert got.shape == (n * 5, 8, 7, 7)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_matches_real_torchvision(aligned: bool, sampling_ratio: int) -> None:
    """Against torchvision itself: its CPU kernel to 1e-5 and, where CUDA is available, its CUDA kernel.

    torchvision's CUDA kernel is compiled with FMA contraction, which moves sample positions by an
    ulp; on 72x72 N(0, 1) maps its own CUDA and CPU results differ by up to ~2e-5. Ours gives the
    same bits on both devices (to accumulation order), so on CUDA it is held to torchvision's CPU
    kernel at 1e-5 and to its CUDA kernel at 1e-5 plus torchvision's own CPU/CUDA disagreement.
    """
    if not torchvision_roi_align_works():
        pytest.skip("torchvision.ops.roi_align is not usable here")
    import torchvision

    rng = np.random.default_rng(17)
    for height, width in ((72, 72), (17, 29)):
        feats = torch.from_numpy(rng.standard_normal((2, 16, height, width)).astype(np.float32))
        boxes = [torch.from_numpy(_random_boxes(rng, 21, height, width)) for _ in range(2)]
        # Rois that are exact multiples of the pooled size: their adaptive grid sits on a ceil() edge.
        boxes[0][:3] = torch.tensor(
            [[0.0, 0.0, 14.0, 7.0], [7.0, 7.0, 14.0, 14.0], [0.0, 0.0, width, height]]
        )
        kwargs = {"sampling_ratio": sampling_ratio, "aligned": aligned}

        tv_cpu = torchvision.ops.roi_align(feats, boxes, 7, **kwargs)
        ours_cpu = roi_align(feats, boxes, 7, **kwargs)
        torch.testing.assert_close(ours_cpu, tv_cpu, atol=1e-5, rtol=0)

        if torch.cuda.is_available():
            feats_gpu = feats.cuda()
            boxes_gpu = [b.cuda() for b in boxes]
            tv_gpu = torchvision.ops.roi_align(feats_gpu, boxes_gpu, 7, **kwargs).cpu()
            ours_gpu = roi_align(feats_gpu, boxes_gpu, 7, **kwargs).cpu()
            torch.testing.assert_close(ours_gpu, tv_cpu, atol=1e-5, rtol=0)
            torchvision_spread = float((tv_gpu - tv_cpu).abs().max())
            torch.testing.assert_close(ours_gpu, tv_gpu, atol=1e-5 + torchvision_spread, rtol=0)


def test_install_into_transformers_without_torchvision() -> None:
    pytest.importorskip("transformers")
    if torchvision_roi_align_works():
        assert install_into_transformers() is False
        return
    assert install_into_transformers() is True
    assert install_into_transformers() is True  # idempotent
    from transformers.models.sam3 import modeling_sam3

    assert modeling_sam3.torchvision.ops.roi_align is roi_align

    # transformers' own box-prompt path now runs (it calls roi_align(feats, boxes.unbind(0), 7)).
    config = modeling_sam3.Sam3GeometryEncoderConfig(
        hidden_size=32, num_attention_heads=2, intermediate_size=64
    )
    encoder = modeling_sam3.Sam3GeometryEncoder(config).eval()
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.3], [0.1, 0.9, 0.5, 0.5]]])  # cxcywh, normalized
    feats = torch.randn(1, 32, 9, 9)
    with torch.no_grad():
        embed, _ = encoder._encode_boxes(boxes, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2), feats)
    assert embed.shape == (1, 2, 32)
    assert torch.isfinite(embed).all()


@pytest.mark.parametrize("transformers_first", [False, True])
def test_install_into_transformers_with_broken_torchvision(tmp_path: Path, transformers_first: bool) -> None:
    """A torchvision that is installed but whose import fails (ops built for another torch)."""
    pytest.importorskip("transformers")
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    script = textwrap.dedent(
        f"""
        import sys
        if {transformers_first}:
            import transformers
            assert transformers.is_torchvision_available()
        from sam3stream.model.roi_align import install_into_transformers, roi_align
        assert install_into_transformers() is True
        from transformers.models.sam3 import modeling_sam3
        assert modeling_sam3.torchvision.ops.roi_align is roi_align
        assert sys.modules["torchvision"] is None
        print("ok")
        """
    )
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
