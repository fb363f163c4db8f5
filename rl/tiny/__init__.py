"""aha's embedded default: a tiny arithmetic base model (`model/`), its data generator and its pretraining."""
