"""Graph search (SPEC §6): ASHA over the node models and edge gates of a Knowledge Transfer Graph.

One Optuna study, any number of workers (processes, or machines) attached to one storage.
A trial samples the model of every node but node 0 and the gate of each of the M² edges
(optionally of the feature edges too; node 0 may be the ensemble of the others),
trains the graph with :func:`timm_dcl.trainer.train_graph`, and reports node 0's top-1 on a
validation split held out of the training data after every epoch, so that the
SuccessiveHalvingPruner can stop it early. The final report then retrains the best graphs and
the baselines over seeds on the whole training split and scores them on the test split.

Modules, one job each: :mod:`.space` (what a trial samples, canonical graphs, baselines),
:mod:`.storage` (storages, heartbeats, the study), :mod:`.worker` (the worker loop),
:mod:`.summary` (the search's outputs), :mod:`.report` (the final report), :mod:`.plots`.
"""
from ..pretrained import find_pretrained, pretrained_path, retarget_pretrained
from .plots import plot_report, plot_rungs
from .report import ReportSettings, run_report
from .space import (DEFAULT_CANDIDATES, DEFAULT_TARGET, Baseline, CanonicalGraph, InvalidGraph, SearchSpace,
                    canonical_feature_gates, canonical_gates, canonical_graph, graph_text, split_key)
from .storage import (JournalHeartbeatStorage, StorageError, fail_stale, make_pruner, make_sampler, open_storage,
                      open_study, rung_epochs, search_settings)
from .summary import ranked_trials, top_trials, write_summary, write_trials_csv
from .worker import SearchWorker, WorkerInfo, enqueue_baselines, isolate_worker, trial_key

__all__ = [
    "DEFAULT_CANDIDATES", "DEFAULT_TARGET", "Baseline", "CanonicalGraph", "InvalidGraph", "SearchSpace",
    "canonical_feature_gates", "canonical_gates", "canonical_graph", "graph_text", "split_key",
    "JournalHeartbeatStorage", "StorageError", "fail_stale", "make_pruner", "make_sampler", "open_storage",
    "open_study", "rung_epochs", "search_settings",
    "SearchWorker", "WorkerInfo", "enqueue_baselines", "isolate_worker", "trial_key",
    "ranked_trials", "top_trials", "write_summary", "write_trials_csv",
    "ReportSettings", "run_report", "plot_report", "plot_rungs",
    "find_pretrained", "pretrained_path", "retarget_pretrained",
]
