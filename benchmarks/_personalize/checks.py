"""Checks of the command line that need more than argparse: models, checkpoints, folders, splits, the output folder.

Each returns ``None`` when the input is usable and otherwise the message ``parse_args`` reports with
``parser.error`` (exit status 2, usage line, no traceback), before any data is prepared or any model trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

__all__ = ["check_data_folder", "check_model", "check_out", "check_split"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def check_model(name: str) -> Optional[str]:
    """``name`` must be a registered timm model that fedpeft can wrap (``fedpeft.VPT`` accepts it).

    The model is built on the ``meta`` device: no memory, no weights, a fraction of a second even for ViT-L. Asking
    fedpeft itself, rather than testing a class here, keeps the check in step with what the library supports.
    """
    import timm
    import torch

    from fedpeft import VPT

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        return f"--model {name!r} is not a registered timm model" + (f" (close: {', '.join(close)})" if close else "")
    with torch.device("meta"):
        try:
            model = timm.create_model(name, pretrained=False)
        except Exception as e:  # any failure to build is a problem of the model name
            return f"--model {name!r} could not be built by timm: {e}"
        try:
            VPT(model, num_prompts=1)
        except TypeError as e:
            return f"--model {name!r}: {e}"
    return None


def check_data_folder(path: str) -> Optional[str]:
    """``path`` must hold client folders, each holding class folders that hold images (ImageFolder layout)."""
    root = Path(path)
    if not root.is_dir():
        return f"--data {path!r} is not a folder (expected PATH/<client>/<class>/<image>)"
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    clients = sorted(p for p in entries if p.is_dir())
    if not clients:
        flat = any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries)
        what = "holds images directly (a flat folder)" if flat else "is empty"
        return f"--data {path!r} {what}; expected one sub-folder per client: PATH/<client>/<class>/<image>"
    for c in clients:
        inside = [p for p in c.iterdir() if not p.name.startswith(".")]
        classes = [p for p in inside if p.is_dir()]
        if not classes:
            flat = any(p.suffix.lower() in IMAGE_SUFFIXES for p in inside)
            what = "holds images directly, not in class folders" if flat else "has no class folders"
            return f"--data: client folder {str(c)!r} {what}; expected PATH/<client>/<class>/<image>"
        images = sum(1 for k in classes for p in k.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images < 2:
            return f"--data: client folder {str(c)!r} has {images} image(s); a train/test split needs at least 2"
    return None


def check_split(sizes: Sequence[tuple]) -> Optional[str]:
    """Every client of every seed must have at least one training and one test image: ``(seed, name, train, test)``."""
    for seed, name, train, test in sizes:
        if train < 1 or test < 1:
            return (f"seed {seed}: client {name!r} gets {train} training and {test} test images; use fewer --clients "
                    f"(or a larger --alpha for --split dirichlet)")
    return None


def check_out(path: Path, overwrite: bool) -> Optional[str]:
    """An explicit ``--out`` must be new or empty, unless ``--overwrite``: a run never replaces another's results."""
    if path.exists() and not path.is_dir():
        return f"--out {str(path)!r} is a file, not a folder"
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        return (f"--out {str(path)!r} already holds files (another run's results?); choose a new folder, or add "
                f"--overwrite to replace them")
    return None
