"""muP monitors for full-scale runs (`metrics.mup_monitors`): on log steps only, the RMS of the activations per role
(the embedding output, the residual stream after each block, the logits) and the RMS of each parameter role's
update relative to its weights. Under a correct muP both stay of the same size when the width grows (the
coordinate check's quantities, on the real run); a wrong rule shows as one role's numbers drifting with width.

Everything is summed on the device; one all-reduce and one host copy per log step. The cost is a copy of this
rank's parameters on log steps, to measure the update (benchmarks/train_step.py measures it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from trainer.train.model import Transformer, param_plan, plain_name

ACTIVATION_ROLES = ("input", "hidden", "output")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _tp_copies(param: nn.Parameter, tp: int) -> int:
    """On how many TP ranks this rank's part of `param` also lives: 1 where TP splits it, `tp` where every TP rank
    holds the same (norm gains; experts and routers, which TP does not split)."""
    names = (param.device_mesh.mesh_dim_names or ()) if isinstance(param, DTensor) else ()
    split = "tp" in names and isinstance(param.placements[names.index("tp")], Shard)
    return 1 if split else tp


class MupMonitor:
    def __init__(self, model: Transformer, plan_cfg, tp: int = 1) -> None:
        self.model = model
        plan = param_plan(plan_cfg)
        self.params: dict[str, list[nn.Parameter]] = {}
        self.copies: dict[str, list[int]] = {}
        for name, param in model.named_parameters():
            role = plan[plain_name(name)].role
            self.params.setdefault(role, []).append(param)
            self.copies.setdefault(role, []).append(_tp_copies(param, tp))
        self.sums: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self.before: dict[str, list[torch.Tensor]] = {}

    def _watch(self, role: str):
        def hook(module, inputs, output) -> None:
            local = _local(output).detach().float()
            found = torch.stack([local.pow(2).sum(), torch.tensor(float(local.numel()), device=local.device)])
            self.sums[role] = self.sums[role] + found if role in self.sums else found
        return hook

    def arm(self) -> None:
        """Before a log step's forward: watch the activations, and keep this rank's weights to measure the update."""
        self.sums = {}
        self.handles = [self.model.embedded.register_forward_hook(self._watch("input")),
                        self.model.logits.register_forward_hook(self._watch("output"))]
        self.handles += [block.register_forward_hook(self._watch("hidden")) for block in self.model.layers.values()]
        self.before = {role: [_local(p).detach().clone() for p in params] for role, params in self.params.items()}

    def collect(self) -> dict[str, float]:
        """After the optimizer step: the log step's numbers, averaged over every rank."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        device = next(iter(self.params.values()))[0].device
        zero = torch.zeros(2, device=device)
        rows = [self.sums.get(role, zero) for role in ACTIVATION_ROLES]
        roles = sorted(self.params)
        with torch.no_grad():
            for role in roles:
                now = [_local(p).float() for p in self.params[role]]
                was = [b.float() for b in self.before[role]]
                # Summed over every rank below: what several TP ranks hold alike counts once.
                copies = self.copies[role]
                update = torch.stack([(n - w).pow(2).sum() / c for n, w, c in zip(now, was, copies, strict=True)]).sum()
                weight = torch.stack([n.pow(2).sum() / c for n, c in zip(now, copies, strict=True)]).sum()
                rows.append(torch.stack([update, weight]))
        values = torch.stack(rows)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
        values = values.tolist()
        self.before = {}
        out = {}
        for role, (total, count) in zip(ACTIVATION_ROLES, values, strict=False):
            if count:
                out[f"mup/act_rms/{role}"] = (total / count) ** 0.5
        for role, (update, weight) in zip(roles, values[len(ACTIVATION_ROLES):], strict=True):
            if weight:
                out[f"mup/update_ratio/{role}"] = (update / weight) ** 0.5
        return out
