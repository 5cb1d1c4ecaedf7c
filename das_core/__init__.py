"""DAS Explorer: Densely-Anchored Sampling for deep metric learning.

The library half of DAS Explorer. Data flows one way, and the subpackages follow it::

    data        datasets, splits, images  ──▶  models     backbones, preprocessing, embed
                                                   │
    training    config, losses, miners, DAS, PDDM, loop  (trains the model)
                                                   │ embeddings
                                                   ▼
    retrieval   exact kNN, metrics, index, query   explorer   maps, DAS analysis, pages' views
                                                   │
    store       checkpoints, run folders, caches, jobs, uploads  (what any step keeps on disk)
                                                   ▼
    app/        the Streamlit pages (outside this package; it only draws what das_core returns)

It never imports streamlit. ``cli`` is the command line (``python -m das_core``); ``errors``
lists every error a user can meet; ``runtime`` is the one device and thread policy and
``arrays`` the one check of input arrays, both used by every step. See ARCHITECTURE.md for the same picture in more words.
"""

from __future__ import annotations

__version__ = "0.1.0"


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return __version__
    commit = out.stdout.strip()
    return f"{__version__}+g{commit}" if out.returncode == 0 and commit else __version__
