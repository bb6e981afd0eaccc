"""A specialist starts as its generalist: same body, and a head cut down to its classes plus a dustbin."""

import math

import torch

from kdrun.models import capabilities


@torch.no_grad()
def init_from_generalist(specialist, generalist, classes, head_path=None):
    """Copy every weight but the head's (its final nn.Linear, see capabilities.head_module); the head keeps
    the generalist's rows for `classes`, and the dustbin row is the mean of the other rows, its bias raised
    by log(number of others) so that when those classes' logits are equal the dustbin's is their log-sum-exp."""
    path, head = capabilities.head_module(generalist, head_path)
    own = capabilities.head_module(specialist, head_path)[1]
    prefix = path + "."
    body = {k: v for k, v in generalist.state_dict().items() if not k.startswith(prefix)}
    missing, unexpected = specialist.load_state_dict(body, strict=False)
    assert not unexpected and all(k.startswith(prefix) for k in missing), (missing, unexpected)
    weight, bias = head.weight, head.bias
    others = [c for c in range(weight.shape[0]) if c not in set(classes)]
    own.weight.copy_(torch.cat([weight[list(classes)], weight[others].mean(0, keepdim=True)]))
    own.bias.copy_(torch.cat([bias[list(classes)], bias[others].mean(0, keepdim=True) + math.log(len(others))]))
