"""Persistence of a tokenizer that holds a frozen VFM outside its module tree.

Used by every family with a frozen VFM (VFMTok / VFMAE, DINO-Tok, GloTok's VFM variant). The VFM is not in
``state_dict()`` nor ``parameters()``; the config records which VFM to load; when no config value can reproduce the
weights the model was trained with (a random VFM, or weights given with ``load_vfm_weights(path)``),
``save_pretrained`` writes them next to the tokenizer's (``vfm.safetensors``) so that the saved folder loads back by
itself. A family without a frozen VFM (GloTok's conv encoder) holds ``None`` and everything here is a no-op.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from safetensors.torch import save_file

from vfmtok.tokenizer.utils.atomic import atomic_file
from vfmtok.tokenizer.utils.errors import CheckpointError
from vfmtok.tokenizer.utils.loading import bundled_file
from vfmtok.tokenizer.vfm import FrozenVFM, looks_like_local_path

__all__ = ["FrozenVFMHolderMixin", "VFM_WEIGHTS_NAME"]

VFM_WEIGHTS_NAME = "vfm.safetensors"


class FrozenVFMHolderMixin:
    """List it first among the bases (before :class:`StrictLoadingMixin`); call :meth:`hold_vfm` in ``__init__``."""

    def hold_vfm(self, vfm: Optional[FrozenVFM]) -> None:
        self.hold_frozen("vfm", vfm)  # FrozenModulesMixin: not part of the tokenizer's weights
        self._vfm_weights_source: Optional[str] = None  # where the VFM weights were loaded from; None: random

    @property
    def vfm(self) -> Optional[FrozenVFM]:
        return self.frozen("vfm")

    @property
    def frozen_encoder(self) -> Optional[FrozenVFM]:
        return self.vfm

    def load_vfm_weights(self, source: Optional[str] = None) -> None:
        """Load the real VFM weights (Hub id, local directory or official checkpoint; default: the config's)."""
        if self.vfm is None:
            raise NotImplementedError(f"{type(self).__name__} with this config has no frozen encoder")
        self.vfm.load_pretrained(source)
        self._vfm_weights_source = source if source is not None else self.vfm.pretrained

    def _vfm_source_is_local(self) -> bool:
        """The config names the VFM weights by a local path: it means nothing on another machine or the Hub."""
        source = None if self.vfm is None else self.vfm.pretrained
        return source is not None and (looks_like_local_path(source) or Path(source).expanduser().exists())

    def _vfm_needs_bundling(self) -> bool:
        if self.vfm is None:
            return False
        return self.vfm.pretrained is None or self._vfm_source_is_local() or (
            self._vfm_weights_source is not None and self._vfm_weights_source != self.vfm.pretrained)

    def save_pretrained(self, save_directory: str | Path, is_main_process: bool = True, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` plus ``vfm.safetensors`` when the config cannot reproduce the VFM. A VFM
        named by a local path is bundled, and the saved config names none (``vfm.pretrained: null``): the folder
        loads anywhere and publishes no local path."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process and self._vfm_needs_bundling():
            state = {k: v.detach().cpu().contiguous() for k, v in self.vfm.model.state_dict().items()}
            with atomic_file(Path(save_directory) / VFM_WEIGHTS_NAME) as temporary:
                save_file(state, str(temporary))
        if is_main_process and self._vfm_source_is_local():
            config_file = Path(save_directory) / "config.json"
            config = json.loads(config_file.read_text())
            if isinstance(config.get("vfm"), dict) and "pretrained" in config["vfm"]:
                config["vfm"]["pretrained"] = None
                with atomic_file(config_file) as temporary:
                    temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, load_vfm_weights: bool = True,
                        vfm_source: Optional[str] = None, **kwargs):
        """Strict diffusers loading, then the VFM weights: ``vfm_source``, else the folder's ``vfm.safetensors``,
        else the source the config names; ``load_vfm_weights=False`` gives a random VFM (offline tests), drawn from
        seed 0."""
        kwargs["low_cpu_mem_usage"] = False  # the VFM is built in the constructor; a meta-device load would miss it
        kwargs.pop("device_map", None)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        if not load_vfm_weights and model.vfm is not None:
            model.vfm.reinitialize()  # a random VFM, the same on every load (not diffusers' uninitialised memory)
        if load_vfm_weights and model.vfm is not None:
            if vfm_source is None:
                vfm_source = bundled_file(pretrained_model_name_or_path, VFM_WEIGHTS_NAME, kwargs)
            if vfm_source is None and model.vfm.pretrained is None:
                raise CheckpointError(
                    f"{pretrained_model_name_or_path}: no VFM weights: the folder has no {VFM_WEIGHTS_NAME} and its "
                    "config names no VFM source (vfm.pretrained); pass vfm_source=, or load_vfm_weights=False for a "
                    "random VFM")
            model.load_vfm_weights(vfm_source)
        return (model, info) if want_info else model
