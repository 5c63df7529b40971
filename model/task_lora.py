"""Linear layers holding every task's LoRA at once, for one forward over mixed-task batches.

Shared by jina-v3 (spec §2.2) and jina-v4 (§7.1): y = W x + b + scaling * B[t] (A[t] x) for the task t
of each row. Callers order a batch so that each task is one contiguous run along dim 0 (tokens when
packed, rows when padded); a layer then applies the merged weight of each run's task to a slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ((task index or None, start, stop), ...) along dim 0; None means base weights (no adapter).
TaskRuns = tuple[tuple[int | None, int, int], ...]


class TaskLinear(nn.Module):
    """nn.Linear with stacked task LoRA: W_t = W + scaling * B[t] @ A[t] (A: (n, r, in), B: (n, out, r)).

    Merged weights are cached per task in use, so batches pay for one GEMM, not a LoRA side path.
    """

    def __init__(
        self, in_features: int, out_features: int, num_tasks: int, rank: int, scaling: float, *, bias: bool = True
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(num_tasks, rank, in_features), requires_grad=False)
        self.lora_B = nn.Parameter(torch.empty(num_tasks, out_features, rank), requires_grad=False)
        self.scaling = scaling
        self._merged: dict[int, torch.Tensor] = {}

    def task_weight(self, task: int | None) -> torch.Tensor:
        if task is None:
            return self.weight
        if task not in self._merged:
            # Merge in fp32 and cast once (as vLLM does): bf16 deltas would round twice.
            delta = self.lora_B[task].float() @ self.lora_A[task].float()  # (out, in)
            self._merged[task] = (self.weight.float() + self.scaling * delta).to(self.weight.dtype)
        return self._merged[task]

    def forward(self, x: torch.Tensor, runs: TaskRuns) -> torch.Tensor:
        if len(runs) == 1:
            return F.linear(x, self.task_weight(runs[0][0]), self.bias)
        out = x.new_empty(*x.shape[:-1], self.weight.shape[0])
        for task, start, stop in runs:
            out[start:stop] = F.linear(x[start:stop], self.task_weight(task), self.bias)
        return out
