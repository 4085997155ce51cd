"""Evaluation metrics over decoded clips, as plain functions of uint8 ``clips_BTHWC`` ([B, T, H, W, 3]).

* Fréchet distances (:mod:`.frechet`): :class:`FrechetDistance` (streaming, mergeable across workers),
  :func:`fvd` / :func:`fid` over a pluggable feature network — :class:`I3DFeatures` (Kinetics-400
  I3D, original FVD), :class:`InceptionFeatures` (FID), :class:`DomainVideoEncoder` (offline
  "domain FVD", trained by :func:`train_domain_encoder`). Weights come only from a path or bucket;
  a missing file raises :class:`MissingWeightsError` naming it.
* VBench-style dimensions (:mod:`.vbench`): :func:`vbench_report` → ``{dim: {"value", "backend"}}``
  with every value labelled ``"vbench"`` (exact definition) or ``"offline-proxy"``.
* Portrait checks (:mod:`.portrait`): :func:`face_detection_rate`, :func:`face_stability`,
  :func:`factor_agreement` (synthetic clips vs their known generative factors).
"""

from w2svd.metrics.clips import as_clips_BTHWC
from w2svd.metrics.domain import DomainVideoEncoder, factor_targets, train_domain_encoder
from w2svd.metrics.frechet import FrechetDistance, fid, frechet_distance, fvd
from w2svd.metrics.i3d import I3DFeatures, InceptionI3d
from w2svd.metrics.inception import InceptionFeatures
from w2svd.metrics.portrait import face_detection_rate, face_stability, factor_agreement
from w2svd.metrics.vbench import DIMENSIONS, vbench_report
from w2svd.metrics.weights import MissingWeightsError

__all__ = [
    "DIMENSIONS",
    "DomainVideoEncoder",
    "FrechetDistance",
    "I3DFeatures",
    "InceptionFeatures",
    "InceptionI3d",
    "MissingWeightsError",
    "as_clips_BTHWC",
    "face_detection_rate",
    "face_stability",
    "factor_agreement",
    "factor_targets",
    "fid",
    "frechet_distance",
    "fvd",
    "train_domain_encoder",
    "vbench_report",
]
