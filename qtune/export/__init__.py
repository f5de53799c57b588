"""Export: an adapter folded into 16-bit weights, GGUF and 4-bit copies."""
