"""Find labelled image files (class folders or a CSV manifest) and check them: the catalog
of the file-backed sources (`data.sources.folder`, `data.sources.manifest`)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vision_tl.core.errors import ConfigError
from vision_tl.data.decode import IMAGE_EXTENSIONS, UNSUPPORTED_EXTENSIONS, is_hidden
from vision_tl.data.scan import BadFile, ImageScanner
from vision_tl.data.source import SPLITS, Catalog

_CANDIDATES = IMAGE_EXTENSIONS + UNSUPPORTED_EXTENSIONS

# split -> class -> files
Candidates = dict[str, dict[str, list[str]]]


def file_signature(paths: Sequence[str]) -> list[list[Any]]:
    """(path, size, mtime_ns) per file: a changed, added or removed file changes the key."""
    rows: list[list[Any]] = []
    for path in paths:
        try:
            stat = os.stat(path)
            rows.append([path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            rows.append([path, -1, -1])
    return rows


def walk_files(
    folder: str | Path, ignored: list[str], visited: set[tuple[int, int]] | None = None
) -> list[str]:
    """Every non-hidden file under `folder`, recursively, sorted by folder then name;
    hidden and system folders are pruned (and `ignored`).

    Links to folders are followed, but each real folder is walked once: `visited` holds
    the (device, inode) of the folders walked or not to be walked (the split folder, the
    other class folders), so a link back up the tree (`loop -> ..`), to itself
    (`self -> .`) or into another class's folder ends there (the link is `ignored`)
    instead of looping forever or counting images again. `folder` itself is always walked.
    """
    visited = set() if visited is None else visited
    found = []
    for depth, (dirpath, dirnames, filenames) in enumerate(os.walk(folder, followlinks=True)):
        try:
            info = os.stat(dirpath)
        except OSError:
            continue
        key = (info.st_dev, info.st_ino)
        if depth and key in visited:
            ignored.append(dirpath)
            dirnames[:] = []
            continue
        visited.add(key)
        hidden = sorted(d for d in dirnames if is_hidden(Path(d)))
        ignored += [os.path.join(dirpath, d) for d in hidden]
        dirnames[:] = sorted(d for d in dirnames if d not in hidden)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            (ignored if is_hidden(Path(name)) else found).append(path)
    return found


def _walk(folder: Path, ignored: list[str], visited: set[tuple[int, int]]) -> list[str]:
    """Image-like files under `folder` (nested folders keep the class), as `walk_files`."""
    found = []
    for path in walk_files(folder, ignored, visited):
        (found if Path(path).suffix.lower() in _CANDIDATES else ignored).append(path)
    return found


def _folder_key(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _class_folders(
    folder: Path,
    split: str,
    ignored: list[str],
    bad: list[BadFile],
    visited: set[tuple[int, int]],
    labelled: bool = True,
) -> dict[str, list[str]]:
    """Candidate files per class subfolder of `folder`; loose images there have no label."""
    classes: dict[str, list[str]] = {}
    for entry in sorted(folder.iterdir()):
        if is_hidden(entry):
            ignored.append(str(entry))
        elif entry.is_dir():
            classes[entry.name] = _walk(entry, ignored, visited)
        elif entry.suffix.lower() in _CANDIDATES and labelled:
            bad.append(BadFile(str(entry), f"not inside a class folder of {split}/ (no label)"))
        else:
            ignored.append(str(entry))
    return classes


def _layout_folders(root: Path, splits: list[Path]) -> set[tuple[int, int]]:
    """The root, split and class folders: each class folder is walked by its own class
    only, so a link into another class's folder or back up to a split or the root is not
    followed."""
    folders = [root, *splits]
    folders += [e for s in splits for e in s.iterdir() if not is_hidden(e) and e.is_dir()]
    return {k for k in map(_folder_key, folders) if k is not None}


def _folder_candidates(root: Path, ignored: list[str], bad: list[BadFile]) -> Candidates:
    if not (root / "train").is_dir():
        visited = _layout_folders(root, [root])
        return {"train": _class_folders(root, "the root", ignored, bad, visited)}
    splits = [root / s for s in SPLITS if (root / s).is_dir()]
    visited = _layout_folders(root, splits)
    candidates: Candidates = {}
    for folder in splits:
        split = folder.name
        has_classes = any(p.is_dir() and not is_hidden(p) for p in folder.iterdir())
        if split == "test" and not has_classes:
            continue  # an unlabelled test/ folder: not part of training
        candidates[split] = _class_folders(folder, f"{split}", ignored, bad, visited)
    return candidates


def read_manifest(
    manifest: str | Path,
    root: str | Path | None,
    bad: list[BadFile],
    groups: dict[str, str] | None = None,
) -> Candidates:
    """Labels from a CSV with columns `path,label` (optional `split`: train/val/test;
    optional `group`, collected into `groups`: images that must share a side of a split).

    Paths are relative to `root` when given, else to the CSV's folder. Missing files and
    paths listed with two different labels go to `bad`; repeated rows count once.
    """
    manifest = Path(manifest).expanduser()
    if not manifest.is_file():
        raise ConfigError(f"data.manifest={manifest}: does not exist")
    try:
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ConfigError(f"cannot read data.manifest {manifest}: {reason}") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if not {"path", "label"} <= set(frame.columns):
        found = ", ".join(frame.columns) or "none"
        raise ConfigError(
            f"data.manifest {manifest} needs columns path,label (optional split, group); "
            f"found: {found}"
        )
    splits = frame["split"].str.strip().str.lower() if "split" in frame else None
    if splits is not None and not set(splits) <= set(SPLITS):
        unknown = sorted(set(splits) - set(SPLITS))
        raise ConfigError(f"data.manifest {manifest}: split values {unknown} are not {SPLITS}")
    base = Path(root).expanduser() if root else manifest.parent
    labels: dict[str, tuple[str, str]] = {}
    conflicts: set[str] = set()
    for i, row in enumerate(frame.itertuples(index=False)):
        rel, label = str(row.path).strip(), str(row.label).strip()
        split = splits.iloc[i] if splits is not None else "train"
        if not rel or not label:
            bad.append(BadFile(f"{manifest}:{i + 2}", "manifest row without a path or label"))
            continue
        path = str(base / rel)
        if path in labels and labels[path] != (label, split):
            conflicts.add(path)
        labels.setdefault(path, (label, split))
        if groups is not None and "group" in frame and str(row.group).strip():
            groups.setdefault(path, str(row.group).strip())
    candidates: Candidates = defaultdict(lambda: defaultdict(list))
    for path, (label, split) in labels.items():
        if path in conflicts:
            bad.append(BadFile(path, "listed in the manifest with different labels or splits"))
        elif not os.path.exists(path):  # a folder or a special file: the scan says which
            bad.append(BadFile(path, "listed in the manifest but not found"))
        else:
            candidates[split][label].append(path)
    return {s: {c: sorted(f) for c, f in classes.items()} for s, classes in candidates.items()}


def _first(bad: list[BadFile], n: int = 3) -> str:
    shown = "; ".join(f"{Path(b.path).name}: {b.reason}" for b in bad[:n])
    return shown + (f"; ... ({len(bad)} in all)" if len(bad) > n else "")


def file_catalog(
    root: str | Path | None,
    *,
    manifest: str | Path | None = None,
    scanner: ImageScanner | None = None,
) -> Catalog:
    """Read `root/{train,val,test}/<class>/...`, `root/<class>/...` or a CSV manifest.

    A `test/` without class folders is unlabelled and is not returned here. Every file is
    checked by `scanner` first; unusable ones land in `bad`. Keys are the file paths.
    """
    ignored: list[str] = []
    bad: list[BadFile] = []
    groups: dict[str, str] = {}
    if manifest is not None:
        candidates = read_manifest(manifest, root, bad, groups)
        where = f"data.manifest {Path(manifest).expanduser()}"
    else:
        if root is None:
            raise ConfigError("data.root is not set")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.root={root}: does not exist or is not a folder")
        candidates = _folder_candidates(root, ignored, bad)
        where = f"class subfolders of {root / 'train' if (root / 'train').is_dir() else root}"
    if not any(candidates.get("train", {}).values()) and not bad:
        raise ConfigError(f"no images in {where}")

    scanner = scanner or ImageScanner()
    files = sorted({f for classes in candidates.values() for fs in classes.values() for f in fs})
    report = scanner.scan(files)
    usable = set(report.good)
    bad += report.bad
    per_split: dict[str, dict[str, list[str]]] = {}
    for split, classes in candidates.items():
        per_split[split] = {}
        for name, files in sorted(classes.items()):
            kept = [f for f in files if f in usable]
            if kept:
                per_split[split][name] = kept
            else:
                label = f"{root / split / name}" if manifest is None else f"class '{name}'"
                what = "empty class folder" if not files else "no usable images in this class"
                bad.append(BadFile(label, f"{what} ({split}); class skipped"))
    if not per_split.get("train"):
        raise ConfigError(f"no usable images in {where}: {_first(bad)}")
    class_names = sorted(per_split["train"])
    index = {name: i for i, name in enumerate(class_names)}
    result = Catalog(class_names, bad=bad, ignored=ignored, scan=report, groups=groups)
    for split in SPLITS:
        classes = per_split.get(split)
        if classes is None:
            continue
        unknown = sorted(set(classes) - set(index))
        if unknown:
            where_split = f"{split}/" if manifest is None else f"the {split} rows"
            raise ConfigError(
                f"classes {unknown} appear in {where_split} but not in train/ under "
                f"{root if manifest is None else manifest}"
            )
        result.samples[split] = [(f, index[c]) for c in sorted(classes) for f in classes[c]]
    return result


def scan_root(
    root: str | Path | None,
    val_fraction: float = 0.2,
    seed: int = 42,
    *,
    manifest: str | Path | None = None,
    scanner: ImageScanner | None = None,
) -> Catalog:
    """`file_catalog`, with train split by `val_fraction` when there is no `val/` folder
    (or manifest split column): what a run over these files trains and validates on."""
    return file_catalog(root, manifest=manifest, scanner=scanner).with_val(val_fraction, seed)
