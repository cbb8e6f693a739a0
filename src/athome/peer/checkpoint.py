"""Expert checkpoints: fp32 weights as safetensors plus optimizer/scaler/counter state, written atomically.

Layout in ``directory`` for expert ``uid``:

- ``{uid}.safetensors``: fp32 master weights and buffers under the module's ``state_dict`` names, so the file loads
  directly into a fresh ``build_expert(...)`` (``module.load_state_dict(safetensors.torch.load_file(path))``).
  Metadata: ``uid``, ``num_updates``, ``save_id``.
- ``{uid}.state.pt``: ``torch.save`` of plain dicts and tensors only (AdamW state, loss scaler, counters), loaded
  with ``weights_only=True`` so a checkpoint cannot run code.

Each file is written to a temp file in the same directory, fsynced and ``os.replace``d: a crash leaves either the
old or the new file. The pair is tied by ``save_id``; the state file is replaced first, so after a crash between
the two replaces the weights are the older ones and :func:`load_expert` warns that the optimizer state is newer.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from athome.peer.backend import CheckpointMismatchError, ExpertBackend

logger = logging.getLogger(__name__)

__all__ = ["save_expert", "load_expert", "checkpoint_paths", "CheckpointSaver", "CheckpointMismatchError"]


def checkpoint_paths(uid: str, directory: Path) -> tuple[Path, Path]:
    """(weights path, state path) of expert ``uid`` in ``directory``."""
    directory = Path(directory)
    return directory / f"{uid}.safetensors", directory / f"{uid}.state.pt"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_expert(backend: ExpertBackend, directory: Path) -> tuple[Path, Path]:
    """Save ``backend``'s consistent snapshot (see ``ExpertBackend.state_dict``); returns the two paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, state_path = checkpoint_paths(backend.name, directory)
    state = backend.state_dict()
    save_id = uuid.uuid4().hex
    weights = {name: t.contiguous() for name, t in {**state.pop("master"), **state.pop("buffers")}.items()}
    metadata = {"uid": backend.name, "num_updates": str(state["counters"]["num_updates"]), "save_id": save_id,
                "format": f"athome-expert-v{state['format']}"}
    state["save_id"] = save_id
    _atomic_write(state_path, lambda tmp: torch.save(state, tmp))
    _atomic_write(weights_path, lambda tmp: save_file(weights, tmp, metadata=metadata))
    logger.debug(f"saved {backend.name} at update {state['counters']['num_updates']} to {directory}")
    return weights_path, state_path


def load_expert(backend: ExpertBackend, directory: Path) -> bool:
    """Load ``backend``'s checkpoint from ``directory``; False if there is none.

    Raises :class:`CheckpointMismatchError` if the saved weights don't fit the expert (names or shapes). A missing
    state file loads the weights with fresh optimizer state (with a warning).
    """
    weights_path, state_path = checkpoint_paths(backend.name, Path(directory))
    if not weights_path.exists():
        return False
    tensors = load_file(str(weights_path), device="cpu")
    param_names = set(backend.parameter_names)
    buffer_names = {name for name, _ in backend.module.named_buffers()}
    state: Dict[str, Any] = dict(
        uid=backend.name,
        master={n: t for n, t in tensors.items() if n in param_names or n not in buffer_names},
        buffers={n: t for n, t in tensors.items() if n in buffer_names and n not in param_names},
    )
    if state_path.exists():
        extra = torch.load(state_path, map_location="cpu", weights_only=True)
        with safe_open(str(weights_path), framework="pt") as f:
            weights_save_id = (f.metadata() or {}).get("save_id")
        if extra.get("save_id") != weights_save_id:
            logger.warning(
                f"{backend.name}: weights and optimizer state in {directory} come from different saves "
                f"(interrupted save?); loading both anyway"
            )
        for key in ("optimizer", "scaler", "counters"):
            if key in extra:
                state[key] = extra[key]
    else:
        logger.warning(f"{backend.name}: {state_path.name} missing, loading weights with fresh optimizer state")
    backend.load_state_dict(state)
    logger.info(f"loaded {backend.name} at update {backend.num_updates} from {directory}")
    return True


class CheckpointSaver(threading.Thread):
    """Saves experts every ``every_updates`` optimizer steps and/or every ``every_seconds``, and once on stop().

    An expert is only re-saved when it has been updated since its last save. Errors are logged, never raised: a
    full disk must not stop the host from serving. Call ``start()``, then ``stop()`` at shutdown.
    """

    def __init__(
        self,
        backends: Union[Mapping[str, ExpertBackend], Iterable[ExpertBackend]],
        directory: Path,
        *,
        every_updates: Optional[int] = None,
        every_seconds: Optional[float] = 300.0,
        poll_interval: float = 1.0,
    ):
        super().__init__(name="CheckpointSaver", daemon=True)
        self.backends = list(backends.values()) if isinstance(backends, Mapping) else list(backends)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.every_updates, self.every_seconds, self.poll_interval = every_updates, every_seconds, poll_interval
        self._stop_event = threading.Event()
        now = time.monotonic()
        self._saved_at: Dict[str, tuple[int, float]] = {b.name: (b.num_updates, now) for b in self.backends}
        self.num_saves = 0

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_interval):
            self.save_due(force=False)
        self.save_due(force=True)

    def save_due(self, force: bool = False) -> None:
        """Save every expert that is due (updated since its last save and past a threshold, or ``force``)."""
        now = time.monotonic()
        for backend in self.backends:
            last_updates, last_time = self._saved_at[backend.name]
            updates = backend.num_updates
            if updates == last_updates:
                continue
            due = force
            due |= self.every_updates is not None and updates - last_updates >= self.every_updates
            due |= self.every_seconds is not None and now - last_time >= self.every_seconds
            if not due:
                continue
            try:
                save_expert(backend, self.directory)
                self._saved_at[backend.name] = (updates, now)
                self.num_saves += 1
            except Exception as error:  # noqa: BLE001 -- keep serving; the next attempt may succeed
                logger.error(f"saving {backend.name} to {self.directory} failed: {error!r}")

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the thread after one final save of every updated expert."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)
        else:
            self.save_due(force=True)
