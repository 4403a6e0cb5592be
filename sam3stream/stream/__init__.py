"""The stream half: camera sources, batcher, GPU worker, pipeline wiring."""
