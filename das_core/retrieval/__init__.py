"""Retrieval: exact k-nearest neighbours and the DML metrics (``evaluation``: Recall@K, MAP@R,
NMI, ...) and the saved, searchable faiss index of a checkpoint's gallery (``index``)."""
