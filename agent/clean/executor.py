"""The one executor: every delete, whatever asked for it, is carried out here.

``Executor.run(snap, ds)`` takes a ``DeleteSet`` that ``agent.domain.safety`` checked on
``snap`` and carries it out:

1. reads the mount tables again and checks the set's guarded paths against them and the
   snapshot's container uses: a mount or a use that appeared since stops it before
   anything changes (the error is raised; nothing was done);
2. clears the read-only flag of parents that must let a child go, destroys the
   subvolumes in one ``btrfs subvolume delete`` (children first), sets the flags back
   on parents that stay;
3. for a volume: checks the mounts again, empties ``_data`` with
   ``agent.host.files.remove_tree`` (which never crosses into another filesystem,
   subvolume or mount), checks the mounts and the containers once more, and only then
   lets Docker remove the volume (``docker volume rm`` follows into mounts: by then
   there is nothing for it to follow into);
4. for a plain layer folder: checks the mounts again and removes it with
   ``remove_tree``;
5. for stale qgroups: destroys them (``btrfs qgroup destroy``), retrying while busy.

Once something has changed, ``run`` never raises: a step that fails ends the run, and
the result lists what was destroyed before it (``deleted``), what failed and why, and
the bytes reclaimed. The caller holds the filesystem's mutation lock (``fs_lock``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from agent.domain.mounts import MountIndex, container_uses
from agent.domain.plans import Deleted
from agent.domain.safety import DeleteSet, check_guard
from agent.domain.snapshot import Snapshot
from agent.errors import AgentError, BtrfsCommandError
from agent.host.backend import Btrfs, Docker

QGROUP_BUSY_RETRIES = 5
_ASIDE = ThreadPoolExecutor(max_workers=2, thread_name_prefix="guard")
QGROUP_BUSY_WAIT_SECONDS = 1.0


@dataclass(frozen=True)
class ExecResult:
    ok: bool
    deleted: tuple[Deleted, ...]  # subvolumes destroyed (host paths)
    failed: tuple[tuple[str, str], ...]  # (path or step, error)
    volume_removed: bool = False
    folder_removed: bool = False
    files_removed: int = 0  # plain files and links removed from a volume or folder
    qgroups_destroyed: tuple[int, ...] = ()
    reclaimed_bytes: int | None = None
    detail: str = ""

    @property
    def changed_anything(self) -> bool:
        return bool(
            self.deleted
            or self.volume_removed
            or self.folder_removed
            or self.files_removed
            or self.qgroups_destroyed
        )


@dataclass
class _Run:
    ds: DeleteSet
    deleted: list[Deleted] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    volume_removed: bool = False
    folder_removed: bool = False
    files_removed: int = 0
    qgroups: list[int] = field(default_factory=list)

    def fail(self, where: str, why: str) -> None:
        self.failed.append((where, why))

    def result(self) -> ExecResult:
        ds = self.ds
        sizes = {s.id: s.exclusive_bytes for s in ds.subvolumes}
        gone = [sizes.get(d.id) for d in self.deleted]
        reclaimed = None if any(s is None for s in gone) else sum(s or 0 for s in gone)
        if self.failed:
            done = f"deleted {len(self.deleted)} subvolume(s) before it stopped; "
            detail = done + "; ".join(f"{p}: {e}" for p, e in self.failed[:5])
        elif ds.volume is not None:
            detail = f"deleted {len(self.deleted)} subvolume(s) and removed volume {ds.volume.name}"
        elif ds.folder is not None:
            detail = f"removed folder {ds.folder.path} ({self.files_removed} file(s))"
        elif ds.qgroup_ids:
            detail = f"destroyed {len(self.qgroups)} stale qgroup(s)"
        else:
            detail = f"deleted {len(self.deleted)} subvolume(s)"
        return ExecResult(
            ok=not self.failed,
            deleted=tuple(self.deleted),
            failed=tuple(self.failed),
            volume_removed=self.volume_removed,
            folder_removed=self.folder_removed,
            files_removed=self.files_removed,
            qgroups_destroyed=tuple(self.qgroups),
            reclaimed_bytes=reclaimed,
            detail=detail,
        )


class Executor:
    """Carries out checked delete sets. ``read_mounts`` reads the mount tables (the
    host's and this process's) right now; ``after_change`` is told after every run that
    changed something (e.g. to drop cached listings)."""

    def __init__(
        self,
        btrfs: Btrfs,
        docker: Docker,
        *,
        read_mounts: Callable[[], MountIndex],
        after_change: Callable[[], None] = lambda: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.btrfs = btrfs
        self.docker = docker
        self._read_mounts = read_mounts
        self._after_change = after_change
        self._sleep = sleep
        self._fs_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def fs_lock(self, fs_uuid: str) -> threading.Lock:
        """One mutating operation per filesystem at a time."""
        with self._locks_guard:
            return self._fs_locks.setdefault(fs_uuid or "-", threading.Lock())

    # -- the run -------------------------------------------------------------------------
    def run(self, snap: Snapshot, ds: DeleteSet) -> ExecResult:
        """Carry out ``ds``. Raises (``Refused``, ``Unavailable``) only when nothing was
        done: the mounts read right now forbid it, or btrfs cannot be started."""
        check_guard(snap, ds.guard, self._read_mounts())
        run = _Run(ds)
        try:
            if ds.subvolumes or ds.clear_readonly:
                self._subvolumes(run)
            if ds.volume is not None and not run.failed:
                self._volume(snap, run)
            if ds.folder is not None and not run.failed:
                self._folder(snap, run)
            if ds.qgroup_ids and not run.failed:
                self._qgroups(snap, run, ds.qgroup_ids)
        except AgentError as exc:
            if not run.deleted and not run.files_removed and not run.qgroups:
                raise
            run.fail("stopped", f"{exc.code}: {exc.detail}")
        except Exception as exc:  # a bug must not lose the record of what went
            if not run.deleted and not run.files_removed and not run.qgroups:
                raise
            run.fail("stopped", f"internal: {type(exc).__name__}: {exc}")
        finally:
            result = run.result()
            if result.changed_anything:
                self._after_change()
        return result

    def _subvolumes(self, run: _Run) -> None:
        ds = run.ds
        doomed = {s.id for s in ds.subvolumes}
        restore: list[str] = []
        try:
            for parent in ds.clear_readonly:
                assert parent.local_path is not None
                self.btrfs.set_readonly(parent.local_path, False)
                if parent.id not in doomed:
                    restore.append(parent.local_path)
            by_path = {s.local_path: s for s in ds.subvolumes if s.local_path is not None}
            if by_path:
                for res in self.btrfs.delete(list(by_path)):
                    sv = by_path.get(res.path)
                    if res.ok and sv is not None:
                        run.deleted.append(Deleted(sv.id, sv.path, sv.exclusive_bytes))
                    elif not res.ok:
                        where = sv.path if sv is not None and sv.path else res.path
                        run.fail(where, res.error or "failed")
        finally:
            for path in restore:
                try:
                    self.btrfs.set_readonly(path, True)
                except AgentError as exc:
                    run.fail(path, f"could not set read-only again: {exc.detail}")

    def _guard_now(self, snap: Snapshot, run: _Run, step: str) -> bool:
        """The guarded paths against the mount tables and the containers as they are
        now; a failure ends the run before ``step``."""
        try:
            # both read now, side by side: the mount tables with what is held open,
            # and the containers with their sources resolved on the host
            uses = _ASIDE.submit(lambda: container_uses(self.btrfs, self.docker.containers()))
            try:
                mounts = self._read_mounts()
            finally:
                found = uses.result()  # never left running into the next step
            check_guard(snap, run.ds.guard, mounts, found)
        except AgentError as exc:
            run.fail(step, f"stopped before it: {exc.code}: {exc.detail}")
            return False
        return True

    def _volume(self, snap: Snapshot, run: _Run) -> None:
        vol = run.ds.volume
        assert vol is not None
        data = snap.pathmap.to_local(vol.record.mountpoint)
        if not self._guard_now(snap, run, "emptying the volume's data"):
            return
        emptied = self.btrfs.remove_tree(data, keep_top=True)
        run.files_removed += emptied.files
        if not emptied.ok:
            run.fail(vol.record.mountpoint, f"emptying the volume's data: {emptied.error}")
            return
        if not self._guard_now(snap, run, "docker volume rm"):
            return
        try:
            self.docker.remove_volume(vol.name)
        except AgentError as exc:
            run.fail(f"volume {vol.name}", f"docker volume rm: {exc.code}: {exc.detail}")
            return
        run.volume_removed = True

    def _folder(self, snap: Snapshot, run: _Run) -> None:
        folder = run.ds.folder
        assert folder is not None
        if not self._guard_now(snap, run, f"removing {folder.path}"):
            return
        removal = self.btrfs.remove_tree(snap.pathmap.to_local(folder.path))
        run.files_removed += removal.files
        if not removal.ok:
            run.fail(folder.path, removal.error or "not removed")
            return
        run.folder_removed = True

    def _qgroups(self, snap: Snapshot, run: _Run, ids: Sequence[int]) -> None:
        fs = snap.filesystems[run.ds.fs_uuid]
        for qid in ids:
            error = self.destroy_qgroup(fs.local_mount, qid)
            if error is None:
                run.qgroups.append(qid)
            else:
                run.fail(f"qgroup 0/{qid}", error)

    def destroy_qgroup(self, mount: str, qgroup_id: int) -> str | None:
        """Destroy level-0 qgroup ``qgroup_id``, retrying while the kernel says busy;
        None when it is gone, else why not."""
        for attempt in range(QGROUP_BUSY_RETRIES):
            try:
                self.btrfs.destroy_qgroup(mount, qgroup_id)
                return None
            except BtrfsCommandError as exc:
                said = exc.stderr.lower()
                if "no such file" in said or "does not exist" in said:
                    return None  # gone already (the kernel dropped it itself)
                if "busy" not in said or attempt == QGROUP_BUSY_RETRIES - 1:
                    return exc.detail
                self._sleep(QGROUP_BUSY_WAIT_SECONDS)
        return "busy"  # pragma: no cover - the loop returns
