"""Datasets and loaders. Everything here returns CPU tensors; the training loop moves them."""

from gptcore.data.loader import ResumableBatchSampler, make_loader
from gptcore.data.text import TokenWindowDataset, build_text_loaders, split_text

__all__ = ["ResumableBatchSampler", "make_loader", "TokenWindowDataset", "build_text_loaders", "split_text"]
