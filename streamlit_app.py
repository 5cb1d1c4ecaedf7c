"""DAS Explorer: the web app. ``make run`` opens it on the embedded demo checkpoint."""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="DAS Explorer", page_icon="🧭", layout="wide")

PAGES = [
    st.Page("app/pages/explore.py", title="Explore", icon="🗺️", default=True),
    st.Page("app/pages/das_internals.py", title="DAS internals", icon="🔬"),
    st.Page("app/pages/retrieve.py", title="Retrieve", icon="🔎"),
    st.Page("app/pages/train.py", title="Train", icon="🏋️"),
    st.Page("app/pages/compare.py", title="Compare", icon="📊"),
]

st.navigation(PAGES).run()
