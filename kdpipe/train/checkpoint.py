"""Checkpoints that are complete when they say so, and a resume that finds the newest intact one.

RUN/checkpoints/ holds ``last.pt`` (end of the last finished epoch), ``best.pt`` (best val top-1) and,
with ``--checkpoint-every N``, mid-epoch ``step-<steps>.pt`` files (the newest two are kept). Every file
is written to a temporary name, fsynced, renamed into place and the folder fsynced, so a killed run
leaves either the old file or the new one. Each file stores a SHA-256 of all its tensors (weights,
optimiser state, RNG: nearly all of its bytes); a truncated file fails to load, a damaged tensor fails
the checksum, and either way the resume says so in one line and takes the next newest.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdpipe.errors import KdpipeError

KEEP_STEP_FILES = 2
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def tensor_digest(obj: Any) -> str:
    """SHA-256 over the bytes of every tensor in a nest of dicts/lists (dict keys in sorted order)."""
    h = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(str((t.dtype, tuple(x.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                visit(x[k])
        elif isinstance(x, list | tuple):
            for v in x:
                visit(v)

    visit(obj)
    return h.hexdigest()


def write_atomic(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, fsync, rename over ``path``, fsync the folder. A full disk is
    one clear line (KdpipeError); the previous file stays and no temporary file is left."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "tensor_sha256": tensor_digest(state)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        free = shutil.disk_usage(path.parent).free
        if isinstance(e, RuntimeError) and free > 64 << 20:
            raise  # torch's own failure, not a full disk
        raise KdpipeError(
            f"cannot write checkpoint {path}: disk full ({free / 2**20:.1f} MiB free); the previous "
            "checkpoint is kept: free some space and run the same command with --resume"
        ) from None


def read_checked(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint; raise ValueError if it is truncated, unreadable or fails its checksum."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated zip, a damaged pickle: torch raises many kinds
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or "module" not in state:
        raise ValueError("not a kdpipe checkpoint")
    want = state.pop("tensor_sha256", None)
    if want is not None and tensor_digest(state) != want:
        raise ValueError("checksum mismatch (damaged bytes)")
    return state


class Checkpoints:
    """The checkpoint folder of one run (written by rank 0 only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    def holds_a_run(self) -> bool:
        return self.last.exists() or bool(self.step_files())

    def step_files(self) -> list[Path]:
        """Mid-epoch checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def save_epoch(self, state: dict[str, Any], improved: bool) -> None:
        write_atomic(self.last, state)
        if improved:
            write_atomic(self.folder / "best.pt", state)

    def save_step(self, state: dict[str, Any]) -> None:
        write_atomic(self.folder / f"step-{state['steps']:09d}.pt", state)
        for old in self.step_files()[:-KEEP_STEP_FILES]:
            old.unlink(missing_ok=True)

    def newest(self, device: torch.device, log: Callable[[str], Any]) -> dict[str, Any] | None:
        """The intact checkpoint with the most steps (None when the run has none); damaged ones are
        named in one line each and skipped."""
        candidates = [p for p in (*reversed(self.step_files()), self.last) if p.exists()]
        best: dict[str, Any] | None = None
        for path in candidates:
            try:
                state = read_checked(path, device)
            except ValueError as e:
                log(f"WARNING: checkpoint {path} is damaged ({e}); using an older one")
                continue
            if best is None or state["steps"] > best["steps"]:
                best = state
        if candidates and best is None:
            raise KdpipeError(
                f"--resume: no intact checkpoint in {self.folder}; start again with another --out"
            )
        return best
