"""Networks whose weights record the constructor settings that built them.

A state dict alone does not say which network it fits: weights trained with other channel widths fail to load
with a long list of size mismatches, and weights trained with another setting that changes no shape (a
normalisation mode, an activation slope) load without complaint and compute something else. A network class
that mixes in :class:`RecordsArchitecture` and calls :meth:`~RecordsArchitecture.record_architecture` in its
constructor keeps those settings in its state dict (PyTorch's ``_extra_state`` entry), so every checkpoint
holding its weights records them too, and loading weights recorded with other settings raises
:class:`ArchitectureMismatchError`, naming each setting with the checkpoint's value and the network's value (the
record is compared when ``load_state_dict`` reaches the network itself, before its submodules' weights).

The record is a ``uint8`` tensor holding JSON (``{"class": ..., "settings": {...}}``): a state dict stays a
dict of tensors, so ``torch.load(..., weights_only=True)``, tools that expect only tensors and TorchScript
export are unaffected. Weights saved before the record existed (no ``_extra_state`` entry) load unchecked.

Torch only: no MONAI, no import of the method packages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "ArchitectureMismatchError",
    "RecordsArchitecture",
    "decode_architecture",
    "encode_architecture",
    "same_setting",
]

_EXTRA_STATE = "_extra_state"  # PyTorch's state dict key of get_extra_state()
_SCALARS = (bool, int, float, str, type(None))


class ArchitectureMismatchError(RuntimeError):
    """Weights recorded with other constructor settings than the network they are loaded into.

    Attributes:
        checkpoint_class, network_class: class names recorded with the weights and of the network.
        differences: setting -> ``(value recorded with the weights, value of the network)``.
    """

    def __init__(self, checkpoint_class: str, network_class: str, differences: Mapping[str, tuple[Any, Any]]) -> None:
        self.checkpoint_class, self.network_class = checkpoint_class, network_class
        self.differences = dict(differences)
        if checkpoint_class != network_class:
            detail = f"the weights are those of a {checkpoint_class}, the network is a {network_class}"
        else:
            detail = "; ".join(
                f"{key}: checkpoint {_shown(old)}, configuration {_shown(new)}"
                for key, (old, new) in self.differences.items()
            )
        super().__init__(
            f"the weights were trained with other {network_class} settings than this configuration builds: {detail}."
        )


def _plain(value: Any, name: str) -> Any:
    """``value`` as JSON-able plain data (tuples become lists); anything else is an error."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"record_architecture: {name}={value!r} is not a finite number.")
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, name) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, name) for k, v in value.items()}
    raise TypeError(
        f"record_architecture: {name} is a {type(value).__name__}; record numbers, strings, booleans, None and "
        "lists or dicts of them."
    )


def _shown(value: Any) -> str:
    return json.dumps(value)


def same_setting(a: Any, b: Any) -> bool:
    """Equal settings: numbers by value (``2`` and ``2.0``), booleans only as booleans, containers item by item."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_setting(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_setting(a[k], b[k]) for k in a)
    return a == b


def encode_architecture(class_name: str, settings: Mapping[str, Any]) -> torch.Tensor:
    """The record ``{"class": class_name, "settings": settings}`` as a ``uint8`` tensor of JSON bytes."""
    text = json.dumps({"class": class_name, "settings": dict(settings)}, sort_keys=True)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def decode_architecture(record: Any) -> dict[str, Any]:
    """``{"class": ..., "settings": {...}}`` from a record written by :func:`encode_architecture`.

    Raises:
        ValueError: ``record`` is not such a record.
    """
    try:
        if isinstance(record, torch.Tensor):
            record = json.loads(bytes(record.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
        if isinstance(record, Mapping) and isinstance(record.get("settings"), Mapping) and "class" in record:
            return {"class": str(record["class"]), "settings": dict(record["settings"])}
    except (ValueError, UnicodeDecodeError):
        pass
    raise ValueError("the weights' architecture record (_extra_state) is not one written by RecordsArchitecture.")


class RecordsArchitecture:
    """Mixin for ``nn.Module`` classes (before ``nn.Module`` in the bases) that record their settings.

    Call :meth:`record_architecture` in ``__init__`` with every constructor setting that decides what the
    weights mean (widths, depths, modes, slopes; not initialisation-only ones). Then ``state_dict()`` holds the
    record under ``_extra_state``, and ``load_state_dict`` compares a recorded one with the network's own first:
    any difference raises :class:`ArchitectureMismatchError`. A state dict without the entry (weights written
    before networks recorded their settings) loads as before, unchecked.
    """

    # TorchScript compiles a module's properties and annotated attributes: the record is Python-only
    __jit_unused_properties__ = ["architecture"]  # noqa: RUF012
    __jit_ignored_attributes__ = ["_architecture"]  # noqa: RUF012

    def record_architecture(self, **settings: Any) -> None:
        """Record the constructor settings (plain values: numbers, strings, booleans, None, lists, dicts)."""
        self._architecture = {name: _plain(value, name) for name, value in settings.items()}

    @property
    def architecture(self) -> dict[str, Any]:
        """The recorded settings (a copy); empty before :meth:`record_architecture`."""
        return json.loads(json.dumps(getattr(self, "_architecture", {})))

    def get_extra_state(self) -> torch.Tensor:
        return encode_architecture(type(self).__name__, getattr(self, "_architecture", {}))

    def set_extra_state(self, state: Any) -> None:
        recorded = decode_architecture(state)
        own_class = type(self).__name__
        if recorded["class"] != own_class:
            raise ArchitectureMismatchError(recorded["class"], own_class, {})
        old, new = recorded["settings"], getattr(self, "_architecture", {})
        differences = {
            key: (old.get(key), new.get(key))
            for key in sorted(set(old) | set(new))
            if key not in old or key not in new or not same_setting(old[key], new[key])
        }
        if differences:
            raise ArchitectureMismatchError(recorded["class"], own_class, differences)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + _EXTRA_STATE
        if key not in state_dict:  # weights saved before the record existed: load them unchecked
            state_dict[key] = self.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
