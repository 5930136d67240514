"""The training loop of this project and its samples: shipped with the package (`pitome-export
finetune` runs it) and used by the shipped models' training scripts in `pipelines/training`."""
