"""Checkpoints for MONAI engines, shared by both bundles: written atomically, found again on resume,
loaded safely, and resumed only into the run that wrote them.

Not a layer, but something both methods need in the same form: a run killed at any moment must resume
from a complete checkpoint, and a run started again with other settings must not silently continue (or
silently end) the earlier run.

- :class:`AtomicCheckpointSaver` writes every checkpoint atomically, keeps at most ``n_saved`` interval
  checkpoints across resumes and can hand its best key-metric scores to the next run.
- :func:`latest_checkpoint` finds the checkpoint to resume from.
- :class:`RunSettings` records the settings of a run in its checkpoints; :class:`CheckedCheckpointLoader`
  compares them before a resumed run starts, and names the file in every error of reading or loading.
- :func:`read_checkpoint` and :func:`load_network_weights` read checkpoints with
  ``torch.load(..., weights_only=True)``; their errors are one line naming the file.
- Networks that record their constructor settings in their weights (:mod:`shared_ops.architecture`) are
  loaded only from checkpoints recorded with the same settings; the loader's error names the file, each
  differing setting with both values and the config overrides that select the checkpoint's network.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shlex
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

from shared_ops.architecture import ArchitectureMismatchError, same_setting

__all__ = [
    "AtomicCheckpointSaver",
    "CheckedCheckpointLoader",
    "CheckpointError",
    "RunSettings",
    "RunSettingsError",
    "latest_checkpoint",
    "load_network_weights",
    "read_checkpoint",
]

_STEP = re.compile(r"=(\d+)\.pt$")
_LISTED = 8  # differences named in a settings message; the rest are counted
_FRESH_START = "move or delete {folder}, or pass --ckpt_dir with a new folder"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit what it is loaded into; the message names the file."""


class RunSettingsError(CheckpointError):
    """A checkpoint to resume from that a run with other settings wrote."""


def _reason(error: BaseException, limit: int = 240) -> str:
    """The first line of ``error`` (whitespace collapsed, at most ``limit`` characters) after its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    if text.startswith("Weights only load failed"):
        text = "torch.load(weights_only=True) refused its content"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)``, with errors that name the file in one line.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: ``torch.load`` fails (garbage, a truncated file, a pickle of arbitrary objects ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises anything from EOFError to UnicodeDecodeError on a damaged file
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_reason(error)}); it is damaged, truncated or was not "
            "written by torch.save."
        ) from None


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """Path of the complete ``{prefix}_*=N.pt`` file with the largest ``N`` in ``directory``, or ``None``.

    ``CheckpointSaver`` names its interval checkpoints ``checkpoint_iteration=N.pt`` or
    ``checkpoint_epoch=N.pt``. :class:`AtomicCheckpointSaver` never leaves a partial file; files written
    otherwise count only when their zip directory (written last by ``torch.save``) is readable: newer files
    without one are skipped with a warning.

    Raises:
        CheckpointError: ``directory`` holds such files but none is complete (rather than starting a new run
            next to them).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.glob(f"{prefix}_*.pt") if (m := _STEP.search(p.name))]
    skipped = []
    for _, path in sorted(found, reverse=True):
        try:
            with zipfile.ZipFile(path) as archive:
                complete = bool(archive.namelist())
        except (zipfile.BadZipFile, OSError):
            complete = False
        if complete:
            for name in skipped:
                warnings.warn(f"{name}: incomplete checkpoint skipped", stacklevel=2)
            return str(path)
        skipped.append(path)
    if skipped:
        raise CheckpointError(
            f"{directory}: no complete checkpoint to resume from ({', '.join(p.name for p in skipped)} cannot be "
            f"read); to start a new run, {_FRESH_START.format(folder=directory)}."
        )
    return None


def _load_state(obj: Any, state: Any, strict: bool = True) -> None:
    """``obj.load_state_dict(state)``, through a ``DataParallel`` / ``DistributedDataParallel`` wrapper."""
    if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        obj = obj.module
    if isinstance(obj, nn.Module):
        obj.load_state_dict(state, strict=strict)
    else:
        obj.load_state_dict(state)


def load_network_weights(network: nn.Module, path: str | os.PathLike, key: str = "network") -> nn.Module:
    """Load weights into ``network`` from a state dict file, or from the ``key`` entry of a checkpoint.

    Uses ``torch.load(..., weights_only=True)`` (:func:`read_checkpoint`); errors name the file.
    """
    path = Path(path)
    state = read_checkpoint(path, map_location="cpu")
    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
        state = state[key]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not network weights (a state dict).")
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit {type(network).__name__}: {error}") from None
    return network


