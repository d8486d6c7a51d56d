"""The engine as the dashboard's pages see it: every name a page uses, in one import.

Pages (``app.py``, ``app_pages/``) import from here and from ``engine`` (the public API) only, so the
engine's subpackages can be reorganised without touching a page, and this file lists the whole surface
the dashboard depends on. Nothing is defined here; each name lives in the module named on its import.
"""

from __future__ import annotations

from engine.data.dataroot import (
    PathRefused,
    data_root,
    resolve_user_path,
)
from engine.data.datasets import (
    DatasetError,
)
from engine.data.images import (
    ImageError,
    SampleImages,
    read_under_root,
    thumbnail_png,
)
from engine.data.uploads import (
    extract_image_zip,
)
from engine.jobs.access import (
    NOBODY,
    SIGNED_OUT,
    identity,
    may,
    reviewer_name,
    role_of,
    sign_in_configured,
)
from engine.jobs.manager import (
    JobManager,
)
from engine.jobs.ownership import (
    describe,
    owner_of,
)
from engine.ood.evaluate import (
    load_report,
    load_results,
)
from engine.review.cleaned import (
    cleaned_zip,
)
from engine.review.export import (
    export_bytes,
    export_filename,
    to_csv_bytes,
)
from engine.review.policy import (
    POLICY_FILE,
    Policy,
    PolicyError,
    available_scores,
    caption,
    decision_for,
    direction_label,
    load_policy,
    save_policy,
    score_values,
    summary_line,
    suspicious_of,
)
from engine.review.reviews import (
    DECISION_CODES,
    DecisionArrays,
    ReviewStore,
    agreement,
    new_batch_id,
)
from engine.scores.confusion import (
    label_matrix,
    per_class_table,
)
from engine.scores.correlations import (
    METHODS,
    correlation_matrix,
    topk_jaccard,
)
from engine.scores.extra import (
    EXTRA,
)
from engine.scores.metrics import (
    flag_metrics,
    ranking_auroc,
)
from engine.scores.predefined import (
    MAX_BYTES,
    PREDEFINED_FILE,
    PredefinedError,
    directions,
    guess_columns,
    join_to_run,
    load_from_run,
    parse_csv,
    save_to_run,
    validate,
)
from engine.scores.registry import (
    REGISTRY,
    oriented,
)
from engine.store.runs import (
    Run,
    RunError,
    delete_run,
    list_runs,
    resume_problem,
    runs_root,
)
from engine.store.views import (
    common_edges,
    first_kept_pass,
    histogram,
    label_errors,
    live_scores,
    margin_bands,
    margin_sample,
    nearest_neighbours,
    per_class,
    subsample,
    training_curves,
)
from engine.training.config import (
    LOADERS,
    MODELS,
    AuditConfig,
    ConfigError,
    parse_class_list,
    torchvision_architectures,
)
from engine.training.retrain import load as load_retrain
from engine.training.retrain import verdict as retrain_verdict

__all__ = [
    "AuditConfig",
    "ConfigError",
    "DECISION_CODES",
    "DatasetError",
    "DecisionArrays",
    "EXTRA",
    "ImageError",
    "JobManager",
    "LOADERS",
    "MAX_BYTES",
    "METHODS",
    "MODELS",
    "NOBODY",
    "POLICY_FILE",
    "PREDEFINED_FILE",
    "PathRefused",
    "Policy",
    "PolicyError",
    "PredefinedError",
    "REGISTRY",
    "ReviewStore",
    "Run",
    "RunError",
    "SIGNED_OUT",
    "SampleImages",
    "agreement",
    "available_scores",
    "caption",
    "cleaned_zip",
    "common_edges",
    "correlation_matrix",
    "data_root",
    "decision_for",
    "delete_run",
    "describe",
    "direction_label",
    "directions",
    "export_bytes",
    "export_filename",
    "extract_image_zip",
    "first_kept_pass",
    "flag_metrics",
    "guess_columns",
    "histogram",
    "identity",
    "join_to_run",
    "label_errors",
    "label_matrix",
    "list_runs",
    "live_scores",
    "load_from_run",
    "load_policy",
    "load_report",
    "load_results",
    "load_retrain",
    "margin_bands",
    "margin_sample",
    "may",
    "nearest_neighbours",
    "new_batch_id",
    "oriented",
    "owner_of",
    "parse_class_list",
    "parse_csv",
    "per_class",
    "per_class_table",
    "ranking_auroc",
    "read_under_root",
    "resolve_user_path",
    "resume_problem",
    "retrain_verdict",
    "reviewer_name",
    "role_of",
    "runs_root",
    "save_policy",
    "save_to_run",
    "score_values",
    "sign_in_configured",
    "subsample",
    "training_curves",
    "summary_line",
    "suspicious_of",
    "thumbnail_png",
    "to_csv_bytes",
    "topk_jaccard",
    "torchvision_architectures",
    "validate",
]
