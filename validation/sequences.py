"""Run prefill + decode through any runtime (artifact runtime or PyTorch module) the same way."""

from __future__ import annotations

import numpy as np
import torch

from mobilellm.exporter.targets.base import TargetRuntime


def run_runtime(runtime: TargetRuntime, tokens: np.ndarray, prefill: int) -> np.ndarray:
    """Prefill tokens[:prefill], then decode the rest one token at a time: logits [len(tokens), V]."""
    runtime.reset()
    out = [runtime.forward(np.asarray(tokens[:prefill], dtype=np.int64), 0)]
    for pos in range(prefill, len(tokens)):
        out.append(runtime.forward(np.asarray(tokens[pos : pos + 1], dtype=np.int64), pos))
    return np.concatenate(out, axis=0).astype(np.float32)


class TorchRuntime(TargetRuntime):
    """The `TargetRuntime` view of an ExportModel (or its fake-quant twin)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def reset(self) -> None:
        self.model.reset_cache()

    @torch.no_grad()
    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        logits = self.model(torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None], torch.tensor([start]))
        return logits[0].float().numpy()
