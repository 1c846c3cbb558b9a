"""The engine inside other trainers: the patched HF forward (``patching``) and HF Trainer / TRL (``hf``);
accelerate, DDP, FSDP2 and torchrun loops use the same pieces (docs/integrations.md)."""
