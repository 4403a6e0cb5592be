"""`sam3stream demo`: a first run on any machine, no GPU and no checkpoint needed.

- clips: synthetic test clips (shapes bouncing over scikit-image's sample photos)
- engines: the tiny random model's engines, exported once; thresholds it can pass
- config: the demo's config file (file cameras, onnxruntime on the CPU, JSONL + video)
- run: the pipeline through the embedding API, bounded in time
- summary: the table printed at the end
"""
