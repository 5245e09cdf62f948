"""Quantized-weight formats (AWQ, GPTQ), written against the array-API core."""
