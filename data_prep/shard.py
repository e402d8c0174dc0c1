"""`python data_prep/shard.py ...`: the same CLI as `modernbert-shard` (see modernbert_train/data/shard.py)."""
import sys

from modernbert_train.data.shard import main

if __name__ == "__main__":
    sys.exit(main())
