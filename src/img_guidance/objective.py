"""The Iteratively Updated Preference Objective (paper Eq. 4-7; supplementary Eq. 17-19).

``iupo_loss`` takes tensors and returns tensors: the aligner's prediction, the reference aligner's
prediction, and the preferred / unpreferred targets. ``ReferenceTracker`` owns the reference aligner
and replaces it by the trained one after k consecutive steps in which the trained one is closer to
the preferred targets.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PREFERENCE_TERMS = ("dpo", "spin")


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared distance over all feature elements: [B, ...] x2 -> [B], float32."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def iupo_loss(
    pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    *,
    lam: float = 1.0,
    terms: Sequence[str] = PREFERENCE_TERMS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = mean_b[ d(w, pred) + lam * softplus(-(sum of the chosen margins)) ].

    With d the per-sample MSE, dw = d(w, pred) - d(w, ref), dl = d(l, pred) - d(l, ref) and
    dref = d(ref, pred), the margins are DPO = -(dw - dl) and SPIN = -(dw - dref). With both terms
    the argument of softplus is 2 dw - dl - dref, the paper's Eq. 6 / supplementary Eq. 17.
    ``terms=()`` or ``lam=0`` gives the L_base-only ablation.

    Args:
        pred: f_theta(c), the trained aligner's output [B, N, D] (any shape with batch first).
        ref_pred: f_ref(c), the reference aligner's output; no gradient flows into it.
        target_w: tokens of the preferred image.
        target_l: tokens of the unpreferred image.
        lam: weight of the preference term (lambda in Eq. 7).
        terms: which margins enter L_pref: any of "dpo", "spin".

    Returns:
        The scalar loss and a dict of detached scalars for logging: ``L_base``, ``L_pref``,
        ``margin_dpo``, ``margin_spin`` (batch means), ``win_fraction`` (samples where pred is
        strictly closer to w than ref is), ``policy_error`` and ``reference_error`` (batch-mean
        squared errors to w, what :meth:`ReferenceTracker.observe` takes).
    """
    shapes = {tuple(t.shape) for t in (pred, ref_pred, target_w, target_l)}
    if len(shapes) != 1:
        raise ValueError(
            "iupo_loss needs pred, ref_pred, target_w and target_l of one shape, got "
            f"{tuple(pred.shape)}, {tuple(ref_pred.shape)}, {tuple(target_w.shape)}, "
            f"{tuple(target_l.shape)}"
        )
    if pred.ndim < 2:
        raise ValueError(f"iupo_loss needs a batch dimension and features, got shape {tuple(pred.shape)}")
    unknown = [t for t in terms if t not in PREFERENCE_TERMS]
    if unknown or len(set(terms)) != len(terms):
        raise ValueError(f"terms must be distinct names from {PREFERENCE_TERMS}, got {tuple(terms)}")
    lam = float(lam)
    if not lam >= 0 or lam == float("inf"):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")

    ref_pred = ref_pred.detach()
    error_w = squared_distance(target_w, pred)  # [B]
    ref_error_w = squared_distance(target_w, ref_pred)
    dw = error_w - ref_error_w
    dl = squared_distance(target_l, pred) - squared_distance(target_l, ref_pred)
    dref = squared_distance(ref_pred, pred)
    margins = {"dpo": -(dw - dl), "spin": -(dw - dref)}

    # softplus(-m) = log(1 + exp(-m)) = -log sigmoid(m), per sample [B]
    l_pref = F.softplus(-sum(margins[t] for t in terms)) if terms else torch.zeros_like(error_w)
    loss = (error_w + lam * l_pref).mean()

    parts = {
        "L_base": error_w.mean(),
        "L_pref": l_pref.mean(),
        "margin_dpo": margins["dpo"].mean(),
        "margin_spin": margins["spin"].mean(),
        "win_fraction": (error_w < ref_error_w).float().mean(),
        "policy_error": error_w.mean(),
        "reference_error": ref_error_w.mean(),
    }
    return loss, {k: v.detach() for k, v in parts.items()}


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _fresh_like(model: nn.Module) -> nn.Module:
    """An independently initialised module of the same config, on the same device and dtype."""
    param = next(model.parameters(), None)
    if hasattr(model, "config") and hasattr(type(model), "from_config"):
        fresh = type(model).from_config(model.config)
    elif hasattr(model, "config") and hasattr(model.config, "to_dict"):
        fresh = type(model)(**model.config.to_dict())
    else:
        fresh = copy.deepcopy(model)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    if param is not None:
        fresh = fresh.to(device=param.device, dtype=param.dtype)
    return fresh


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class ReferenceTracker:
    """Owns the reference aligner f_ref and replaces it by the policy after k consecutive wins.

    The reference starts as an independently initialised model of the policy's config (not a copy
    of the policy: the paper initialises f_ref randomly). It is frozen: no gradients, eval mode.
    Under ``torch.distributed`` the initial reference is broadcast from rank 0 and the errors given
    to :meth:`observe` are averaged over processes, so every process replaces it at the same step.

    Args:
        model: the policy aligner (DDP and torch.compile wrappers are unwrapped; unwrap others,
            such as DeepSpeed engines, before passing the model).
        k: consecutive steps the policy must win before it becomes the reference (paper: 10).
    """

    def __init__(self, model: nn.Module, *, k: int = 10):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.model = model
        self.k = k
        self.count = 0
        self.replacements = 0
        self.reference = _fresh_like(_unwrap(model))
        self.reference.requires_grad_(False)
        self.reference.eval()
        if _distributed():
            for tensor in self.reference.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def observe(self, policy_error: float | torch.Tensor, reference_error: float | torch.Tensor) -> bool:
        """Record one step's batch-mean squared errors to w; replace the reference on the k-th
        consecutive step where the policy's is strictly lower. Returns True when it replaced."""
        errors = torch.stack(
            [
                torch.as_tensor(policy_error, dtype=torch.float64).reshape(()).cpu(),
                torch.as_tensor(reference_error, dtype=torch.float64).reshape(()).cpu(),
            ]
        )
        if _distributed():
            device = next(self.reference.parameters()).device
            errors = errors.to(device=device, dtype=torch.float32)
            torch.distributed.all_reduce(errors, op=torch.distributed.ReduceOp.SUM)
            errors = errors / torch.distributed.get_world_size()
        policy, reference = errors.tolist()
        self.count = self.count + 1 if policy < reference else 0
        if self.count < self.k:
            return False
        self.copy_policy()
        return True

    @torch.no_grad()
    def copy_policy(self) -> None:
        """Copy the policy's current weights into the reference and start counting again."""
        self.reference.load_state_dict(_unwrap(self.model).state_dict())
        self.count = 0
        self.replacements += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "count": self.count,
            "replacements": self.replacements,
            "reference": self.reference.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["k"] != self.k:
            raise ValueError(f"tracker state was saved with k={state['k']} but this tracker has k={self.k}")
        self.count = int(state["count"])
        self.replacements = int(state["replacements"])
        self.reference.load_state_dict(state["reference"])
