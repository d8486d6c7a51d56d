"""difficulty-audit dashboard: `streamlit run app.py` (what `make demo` does).

The pages live in app_pages/, not pages/: Streamlit 1.67 treats a pages/ folder as a legacy
multipage app whenever a fresh server's first request is a page URL (and in AppTest on every
rerun), running the page without this script, its st.navigation or its sidebar.
"""

import streamlit as st

from app_pages.common import sidebar_run_picker

st.set_page_config(page_title="difficulty-audit", page_icon="🔎", layout="wide")

pages = [
    st.Page("app_pages/audit.py", title="Audit", icon="🚀", default=True),
    st.Page("app_pages/aum.py", title="AUM", icon="📉"),
    st.Page("app_pages/flagged.py", title="Flagged samples", icon="🏷️"),
    st.Page("app_pages/scores.py", title="Scores", icon="🧮"),
    st.Page("app_pages/datamap.py", title="Data map", icon="🗺️"),
    st.Page("app_pages/ood.py", title="OoD & uncertainty", icon="🌫️"),
]
nav = st.navigation(pages)
sidebar_run_picker()
nav.run()
