"""difficulty-audit dashboard: `streamlit run app.py` (what `make demo` does).

The pages live in app_pages/, not pages/: Streamlit 1.67 treats a pages/ folder as a legacy
multipage app whenever a fresh server's first request is a page URL (and in AppTest on every
rerun), running the page without this script, its st.navigation or its sidebar.
"""

import importlib.machinery

import streamlit as st

from app_pages.common import require_access, sidebar_run_picker

# Named __main__ by its spec, so that decoding workers started by forkserver (engine.data.pipeline, chosen in this
# multi-threaded server instead of fork) do not import and run this script again.
__spec__ = importlib.machinery.ModuleSpec("__main__", None)

st.set_page_config(page_title="difficulty-audit", page_icon=":material/search:", layout="wide")

pages = [
    st.Page("app_pages/audit.py", title="Audit", icon=":material/rocket_launch:", default=True),
    st.Page("app_pages/aum.py", title="AUM", icon=":material/show_chart:"),
    st.Page("app_pages/flagged.py", title="Flagged samples", icon=":material/flag:"),
    st.Page("app_pages/scores.py", title="Scores", icon=":material/functions:"),
    st.Page("app_pages/datamap.py", title="Data map", icon=":material/scatter_plot:"),
    st.Page("app_pages/ood.py", title="OoD & uncertainty", icon=":material/blur_on:"),
]
require_access()  # sign-in and roles when configured (engine.jobs.access); nothing in local mode
nav = st.navigation(pages)
sidebar_run_picker()
nav.run()
