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
had been in the figure all along.

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
  const token = {};  // this payload; a graph holds it when its slot traces carry it
  let gd = null, timer = null, stopped = false;

  // The traces (index, x, y, customdata) that the payload fills in, or null while the graph
  // lacks one of them (not drawn yet, or drawn from another figure).
  function updates(g) {
    const idx = [], xs = [], ys = [], cds = [];
    const lx = [], ly = [];
    const li = g.data.findIndex(t => t.meta === p.links_slot);
    const real = li >= 0 ? realPositions(g) : null;
    for (const s of p.slots || []) {
      const i = g.data.findIndex(t => t.meta === s.slot);
      if (i < 0) return null;
      const xy = decode(s.xy, Float32Array);
      const anchor = decode(s.anchor, Int32Array), round = decode(s.round, Uint8Array);
      const n = anchor.length, x = new Array(n), y = new Array(n), cd = new Array(n);
      for (let k = 0; k < n; k++) {
        x[k] = xy[2 * k]; y[k] = xy[2 * k + 1]; cd[k] = [anchor[k], round[k]];
        const a = real && real.get(anchor[k]);
        if (a) { lx.push(a[0], x[k], NaN); ly.push(a[1], y[k], NaN); }
      }
      idx.push(i); xs.push(x); ys.push(y); cds.push(cd);
    }
    if (li >= 0) { idx.push(li); xs.push(lx); ys.push(ly); cds.push(null); }
    return {idx, xs, ys, cds};
  }

  function holds(g) {
    return (p.slots || []).every(s => { const t = g.data.find(t => t.meta === s.slot); return t && t._dasProduced === token; });
  }

  function apply() {
    if (stopped) return;
    const g = document.querySelector('.st-key-' + p.target + ' .js-plotly-plot');
    const ready = g && Array.isArray(g.data) && g._fullLayout && g._fullData && window.Plotly;
    const u = ready ? updates(g) : null;
    if (!u) { timer = setTimeout(apply, 50); return; }
    if (g !== gd) {  // a new graph (first draw, or a new figure): re-apply if it is ever redrawn without us
      if (gd && gd.removeListener) gd.removeListener('plotly_afterplot', check);
      gd = g;
      gd.on('plotly_afterplot', check);
    }
    if (holds(g)) return;
    for (const i of u.idx) g.data[i]._dasProduced = token;
    window.Plotly.restyle(g, {x: u.xs, y: u.ys, customdata: u.cds}, u.idx);
  }

  function check() {
    if (!stopped && gd && !holds(gd)) { clearTimeout(timer); timer = setTimeout(apply, 0); }
  }

  // a graph that replaces ours (Streamlit drew a new figure) gets the points too
  const obs = new MutationObserver(() => {
    const g = document.querySelector('.st-key-' + p.target + ' .js-plotly-plot');
    if (g && g !== gd) { clearTimeout(timer); apply(); }
  });
  obs.observe(document.body, {childList: true, subtree: true});
  apply();
  return () => {
    stopped = true;
    clearTimeout(timer);
    obs.disconnect();
    if (gd && gd.removeListener) gd.removeListener('plotly_afterplot', check);
  };
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
