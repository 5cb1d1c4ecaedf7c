"""emoji-styles: class matching, rendering, the cache, the stored split and the loader, on a
tiny fixture laid out exactly like the npm packages (tests/emoji_fixture/npm/node_modules/
@iconify-json/<set>/{icons,chars,info,package}.json), so no test needs the registry; plus one
test of the real pinned packages that skips only where they are absent and npm cannot reach
its registry."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from das_core.data import DatasetError, DatasetSplits, load_splits
from das_core.data.emoji_styles import (
    EmojiDataset,
    Recipe,
    arrays_from_file,
    default_root,
    describe,
    emoji_arrays,
    load_emoji_styles,
    make_split,
    read_split,
    style_grid,
)
from das_core.data.emoji_styles import sources as src
from das_core.data.emoji_styles.render import (
    build_rendered,
    cache_path,
    find_near_duplicates,
    load_rendered,
    render_svg,
)

FIXTURE = Path(__file__).resolve().parent / "emoji_fixture"
FIXTURE_STYLES = (
    src.Style("noto", True),
    src.Style("twemoji", True),
    src.Style("openmoji", True),
    src.Style("emojione", False),
    src.Style("fxemoji", False),
)
FIXTURE_SPLIT = FIXTURE / "split.json"
RECIPE = Recipe(styles=FIXTURE_STYLES, min_styles=5, split=FIXTURE_SPLIT, near_duplicates=None)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    out = tmp_path / "emoji-styles"
    shutil.copytree(FIXTURE, out)
    return out


def load_fixture(root: Path, size: int = 16) -> DatasetSplits:
    return load_emoji_styles(root, size=size, recipe=RECIPE, install=False)


def test_catalogue_matches_code_points_names_and_unicode_names(root: Path) -> None:
    cat = src.read_catalogue(root, replace(RECIPE, min_styles=1))
    by_key = {k: {FIXTURE_STYLES[si].prefix for si, _ in imgs} for k, imgs in zip(cat.keys, cat.images, strict=True)}
    five = {"noto", "twemoji", "openmoji", "emojione", "fxemoji"}
    # 2764 and 2764-fe0f are one class; fxemoji's "heavyblackheart" is Unicode's name of U+2764
    assert by_key["2764"] == five
    assert by_key["1f600"] == five  # fxemoji "grinningface" = "grinning-face" without punctuation
    assert by_key["1f44d"] == five  # fxemoji "thumbsupsign" = Unicode's THUMBS UP SIGN
    # emojione's "sun" is a rotated alias (another drawing): not taken
    assert by_key["2600"] == five - {"emojione"}
    # openmoji draws cat and cat face with one icon: ambiguous, dropped from openmoji for both
    assert by_key["1f431"] == {"noto", "twemoji", "emojione", "fxemoji"}
    assert by_key["1f408"] == {"noto"}
    # skin tones and flags are no classes, in code-point sets or name-matched ones
    assert not any("1f3fb" in k or "1f1eb" in k for k in cat.keys)
    assert cat.dropped["skin tone code points"] == 2 and cat.dropped["flag code points"] == 3
    assert cat.names[cat.keys.index("1f600")] == "grinning-face"


def test_min_styles_keeps_emoji_drawn_often_enough(root: Path) -> None:
    cat = src.read_catalogue(root, replace(RECIPE, min_styles=4))
    assert cat.keys == sorted(["1f600", "2764", "1f44d", "1f680", "2600", "1f431"])
    cat5 = src.read_catalogue(root, RECIPE)
    assert cat5.keys == sorted(["1f600", "2764", "1f44d", "1f680"])
    assert cat5.n_images == 20


def test_render_svg_on_white_keeps_aspect_and_colour() -> None:
    # a red square filling the left half of a 20 x 10 view box, rendered into 16 x 16 px:
    # 'meet' scaling gives a 16 x 8 band centred vertically, white above and below it
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 20 10">'
        '<rect x="0" y="0" width="10" height="10" fill="#ff0000"/></svg>'
    )
    img = render_svg(svg, 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert img[8, 3].tolist() == [255, 0, 0]
    assert img[8, 12].tolist() == [255, 255, 255]  # transparent -> white
    assert img[1, 3].tolist() == [255, 255, 255]  # outside the letterboxed view box


def test_loader_splits_by_the_stored_class_list(root: Path) -> None:
    splits = load_fixture(root)
    assert splits.name == "emoji-styles"
    assert splits.train.class_names == ["grinning-face", "red-heart"]
    assert splits.test.class_names == ["thumbs-up", "rocket"]
    assert len(splits.train) == 10 and len(splits.test) == 10
    assert np.bincount(splits.test.labels).tolist() == [5, 5]
    # 2600 (sun) is in the stored split but has 4 styles here: noted, not an error
    assert any("not in the installed sets" in n for n in splits.notes)
    ds = splits.train
    assert isinstance(ds, EmojiDataset)
    img = ds.load_image(0)
    assert img.mode == "RGB" and img.size == (16, 16)
    assert sorted(ds.style_names[s] for s in ds.styles[ds.labels == 0]) == sorted(
        ["noto", "twemoji", "openmoji", "emojione", "fxemoji"]
    )
    assert ds.describe_item(0).endswith(f"({ds.style_names[int(ds.styles[0])]})")


def test_cache_is_written_once_and_rebuilt_when_stale(root: Path) -> None:
    path = build_rendered(root, 16, recipe=RECIPE)
    first = path.stat().st_mtime_ns
    assert build_rendered(root, 16, recipe=RECIPE) == path
    assert path.stat().st_mtime_ns == first  # up to date: not rendered again
    pkg = root / "npm/node_modules/@iconify-json/noto/package.json"
    pkg.write_text(json.dumps({"name": "@iconify-json/noto", "version": "0.0.2"}))
    build_rendered(root, 16, recipe=RECIPE)
    r = load_rendered(path)
    assert json.loads(r.stamp)["sets"]["noto"] == "0.0.2"
    assert r.images.shape == (20, 16, 16, 3)
    # the picture of a class is the set's drawing: openmoji's rocket is orange (#e67e22)
    k = r.class_keys.index("1f680")
    i = int(np.flatnonzero((r.labels == k) & (r.styles == r.style_names.index("openmoji")))[0])
    assert r.images[i, 12, 8].tolist() == [0xE6, 0x7E, 0x22]


def test_sizes_are_cached_separately(root: Path) -> None:
    a = emoji_arrays(24, root, recipe=RECIPE, install=False)
    assert a.images.shape[1:] == (24, 24, 3)
    assert cache_path(root, 24).is_file() and not cache_path(root, 16).exists()
    assert set(a.split.tolist()) == {"train", "test"}
    assert a.licences == ["Apache-2.0", "CC-BY-4.0", "CC-BY-SA-4.0", "CC-BY-4.0", "Apache-2.0"]
    a4 = emoji_arrays(24, root, recipe=replace(RECIPE, min_styles=4), install=False)
    grid = style_grid(a4, ["1f600", "2600"], pad=2)
    assert grid.shape == (2 * 26 + 2, 5 * 26 + 2, 3)
    assert (grid[28:, 3 * 26 + 2 : 4 * 26] == 255).all()  # emojione lacks the sun: a white cell
    assert (grid[2:26, 2:26] != 255).any()
    lines = describe(a)
    assert any("train" in x and "2 classes" in x and "min 5 / median 5 / max 5" in x for x in lines)
    assert any("openmoji" in x and "CC-BY-SA-4.0" in x for x in lines)


def test_a_cache_file_alone_is_enough(root: Path, tmp_path: Path) -> None:
    # as on a GPU host that got only the .npz: no package, no registry, no npm run
    path = build_rendered(root, 16, recipe=RECIPE)
    shutil.rmtree(root / "npm")
    splits = load_emoji_styles(root, size=16, recipe=RECIPE)  # install=True, yet npm is not called
    assert (splits.train.num_classes, splits.test.num_classes) == (2, 2)
    moved = tmp_path / "elsewhere.npz"
    shutil.copyfile(path, moved)
    a = arrays_from_file(moved, FIXTURE_SPLIT)
    assert a.images.shape == (20, 16, 16, 3) and sorted(set(a.split.tolist())) == ["test", "train"]
    assert [a.class_names[k] for k in np.unique(a.labels[a.split == "train"])] == ["grinning-face", "red-heart"]


def test_corrupt_cache_says_how_to_fix(root: Path) -> None:
    path = cache_path(root, 16)
    path.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="delete it"):
        load_rendered(path)
    build_rendered(root, 16, recipe=RECIPE)  # an unreadable cache is rebuilt
    assert load_rendered(path).images.shape[0] == 20


def test_near_duplicates_are_found_and_the_stored_list_applied(root: Path, tmp_path: Path) -> None:
    r = load_rendered(build_rendered(root, 16, recipe=RECIPE))
    assert find_near_duplicates(r) == []  # the fixture's drawings all differ
    # make twemoji's rocket look exactly like its thumbs-up: one pair, both classes named
    style = r.style_names.index("twemoji")
    rocket = int(np.flatnonzero((r.labels == r.class_keys.index("1f680")) & (r.styles == style))[0])
    thumbs = int(np.flatnonzero((r.labels == r.class_keys.index("1f44d")) & (r.styles == style))[0])
    r.images[rocket] = r.images[thumbs]
    assert find_near_duplicates(r) == [{"style": "twemoji", "classes": ["1f44d", "1f680"], "rms": 0.0}]
    # a stored list leaves those drawings out: both fall to 4 styles, under min_styles 5
    listed = tmp_path / "near.json"
    listed.write_text(json.dumps({"pairs": find_near_duplicates(r)}))
    cat = src.read_catalogue(root, replace(RECIPE, near_duplicates=listed))
    assert cat.keys == ["1f600", "2764"]
    assert cat.dropped["near-duplicate drawings of two emoji in one style"] == 2
    # and the cache built without the list is stale under it
    path = build_rendered(root, 16, recipe=replace(RECIPE, near_duplicates=listed))
    assert load_rendered(path).class_keys == ["1f600", "2764"]


def test_forbidden_licence_is_refused(root: Path) -> None:
    info = root / "npm/node_modules/@iconify-json/fxemoji/info.json"
    data = json.loads(info.read_text())
    data["license"] = {"title": "Proprietary", "spdx": "LicenseRef-Apple"}
    info.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="not known to allow redistribution"):
        load_fixture(root)


def test_missing_packages_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="make data"):
        load_emoji_styles(tmp_path, size=16, recipe=RECIPE, install=False)


def test_unreachable_registry_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an npm that fails the way npm does offline: the message says the registry cannot be reached
    fake = tmp_path / "npm"
    fake.write_text("#!/bin/sh\necho 'npm error code ENOTFOUND' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(DatasetError, match="registry cannot be reached"):
        src.install_packages(tmp_path / "data", npm=str(fake))


def test_stored_split_is_a_fixed_half() -> None:
    train, test = read_split()
    assert abs(len(train) - len(test)) <= 1 and not set(train) & set(test)
    # the rule it was made by gives the same lists again
    again = make_split(train + test, seed=json.loads(src.SPLIT_PATH.read_text())["seed"])
    assert (again["train"], again["test"]) == (train, test)


def test_registry_and_model_preprocessing(root: Path) -> None:
    from das_core.models.backbones import build_backbone

    # colour images reach both the grey 28 px small CNN and the RGB EfficientNet-Lite0
    splits = load_fixture(root)
    img = splits.train.load_image(3)
    for name in ("small-cnn", "efficientnet-lite0"):
        prep = build_backbone(name, pretrained=False).preprocessing
        for transform in (prep.eval_transform(), prep.train_transform()):
            x = transform(img)
            assert x.shape == (prep.channels, prep.crop, prep.crop)


def test_real_packages_give_many_classes_with_few_images() -> None:
    # the data `make data` prepared (data/emoji-styles, or $DAS_DATA_DIR/emoji-styles)
    real = default_root()
    have = src.installed_versions(real)
    if any(have.get(k) != v for k, v in src.pinned_versions().items()) and not src.registry_reachable():
        pytest.skip("the pinned @iconify-json packages are not installed and the npm registry cannot be reached")
    splits = load_splits("emoji-styles")
    assert splits.train.num_classes >= 500 and splits.test.num_classes >= 500
    counts = np.concatenate([splits.train.class_counts(), splits.test.class_counts()])
    assert counts.min() >= src.MIN_STYLES and counts.max() <= len(src.STYLES)
    assert not set(splits.train.class_names) & set(splits.test.class_names)
    img = splits.test.load_image(0)
    assert img.mode == "RGB" and img.size == (64, 64)


def test_cli_data_check_prints_splits_styles_and_licences(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from das_core.cli import main

    build_rendered(root, 16, recipe=RECIPE)
    shutil.rmtree(root / "npm")  # the file alone: the CLI reads it with the stored (real) split
    assert main(["data", "check", "emoji-styles", "--root", str(root), "--size", "16"]) == 0
    out = capsys.readouterr().out
    # the real split puts grinning face, red heart and thumbs up in train, rocket in test
    assert "4 classes, 20 images at 16 px" in out
    assert "train     3 classes      15 images  images per class min 5 / median 5 / max 5" in out
    assert "test      1 classes       5 images" in out
    assert "openmoji" in out and "CC-BY-SA-4.0" in out
