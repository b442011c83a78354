"""Folders of images: ``folder:PATH`` (one subfolder per class, PNG/JPEG/..., decoded with Pillow).

Evaluation reads each image as ``resize`` (shorter side) -> ``crop`` (centre) or ``size`` (exactly
N x N); training adds ``rrc`` (random-resized crop to ``crop``, of at least that fraction of the area)
and ``flip`` (random horizontal flips). ``norm=imagenet`` (or ``mean=...&std=...``) normalises.
Images are opened when a batch needs them: memory holds the list of files, not the images.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compress.data.core import Batch, Data
from compress.data.files import inside
from compress.data.kinds import pil_to_tensor
from compress.data.sources import int_option
from compress.errors import InputError, UsageError, first_line, safe
from compress.filesystem import not_regular, open_regular

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
NORMS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
OPTIONS = ("size", "resize", "crop", "rrc", "flip", "norm", "mean", "std", "channels")
MAX_PIXELS = 1 << 24  # per image, checked from its header before it is decoded (a decompression bomb is refused)
# Pillow's formats for those names: no other decoder is tried on a file (EPS, for one, would run Ghostscript)
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "PPM", "TIFF")
MAX_FILES = 2_000_000  # images in one folder (ImageNet's training set holds 1.28 M); memory holds their names
MAX_ENTRIES = 4 * MAX_FILES  # files and folders looked at while scanning, images or not
MAX_DEPTH = 16  # folders below a class folder


class FolderData(Data):
    """``root/<class>/<image>``; classes are the subfolders in sorted order, as torchvision's ImageFolder."""

    def __init__(
        self,
        root,
        name: str | None = None,
        *,
        size: int | None = None,
        resize: int | None = None,
        crop: int | None = None,
        rrc: float | None = None,
        flip: bool = False,
        mean=None,
        std=None,
        channels: int | None = None,
        workers: int = 0,
    ):
        self.root = Path(root)
        self.name = name or f"folder:{root}"
        self.size, self.resize, self.crop, self.rrc, self.flip = size, resize, crop, rrc, flip
        self.mean, self.std, self.channels, self.workers = mean, std, channels, workers
        if rrc is not None and crop is None and size is None:
            raise UsageError(f"{self.name}: ?rrc needs the size it crops to: ?crop=N (or ?size=N)")
        self.classes, self.files, self.targets = self._scan()

    def _scan(self) -> tuple[list[str], list[str], torch.Tensor]:
        """Every image under ``root/<class>/``, by a walk that is bounded (``MAX_ENTRIES`` looked at, ``MAX_FILES``
        kept, ``MAX_DEPTH`` deep), keeps regular files only and keeps every path inside the folder."""
        if not self.root.is_dir():
            raise InputError(f"{self.name}: folder {self.root} not found")
        seen = [0]
        classes = []
        for e in _entries(self.root, seen, self.name):
            if not e.name.startswith(".") and e.is_dir():
                if e.is_symlink():
                    inside(e.path, self.root)
                classes.append(e.name)
        classes.sort()
        if not classes:
            raise InputError(f"{self.name}: no class subfolders in {self.root} (expected {self.root}/<class>/<image>)")
        files: list[str] = []
        targets: list[int] = []
        for c, cls in enumerate(classes):
            found = self._walk(self.root / cls, 0, seen, len(files))
            if not found:
                raise InputError(
                    f"{self.name}: class folder {self.root / cls} holds no images ({', '.join(EXTENSIONS[:3])}, ...)"
                )
            files += found
            targets += [c] * len(found)
        return classes, files, torch.tensor(targets, dtype=torch.long)

    def _walk(self, folder: Path, depth: int, seen: list[int], kept: int) -> list[str]:
        """Images of ``folder`` (sorted), then of its subfolders in sorted order, as ``os.walk`` lists them.
        Links to folders are not followed; a link to an image must stay inside the root (its real path is
        kept, so reading it follows no link); anything but a regular file with an image's name is refused."""
        if depth > MAX_DEPTH:
            raise InputError(f"{self.name}: folders nested more than {MAX_DEPTH} deep under {self.root}")
        names, subfolders = [], []
        for e in _entries(folder, seen, self.name):
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                subfolders.append(e.name)
            elif e.name.lower().endswith(EXTENSIONS):
                path, kind = e.path, None
                if e.is_symlink():
                    path = str(inside(path, self.root))
                    kind = not_regular(os.stat(path).st_mode)
                elif not e.is_file(follow_symlinks=False):  # the listing's file type: no system call for a file
                    kind = not_regular(e.stat(follow_symlinks=False).st_mode)
                if kind is not None:
                    raise InputError(f"{self.name}: {safe(e.path, 200)} is {kind}, not an image file")
                names.append((e.name, path))
                if kept + len(names) > MAX_FILES:
                    raise InputError(f"{self.name}: more than {MAX_FILES:,} images under {self.root}")
        found = [p for _, p in sorted(names)]
        for d in sorted(subfolders):
            found += self._walk(folder / d, depth + 1, seen, kept + len(found))
        return found

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> torch.Tensor:
        return self.targets

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def read(self, i: int, train: bool = False) -> torch.Tensor:
        from PIL import Image

        path = self.files[i]
        try:
            # a regular file, opened without blocking and without following a link (the scan kept real paths):
            # a FIFO or a link swapped in after the scan is refused, not waited on or followed
            with open_regular(path, follow=False) as f, warnings.catch_warnings():
                # Pillow warns above its own limit (89 M pixels) and refuses above twice that; ours is lower
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f, formats=FORMATS) as opened:  # reads the header only
                    img: Any = opened
                    w, h = img.size
                    if w * h > MAX_PIXELS:
                        raise InputError(
                            f"{self.name}: image {safe(path, 200)} is {w} x {h}, more than {MAX_PIXELS:,} pixels"
                        )
                    if self.resize is not None and self.resize * self.resize * max(w, h) > MAX_PIXELS * min(w, h):
                        raise InputError(
                            f"{self.name}: image {safe(path, 200)} is {w} x {h}: ?resize={self.resize} "
                            f"(its shorter side) would make it more than {MAX_PIXELS:,} pixels"
                        )
                    if getattr(img, "format", None) == "JPEG" and _scans(f) > MAX_SCANS:
                        raise InputError(
                            f"{self.name}: image {safe(path, 200)} is a JPEG of more than {MAX_SCANS} "
                            "scans (a decoder's time bomb; a progressive JPEG has about 10)"
                        )
                    img = img.convert(
                        "L"
                        if self.channels == 1
                        else "RGB"
                        if self.channels == 3 or img.mode not in ("L", "I;16", "I", "1")
                        else "L"
                    )
                    x = pil_to_tensor(img)
        except InputError:
            raise
        except Exception as e:  # PIL's UnidentifiedImageError, DecompressionBombError, OSError when truncated, ...
            raise InputError(f"{self.name}: cannot read image {safe(path, 200)}: {first_line(e)}") from None
        return self._transform(x, train)

    def _transform(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if self.size is not None and not (train and self.rrc is not None):
            x = F.interpolate(
                x[None], size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )[0]
        if self.resize is not None and not (train and self.rrc is not None):
            h, w = x.shape[-2:]
            s = self.resize / min(h, w)
            x = F.interpolate(
                x[None],
                size=(max(1, round(h * s)), max(1, round(w * s))),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
        out = self.crop or self.size
        if train and self.rrc is not None and out is not None:
            x = _random_resized_crop(x, out, self.rrc)
        elif self.crop is not None:
            h, w = x.shape[-2:]
            if h < self.crop or w < self.crop:
                raise InputError(f"{self.name}: an image of {w} x {h} is smaller than ?crop={self.crop}; add ?resize=N")
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            x = x[:, top : top + self.crop, left : left + self.crop]
        if train and self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        if self.mean is not None:
            c = x.shape[0]
            mean, std = torch.tensor(self.mean[:c]).view(-1, 1, 1), torch.tensor(self.std[:c]).view(-1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()

    def batch(self, indices, train: bool = False) -> Batch:
        idx = [int(i) for i in indices]
        xs: list[torch.Tensor] = []
        for i in idx:  # checked as read: a batch holds at most batch-size images of the first one's size
            x = self.read(i, train)
            if xs and x.shape != xs[0].shape:
                raise InputError(
                    f"{self.name}: image {safe(self.files[i], 200)} is {tuple(x.shape)} but "
                    f"{safe(self.files[idx[0]], 200)} is {tuple(xs[0].shape)}; give one size "
                    "(?size=N, or ?resize=N&crop=N)"
                )
            xs.append(x)
        return torch.stack(xs), self.targets[idx]


def _random_resized_crop(x: torch.Tensor, out: int, min_scale: float) -> torch.Tensor:
    """Inception-style: a random area in [min_scale, 1] of the image and aspect ratio in [3/4, 4/3], resized."""
    _, h, w = x.shape
    for _ in range(10):
        area = h * w * float(torch.empty(()).uniform_(min_scale, 1.0))
        ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3))))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            break
    else:  # the centre, as large as fits
        ch = cw = min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    patch = x[None, :, top : top + ch, left : left + cw]
    return F.interpolate(patch, size=(out, out), mode="bilinear", antialias=True, align_corners=False)[0]


