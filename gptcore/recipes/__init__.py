"""What each stage calls: pretraining, the spam classifier and its baseline, instruction finetuning,
and the LLM judge. A recipe composes the model, the data, training and inference; stages stay thin."""
