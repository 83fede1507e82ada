"""What a run reports: the metrics writer and reader (`log`), model FLOPs utilisation (`mfu`) and the
one-PNG dashboard (`dashboard`)."""
