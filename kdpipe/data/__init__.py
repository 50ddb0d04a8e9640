"""Datasets, fingerprints, replayable augmented views and input preprocessing."""

from kdpipe.data.dataset import ArrayDataset, Dataset, stratified_split
from kdpipe.data.datasets import available_builtins, load_dataset, load_folder, load_npz
from kdpipe.data.folder import FolderDataset
from kdpipe.data.preprocess import Normalize
from kdpipe.data.views import VIEW_FIELDS, ViewPolicy, apply_views, draw_view_params, plain_view_params

__all__ = [
    "VIEW_FIELDS",
    "ArrayDataset",
    "Dataset",
    "FolderDataset",
    "Normalize",
    "ViewPolicy",
    "apply_views",
    "available_builtins",
    "draw_view_params",
    "load_dataset",
    "load_folder",
    "load_npz",
    "plain_view_params",
    "stratified_split",
]
