"""The produced points of a map, sent on their own: a slider move sends only them.

Streamlit sends an element again on every rerun, unless the browser already holds the very
same message (its ForwardMsg cache, for messages of 10 kB or more, keyed by content hash): then
only the hash goes. So the Explore map is drawn as a figure that does not change when r_s or
r_b move (the real points, and an empty trace per class DAS produces from, see
``plots.embedding_map(produced_slots=...)``), and the produced points travel in this small
``st.components.v2`` component, whose JavaScript writes them into those traces with
``Plotly.restyle`` (the ``window.Plotly`` that Streamlit's own chart bundle sets). Plotly's
restyle event makes Streamlit's chart keep the new data as its state, so hover (``app.hover``
reads ``customdata`` as before) and box / lasso selection see the produced points as if they
had been in the figure all along. A graph whose traces hold the payload's points already (the
session's first draw, whose figure carries them, or Streamlit's redraw from its copy of the
data after a restyle) is left alone: compared by value, so the map is drawn once per change.

The payload is compact: little-endian typed arrays in base64 (float32 positions, int32 anchor
ids, uint8 rounds), grouped by the trace they belong to (its ``meta``); the links' anchor ends
are looked up among the real points the graph holds (by ``customdata[0]``).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import streamlit as st

from app.plots import LINKS_SLOT, produced_slot

_JS = r"""
function decode(b64, Type) {
  const bin = atob(b64), u8 = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
  return new Type(u8.buffer);
}

// Map positions of the real points by their index in the split (customdata[0] of the traces
// that are not produced ones, as Plotly decoded them): the anchors' ends of the links.
function realPositions(g) {
  const pos = new Map();
  for (const t of g._fullData) {
    if (typeof t.meta === 'string' && t.meta.startsWith('produced-')) continue;
    if (!t.customdata || !t.x || t.mode !== 'markers') continue;
    for (let k = 0; k < t.x.length; k++) {
      const row = t.customdata[k];
      const id = Number(row && row.length !== undefined ? row[0] : row);
      if (!pos.has(id)) pos.set(id, [Number(t.x[k]), Number(t.y[k])]);
    }
  }
  return pos;
}

