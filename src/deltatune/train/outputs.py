"""Output folders of the commands: an existing result is never replaced without ``--overwrite``,
and a command that fails part-way leaves the previous state as it was.

A command asks for a ``StagedOutput``: it writes into ``work`` and calls ``commit()`` when it is
done, or ``discard()`` when it fails. ``work`` is the output folder itself for a new run (so a
killed ``deltatune train`` can ``--resume`` from its checkpoint there), and a hidden sibling
folder when the output already holds a result that ``--overwrite`` replaces: the old result
then stays whole until the new one is complete, and ``commit`` moves the new files in (one
atomic rename each) and removes the old result's files that the new one does not have.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from ..core.errors import DeltatuneError


def check_writable(folder: Path, option: str = "--out") -> None:
    """Create ``folder`` if missing and write (then remove) a probe file in it, so that a
    read-only or immutable folder is refused before any long work, not after it."""
    if folder.exists() and not folder.is_dir():
        raise DeltatuneError(f"{option} {folder}: is an existing file, not a folder; give the path of a folder "
                             f"(it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".deltatune-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DeltatuneError(f"{option} {folder}: cannot write there ({e.strerror or e}); give a folder you can "
                             f"write to") from None


@dataclasses.dataclass
class StagedOutput:
    final: Path
    work: Path                      # where the command writes
    replaces: list[str]             # entries of ``final`` that belong to the result being replaced

    @property
    def staged(self) -> bool:
        return self.work != self.final

    def commit(self) -> None:
        if not self.staged:
            return
        if not self.final.exists():
            os.replace(self.work, self.final)
            return
        produced = sorted(p.name for p in self.work.iterdir())
        for name in produced:
            target = self.final / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(self.work / name, target)
        for name in self.replaces:
            if name not in produced:
                old = self.final / name
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                elif old.exists() or old.is_symlink():
                    old.unlink()
        shutil.rmtree(self.work, ignore_errors=True)

    def discard(self) -> None:
        if self.staged:
            shutil.rmtree(self.work, ignore_errors=True)


def stage_output(final: Path, existing: Iterable[str], overwrite: bool, what: str, fixes: str,
                 always_stage: bool = False, option: str = "--out") -> StagedOutput:
    """The ``StagedOutput`` of a command writing into ``final``. ``existing``: the entries of
    ``final`` that form a previous result; with any of them, the command needs ``overwrite``
    (the error names ``what`` is there and the ``fixes``). ``always_stage``: write into a sibling
    folder even for a new output (a folder that appears complete or not at all)."""
    check_writable(final.parent if always_stage and not final.exists() else final, option)
    existing = sorted(existing)
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise DeltatuneError(f"{option} {final} already holds {what} ({shown}); {fixes}")
    if not existing and not always_stage:
        return StagedOutput(final, final, [])
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-"))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)      # mkdtemp's 0700 would become the output folder's mode
    return StagedOutput(final, work, existing)
