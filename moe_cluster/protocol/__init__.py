"""Wire formats, numpy only (no torch, no Ray): the native v1 endpoint (JSON, msgpack tensors), the Open
Inference Protocol v2, the client-error type, limits, tensor bytes and JSON bodies."""
