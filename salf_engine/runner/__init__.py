"""The truncated runner: one forward of an HF decoder with every row cut at its own depth (``truncated``),
and the losses computed on it without the [B, T, V] logits: the head cross-entropy a chunk of positions at
a time (``chunked_loss``) and the response-only loss of prompt/response rows (``response_loss``)."""