# ----------------------------------------------------------------------------------------------------------------
# The settings of a run
# ----------------------------------------------------------------------------------------------------------------

_SCALARS = (bool, int, float, str, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _plain(value: Any) -> Any:
    """A plain value as stored in a checkpoint: tuples become lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _module_settings(key: str, module: nn.Module) -> dict[str, dict]:
    """One entry per submodule of ``module`` (``key``, ``key.<submodule>``): its class and its plain public
    attributes (channel counts, kernel sizes, strides, modes, slopes, loss weights ...)."""
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        module = module.module
    entries = {}
    for name, sub in module.named_modules():
        attributes = {
            attribute: _plain(value)
            for attribute, value in sorted(vars(sub).items())
            if not attribute.startswith("_") and attribute != "training" and _is_plain(value)
        }
        entries[f"{key}.{name}" if name else key] = {"class": type(sub).__name__, "attributes": attributes}
    return entries


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, Mapping) and set(value) == {"class", "attributes"}:
        attributes = ", ".join(f"{k}={_shown(v)}" for k, v in value["attributes"].items())
        return f"{value['class']}({attributes})"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return "null" if value is None else str(value)


_ABSENT = object()


class RunSettings:
    """The settings a training run was started with: saved in its checkpoints, compared when it resumes.

    Give it to a ``CheckpointSaver`` in ``save_dict`` (it has ``state_dict``) and to
    :class:`CheckedCheckpointLoader` in ``load_dict``: the loader compares it with the checkpoint's record
    before the run starts and stops with one message naming every difference (``key: old -> new``) and how to
    start a new run instead. Without this a changed setting is silently ignored (the restored optimizer keeps
    the old learning rate, a finished run trains nothing and rewrites its model) or fails later with an
    unrelated error (a preset without RoI discriminators meets their optimizer state).

    Args:
        values: setting name (the config key) -> value: a plain value as the config resolves it (numbers,
            strings, booleans, None, lists and dicts of them), or a module (a network, a loss), recorded as one
            entry per submodule with its class and its plain public attributes. Keys left out may change on
            resume.
        may_change: the config keys left out on purpose (e.g. ``max_epochs``), named in the message.

    Raises:
        TypeError: a value that is neither plain nor a module.
    """

    def __init__(self, values: Mapping[str, Any], may_change: Sequence[str] = ()) -> None:
        self.values: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, nn.Module):
                self.values.update(_module_settings(str(key), value))
            elif _is_plain(value):
                self.values[str(key)] = _plain(value)
            else:
                raise TypeError(
                    f"RunSettings: {key!r} is a {type(value).__name__}; record plain config values or modules."
                )
        self.may_change = tuple(may_change)

    def state_dict(self) -> dict[str, Any]:
        return {"values": copy.deepcopy(self.values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: check that ``state`` records these settings (:meth:`check`)."""
        self.check(state)

    def differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """``"key: old -> new"`` for each setting that differs from ``recorded`` (a :meth:`state_dict`)."""
        old = recorded.get("values", {}) if isinstance(recorded, Mapping) else {}
        lines = []
        for key in sorted(set(old) | set(self.values)):
            before, after = old.get(key, _ABSENT), self.values.get(key, _ABSENT)
            if before is _ABSENT or after is _ABSENT or not same_setting(before, after):
                lines.append(f"{key}: {_shown(before)} -> {_shown(after)}")
        return lines

    def check(self, recorded: Any, path: str | os.PathLike = "checkpoint") -> None:
        """Raise :class:`RunSettingsError` naming ``path`` unless ``recorded`` holds these settings."""
        folder = Path(path).parent
        fresh = _FRESH_START.format(folder=folder)
        if not (isinstance(recorded, Mapping) and isinstance(recorded.get("values"), Mapping)):
            raise RunSettingsError(
                f"{path}: records no run settings (written before runs recorded them), so resuming cannot check that "
                f"this is the same run; to start a new run, {fresh}."
            )
        differences = self.differences(recorded)
        if not differences:
            return
        listed = "; ".join(differences[:_LISTED])
        if len(differences) > _LISTED:
            listed += f"; and {len(differences) - _LISTED} more"
        changeable = f" Settings that may change on resume: {', '.join(self.may_change)}." if self.may_change else ""
        raise RunSettingsError(
            f"{path}: cannot resume, the run in {folder} was started with other settings (old -> new): {listed}. "
            f"Run it again with its own settings to resume it, or, to start a new run, {fresh}.{changeable}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _cli_value(value: Any) -> str:
    """``value`` as a ``python -m monai.bundle`` command-line argument (Python literals, shell-quoted)."""
    if isinstance(value, str):
        return shlex.quote(value)
    text = repr(value).replace(" ", "")
    return text if isinstance(value, (bool, int, float, type(None))) else shlex.quote(text)


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader``, checked before the engine runs and with errors that name the file.

    When attached it reads the checkpoint (:func:`read_checkpoint`), compares each :class:`RunSettings` of
    ``load_dict`` with the checkpoint's record, checks that the checkpoint holds every object of ``load_dict``
    and loads all of them but engines. An engine's state (epoch, iteration) is loaded when the engine starts, as
    MONAI does (ignite would start a finished run over if its state were set before ``run``). So a checkpoint that
    cannot be read or resumed stops the run before anything is trained or written, with one
    :class:`CheckpointError` line. A checkpoint holding a bare state dict loads into a ``load_dict`` of one object.

    Args:
        load_path, load_dict, name, map_location, strict: as MONAI's ``CheckpointLoader`` (shapes must fit:
            there is no ``strict_shape``).
        config_keys: for the message when a network's recorded settings differ from the checkpoint's
            (:class:`~shared_ops.architecture.ArchitectureMismatchError`): the config key of each setting
            (``{"num_blocks": "generator_blocks"}``), or one prefix for all (``"network_def#"``), so that the
            message lists the command-line overrides that build the checkpoint's network.
    """

    def __init__(
        self,
        load_path: str | os.PathLike,
        load_dict: dict,
        name: str | None = None,
        map_location: Any = None,
        strict: bool = True,
        config_keys: Mapping[str, str] | str | None = None,
    ) -> None:
        super().__init__(str(load_path), load_dict, name=name, map_location=map_location, strict=strict)
        self._engine_states: dict[str, Any] = {}
        self.config_keys = config_keys

    def _overrides(self, error: ArchitectureMismatchError) -> str:
        """`` --key value`` for each differing setting that has a config key, or ``""``."""
        keys = self.config_keys
        if keys is None or error.checkpoint_class != error.network_class:
            return ""
        pairs = []
        for setting, (recorded, _) in error.differences.items():
            key = keys + setting if isinstance(keys, str) else keys.get(setting)
            if key is None or recorded is None:
                return ""
            key = key.replace("::", "#")  # MONAI's parser turns '#' in config strings into its '::' separator
            pairs.append(f"--{key} {_cli_value(recorded)}")
        return " To use this checkpoint, run with: " + " ".join(pairs) + "."

    def _load(self, objects: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> None:
        for key, obj in objects.items():
            try:
                _load_state(obj, checkpoint[key], strict=self.strict)
            except ArchitectureMismatchError as error:
                raise CheckpointError(f"{self.load_path}: {key!r}: {error}{self._overrides(error)}") from None
            except Exception as error:
                raise CheckpointError(
                    f"{self.load_path}: {key!r} does not fit this run's {type(obj).__name__} ({_reason(error)})."
                ) from None

    def _check_epochs(self, engine: Engine, epoch: int) -> None:
        max_epochs = engine.state.max_epochs
        if max_epochs is not None and epoch > max_epochs:
            raise CheckpointError(
                f"{self.load_path}: the run has trained {epoch} epochs, more than max_epochs={max_epochs}; pass "
                f"--max_epochs {epoch} or more to resume it."
            )

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        path = self.load_path
        checkpoint = read_checkpoint(path, self.map_location)
        if len(self.load_dict) == 1:
            key = next(iter(self.load_dict))
            if not (isinstance(checkpoint, Mapping) and key in checkpoint):
                checkpoint = {key: checkpoint}  # a bare state dict, e.g. models/model.pt
        if not isinstance(checkpoint, Mapping):
            raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a dict of states.")
        for key, obj in self.load_dict.items():
            if isinstance(obj, RunSettings):
                obj.check(checkpoint.get(key), path)
        missing = [key for key in self.load_dict if key not in checkpoint]
        if missing:
            raise CheckpointError(
                f"{path}: lacks {', '.join(map(repr, missing))} (it holds {', '.join(map(repr, sorted(checkpoint)))}); "
                "it is not a checkpoint of this configuration."
            )
        engines = {key: obj for key, obj in self.load_dict.items() if isinstance(obj, Engine)}
        for key, obj in engines.items():
            state = checkpoint[key]
            if isinstance(state, Mapping) and "iteration" in state and state.get("epoch_length"):
                self._check_epochs(obj, int(state["iteration"]) // int(state["epoch_length"]))
            elif isinstance(state, Mapping) and "epoch" in state:
                self._check_epochs(obj, int(state["epoch"]))
        others = {key: obj for key, obj in self.load_dict.items() if key not in engines}
        self._load({k: v for k, v in others.items() if not isinstance(v, RunSettings)}, checkpoint)
        self._engine_states = {key: checkpoint[key] for key in engines}
        if engines:
            engine.add_event_handler(Events.STARTED, self)
        else:
            self.logger.info(f"Restored all variables from {path}")

    def __call__(self, engine: Engine) -> None:
        """At the engine's start: load the engine states read when attached."""
        engines = {key: self.load_dict[key] for key in self._engine_states}
        prior_max_epochs = engine.state.max_epochs
        self._load(engines, self._engine_states)
        self._engine_states = {}
        self._check_epochs(engine, engine.state.epoch)
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------


def _replaced_by_next_save(filename: str) -> None:
    """``remove`` of a saver with a fixed file name: keep the file, the next save replaces it atomically."""


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` for runs that are killed and resumed. Arguments as ``CheckpointSaver``.

    What differs:

    - Every file is written to a temporary file first and then renamed. MONAI's saver writes in place, so a run
      killed while saving leaves a truncated checkpoint that the next run would try to resume from. Here a
      checkpoint file is either complete or absent (ignite's atomic saving; the files are then readable by their
      owner only). A file with a fixed name (``final_filename``, ``key_metric_filename``) is replaced by the
      next save instead of being deleted before it.
    - The final checkpoint is written when the run completes, not when it fails: MONAI also writes it on an
      exception, which would leave e.g. a ``model.pt`` of a broken or refused run.
    - Interval checkpoints already in ``save_dir`` when the saver is attached (those of the run being resumed)
      count towards ``n_saved``: after each interval save at most ``n_saved`` of them are left (ignite's saver
      only knows the files it wrote itself, so they used to pile up over resumes).
    - :meth:`state_dict` gives the key-metric scores saved so far (ignite's list of ``(score, file name)``).
      Save the key-metric saver in the trainer's interval checkpoints and load it on resume (MONAI's
      ``load_state_dict``), so that the first validation after a resume replaces the best model only when it
      beats the best of the whole run.

    Keep ``n_saved >= 2`` for interval checkpoints: ignite deletes the oldest file *before* writing the
    next one, so with ``n_saved=1`` a run killed during a save would leave no checkpoint at all.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                handler = checkpoint.save_handler
                handler._atomic = True
                if handler.filename is not None:
                    handler.remove = _replaced_by_next_save

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self._interval_checkpoint is not None:
            self._adopt_interval_files()

    def _adopt_interval_files(self) -> None:
        """Count the interval checkpoints of ``save_dir`` (an earlier run's) among the files this saver keeps."""
        checkpoint = self._interval_checkpoint
        name = "checkpoint" if len(self.save_dict) > 1 else next(iter(self.save_dict))
        base = f"{checkpoint.filename_prefix}_{name}" if checkpoint.filename_prefix else name
        pattern = re.compile(
            rf"{re.escape(base)}_{re.escape(checkpoint.score_name)}=(\d+)\.{re.escape(checkpoint.ext)}"
        )
        directory = Path(self.save_dir)
        files = [(int(m.group(1)), p.name) for p in directory.iterdir() if (m := pattern.fullmatch(p.name))]
        saved = checkpoint.state_dict()["_saved"]
        known = {filename for _, filename in saved}
        saved += [(step, filename) for step, filename in files if filename not in known]
        checkpoint.load_state_dict({"_saved": sorted(saved)})

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        checkpoint = self._interval_checkpoint
        saved = checkpoint.state_dict()["_saved"]
        surplus = len(saved) - checkpoint.n_saved if checkpoint.n_saved is not None else 0
        if surplus > 0:
            for _, filename in saved[:surplus]:
                with contextlib.suppress(FileNotFoundError):
                    checkpoint.save_handler.remove(filename)
                self.logger.info(f"Deleted earlier checkpoint: {filename}")
            checkpoint.load_state_dict({"_saved": saved[surplus:]})

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """Re-raise ``e`` without writing the final checkpoint (the run did not complete)."""
        raise e

    def state_dict(self) -> dict[str, Any]:
        """The key-metric checkpoints saved so far, ``{"_saved": [(score, file name), ...]}`` (empty without)."""
        if self._key_metric_checkpoint is None:
            return {}
        saved = self._key_metric_checkpoint.state_dict()["_saved"]
        return {"_saved": [(float(score), str(filename)) for score, filename in saved]}
