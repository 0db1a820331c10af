"""finetune-trainer: the training program the FineTuneJob pods run (`python -m finetune_trainer`)."""
