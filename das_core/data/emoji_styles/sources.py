"""The Iconify emoji sets behind ``emoji-styles``: installing them from npm at pinned versions,
reading their ``icons.json`` / ``chars.json`` / ``info.json``, and matching icons to classes.

A class is one emoji, keyed by its code points (lower-case hex joined by ``-``, without the
variation selector ``fe0f``, so ``2764-fe0f`` and ``2764`` are one class). Sets with a
``chars.json`` (noto, twemoji, openmoji, fluent-emoji-flat) map code points to icon names; the
others (noto-v1, emojione, emojione-v1, fxemoji) match by icon name, compared without
punctuation (fxemoji writes ``alarmclock`` for ``alarm-clock``), through any name the
code-point sets use for that emoji. Skin-tone variants (U+1F3FB..U+1F3FF) and country or
subdivision flags (regional indicators, tag sequences) are left out. One SVG drawing that
answers for two classes in a style (the same icon or the same body under two names) is
ambiguous: it is dropped from that style for every class that claims it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from das_core.data.base import DatasetError

log = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parent
PACKAGE_JSON = ASSET_DIR / "package.json"
PACKAGE_LOCK = ASSET_DIR / "package-lock.json"
SPLIT_PATH = ASSET_DIR / "split.json"
NEAR_DUPLICATES_PATH = ASSET_DIR / "near_duplicates.json"
SCOPE = "@iconify-json"


@dataclass(frozen=True)
class Style:
    """One Iconify set: its npm name under ``@iconify-json`` and how its icons find classes."""

    prefix: str
    by_chars: bool  # True: chars.json maps code points to icons; False: match by icon name


# Order = preference for a class's display name (the first code-point set that has it).
STYLES: tuple[Style, ...] = (
    Style("noto", True),
    Style("twemoji", True),
    Style("openmoji", True),
    Style("fluent-emoji-flat", True),
    Style("noto-v1", False),
    Style("emojione", False),
    Style("emojione-v1", False),
    Style("fxemoji", False),
)
MIN_STYLES = 5
# Licences (SPDX) whose terms allow redistribution and commercial use; anything else is refused.
ALLOWED_LICENCES = frozenset({"MIT", "Apache-2.0", "CC-BY-4.0", "CC-BY-SA-4.0", "CC0-1.0", "OFL-1.1"})

SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
REGIONAL = range(0x1F1E6, 0x1F200)
TAGS = range(0xE0020, 0xE0080)
VS16 = 0xFE0F


@dataclass(frozen=True)
class Recipe:
    """What the dataset is made of: the sets, the least number of styles per class, the stored
    split and the stored near-duplicate list. The default is the published dataset; tests use
    a recipe of their own on a fixture."""

    styles: tuple[Style, ...] = STYLES
    min_styles: int = MIN_STYLES
    split: Path = SPLIT_PATH
    near_duplicates: Path | None = NEAR_DUPLICATES_PATH


RECIPE = Recipe()


# -- npm -------------------------------------------------------------------------------------
def npm_dir(root: Path) -> Path:
    return root / "npm"


def packages_dir(root: Path) -> Path:
    return npm_dir(root) / "node_modules" / SCOPE


def pinned_versions(package_json: Path = PACKAGE_JSON) -> dict[str, str]:
    """``{prefix: version}`` pinned in the repository's package.json."""
    deps: dict[str, str] = json.loads(package_json.read_text())["dependencies"]
    return {name.split("/", 1)[1]: ver for name, ver in deps.items() if name.startswith(SCOPE + "/")}


