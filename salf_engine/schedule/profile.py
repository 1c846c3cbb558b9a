"""The eof profile's forward: every space's deviation of every sample, one batched no-grad pass."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from salf_engine.data import collate
from salf_engine.errors import ConfigError
from salf_engine.runner.truncated import is_patched
from salf_engine.runtime.device import autocast_context

__all__ = ["profile_deviations"]


@torch.no_grad()
def profile_deviations(runner, encoded, pad_id: int, *, batch_size: int = 32, dtype: str = "float32",
                       progress: bool = True, desc: str = "profile") -> torch.Tensor:
    """float32 [N, m+1]: deviations of every sample of `encoded` in every space, one batched no-grad pass."""
    if runner.bases is None:
        raise ConfigError("profiling deviations needs the runner's semantic bases")
    device = next(runner.model.parameters()).device
    n = len(encoded)
    out = torch.empty(n, runner.num_layers + 1, dtype=torch.float32)
    order = sorted(range(n), key=lambda i: len(encoded.input_ids[i]))
    was_training = runner.model.training
    runner.model.eval()
    try:
        starts = range(0, n, batch_size)
        for s in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            idx = order[s:s + batch_size]
            batch = collate(encoded, idx, pad_id, padding_side="left")
            with autocast_context(dtype, device):
                if is_patched(runner.model):  # through the root module (DDP, FSDP2 hooks run)
                    res = runner.model(input_ids=batch["input_ids"].to(device),
                                       attention_mask=batch["attention_mask"].to(device),
                                       salf_depth=runner.num_layers, salf_label=batch["labels"].to(device),
                                       salf_logits="last")
                else:
                    res = runner(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 depth=runner.num_layers, last_index=batch["last_index"].to(device),
                                 labels=batch["labels"].to(device))
            out[torch.as_tensor(idx)] = res.deviations.float().cpu()
    finally:
        runner.model.train(was_training)
    return out
