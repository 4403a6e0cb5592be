"""The model side (torch + transformers): build or load SAM 3 at a resolution, split it, export it.

Only the torch backend, ``[engines.export]`` (an export at start) and the engine check of a moved
checkpoint import it at run time; the onnxruntime and TensorRT backends never do.
"""
