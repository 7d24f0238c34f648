"""Stage step 1, pruning: the OBS solver and mask selection, the baselines, per-layer allocation, and the
calibration pass (in memory, streamed, on every rank; MoE experts)."""
