"""Frozen helper networks held outside a module's tree.

A tokenizer runs a frozen VFM, a loss a frozen LPIPS network, a discriminator a frozen ViT. None of them is part of
the owner's weights: they must not appear in ``state_dict()`` (checkpoints stay small and load strictly without
them), nor in ``parameters()`` (optimizers and EMA see only what is trained), and ``.train()`` must never switch
them out of eval mode. They must still follow ``.to(device)`` / ``.half()`` of their owner.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["FrozenModulesMixin"]


class FrozenModulesMixin:
    """Mixin for ``nn.Module`` subclasses (list it before ``nn.Module`` / ``ModelMixin``): :meth:`hold_frozen`
    stores a module outside the module tree, frozen and in eval mode; :meth:`frozen` returns it."""

    def hold_frozen(self, name: str, module: Optional[nn.Module]) -> None:
        if module is not None:
            module.requires_grad_(False)
            module.eval()
        self.__dict__.setdefault("_frozen_modules", {})[name] = module

    def frozen(self, name: str) -> Optional[nn.Module]:
        return self.__dict__["_frozen_modules"][name]

    def _held_frozen(self) -> list[nn.Module]:
        return [m for m in self.__dict__.get("_frozen_modules", {}).values() if m is not None]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        for module in self._held_frozen():  # .to(), .cuda(), .half() ... reach them although they are not children
            module._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        for module in self._held_frozen():
            module.eval()
        return self
