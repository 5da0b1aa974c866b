"""Muon on the blocks' weight matrices and AdamW on everything else, as one optimizer object.

Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks",
kellerjordan.github.io/posts/muon) keeps one momentum buffer per matrix and replaces each update by an
approximately orthogonal matrix of the same shape: the Newton-Schulz iteration pushes every singular
value of the (Nesterov) momentum towards 1, so no direction of the update dominates the others.

The formula is torch.optim.Muon's (torch >= 2.9; tests/test_muon.py checks the two agree on a matrix):
momentum as an exponential average (`buf.lerp_(grad, 1 - momentum)`), Nesterov as `grad.lerp(buf,
momentum)`, five quintic Newton-Schulz steps with Jordan's coefficients, decoupled weight decay, and a
learning rate adjusted to the matrix's shape. It is implemented here rather than wrapped because
torch.optim.Muon orthogonalises whatever tensor it is handed: under FSDP2 that is one rank's rows of the
matrix, which is a different (wrong) update. Here a sharded (DTensor) update is gathered whole, every
rank orthogonalises the full matrix and keeps its own rows. Being one optimizer with AdamW (groups
marked `muon` step with Muon) keeps checkpoints, resume, the GradScaler and DCP's sharded optimizer
state dicts working as they do for AdamW.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Jordan's quintic coefficients (a, b, c), chosen to maximise the slope at zero; the iteration then ends
# with singular values roughly in [0.7, 1.2] rather than exactly 1, which does not hurt training (Keller
# Jordan's Muon write-up; the same numbers as torch.optim.Muon and modded-nanogpt).
JORDAN_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # torch.optim.Muon's guard against dividing a zero update by its norm


def orthogonalize(update: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """Newton-Schulz iteration towards the orthogonal factor U V^T of `update` (rows, cols), in `dtype`.

    Works on the wide orientation (rows <= cols) so the Gram matrix X X^T is the smaller one, and divides
    by the Frobenius norm first so every singular value starts at most 1.
    """
    a, b, c = JORDAN_COEFFICIENTS
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=NS_EPS)
    for _ in range(steps):
        gram = x @ x.T  # (rows, rows)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return x.T if tall else x


def lr_adjustment(kind: str, rows: int, cols: int) -> float:
    """The factor on a matrix's learning rate that evens out the size of updates across shapes.

    original: sqrt(max(1, rows/cols)), from Keller Jordan's Muon (muon.py) and modded-nanogpt: the
    orthogonal update of a tall matrix (more outputs than inputs) has smaller entries (RMS 1/sqrt(rows)
    instead of 1/sqrt(cols)), and this restores them.
    match_rms_adamw: 0.2 sqrt(max(rows, cols)), from Moonshot's "Muon is Scalable for LLM Training"
    (Liu et al., 2025): the update's RMS becomes 0.2, about AdamW's, so AdamW's lr and decay carry over.
    """
    if kind == "original":
        return math.sqrt(max(1.0, rows / cols))
    if kind == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _whole(t: Tensor) -> Tensor:
    """The full matrix of an FSDP2-sharded DTensor (an all-gather); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: Tensor, param: Tensor) -> Tensor:
    """`full` laid out as `param`: for a DTensor, this rank's rows, cut locally (every rank holds `full`)."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (tensor cores; what torch.optim.Muon and modded-nanogpt use), fp32 elsewhere: CPUs
    without native bf16 emulate it, slower than fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def muon_step(group: dict, state: dict) -> None:
    """One Muon update of every matrix in `group` that has a gradient (state: the optimizer's, per param)."""
    lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
    for p in group["params"]:
        if p.grad is None:
            continue
        grad = p.grad
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(grad)
        buf = st["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        full = _whole(update)  # the orthogonalisation must see the whole matrix, never one rank's rows
        ortho = orthogonalize(full, group["ns_steps"], ns_dtype(full.device)).to(p.dtype)
        rows, cols = p.shape
        p.mul_(1 - lr * decay)
        p.add_(_like(ortho, p), alpha=-lr * lr_adjustment(group["lr_adjust"], rows, cols))


class MuonAdamW(torch.optim.AdamW):
    """AdamW whose param groups marked `"muon": True` step with Muon instead.

    One optimizer object, so `state_dict()`, the GradScaler, gradient clipping and DCP's
    get/set_optimizer_state_dict see what they see for plain AdamW. Muon groups carry their own lr,
    weight_decay, momentum, nesterov, ns_steps and lr_adjust.
    """

    def __init__(self, groups: list[dict], **adamw_kwargs) -> None:
        super().__init__(groups, **adamw_kwargs)
        # Fused AdamW would take over the GradScaler's inf check (fp16) and skip only its own groups;
        # with this off the scaler skips the whole step, Muon's groups included.
        self._step_supports_amp_scaling = False

    @torch.no_grad()
    def step(self, closure=None):
        """AdamW over the plain groups, then Muon over the marked ones."""
        everything = self.param_groups
        self.param_groups = [g for g in everything if not g.get("muon")]
        try:
            loss = super().step(closure)
        finally:
            self.param_groups = everything
        for group in everything:
            if group.get("muon"):
                muon_step(group, self.state)
        return loss

    def __setstate__(self, state: dict) -> None:
        # load_state_dict ends here; Adam's version expects its own `step` in every parameter's state,
        # and Muon's parameters hold a momentum buffer only, so it sees the AdamW groups alone.
        everything = state["param_groups"]
        super().__setstate__({**state, "param_groups": [g for g in everything if not g.get("muon")]})
        self.param_groups = everything
