"""Bring your own embeddings: reading .npz and Parquet files das_core did not make, and the
messages for files that cannot be used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from das_core.store.external import SPLIT, EmbeddingsFileError, read_embeddings_file


def _blobs(n_per: int = 20, classes: int = 3, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 4
    y = np.repeat(np.arange(classes), n_per)
    return (centres[y] + rng.normal(size=(len(y), d))).astype(np.float32), y


def test_npz_round_trip_with_names_paths_and_checkpoint(tmp_path: Path) -> None:
    emb, y = _blobs()
    f = tmp_path / "mine.npz"
    paths = np.array([f"img/{i}.png" for i in range(len(y))])
    np.savez(f, embeddings=emb.astype(np.float64), labels=y, class_names=np.array(["cat", "dog", "eel"]),
             paths=paths, checkpoint=np.array("/models/m.safetensors"))
    ef = read_embeddings_file(f)
    assert ef.embeddings.dtype == np.float32 and ef.embeddings.shape == emb.shape
    np.testing.assert_array_equal(ef.embeddings, emb)  # float32 -> float64 -> float32 is exact
    np.testing.assert_array_equal(ef.labels, y)
    assert ef.class_names == ["cat", "dog", "eel"]
    assert ef.checkpoint == "/models/m.safetensors"
    assert ef.image_paths() is not None and ef.image_paths()[3] == tmp_path / "img/3.png"
    es = ef.embedding_set()
    assert es.split == SPLIT and es.num_classes == 3 and len(es) == len(y) and es.checkpoint_key == ef.key


def test_string_labels_and_unnamed_integer_labels(tmp_path: Path) -> None:
    emb, y = _blobs()
    np.savez(tmp_path / "s.npz", embeddings=emb, labels=np.array(["zebra", "ant", "moth"])[y])
    ef = read_embeddings_file(tmp_path / "s.npz")
    assert ef.class_names == ["ant", "moth", "zebra"]
    assert [ef.class_names[c] for c in ef.labels[[0, 20, 40]]] == ["zebra", "ant", "moth"]
    np.savez(tmp_path / "i.npz", embeddings=emb, labels=y * 10 + 7)  # ids 7, 17, 27: renumbered 0..2
    ef = read_embeddings_file(tmp_path / "i.npz")
    assert ef.class_names == ["7", "17", "27"] and set(ef.labels.tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"labels": np.zeros(4)}, "no array 'embeddings'"),
        ({"embeddings": np.ones((4, 3))}, "no array 'labels'"),
        ({"embeddings": np.ones((4, 3)), "labels": np.zeros(5, int)}, "4 embeddings but 5 labels"),
        ({"embeddings": np.ones(4), "labels": np.zeros(4, int)}, "expected (N, d)"),
        ({"embeddings": np.array([[0.0, 1], [np.nan, 1], [1, 1]]), "labels": np.zeros(3, int)}, "NaN"),
        ({"embeddings": np.ones((3, 2)), "labels": np.array([0, 1, 2]), "class_names": np.array(["a", "b"])},
         "labels have no class name"),
        ({"embeddings": np.ones((3, 2)), "labels": np.array([0, 0.5, 1])}, "not whole numbers"),
        ({"embeddings": np.ones((3, 2)), "labels": np.zeros(3, int), "paths": np.array(["a", "b"])},
         "2 paths for 3 embeddings"),
    ],
)
def test_bad_npz_names_the_problem(tmp_path: Path, arrays: dict, needle: str) -> None:
    f = tmp_path / "bad.npz"
    np.savez(f, **arrays)
    with pytest.raises(EmbeddingsFileError, match="bad.npz") as err:
        read_embeddings_file(f)
    assert needle in str(err.value)


def test_ragged_npz_is_refused_without_unpickling(tmp_path: Path) -> None:
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.ones(3), np.ones(2)
    f = tmp_path / "ragged.npz"
    np.savez(f, embeddings=ragged, labels=np.zeros(2, int))
    with pytest.raises(EmbeddingsFileError, match="ragged vectors"):
        read_embeddings_file(f)


def test_not_an_npz(tmp_path: Path) -> None:
    f = tmp_path / "x.npz"
    f.write_bytes(b"not a zip")
    with pytest.raises(EmbeddingsFileError, match="not a readable .npz"):
        read_embeddings_file(f)
    with pytest.raises(EmbeddingsFileError, match="not an embeddings file"):
        (tmp_path / "x.csv").write_text("1,2\n")
        read_embeddings_file(tmp_path / "x.csv")


def _parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def test_parquet_vector_label_path_and_produced_rows(tmp_path: Path) -> None:
    emb, y = _blobs()
    names = np.array(["cat", "dog", "eel"])
    table = pa.table({
        "embedding": [row.tolist() for row in emb] + [emb[0].tolist()],
        "label": [*y.tolist(), 0],
        "class_name": [*names[y].tolist(), "cat"],
        "image_path": [f"/data/{i}.jpg" for i in range(len(y) + 1)],
        "produced": [False] * len(y) + [True],
    }).replace_schema_metadata({"checkpoint": "/m/best.safetensors"})
    ef = read_embeddings_file(_parquet(tmp_path / "e.parquet", table))
    assert len(ef) == len(y), "the produced row is left out"
    assert any("produced" in n for n in ef.notes)
    np.testing.assert_allclose(ef.embeddings, emb, rtol=0, atol=0)  # float32 -> double list -> float32: exact
    assert ef.class_names == ["cat", "dog", "eel"] and ef.paths is not None and ef.paths[5] == "/data/5.jpg"
    assert ef.checkpoint == "/m/best.safetensors"


@pytest.mark.parametrize(
    ("columns", "needle"),
    [
        ({"label": [0, 1]}, "no vector column"),
        ({"embedding": [[1.0, 2.0], [3.0, 4.0]]}, "no label column"),
        ({"embedding": [[1.0, 2.0], [3.0]], "label": [0, 1]}, "ragged vectors"),
        ({"embedding": [[1.0, 2.0], None], "label": [0, 1]}, "have no vector"),
        ({"embedding": [[1.0, float("nan")], [3.0, 4.0]], "label": [0, 1]}, "NaN"),
        ({"embedding": [[1.0, 2.0], [3.0, 4.0]], "label": [0, None]}, "have no label"),
        ({"embedding": ["a", "b"], "label": [0, 1]}, "not a list of numbers"),
        ({"embedding": [[1.0, 2.0], [3.0, 4.0]], "label": [0, 0], "class_name": ["a", "b"]}, "named both"),
    ],
)
def test_bad_parquet_names_the_problem(tmp_path: Path, columns: dict, needle: str) -> None:
    f = _parquet(tmp_path / "bad.parquet", pa.table(columns))
    with pytest.raises(EmbeddingsFileError, match="bad.parquet") as err:
        read_embeddings_file(f)
    assert needle in str(err.value)


def test_embeddings_file_error_is_a_user_error() -> None:
    from das_core.errors import USER_ERRORS

    assert issubclass(EmbeddingsFileError, USER_ERRORS)
