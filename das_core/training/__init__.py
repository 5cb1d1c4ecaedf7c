"""Training: what a run is (``config``, ``presets``), what it optimises (``losses``, ``miners``,
``ms_dense``, ``triplet_dense``), the two methods this project is about (``das``: DFS + MTS; ``pddm``), how it runs
(``loop``: setup, epochs, checkpoints; ``distributed``; ``cuda_graphs``) and what it measures
while it runs (``diagnostics``; ``observers``: TensorBoard event files and the training timeline)."""