def _floats(text: str, what: str, name: str) -> tuple[float, ...]:
    try:
        v = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"{name}: ?{what}={text!r} must be numbers separated by commas") from None
    if not v or len(v) > 4 or not all(math.isfinite(f) for f in v):
        raise UsageError(f"{name}: ?{what}={text!r} must be 1 to 4 finite numbers")
    return v


def folder(path: str, opts: dict[str, str], name: str) -> FolderData:
    """``folder:PATH?...`` -> FolderData (see the module docstring for the options)."""
    size, resize, crop, ch = (int_option(opts, k, name) for k in ("size", "resize", "crop", "channels"))
    if ch not in (None, 1, 3):
        raise UsageError(f"{name}: ?channels= is 1 (grey) or 3 (RGB) for images")
    rrc = None
    if "rrc" in opts:
        try:
            rrc = float(opts["rrc"] or 0.08)
        except ValueError:
            raise UsageError(f"{name}: ?rrc={opts['rrc']!r} must be the smallest area kept, in (0, 1]") from None
        if not 0 < rrc <= 1:
            raise UsageError(f"{name}: ?rrc={opts['rrc']!r} must be the smallest area kept, in (0, 1]")
    flip = "flip" in opts and opts["flip"] not in ("0", "false", "no")
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    if "norm" in opts:
        if opts["norm"] not in NORMS:
            raise UsageError(
                f"{name}: ?norm={opts['norm']!r} unknown; known: {', '.join(NORMS)} (or ?mean=...&std=...)"
            )
        mean, std = NORMS[opts["norm"]]
    if "mean" in opts or "std" in opts:
        if "mean" not in opts or "std" not in opts:
            raise UsageError(f"{name}: give both ?mean= and ?std=")
        means, stds = _floats(opts["mean"], "mean", name), _floats(opts["std"], "std", name)
        if len(means) != len(stds) or not all(s > 0 for s in stds):
            raise UsageError(f"{name}: ?mean and ?std need as many values, and std > 0")
        mean, std = means, stds
    if mean is not None and std is not None and len(mean) == 1:
        mean, std = mean * 3, std * 3
    return FolderData(
        path, name, size=size, resize=resize, crop=crop, rrc=rrc, flip=flip, mean=mean, std=std, channels=ch
    )


