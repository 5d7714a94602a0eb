"""ONNX export: graph building, int4 packing and the pruning subgraph (``qavtp.export``)."""
