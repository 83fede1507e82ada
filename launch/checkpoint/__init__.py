"""What a run leaves on disk and reads back: crash-safe checkpoints (`store`) written as JSON plus
safetensors (`state_files`), what a resume may change (`resume`), the run directory and its lock
(`run_dir`) and loading a trained model for use (`pretrained`)."""
