"""DAS Explorer: the web app. ``make run`` opens it on the embedded demo checkpoint."""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="DAS Explorer", page_icon="🧭", layout="wide")

PAGES = [
    st.Page("app/pages/explore.py", title="Explore", icon="🗺️", default=True),
    st.Page("app/pages/das_internals.py", title="DAS internals", icon="🔬"),
    st.Page("app/pages/retrieve.py", title="Retrieve", icon="🔎"),
    st.Page("app/pages/train.py", title="Train", icon="🏋️"),
    st.Page("app/pages/sweeps.py", title="Sweeps", icon="🎯"),
    st.Page("app/pages/compare.py", title="Compare", icon="📊"),
    st.Page("app/pages/timeline.py", title="Timeline", icon="🎞️"),
]

try:
    st.navigation(PAGES).run()
except Exception as exc:  # the last resort: one short message, the traceback in a log file
    from das_core.crashlog import last_resort_message

    st.error(last_resort_message(exc, "this page"))
