"""Tree edits: what the user did in the person folders, turned into corrections.

The manifest (store table ``output_entries``) records every entry the organizer made with its
identity (device:inode, or a symlink's target; a crop's or montage's size and mtime too). Moving a
link, or renaming the folder it is in, keeps that identity, so the tree compared with the manifest tells the user's changes apart:

* an entry missing from its place and found elsewhere in the tree was *moved*;
* one found nowhere was *deleted* (a link moved out of the tree, or to the trash, is deleted);
* a file the organizer did not make is left alone (reported once).

This runs before every tree update that could "repair" a change (scans, the service after file
events in the tree, `recluster`), and the manifest is brought up to date with what it found, so
the update keeps the moved entries instead of putting them back. What each change means:

============================================  ===============================================
every link of ``cluster_7/`` now in ``Alice/``  Alice is a new name: person 7 is named Alice
  (the folder renamed)                          Alice is a person's folder: 7 merged into it
some links of ``A/`` moved to ``B/``            their faces are B's (B new: a new person B)
a link moved to ``doubtful/`` or deleted        its face is rejected from A
a link moved from ``doubtful/`` to ``B/``       its doubtful face is B's
a face crop moved from ``doubtful/faces/``      that face is B's
the whole folder ``A/`` deleted                 person A is hidden
============================================  ===============================================

When a photo holds several faces, the face meant is the one that was in the folder the link was
moved from. A change that cannot be read without guessing (a folder renamed to a name another
person has, an invalid name, a link copied rather than moved) is logged and kept for `status`,
and nothing is done about it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .corrections import CorrectionError, Corrections
from .ingest import IngestError, open_regular
from .output import DOUBTFUL, entry_ident, folder_name, ident_key, same_file, validate_person_name
from .store import TREE_UNCLEAR, Store

log = logging.getLogger(__name__)

IGNORED = "tree_ignored"  # meta key: files in the tree the organizer did not make, already reported


@dataclass
class EditReport:
    corrections: list[int] = field(default_factory=list)  # ids of the corrections recorded
    unclear: list[str] = field(default_factory=list)


@dataclass
class _Moved:
    relpath: str  # where the manifest says it was
    kind: str
    source: str
    ident: str  # as the manifest records it
    dest: str | None  # where it is now (None: deleted)
    put_back: bool = False  # the entry is in its place again (a tree update made it anew)


def _top(relpath: str) -> str:
    return relpath.split("/", 1)[0]


def _walk(output: Path, tops: Iterable[str] | None) -> dict[str, str]:
    """relpath -> identity (:func:`ident_key`) of every file under the given top-level folders (all:
    None), except the store's folder and dot files (temporary files)."""
    found: dict[str, str] = {}
    roots = [output] if tops is None else [output / t for t in tops]
    for root in roots:
        if not os.path.isdir(root) or os.path.islink(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                try:
                    found[p.relative_to(output).as_posix()] = entry_ident(p)
                except OSError:
                    pass
    return found


class TreeEdits:
    """Reads the user's changes in one output tree and records them through :class:`Corrections`."""

    def __init__(self, store: Store, output: Path):
        self.store = store
        self.output = Path(output)
        self.corrections = Corrections(store)
        self._keep_out: set[str] = set()  # files the user moved that were not acted on: theirs

    def interpret(self, tops: Iterable[str] | None = None) -> EditReport:
        """Compare the tree (the given top-level folders, or all of it) with the manifest, record
        what the user changed, and update the manifest to match the tree."""
        report = EditReport()
        tops = None if tops is None else {t for t in tops if t and not t.startswith(".")}
        if tops is not None and not tops:
            return report
        manifest, idents = self.store.manifest()
        in_scope = (lambda rp: True) if tops is None else (lambda rp: _top(rp) in tops)
        on_disk = _walk(self.output, tops)
        missing = [rp for rp, ident in idents.items()
                   if ident is not None and in_scope(rp) and rp not in on_disk and not os.path.lexists(self.output / rp)]
        ignored = set(json.loads(self.store.get_meta(IGNORED) or "[]"))
        foreign = {rp: i for rp, i in on_disk.items() if rp not in manifest and rp not in ignored}
        if not missing and not foreign:
            return report
        self._remake_overwritten(missing, manifest, idents, on_disk)
        by_ident: dict[str, list[str]] = defaultdict(list)
        for rp in sorted(foreign):
            by_ident[foreign[rp]].append(rp)
        moved: list[_Moved] = []
        for rp in sorted(missing):
            kind, source = manifest[rp]
            # a deleted entry's inode number may be reused by a new file of the user's: a file with
            # the same identity counts as the entry moved only if it is still that entry
            key = ident_key(idents[rp])
            dests = [d for d in by_ident.get(key, []) if _still_entry(self.output / d, kind, source, idents[rp])]
            # several candidates (one photo linked from several folders): the same name first
            dests.sort(key=lambda d: (d.rsplit("/", 1)[-1] != rp.rsplit("/", 1)[-1], d))
            dest = dests[0] if dests else None
            if dest is not None:
                by_ident[key].remove(dest)
            moved.append(_Moved(rp, kind, source, idents[rp], dest))
        # a file with the identity of an entry still in place: the entry was put back by a tree
        # update while the user moved it (or hard-linked it): the move counts, the entry goes
        present = defaultdict(list)
        for rp, ident in idents.items():
            if ident is not None and rp not in missing:
                present[ident_key(ident)].append(rp)
        for ident, dests in by_ident.items():
            for dest in list(dests):
                srcs = [s for s in present.get(ident, []) if _top(s) != _top(dest) and manifest[s][0] == "link"]
                if srcs:
                    srcs.sort(key=lambda s: (_top(s) == DOUBTFUL, s))
                    kind, source = manifest[srcs[0]]
                    moved.append(_Moved(srcs[0], kind, source, ident, dest, put_back=True))
                    present[ident].remove(srcs[0])
                    dests.remove(dest)
        self._act(moved, manifest, report)
        # what is left is the user's own: left alone, reported once
        matched = {m.dest for m in moved} - self._keep_out
        leftover = sorted(rp for dests in by_ident.values() for rp in dests if rp not in matched)
        if leftover or self._keep_out:
            links = {}
            for rp, (kind, source) in manifest.items():
                if kind == "link":
                    links.setdefault(rp.rsplit("/", 1)[-1], source)
            for rp in leftover:
                name = rp.rsplit("/", 1)[-1]
                src = links.get(name)
                if src and _same_size(self.output / rp, src):
                    self._unclear(report, f"{rp} looks like a copy of a photo's link: copies are not understood, "
                                          "move links instead (the copy is left alone)")
                else:
                    log.info("leaving %s alone: the organizer did not make it", self.output / rp)
            self.store.set_meta(IGNORED, json.dumps(sorted(ignored | set(leftover) | self._keep_out)[-5000:]))
        if report.unclear:
            before = json.loads(self.store.get_meta(TREE_UNCLEAR) or "[]")
            self.store.set_meta(TREE_UNCLEAR, json.dumps((before + report.unclear)[-50:]))
        return report

    def _remake_overwritten(self, missing: list[str], manifest: dict, idents: dict, on_disk: dict) -> None:
        """A representative or montage moved over another folder's own: the file there is still
        the organizer's (not a file of the user's, which would be left alone), so it is removed
        and the next tree update makes that folder's own again."""
        gone = {ident_key(idents[rp]): rp for rp in missing if manifest[rp][0] != "link"}
        for rp, key in on_disk.items():
            entry = manifest.get(rp)
            if entry is None or entry[0] == "link" or key not in gone or key == ident_key(idents.get(rp) or ""):
                continue
            kind, source = manifest[gone[key]]
            if _still_entry(self.output / rp, kind, source, idents[gone[key]]):
                try:
                    os.unlink(self.output / rp)
                    log.info("%s was replaced by another folder's %s: made again", rp, rp.rsplit("/", 1)[-1])
                except OSError:
                    pass

    # ---- what the moves mean -------------------------------------------------------------
    def _act(self, moved: list[_Moved], manifest: dict, report: EditReport) -> None:
        people = self.store.people()
        folder_person = {folder_name(p["id"], p["name"]): p for p in people}
        by_src: dict[str, list[_Moved]] = defaultdict(list)
        for m in moved:
            by_src[_top(m.relpath)].append(m)
        for src, ms in sorted(by_src.items()):
            links_of_src = [rp for rp, (kind, _) in manifest.items() if _top(rp) == src and kind == "link"]
            person = folder_person.get(src)
            src_pid = person["id"] if person and src != DOUBTFUL else None
            moved_links = [m for m in ms if m.kind == "link"]
            by_dest: dict[str | None, list[_Moved]] = defaultdict(list)
            for m in ms:
                by_dest[_top(m.dest) if m.dest else None].append(m)
            # the folder as a whole (renamed, moved, deleted): judged by its links alone (a
            # representative or montage moved over another folder's own is no sign either way)
            link_dests = {_top(m.dest) if m.dest else None for m in moved_links}
            whole = (src_pid is not None and moved_links and len(moved_links) == len(links_of_src)
                     and len(link_dests) == 1)
            (only_dest,) = link_dests if len(link_dests) == 1 else (object(),)
            if whole and only_dest is None and not os.path.isdir(self.output / src):
                self._record(report, lambda: self.corrections.hide(src_pid, "folders"))
                log.info("folder %s deleted: person %d hidden", src, src_pid)
                self._forget(ms)
                continue
            if whole and only_dest == src:  # into a sub-folder of its own: nothing changes
                self._relocate(ms)
                continue
            if whole and only_dest is not None and only_dest != DOUBTFUL:
                if self._whole_folder(src, src_pid, only_dest, folder_person, report):
                    self._relocate(ms)
                else:
                    self._forget(ms)
                continue
            for dest, group in sorted(by_dest.items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
                done = self._links(src, src_pid, dest, group, folder_person, report)
                (self._relocate if done or dest is not None else self._forget)(group)

    def _whole_folder(self, src: str, src_pid: int, dest: str, folder_person: dict, report: EditReport) -> bool:
        """Every link of a person's folder moved to one folder: a rename or a merge."""
        target = folder_person.get(dest)
        if target is not None and target["id"] != src_pid:
            if target["hidden"] or not (self.output / dest).is_dir():
                self._unclear(report, f"{src}/ was renamed to {dest}/, the name of person {target['id']} "
                                      "(hidden or without photos): rename it to another name or unhide that person")
                return False
            ok = self._record(report, lambda: self.corrections.merge(src_pid, target["id"], "folders"))
            log.info("folder %s moved into %s: person %d merged into %d", src, dest, src_pid, target["id"])
            return ok
        name = self._valid_name(dest, report, src)
        if name is None:
            return False
        ok = self._record(report, lambda: self.corrections.name(src_pid, name, "folders"))
        log.info("folder %s renamed: person %d is now %s", src, src_pid, name)
        return ok

    def _links(self, src: str, src_pid: int | None, dest: str | None, group: list[_Moved], folder_person: dict,
               report: EditReport) -> bool:
        """Some links (or doubtful face crops) moved from ``src`` to ``dest`` (None: deleted)."""
        if src == DOUBTFUL and dest is None:
            return False  # nothing to reject it from: the update puts the link back
        if src_pid is None and src != DOUBTFUL:
            return False
        target = folder_person.get(dest) if dest is not None else None
        if dest is not None and dest != DOUBTFUL and target is None:
            name = self._valid_name(dest, report, src)
            if name is None:
                return False
        faces = []
        for m in group:
            f = self._face_of(m, src_pid, target["id"] if target else None)
            if f is not None:
                faces.append(f)
        if not faces:
            return False
        if dest is None or dest == DOUBTFUL:
            if src_pid is None:
                return False
            return self._record(report, lambda: self.corrections.reject(faces, src_pid, "folders"))
        if target is not None:
            if target["id"] == src_pid:
                return True  # moved within its own folder (a sub-folder): nothing changes
            return self._record(report, lambda: self.corrections.assign(faces, target["id"], "folders", src_pid))
        return self._record(report, lambda: self.corrections.split(name, faces, "folders", src_pid))

    def _face_of(self, m: _Moved, src_pid: int | None, dest_pid: int | None) -> int | None:
        """The face a moved entry is about: the one that was in the source folder."""
        if m.kind == "crop":
            if not m.relpath.startswith(f"{DOUBTFUL}/faces/"):
                return None  # a representative moved along with its folder
            return int(m.source.split("|", 1)[0])
        faces = self.store.faces_of_photo(m.source)
        if src_pid is not None:
            mine = [f for f in faces if f.cluster_id == src_pid and not f.doubtful]
        else:  # from doubtful/: its doubtful face, the one nearest the destination first
            mine = sorted((f for f in faces if f.doubtful), key=lambda f: f.nearest_cluster != dest_pid)
        return mine[0].id if mine else None

    def _valid_name(self, dest: str, report: EditReport, src: str) -> str | None:
        try:
            name = validate_person_name(dest)
        except ValueError as exc:
            self._unclear(report, f"{src}/ -> {dest}/: {exc}")
            return None
        if name != dest:
            self._unclear(report, f"{src}/ -> {dest}/: not a valid person name (it would be {name!r})")
            return None
        if any(p["name"] == name for p in self.store.people()):
            self._unclear(report, f"{src}/ -> {dest}/: the name of another person (hidden or without photos)")
            return None
        return name

    def _record(self, report: EditReport, make) -> bool:
        try:
            report.corrections.append(make())
            return True
        except CorrectionError as exc:
            self._unclear(report, str(exc))
            return False

    def _unclear(self, report: EditReport, msg: str) -> None:
        log.warning("person folders: %s", msg)
        report.unclear.append(msg)

    # ---- the manifest follows the tree ---------------------------------------------------
    def _relocate(self, ms: list[_Moved]) -> None:
        """The entries are where the user put them (deleted ones are forgotten): the next tree
        update removes those no longer wanted there, as it does any entry of its own."""
        with self.store.db.atomic():
            for m in ms:
                if not m.put_back:  # (one put back stays the organizer's: the update removes it)
                    self.store.manifest_remove(m.relpath)
                if m.dest is not None:
                    self.store.manifest_add(m.dest, m.kind, m.source)
                    self.store.manifest_set_ident(m.dest, m.ident)

    def _forget(self, ms: list[_Moved]) -> None:
        """A change not acted on: the missing entries are made again where they belong, and what
        the user moved stays theirs."""
        with self.store.db.atomic():
            for m in ms:
                if not m.put_back:
                    self.store.manifest_remove(m.relpath)
                if m.dest is not None:
                    self._keep_out.add(m.dest)


def _still_entry(path: Path, kind: str, source: str, ident: str) -> bool:
    """Is the file at ``path`` (found with a missing entry's identity ``ident``, device:inode or
    symlink target) that entry, moved? A link is the original photo itself (a hard link) or as large
    as it (a symlink's target is its identity; a copy); a face crop or montage has the size and mtime
    it was made with (a rename keeps them)."""
    try:
        if kind == "link":
            return path.is_symlink() or os.path.samefile(path, source) or _same_size(path, source)
        if ident != ident_key(ident):
            return same_file(path, ident)
        # recorded before identities held size and mtime: a JPEG image (the organizer writes no other)
        with open_regular(path) as fh, Image.open(fh) as im:  # (a FIFO of the user's is not opened)
            return im.format == "JPEG"
    except (OSError, ValueError, IngestError):
        return False


def _same_size(path: Path, source: str) -> bool:
    try:
        return os.path.getsize(path) == os.path.getsize(source)
    except OSError:
        return False
