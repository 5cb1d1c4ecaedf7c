"""What the app's pages show, computed here so that the pages only draw:

* ``umap_fit``: how a 2-D map is made (UMAP fit on a capped sample, placement of the other
  and of DAS-produced points, the frozen ``MapParams``); ``maps``: the cached map of a
  checkpoint's split (the Explore page's first step); ``compare``: two maps or two runs side
  by side (Procrustes alignment, displacement, DAS's map shift, comparability);
* ``analysis``: per-class DAS analysis (frequency, DFS masks, MTS banks, produced points);
* ``runs_view``, ``train_form``, ``bench_view``: the runs table and curves, the Train form,
  the benchmark tables; ``thumbs``: image sprites for hover thumbnails;
* ``timeline``: a run's training timeline as aligned maps over epochs, two runs side by side;
  ``selection``: which map points a box or lasso selection holds; ``export``: Parquet and
  TensorBoard projector files of what a map shows.
"""
