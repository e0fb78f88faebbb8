"""Quantization: ggml block codecs in numpy and the nested (matryoshka) plan."""
