"""Datasets and loaders. Everything here returns CPU tensors; the training loop moves them.

Submodules: `text` (LM windows), `sms` (the spam collection), `instructions` (Alpaca pairs), `loader`
(the resumable batch sampler). Import them directly; this package file imports nothing, so a stage
depends only on the data modules it uses.
"""
