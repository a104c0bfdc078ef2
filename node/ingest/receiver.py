"""The receive path: a received instance is kept (spooled, fsync'd, indexed) before SUCCESS is
answered, under the re-send policy below; spool files the index lacks are indexed or
quarantined at start-up (docs/DESIGN.md "The durability contract")."""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dipnode.dicom_io.intake import Header, dataset_bytes, read_received
from dipnode.dicom_io.logsafe import shown
from dipnode.dicom_io.scp import ReceivedInstance
from dipnode.dicom_io.status import Status, StoreRefused
from dipnode.node.ingest.completion import check_indexable, instance_record
from dipnode.node.jobs.rows import InstanceRecord, KnownInstance, StoreError
from dipnode.node.jobs.store import Store
from dipnode.node.ingest.spool import Spool

log = logging.getLogger(__name__)

__all__ = ["Receiver"]


class Receiver:
    """Keeps what the receiver (dicom_io.scp) hands over: ``on_store`` is its callback."""

    def __init__(self, spool: Spool, store: Store, *, make_room: Callable[[], object] | None = None) -> None:
        """make_room: called when the spool is at its free-space mark, before the store is
        refused (retention's emergency sweep, node/ops/retention.py); the store is tried once more."""
        self.spool = spool
        self.store = store
        self._make_room = make_room
        # Stores of one SOP Instance UID are serialised (the re-send policy reads, then writes).
        self._uid_locks = [threading.Lock() for _ in range(64)]
        self.quarantined_at_start = 0

    def on_store(self, instance: ReceivedInstance) -> Status:
        """Keep one received instance: SUCCESS means durable (fsync'd) AND indexed; anything
        else raises (StoreRefused with the status to answer) and leaves nothing behind.

        A re-sent SOP Instance UID (policy, also in README "Receiving"):

        - the same data-set bytes in the same transfer syntax: idempotent, SUCCESS, nothing is
          written (debug log);
        - other bytes (other pixels, other attributes, or the same instance re-encoded in another
          transfer syntax) under the same series: refused DUPLICATE_SOP_INSTANCE (0x0111), the
          first copy is kept, because a job may already have used it and an instance must never
          change under a finished result; the refusal line names both UIDs (WARNING). A
          corrected instance needs a new SOP Instance UID (PS3.3 C.12.1.1.1);
        - the same UID under another series: refused DUPLICATE_SOP_INSTANCE, never acknowledged
          and dropped (UIDs are unique, PS3.5 9.1: one of the two is wrong);
        - the UID is indexed but its file is gone from the spool: written again.
        """
        header = self.spool.parse(instance)  # StoreRefused for what must not be kept
        ds = header.dataset
        path = self.spool.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                   str(ds.SOPInstanceUID))
        record = instance_record(ds, path, header.transfer_syntax)
        try:
            check_indexable(record)  # refused before anything is written
        except ValueError as exc:
            raise StoreRefused(Status.CANNOT_UNDERSTAND, str(exc)) from None
        uid = record.sop_instance_uid
        with self._uid_locks[hash(uid) % len(self._uid_locks)]:
            known = self.store.instance(uid)
            if known is not None:
                self._check_resent(instance, header, record, known, path)
                if known.path.exists():
                    log.debug("instance %s of series %s re-sent identical: nothing to do",
                              uid, record.series_uid)
                    return Status.SUCCESS
                log.warning("instance %s is indexed but its file %s is gone: written again", uid, known.path)
            stored = self._spool_store(instance, header)  # durable before we answer
            try:
                new = self.store.record_instance(record, time.time())
            except BaseException:
                if known is None:
                    self.spool.discard(stored.path)  # not indexed: not kept
                raise
        log.debug("stored %s (series %s)%s", uid, record.series_uid, "" if new else " again")
        return Status.SUCCESS

    def _spool_store(self, instance: ReceivedInstance, header: Header):
        """Spool.store; at the free-space mark, make room first and try once more, so that a
        store is refused only when nothing finished is left to delete."""
        try:
            return self.spool.store(instance, header)
        except StoreRefused as exc:
            if exc.status != Status.OUT_OF_RESOURCES or self._make_room is None:
                raise
        self._make_room()
        return self.spool.store(instance, header)

    def _check_resent(self, instance: ReceivedInstance, header: Header, record: InstanceRecord,
                      known: KnownInstance, path: Path) -> None:
        """Raise StoreRefused unless ``instance`` is the indexed one again (see on_store)."""
        uid = record.sop_instance_uid
        if known.series_uid != record.series_uid or known.path != path:
            where = (f"series {record.series_uid}" if known.series_uid != record.series_uid
                     else f"study {record.study_uid}")
            raise StoreRefused(Status.DUPLICATE_SOP_INSTANCE,
                               f"SOP instance {uid} re-sent under {where} is already stored in series "
                               f"{known.series_uid} of study {known.path.parent.parent.name}; refused, "
                               "the first copy is kept")
        if not known.path.exists():
            return
        if known.transfer_syntax != header.transfer_syntax:
            raise StoreRefused(Status.DUPLICATE_SOP_INSTANCE,
                               f"SOP instance {uid} of series {record.series_uid} re-sent in transfer syntax "
                               f"{header.transfer_syntax}, stored in {known.transfer_syntax}; refused, "
                               "the first copy is kept")
        if dataset_bytes(known.path.read_bytes()) != memoryview(instance.raw)[header.data_offset:]:
            raise StoreRefused(Status.DUPLICATE_SOP_INSTANCE,
                               f"SOP instance {uid} of series {record.series_uid} re-sent with different "
                               "content; refused, the first copy is kept (a result may have used it)")

    # -- start-up --------------------------------------------------------------------------
    def index_orphans(self) -> int:
        """Index whole spool files that the index lacks: a kill between the spool's rename and
        the index write leaves one (the sender saw no success and may never re-send it).

        A file that cannot be indexed (unreadable, refused by today's checks, named after other
        UIDs than it holds, a second copy of an indexed instance) never stops the start: it is
        moved to the spool's quarantine folder, logged and counted (``dipnode jobs`` shows the
        count). Returns the number of files indexed.
        """
        known = self.store.indexed_paths()
        found = quarantined = 0
        for path in sorted(self.spool.instances.rglob("*.dcm")):
            if path in known:
                continue
            try:
                self._index_orphan(path)
                found += 1
            except (StoreRefused, ValueError, OverflowError, OSError, sqlite3.IntegrityError) as exc:
                reason = exc.reason if isinstance(exc, StoreRefused) else f"{type(exc).__name__}: {exc}"
                try:
                    target = self.spool.quarantine(path)
                except OSError as move:
                    log.error("spool file %s cannot be indexed (%s) nor quarantined (%s); left in place",
                              path, shown(reason, 300), move)
                    continue
                quarantined += 1
                log.warning("spool file %s cannot be indexed (%s): quarantined as %s",
                            path, shown(reason, 300), target)
        if found:
            log.info("indexed %d spool files the index lacked (stored before a crash)", found)
        self.quarantined_at_start = quarantined
        total = len(self.spool.quarantined())
        if total:
            log.warning("quarantined: %d files in %s (%d moved at this start-up); they are kept for a "
                        "person to look at and are not processed", total, self.spool.quarantine_dir, quarantined)
        return found

    def _index_orphan(self, path: Path) -> None:
        header = read_received(path.read_bytes(), None, max_bytes=self.spool.max_instance_bytes)
        ds = header.dataset
        record = instance_record(ds, path, header.transfer_syntax)
        check_indexable(record)
        expected = self.spool.path_for(record.study_uid, record.series_uid, record.sop_instance_uid)
        if expected != path:
            raise ValueError(f"file name does not match the UIDs it holds (they name {expected})")
        existing = self.store.instance(record.sop_instance_uid)
        if existing is not None:
            raise StoreError(f"SOP Instance UID already indexed at {existing.path}")
        self.store.record_instance(record, time.time())
