"""difficulty-audit dashboard: `streamlit run app.py` (what `make demo` does)."""

import streamlit as st

st.set_page_config(page_title="difficulty-audit", page_icon="🔎", layout="wide")

pages = [
    st.Page("pages/audit.py", title="Audit", icon="🚀", default=True),
    st.Page("pages/aum.py", title="AUM", icon="📉"),
    st.Page("pages/flagged.py", title="Flagged samples", icon="🏷️"),
    st.Page("pages/datamap.py", title="Data map", icon="🗺️"),
]
nav = st.navigation(pages)
nav.run()  # each page draws the sidebar run picker itself (pages.common.sidebar_run_picker)
