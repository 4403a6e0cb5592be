"""Runtimes that execute the four SAM 3 graphs: onnxruntime (CPU), torch (CUDA), TensorRT.

Nothing here imports torch unless the torch backend is chosen.
"""

from sam3stream.runtime.types import Backend, RawOutputs, TextFeatures

__all__ = ["Backend", "RawOutputs", "TextFeatures"]
