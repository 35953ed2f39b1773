"""The one way a frozen network is held: out of parameters, state dicts and checkpoints, moved by ``.to()``.

Frozen parts (the ViT, the VAE, stage 3's MLLM, metric networks) are either rebuilt from a
config or loaded from a local folder, so storing them in every checkpoint (7 B parameters for
stage 3's MLLM) or handing them to an optimizer is waste. ``Frozen(net)`` is a submodule with no
parameters or buffers of its own: ``parameters()``, ``state_dict()``, FSDP and optimizers never
see ``net``, while ``.to()`` / ``.half()`` reach it and ``.train()`` leaves it in eval mode.

It sits in the bottom package because every layer holds frozen networks (the metrics too).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class Frozen(nn.Module):
    """Holds ``net`` frozen (no gradients, eval mode) and outside the module tree; see the module docstring."""

    def __init__(self, net: nn.Module, follow_owner: bool = True):
        super().__init__()
        object.__setattr__(self, "net", net.eval().requires_grad_(False))  # not registered as a child
        # False: the owner's .to() / .half() leave ``net`` where it is (something else places it,
        # e.g. offloaded generation, which moves each network to the GPU only while it works)
        self.follow_owner = follow_owner

    def _apply(self, fn: Callable, recurse: bool = True) -> Frozen:
        super()._apply(fn, recurse)
        if self.follow_owner:
            self.net._apply(fn, recurse)
            _track_placement(self.net)
        return self

    def train(self, mode: bool = True) -> Frozen:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def _track_placement(net: nn.Module) -> None:
    """Lightning modules inside ``net`` record their device and dtype in their own ``.to()``, which
    ``_apply`` bypasses: set them from the weights, so ``module.dtype`` tells what the weights are."""
    weight = next((p for p in net.parameters() if p.is_floating_point()), None)
    if weight is None:
        return
    for module in net.modules():
        if hasattr(module, "_device") and hasattr(module, "_dtype"):  # lightning's DeviceDtypeModuleMixin
            module._device, module._dtype = weight.device, weight.dtype


def hold_frozen(owner: nn.Module, name: str, net: nn.Module) -> nn.Module:
    """``owner.<name>`` is ``net``, frozen and held by a :class:`Frozen` child (``owner.frozen_<name>``).

    For classes whose code reads the network under a fixed attribute name (e.g. torchmetrics'
    ``CLIPScore.model``); everything else holds a ``Frozen`` directly.
    """
    owner._modules.pop(name, None)
    setattr(owner, f"frozen_{name}", Frozen(net))
    object.__setattr__(owner, name, net)  # a plain attribute: the Frozen child is what the module tree sees
    return net
