"""Train a byte-level BPE tokenizer: `python data_prep/train_tokenizer.py train --input ... --vocab-size N
--out DIR` (same as the `modernbert-tokenizer` command)."""
import sys

from modernbert_train.data.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