export default function(component) {
  const p = component.data || {};
  // the payload's points, decoded once
  const want = (p.slots || []).map(s => ({
    slot: s.slot, xy: decode(s.xy, Float32Array), anchor: decode(s.anchor, Int32Array), round: decode(s.round, Uint8Array),
  }));
  let gd = null, timer = null, stopped = false, restyles = 0;
  // Streamlit runs this function again for each new payload without stopping the previous
  // run: the newest run for a map is the live one, and an older one retires when it notices
  // (two live ones would write their points over each other's, back and forth).
  const live = (window.__dasProducedLive = window.__dasProducedLive || {});
  const me = {};
  live[p.target] = me;

  // The traces (index, x, y, customdata) that the payload fills in, or null while the graph
  // lacks one of them (not drawn yet, or drawn from another figure).
  function updates(g) {
    const idx = [], xs = [], ys = [], cds = [];
    const lx = [], ly = [];
    const li = g.data.findIndex(t => t.meta === p.links_slot);
    const real = li >= 0 ? realPositions(g) : null;
    for (const w of want) {
      const i = g.data.findIndex(t => t.meta === w.slot);
      if (i < 0) return null;
      const n = w.anchor.length, x = new Array(n), y = new Array(n), cd = new Array(n);
      for (let k = 0; k < n; k++) {
        x[k] = w.xy[2 * k]; y[k] = w.xy[2 * k + 1]; cd[k] = [w.anchor[k], w.round[k]];
        const a = real && real.get(w.anchor[k]);
        if (a) { lx.push(a[0], x[k], NaN); ly.push(a[1], y[k], NaN); }
      }
      idx.push(i); xs.push(x); ys.push(y); cds.push(cd);
    }
    if (li >= 0) { idx.push(li); xs.push(lx); ys.push(ly); cds.push(null); }
    return {idx, xs, ys, cds};
  }

  // Whether the graph's produced traces hold exactly the payload's points: drawn so from the
  // figure (the first draw of a session carries them), filled in by us, or redrawn by Streamlit
  // from its copy of them. Compared by value (float32 positions, anchor ids, rounds), so a copy
  // counts, and a graph that holds them is not redrawn.
  function holds(g) {
    return want.every(w => {
      const t = g._fullData.find(t => t.meta === w.slot);
      const n = w.anchor.length;
      if (!t || !t.x || !t.y || t.x.length !== n || t.y.length !== n) return false;
      const cd = t.customdata || [];
      for (let k = 0; k < n; k++) {
        const row = cd[k];
        if (+t.x[k] !== w.xy[2 * k] || +t.y[k] !== w.xy[2 * k + 1] || !row
            || Number(row[0]) !== w.anchor[k] || Number(row[1]) !== w.round[k]) return false;
      }
      return true;
    });
  }

  function current() {
    if (!stopped && live[p.target] !== me) stop();
    return !stopped;
  }

  function apply() {
    if (!current()) return;
    const g = document.querySelector('.st-key-' + p.target + ' .js-plotly-plot');
    const ready = g && Array.isArray(g.data) && g._fullLayout && g._fullData && window.Plotly;
    if (!ready) { timer = setTimeout(apply, 50); return; }
    if (g !== gd) {  // a new graph (first draw, or a new figure): re-apply if it is ever redrawn without us
      if (gd && gd.removeListener) gd.removeListener('plotly_afterplot', check);
      gd = g;
      gd.on('plotly_afterplot', check);
    }
    if (holds(g)) { restyles = 0; return; }
    const u = updates(g);
    if (!u) { timer = setTimeout(apply, 50); return; }
    // a safety net: the values written are the ones compared, so one restyle settles a graph;
    // never loop on a graph that would not take them
    if (restyles++ >= 4) return;
    window.Plotly.restyle(g, {x: u.xs, y: u.ys, customdata: u.cds}, u.idx);
  }

  function check() {
    if (current() && gd && !holds(gd)) { clearTimeout(timer); timer = setTimeout(apply, 0); }
  }

  // a graph that replaces ours (Streamlit drew a new figure) gets the points too
  const obs = new MutationObserver(() => {
    if (!current()) return;
    const g = document.querySelector('.st-key-' + p.target + ' .js-plotly-plot');
    if (g && g !== gd) { clearTimeout(timer); apply(); }
  });
  function stop() {
    stopped = true;
    clearTimeout(timer);
    obs.disconnect();
    if (gd && gd.removeListener) gd.removeListener('plotly_afterplot', check);
    if (live[p.target] === me) delete live[p.target];
  }
  obs.observe(document.body, {childList: true, subtree: true});
  apply();
  return stop;
}
"""

_component: Any = None


def _b64(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.dtype(dtype)).tobytes()).decode("ascii")


def payload(target: str, slots: list[int],
            produced: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """What the component sends for the map with Streamlit key ``target``: per slot class (see
    ``plots.embedding_map(produced_slots=...)``) the points produced from it, ``(coords, labels,
    anchor ids, rounds)`` (none for ``None``). The links' anchor ends are the real points the
    map holds already (the anchor ids are their ``customdata``), so they are not sent."""
    out: list[dict[str, str]] = []
    if produced is None:
        p_xy = np.zeros((0, 2), np.float32)
        p_lab = p_anchor = p_round = np.zeros(0, np.int64)
    else:
        p_xy, p_lab, p_anchor, p_round = produced
        if len(p_round) and not 0 <= int(p_round.min()) <= int(p_round.max()) <= 255:
            raise ValueError("rounds must lie in 0..255 (they are sent as bytes)")
        stray = set(np.unique(p_lab).tolist()) - set(slots)
        if stray:
            raise ValueError(f"points produced from classes without a trace on the map: {sorted(stray)}")
    for c in sorted(set(slots)):
        sel = p_lab == c
        out.append({
            "slot": produced_slot(c),
            "xy": _b64(p_xy[sel], "<f4"),
            "anchor": _b64(p_anchor[sel], "<i4"),
            "round": _b64(p_round[sel], "u1"),
        })
    return {"target": target, "links_slot": LINKS_SLOT, "slots": out}


def show_produced(target: str, slots: list[int],
                  produced: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
                  key: str = "das-produced-layer") -> None:
    """Fill the produced-point traces of the map with Streamlit key ``target`` in the browser."""
    global _component
    if _component is None:
        _component = st.components.v2.component("das_produced_layer", js=_JS)
    _component(key=key, data=payload(target, slots, produced), height=0)


def decode_payload(data: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of a :func:`payload` by trace (``meta``) (for tests and tools): ``xy`` (n, 2),
    ``anchor`` (n,), ``round`` (n,)."""
    out = {}
    for s in data["slots"]:
        out[s["slot"]] = {
            "xy": np.frombuffer(base64.b64decode(s["xy"]), "<f4").reshape(-1, 2),
            "anchor": np.frombuffer(base64.b64decode(s["anchor"]), "<i4"),
            "round": np.frombuffer(base64.b64decode(s["round"]), "u1"),
        }
    return out
