"""Export of patched models: ONNX lowering with a frozen schedule, graph checks, runners, parity."""
