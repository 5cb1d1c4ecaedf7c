"""Image thumbnails on hover over Plotly maps.

Plotly's hover labels cannot show images, and Streamlit sends no hover events to Python. This
small ``st.components.v2`` component runs in the page, finds the Plotly graphs whose layout
carries ``meta.thumbs`` (sprite-sheet geometry from ``das_core.explorer.thumbs``), and on
``plotly_hover`` shows the hovered item's thumbnail, cut out of a sprite sheet served by
Streamlit's static file server, with its trace's name and index (Plotly's own label is hidden
while it shows). ``customdata[0]`` of a point is the item's index in the split; produced points
carry ``[anchor index, round]``.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

_JS = r"""
export default function(component) {
  const doc = document;
  let tip = doc.getElementById('das-thumb-tip');
  if (!tip) {
    tip = doc.createElement('div');
    tip.id = 'das-thumb-tip';
    tip.setAttribute('data-testid', 'das-thumb-tip');
    tip.style.cssText = 'position:fixed;pointer-events:none;z-index:100000;display:none;' +
      'background:#fff;border:1px solid #999;border-radius:4px;padding:4px;box-shadow:0 2px 8px rgba(0,0,0,.25);' +
      'font:12px sans-serif;color:#222';
    tip.innerHTML = '<div class="thumb" style="width:112px;height:112px;image-rendering:pixelated;' +
      'background-repeat:no-repeat;background-color:#000"></div><div class="text" style="max-width:160px"></div>';
    doc.body.appendChild(tip);
  }
  const SHOW = 112;
  // Each hover shows either our tooltip (and hides Plotly's label, which would repeat it) or,
  // for a point without a thumbnail (a query star, a graph without sprites), Plotly's label.
  function plotlyLabel(gd, visible) {
    const layer = gd.querySelector('.hoverlayer');
    if (layer) layer.style.visibility = visible ? '' : 'hidden';
  }
  function show(gd, ev) {
    plotlyLabel(gd, true);
    tip.style.display = 'none';
    const m = gd.layout && gd.layout.meta && gd.layout.meta.thumbs;
    const p = ev.points && ev.points[0];
    if (!m || !p || p.customdata === undefined || p.customdata === null) return;
    // rows of 2-D customdata arrive as typed arrays (plotly.py sends numpy arrays binary)
    const raw = p.customdata;
    const cd = Array.isArray(raw) || ArrayBuffer.isView(raw) ? Array.from(raw) : [raw];
    const id = Number(cd[0]);
    if (!(id >= 0) || id >= m.count) return;
    const sheet = Math.floor(id / m.per_sheet), cell = id % m.per_sheet;
    const col = cell % m.per_row, row = Math.floor(cell / m.per_row);
    const scale = SHOW / m.size;
    const th = tip.querySelector('.thumb');
    th.style.backgroundImage = 'url("' + m.base + m.files[sheet] + '")';
    th.style.backgroundSize = (m.per_row * m.size * scale) + 'px auto';
    th.style.backgroundPosition = (-col * m.size * scale) + 'px ' + (-row * m.size * scale) + 'px';
    // the trace names the class (a trace of many classes gives each point's class as its text);
    // produced points (customdata [anchor, round]) name their anchor
    const name = String((typeof p.text === 'string' && p.text) || (p.data && p.data.name) || '');
    tip.querySelector('.text').textContent = (name ? name + ' · ' : '') +
      (cd.length > 1 ? 'round ' + cd[1] + ' · anchor #' + id : '#' + id);
    plotlyLabel(gd, false);
    const e = ev.event || {};
    tip.style.left = ((e.clientX || 0) + 18) + 'px';
    tip.style.top = ((e.clientY || 0) + 18) + 'px';
    tip.style.display = 'block';
  }
  function attach() {
    doc.querySelectorAll('.js-plotly-plot').forEach(gd => {
      if (gd.__dasThumbs || typeof gd.on !== 'function') return;
      gd.__dasThumbs = true;
      gd.on('plotly_hover', ev => show(gd, ev));
      gd.on('plotly_unhover', () => { tip.style.display = 'none'; });
    });
  }
  attach();
  const obs = new MutationObserver(attach);
  obs.observe(doc.body, {childList: true, subtree: true});
  return () => { obs.disconnect(); tip.style.display = 'none'; };
}
"""

_component: Any = None


def enable_hover_thumbnails(key: str = "das-hover-thumbs") -> None:
    """Mount the hover-thumbnail behaviour once on the page (it attaches to every map)."""
    global _component
    if _component is None:
        _component = st.components.v2.component("das_hover_thumbnails", js=_JS)
    _component(key=key, data={})
