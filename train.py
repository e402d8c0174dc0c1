"""Entry point for `composer train.py yamls/base.yaml [key=value ...]` and `python train.py ...`."""
from modernbert_train.train.cli import main

# Composer spawns upload processes: the guard keeps them from re-running training.
if __name__ == "__main__":
    raise SystemExit(main())
