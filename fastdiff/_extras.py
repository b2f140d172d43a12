"""Optional dependencies ("extras"): one clear message when one is missing.

The core install (torch, numpy, safetensors, tqdm) runs the fused operators;
``pip install 'fastdiff[train]'`` adds what the trainer, the datasets and the
demo need (pillow, matplotlib, scikit-learn)."""
from __future__ import annotations

import importlib.util

# extra -> [(import name, distribution name)]
EXTRAS = {
    "train": [("PIL", "pillow"), ("matplotlib", "matplotlib"), ("sklearn", "scikit-learn")],
    "diffusers": [("diffusers", "diffusers")],
}


class MissingExtra(ImportError):
    """A feature needs an extra that is not installed; the message names the
    ``pip install 'fastdiff[extra]'`` to run."""


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken one
        return False


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` when a package of ``extra`` is missing;
    ``what`` names the feature (e.g. "fastdiff train")."""
    missing = [dist for mod, dist in EXTRAS[extra] if not _importable(mod)]
    if missing:
        raise MissingExtra(f"{what} needs the '{extra}' extra ({', '.join(missing)} missing): "
                           f"pip install 'fastdiff[{extra}]'")
