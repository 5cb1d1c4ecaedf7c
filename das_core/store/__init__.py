"""Everything on disk: checkpoints (``checkpoint``), run folders (``runs``), the read-through
cache of derived arrays (``cache``), the training-job queue (``jobs``), uploaded checkpoints
(``uploads``), the embedded demo (``demo``), a run's training timeline (``timeline``) and atomic file writes
(``io``)."""
