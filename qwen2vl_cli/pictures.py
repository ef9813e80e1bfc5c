"""Pictures qvl writes (--draw, --frames-sheet): a new file, in the format its name says, written
whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qwen2vl_cli.errors import QvlError, UsageError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def picture_format(path: str, option: str, example: str) -> str:
    """Pillow's format for a picture's file name; a name it cannot write, or a file already there, is a usage error."""
    from PIL import Image

    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if ext not in EXTENSIONS or fmt is None or fmt not in Image.SAVE:
        raise UsageError(f"{option} {path}: name it .png, .jpg or .webp (the extension decides the format)")
    if Path(path).is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file name such as {Path(path) / example}")
    if Path(path).exists() or Path(path).is_symlink():  # a link to nothing too: writing would follow it
        raise UsageError(f"{option} {path}: the file exists; choose a new name")
    if not Path(path).parent.is_dir():
        raise UsageError(f"{option} {path}: no such directory")
    return fmt


# The largest side each format holds; PNG's is far past any picture qvl draws.
LARGEST_SIDE = {"WEBP": 16383, "JPEG": 65500}


def save_new(picture, path: str, option: str) -> None:
    """`picture` (a PIL image) written to `path`, a new file."""
    fmt = picture_format(path, option, Path(path).name)
    side = LARGEST_SIDE.get(fmt)
    if side is not None and max(picture.size) > side:
        raise QvlError(f"{option} {path}: the picture is {picture.size[0]}x{picture.size[1]} pixels, larger than {fmt} holds "
                       f"({side} a side); name it .png")
    # Written whole under a temporary name, then linked to its own: a full disk leaves no cut
    # picture behind to block the retry, and a file that appeared meanwhile is never replaced.
    target = Path(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as e:
        raise QvlError(f"{option} {path}: cannot write it ({e.strerror or e})") from None
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # as a file the user made (mkstemp's is theirs alone)
        with os.fdopen(fd, "wb") as out:
            picture.save(out, format=fmt)
        _place(temporary, target)
    except FileExistsError:
        raise QvlError(f"{option} {path}: a file of that name appeared meanwhile; it is left as it is") from None
    except (OSError, ValueError) as e:  # a full disk; an encoder's own refusal
        raise QvlError(f"{option} {path}: cannot write it ({getattr(e, 'strerror', None) or e})") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _place(temporary: str, target: Path) -> None:
    """`temporary` under `target`'s name, never over a file there (FileExistsError)."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT, some network mounts)
        if target.exists():
            raise FileExistsError(str(target)) from None
        os.replace(temporary, target)
