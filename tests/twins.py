"""A torch.nn norm and its normlab twin with the same state, for the torch tests."""

import torch

import normlab.torch as nt


def randomized_pair(cls_name: str, args: tuple, dtype):
    """``(reference, twin)``: ``torch.nn.<cls_name>(*args)`` with its parameters drawn from
    [0.5, 1.5] (so that a dropped or misread weight shows), and the twin loaded from it."""
    reference = getattr(torch.nn, cls_name)(*args, dtype=dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(0.5, 1.5)
    twin = getattr(nt, cls_name)(*args, dtype=dtype)
    twin.load_state_dict(reference.state_dict())
    return reference, twin
