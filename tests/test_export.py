"""Export: the Parquet file read back with pandas (and its Arrow types), the TensorBoard
projector files read back with TensorBoard's own config parser, and ``python -m das_core
export`` on a trained run and on an embeddings file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from das_core.data.base import ArrayDataset
from das_core.explorer.export import (
    METADATA_TSV,
    PROJECTOR_CONFIG,
    SPRITE_PNG,
    TENSORS_TSV,
    export_table,
    parquet_bytes,
    sprite_geometry,
    tensorboard_zip,
    write_tensorboard,
)
from das_core.store.cache import EmbeddingSet


def _set(n: int = 12, d: int = 4) -> EmbeddingSet:
    rng = np.random.default_rng(0)
    return EmbeddingSet(
        embeddings=rng.normal(size=(n, d)).astype(np.float32), labels=np.arange(n, dtype=np.int64) % 3,
        class_names=["cat", "dog\tcorgi", "eel"], split="test", dataset="toy", checkpoint_key="k",
    )


def _table(es: EmbeddingSet):  # type: ignore[no-untyped-def]
    coords = np.stack([np.arange(len(es)), -np.arange(len(es))], axis=1).astype(np.float32)
    produced = (es.embeddings[[0, 4]] * 2, es.labels[[0, 4]], np.array([0, 4]))
    return export_table(es, coords=coords, produced=produced, produced_xy=np.array([[0.5, 0.5], [4.5, 4.5]]),
                        paths=[f"/img/{i}.png" for i in range(len(es))], meta={"checkpoint": "/m.safetensors"})


def test_parquet_reads_back_with_pandas() -> None:
    es = _set()
    df = pd.read_parquet(io.BytesIO(parquet_bytes(_table(es))))
    assert list(df.columns) == ["vector", "label", "class_name", "image_id", "path", "x", "y", "produced", "anchor"]
    assert len(df) == len(es) + 2
    real, prod = df[~df["produced"]], df[df["produced"]]
    np.testing.assert_array_equal(np.stack(real["vector"].to_numpy()), es.embeddings)  # float32 stored: exact
    assert real["class_name"].tolist()[:3] == ["cat", "dog\tcorgi", "eel"]
    assert real["image_id"].tolist() == list(range(len(es))) and real["path"].iloc[5] == "/img/5.png"
    assert real["x"].tolist()[:3] == [0.0, 1.0, 2.0] and real["anchor"].isna().all()
    assert prod["anchor"].tolist() == [0, 4] and prod["image_id"].isna().all() and prod["path"].isna().all()
    assert prod["x"].tolist() == [0.5, 4.5]


def test_parquet_column_types_are_what_embedding_atlas_and_fiftyone_read() -> None:
    """The Arrow types the README's Embedding Atlas / FiftyOne commands rely on: a numeric list
    column is a vector to Atlas (``--vector``), float ``x``/``y`` its projection, a string column
    its ``--text``; the ``vector`` rows become FiftyOne's ``embedding`` arrays. Neither tool is
    installed here (too heavy, see README); this schema was read by hand with Embedding Atlas
    0.26's own loader (``embedding_atlas.cli.load_datasets``), so this test pins it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    es = _set()
    schema = pq.read_schema(io.BytesIO(parquet_bytes(_table(es))))
    want = {"vector": pa.list_(pa.float32()), "label": pa.int64(), "class_name": pa.string(),
            "image_id": pa.int64(), "path": pa.string(), "x": pa.float32(), "y": pa.float32(),
            "produced": pa.bool_(), "anchor": pa.int64()}
    assert {f.name: f.type for f in schema} == want


