"""Inference: decoding with the KV cache, the CPU matrix-vector kernels and the fused block step
(gemv.c), and int8 quantization of a model's Linear layers for decoding."""