def looks_like_folder(path: Path) -> bool:
    """A folder whose subfolders hold images (checked on the first few entries only)."""
    try:
        with os.scandir(path) as top:
            for d in sorted(itertools.islice(top, 50), key=lambda e: e.name):
                if d.is_dir() and not d.name.startswith("."):
                    with os.scandir(d.path) as inner:
                        if any(f.name.lower().endswith(EXTENSIONS) for f in itertools.islice(inner, 50)):
                            return True
    except OSError:
        return False
    return False


def _entries(folder, seen: list[int], name: str) -> list[os.DirEntry]:
    """The entries of ``folder``, counted into ``seen[0]`` as they are listed: at most ``MAX_ENTRIES`` in all."""
    out = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                seen[0] += 1
                if seen[0] > MAX_ENTRIES:
                    raise InputError(f"{name}: more than {MAX_ENTRIES:,} files and folders to look through")
                out.append(e)
    except OSError as e:
        raise InputError(f"{name}: cannot list {safe(str(folder), 200)}: {e.strerror or e}") from None
    return out


MAX_SCANS = 64  # a progressive JPEG has about 10; each scan is decoded over the whole image


def _scans(f) -> int:
    """How many start-of-scan markers (FF DA) the open JPEG ``f`` has, at most: in entropy-coded data an FF is
    always followed by 00 or a restart marker, so every FF DA in the file is a marker. Read in chunks; ``f``'s
    position is restored."""
    pos = f.tell()
    f.seek(0)
    count, tail = 0, b""
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        data = tail + chunk
        count += data.count(b"\xff\xda")
        tail = data[-1:] if data[-1:] == b"\xff" else b""  # a marker split across chunks: counted next round
        if count > MAX_SCANS:
            break
    f.seek(pos)
    return count