def test_tensorboard_files_open_with_tensorboards_reader(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from google.protobuf import text_format
    from tensorboard.plugins.projector import projector_config_pb2

    es = _set()
    images = ArrayDataset("toy", "test", np.arange(len(es) * 9 * 6, dtype=np.uint8).reshape(len(es), 9, 6),
                          es.labels, es.class_names)
    table = _table(es)
    cfg_path = write_tensorboard(table, tmp_path, images=images, name="toy-test")
    cfg = text_format.Parse(cfg_path.read_text(), projector_config_pb2.ProjectorConfig())
    emb = cfg.embeddings[0]
    assert (emb.tensor_name, emb.tensor_path, emb.metadata_path) == ("toy-test", TENSORS_TSV, METADATA_TSV)
    per_row, size = sprite_geometry(len(table), 9)
    assert emb.sprite.image_path == SPRITE_PNG and list(emb.sprite.single_image_dim) == [size, size]
    tensors = np.loadtxt(tmp_path / TENSORS_TSV, delimiter="\t", dtype=np.float32)
    # written with 7 significant digits: float32 has 24 bits (~7.2 digits), so 1e-6 relative holds
    np.testing.assert_allclose(tensors, table.vectors, rtol=1e-6)
    meta = pd.read_csv(tmp_path / METADATA_TSV, sep="\t")
    assert list(meta.columns) == ["class_name", "label", "image_id", "produced", "anchor"]
    assert len(meta) == len(table) and meta["class_name"][1] == "dog corgi"  # a tab would break the TSV
    assert meta["produced"].tolist() == [False] * len(es) + [True, True]
    with Image.open(tmp_path / SPRITE_PNG) as sprite:
        assert sprite.size == (per_row * size, per_row * size)
        # produced point 1 (row len(es) + 1) shows its anchor's image (item 4)
        def cell(k: int) -> np.ndarray:
            x, y = (k % per_row) * size, (k // per_row) * size
            return np.asarray(sprite.crop((x, y, x + size, y + size)))

        np.testing.assert_array_equal(cell(len(es) + 1), cell(4))
        assert not np.array_equal(cell(4), cell(5))
    names = zipfile.ZipFile(io.BytesIO(tensorboard_zip(table, images=images))).namelist()
    assert sorted(names) == sorted([TENSORS_TSV, METADATA_TSV, SPRITE_PNG, PROJECTOR_CONFIG])


def test_tensorboards_projector_plugin_serves_the_files(tmp_path: Path) -> None:
    """TensorBoard's own projector plugin (the server side of the Projector tab) on the folder."""
    pytest.importorskip("tensorboard")
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug.test import Client

    es = _set()
    images = ArrayDataset("toy", "test", np.zeros((len(es), 9, 6), np.uint8), es.labels, es.class_names)
    table = _table(es)
    write_tensorboard(table, tmp_path, images=images, name="toy-test")

    class NoRuns:  # the logdir itself is the one run, "."
        def list_runs(self, ctx: object, experiment_id: str) -> list[object]:
            return []

    apps = ProjectorPlugin(base_plugin.TBContext(logdir=str(tmp_path), data_provider=NoRuns())).get_plugin_apps()

    def get(route: str, query: str = "run=.&name=toy-test") -> bytes:
        r = Client(apps[route]).get(f"{route}?{query}")
        assert r.status_code == 200, (route, r.data[:300])
        return bytes(r.data)

    import json

    info = json.loads(get("/info", "run=."))["embeddings"][0]
    assert info["tensorShape"] == [len(table), table.vectors.shape[1]] and info["sprite"]["imagePath"] == SPRITE_PNG
    served = np.frombuffer(get("/tensor"), dtype=np.float32).reshape(len(table), -1)
    np.testing.assert_allclose(served, table.vectors, rtol=1e-6)  # 7 significant digits in the TSV, as above
    assert get("/metadata").decode().splitlines()[0] == "class_name\tlabel\timage_id\tproduced\tanchor"
    assert get("/sprite_image").startswith(b"\x89PNG")


def test_sprite_stays_within_tensorboards_limit() -> None:
    per_row, size = sprite_geometry(35_000, 64)
    assert per_row * per_row >= 35_000 and per_row * size <= 8192


@pytest.mark.slow
def test_cli_export_of_a_run_and_of_an_embeddings_file(digits_run: Path, tmp_path: Path) -> None:
    from das_core.cli import main
    from das_core.explorer.maps import get_map
    from das_core.store.cache import load_cached_embeddings
    from das_core.store.external import read_embeddings_file

    out = tmp_path / "pq"
    assert main(["export", str(digits_run), "--split", "test", "--format", "parquet", "--out", str(out),
                 "--das-anchors", "5"]) == 0
    df = pd.read_parquet(out / "embeddings.parquet")
    real = df[~df["produced"]]
    n_classes = real["label"].nunique()
    assert int(df["produced"].sum()) == 5 * n_classes * 3  # 5 anchors per class x T = 3 (the default)
    # the map is the Explore page's: the same cached map of the same cached embeddings
    es = load_cached_embeddings(read_embeddings_file_key(digits_run), "test")
    assert es is not None
    np.testing.assert_array_equal(real[["x", "y"]].to_numpy(np.float32), get_map(es).coords)
    # the export reads back as an embeddings file (its produced rows left out) naming its checkpoint
    ef = read_embeddings_file(out / "embeddings.parquet")
    assert len(ef) == len(es) and ef.checkpoint is not None and ef.checkpoint.endswith(".safetensors")
    np.testing.assert_array_equal(ef.embeddings, es.embeddings)

    run_tb = tmp_path / "run-tb"
    assert main(["export", str(digits_run), "--split", "test", "--format", "tensorboard", "--out", str(run_tb),
                 "--das-anchors", "2"]) == 0
    with Image.open(run_tb / SPRITE_PNG) as sprite:  # the digits' own images, 8 px each
        per_row, size = sprite_geometry(len(es) + 2 * n_classes * 3, 8)
        assert sprite.size == (per_row * size, per_row * size)
    assert 'single_image_dim: 8' in (run_tb / PROJECTOR_CONFIG).read_text()

    tb = tmp_path / "tb"
    assert main(["export", str(out / "embeddings.parquet"), "--format", "tensorboard", "--out", str(tb),
                 "--das-anchors", "0"]) == 0
    assert {p.name for p in tb.iterdir()} >= {TENSORS_TSV, METADATA_TSV, PROJECTOR_CONFIG}
    assert len((tb / METADATA_TSV).read_text().splitlines()) == len(es) + 1  # a header, no produced rows

    bad = tmp_path / "bad.npz"
    np.savez(bad, embeddings=np.ones((3, 2)), labels=np.zeros(4, int))
    assert main(["export", str(bad), "--format", "parquet", "--out", str(tmp_path / "x")]) == 2


def read_embeddings_file_key(run: Path) -> str:
    from das_core.store.cache import file_key
    from das_core.store.checkpoint import resolve_checkpoint_path

    return file_key(resolve_checkpoint_path(run))
