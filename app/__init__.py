"""The Streamlit UI of DAS Explorer: pages, widgets and plot builders only. Every number it
shows is computed by ``das_core`` (and tested there)."""
