"""The engine inside other trainers: the patched HF forward (``patching``), HF Trainer / TRL (``hf``),
torch.distributed and accelerate (``distributed``)."""
