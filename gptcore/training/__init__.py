"""Training: the loop, the optimizer step, saved progress (resume), lr schedules, the memory-saving
layers and losses, and the metrics log every training stage writes."""
