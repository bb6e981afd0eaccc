"""K models of one architecture trained as one: each parameter stacked on a new leading dimension and
the forward pass vectorised over it (torch.func.vmap), so K small GEMMs become one batched GEMM and the
optimiser steps K models in one pass over each tensor."""

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kdrun.ensemble import combine_logits
from kdrun.models import capabilities


class StackedModels(nn.Module):
    """Members must hold no random layers and no running statistics (see has_per_run_state): under
    vmap they could not draw or keep what the member would on its own. `member_logits` is [B, K, C],
    like an Ensemble's, so evaluation reports each member's test errors."""

    def __init__(self, models):
        super().__init__()
        params, buffers = stack_module_state(list(models))
        if buffers:
            raise ValueError(f"cannot stack models with buffers ({', '.join(buffers)})")
        self.names = list(params)
        # a member's matrix [out, in] is kept as [K, in, out]: its gradient then comes out of the batched
        # matmul in that layout, where [K, out, in] cost a copy per step (13% of a fused step here)
        self.flipped = [params[name].dim() == 3 for name in self.names]
        self.stacked = nn.ParameterList(nn.Parameter(_flip(params[name]).contiguous() if flip else params[name])
                                        for name, flip in zip(self.names, self.flipped))
        # the architecture, kept out of the module tree (no weights to move or save: they are the slices)
        self.__dict__["template"] = copy.deepcopy(models[0]).to("meta")
        self.k = len(models)

    def _member_forward(self, params, x):
        return functional_call(self.template, dict(zip(self.names, params)), (x,))

    def _member_params(self):
        """Every stacked parameter in its member's layout ([K, ...member shape]; views, no copies)."""
        return tuple(_flip(p) if flip else p for p, flip in zip(self.stacked, self.flipped))

    def member_logits(self, x):
        return vmap(self._member_forward, in_dims=(0, None), out_dims=1)(self._member_params(), x)

    def combined(self, member_logits):
        return combine_logits(member_logits, "arithmetic", 1.0)

    def forward(self, x):
        return self.combined(self.member_logits(x))

    def member_state_dict(self, k):
        """Member k's weights, as its own model's state_dict."""
        return {name: p[k].detach().clone() for name, p in zip(self.names, self._member_params())}

    @torch.no_grad()
    def constrain(self):
        """Each member's own constraint (max-norm), applied to its slice through a real copy of the
        architecture: constraints are per unit, so they are exact on the slice."""
        if getattr(self.template, "max_norm", None) is None:
            return
        device = self.stacked[0].device
        member = self.__dict__.get("scratch")  # made once per device, like the template kept out of the tree
        if member is None or next(member.parameters()).device != device:
            member = self.__dict__["scratch"] = copy.deepcopy(self.template).to_empty(device=device)
        for k in range(self.k):
            member.load_state_dict(self.member_state_dict(k))
            capabilities.constrain(member)
            for name, p in zip(self.names, self._member_params()):
                p[k].copy_(member.get_parameter(name))


def _flip(stacked_matrix):
    return stacked_matrix.transpose(-1, -2)


def has_per_run_state(model):
    """What a member of StackedModels may not have: dropout that draws (p > 0) or batch norm."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return "dropout"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "BatchNorm"
    return None