def installed_versions(root: Path, styles: Sequence[Style] = STYLES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for s in styles:
        p = packages_dir(root) / s.prefix / "package.json"
        try:
            out[s.prefix] = str(json.loads(p.read_text())["version"])
        except (OSError, ValueError, KeyError):
            out[s.prefix] = None
    return out


def install_packages(root: Path, *, npm: str | None = None) -> bool:
    """``npm ci`` the pinned sets into ``root/npm`` unless exactly those versions are there.
    Returns whether npm ran; raises ``DatasetError`` (with the fix) when it cannot."""
    want = pinned_versions()
    have = installed_versions(root)
    if all(have.get(k) == v for k, v in want.items()):
        return False
    exe = npm or shutil.which("npm")
    if exe is None:
        raise DatasetError(
            "emoji-styles: `npm` is not installed, so the Iconify emoji sets cannot be installed; "
            "install Node.js/npm (Debian: apt-get install npm) and run `make data`"
        )
    target = npm_dir(root)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PACKAGE_JSON, target / "package.json")
    shutil.copyfile(PACKAGE_LOCK, target / "package-lock.json")
    log.info("emoji-styles: installing the pinned Iconify emoji sets with npm ci into %s", target)
    cmd = [exe, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"]
    try:
        proc = subprocess.run(cmd, cwd=target, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DatasetError(f"emoji-styles: `npm ci` in {target} failed to run: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        offline = any(w in " ".join(tail) for w in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "network"))
        why = "the npm registry cannot be reached" if offline else "npm failed"
        raise DatasetError(
            f"emoji-styles: {why} (`npm ci` in {target} exited {proc.returncode}: {' | '.join(tail)}). "
            f"Retry with network access to registry.npmjs.org (or an npm mirror set in ~/.npmrc), "
            f"or copy an installed node_modules/@iconify-json into {packages_dir(root)}"
        )
    have = installed_versions(root)
    wrong = {k: have.get(k) for k, v in want.items() if have.get(k) != v}
    if wrong:
        raise DatasetError(f"emoji-styles: after npm ci these sets are missing or at other versions: {wrong}")
    return True


def registry_reachable(timeout: float = 10.0) -> bool:
    """Whether ``npm`` can reach its registry (for tests that need the real packages)."""
    exe = shutil.which("npm")
    if exe is None:
        return False
    try:
        proc = subprocess.run(
            [exe, "view", f"{SCOPE}/twemoji", "version", "--loglevel=error"],
            capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, "NO_UPDATE_NOTIFIER": "1"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


# -- reading one set -------------------------------------------------------------------------
@dataclass(frozen=True)
class Icon:
    """An icon as a standalone SVG's parts: body and view box."""

    body: str
    left: float
    top: float
    width: float
    height: float

    def svg(self) -> str:
        return (
            '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{self.left:g} {self.top:g} {self.width:g} {self.height:g}">{self.body}</svg>'
        )

    def digest(self) -> str:
        return hashlib.sha1(self.svg().encode()).hexdigest()


@dataclass
class IconSet:
    prefix: str
    version: str
    name: str
    licence: str  # SPDX
    licence_title: str
    author: str
    icons: dict[str, Icon]  # name (aliases without transformations included) -> icon
    chars: dict[str, str]  # code point key -> icon name


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"emoji-styles: {path} not found ({what}); run `make data`") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"emoji-styles: cannot read {path} ({what}): {exc}; run `make data` again") from exc


def read_set(root: Path, style: Style) -> IconSet:
    """One installed Iconify set under ``root/npm/node_modules/@iconify-json/<prefix>``."""
    folder = packages_dir(root) / style.prefix
    info = _read_json(folder / "info.json", "the set's info.json")
    data = _read_json(folder / "icons.json", "the set's icons")
    pkg = _read_json(folder / "package.json", "the package's version")
    lic = info.get("license") or {}
    spdx = str(lic.get("spdx", ""))
    if spdx not in ALLOWED_LICENCES:
        raise DatasetError(
            f"emoji-styles: set {style.prefix} is licensed {spdx or 'without a licence'}, which is not known "
            f"to allow redistribution and commercial use; leave it out of STYLES"
        )
    dw, dh = float(data.get("width", 16)), float(data.get("height", 16))
    raw = data.get("icons", {})
    icons: dict[str, Icon] = {}
    for name, d in raw.items():
        if d.get("hidden") or d.get("rotate") or d.get("hFlip") or d.get("vFlip"):
            continue
        icons[name] = Icon(
            d["body"], float(d.get("left", data.get("left", 0))), float(d.get("top", data.get("top", 0))),
            float(d.get("width", dw)), float(d.get("height", dh)),
        )
    for alias, a in data.get("aliases", {}).items():
        if set(a) - {"parent"}:  # a transformed or resized alias is another drawing; skip it
            continue
        if a.get("parent") in icons and alias not in icons:
            icons[alias] = icons[a["parent"]]
    chars: dict[str, str] = {}
    if style.by_chars:
        for cp, name in _read_json(folder / "chars.json", "the set's code points").items():
            chars[str(cp).lower()] = str(name)
    author = info.get("author") or {}
    return IconSet(
        style.prefix, str(pkg.get("version", "?")), str(info.get("name", style.prefix)), spdx,
        str(lic.get("title", spdx)), str(author.get("name", "")), icons, chars,
    )


# -- classes -----------------------------------------------------------------------------------
def normalise_key(cp: str) -> str:
    """``"2764-FE0F"`` -> ``"2764"``: lower-case hex without variation selector 16."""
    parts = [p for p in cp.lower().split("-") if p and int(p, 16) != VS16]
    return "-".join(parts)


def excluded(key: str) -> str | None:
    """Why the emoji ``key`` is left out (``"skin tone"``, ``"flag"``), or None."""
    cps = [int(p, 16) for p in key.split("-") if p]
    if any(c in SKIN_TONES for c in cps):
        return "skin tone"
    if any(c in REGIONAL or c in TAGS for c in cps):
        return "flag"
    return None


def unicode_names(key: str) -> list[str]:
    """Unicode's character name of a one-code-point emoji (a keycap: of its base character)."""
    cps = [int(p, 16) for p in key.split("-")]
    if len(cps) == 2 and cps[1] == 0x20E3:
        cps = cps[:1]
    if len(cps) != 1:
        return []
    name = unicodedata.name(chr(cps[0]), "")
    return [name] if name else []


def name_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass
class Catalogue:
    """Matched classes: ``images[k]`` lists ``(style index, icon)`` of class ``keys[k]``."""

    keys: list[str]
    names: list[str]
    images: list[list[tuple[int, Icon]]]
    sets: list[IconSet]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count (classes or images)

    @property
    def n_images(self) -> int:
        return sum(len(v) for v in self.images)


def read_near_duplicates(path: Path | None = NEAR_DUPLICATES_PATH) -> list[tuple[str, str]]:
    """``(style, class key)`` drawings to leave out: the stored near-duplicate pairs (both sides)."""
    if path is None:
        return []
    data = _read_json(path, "the stored near-duplicate list")
    return [(str(e["style"]), str(k)) for e in data["pairs"] for k in e["classes"]]


def build_catalogue(
    sets: Sequence[IconSet],
    styles: Sequence[Style],
    min_styles: int = MIN_STYLES,
    exclude: Sequence[tuple[str, str]] = (),
) -> Catalogue:
    """Match every set's icons to emoji and keep the emoji drawn in at least ``min_styles`` sets;
    ``exclude`` lists ``(style, class key)`` drawings to leave out (near-duplicates)."""
    dropped: dict[str, int] = defaultdict(int)
    # 1. code-point sets: key -> icon name per set
    claims: dict[int, dict[str, list[str]]] = {}  # style -> icon name -> keys claiming it
    display: dict[str, str] = {}
    names_of: dict[str, set[str]] = defaultdict(set)  # name key -> emoji keys using that name
    for si, (st, s) in enumerate(zip(styles, sets, strict=True)):
        if not st.by_chars:
            continue
        per: dict[str, list[str]] = defaultdict(list)
        for cp, icon_name in s.chars.items():
            key = normalise_key(cp)
            if not key:
                continue
            why = excluded(key)
            if why is not None:
                dropped[f"{why} code points"] += 1
                continue
            if icon_name not in s.icons:
                continue
            if key not in per[icon_name]:
                per[icon_name].append(key)
            display.setdefault(key, icon_name)
            names_of[name_key(icon_name)].add(key)
        claims[si] = per
    for key in display:  # Unicode's own names too (fxemoji and the older sets use many of them)
        for alt in unicode_names(key):
            names_of[name_key(alt)].add(key)
    # 2. name-matched sets: an icon name (or alias) names a class when exactly one emoji uses it
    for si, (st, s) in enumerate(zip(styles, sets, strict=True)):
        if st.by_chars:
            continue
        per = defaultdict(list)
        for icon_name in s.icons:
            if "tone" in icon_name:
                continue
            keys = names_of.get(name_key(icon_name), set())
            if not keys:  # "angry" for "angry-face", "frog-face" for "frog"
                nk = name_key(icon_name)
                keys = names_of.get(nk + "face", set()) or names_of.get(nk.removesuffix("face"), set())
            if len(keys) == 1:
                key = next(iter(keys))
                if key not in per[icon_name]:
                    per[icon_name].append(key)
        claims[si] = per
    # 3. one drawing per (style, class); a drawing claimed by two classes is dropped
    by_key: dict[str, dict[int, Icon]] = defaultdict(dict)
    for si in sorted(claims):
        s = sets[si]
        digest_keys: dict[str, set[str]] = defaultdict(set)
        digest_icon: dict[str, Icon] = {}
        for icon_name, claimants in claims[si].items():
            icon = s.icons[icon_name]
            d = icon.digest()
            digest_keys[d].update(claimants)
            digest_icon[d] = icon
        taken: dict[str, str] = {}  # key -> digest already chosen in this style
        ambiguous: set[str] = set()
        for d, keys in digest_keys.items():
            if len(keys) > 1:
                dropped["drawings shared by several emoji in one style"] += 1
                continue
            key = next(iter(keys))
            if key in taken and taken[key] != d:
                ambiguous.add(key)  # two different drawings for one emoji under different names
                continue
            taken[key] = d
            by_key[key][si] = digest_icon[d]
        for key in ambiguous:  # keep the code-point set's own choice; name matches are unsure
            if not styles[si].by_chars:
                by_key[key].pop(si, None)
    index = {st.prefix: si for si, st in enumerate(styles)}
    for prefix, key in exclude:
        if prefix in index and by_key.get(key, {}).pop(index[prefix], None) is not None:
            dropped["near-duplicate drawings of two emoji in one style"] += 1
    kept = sorted(k for k, v in by_key.items() if len(v) >= min_styles)
    dropped[f"emoji in fewer than {min_styles} styles"] = sum(1 for v in by_key.values() if len(v) < min_styles)
    names = _unique([display.get(k, k) for k in kept], kept)
    images = [sorted(by_key[k].items()) for k in kept]
    return Catalogue(kept, names, images, list(sets), dict(dropped))


def _unique(names: list[str], keys: list[str]) -> list[str]:
    count: dict[str, int] = defaultdict(int)
    for n in names:
        count[n] += 1
    return [n if count[n] == 1 else f"{n} ({k})" for n, k in zip(names, keys, strict=True)]


def read_catalogue(root: Path, recipe: Recipe = RECIPE) -> Catalogue:
    sets = [read_set(root, s) for s in recipe.styles]
    return build_catalogue(sets, recipe.styles, recipe.min_styles, read_near_duplicates(recipe.near_duplicates))
