"""DAS Explorer: Densely-Anchored Sampling for deep metric learning.

The library half of DAS Explorer: datasets, models, losses and miners, DAS and
PDDM, training, evaluation and checkpoints. It never imports streamlit.
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
