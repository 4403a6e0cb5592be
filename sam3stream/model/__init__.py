"""The model side (torch + transformers): build or load SAM 3 at a resolution, split it, export it.

Nothing in the run-time path imports this package.
"""
