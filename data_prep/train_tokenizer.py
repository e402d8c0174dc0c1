"""Train a byte-level BPE tokenizer (same as the `modernbert-tokenizer` command):
`python data_prep/train_tokenizer.py train --input PATH... --vocab-size N --out DIR`."""
import sys

from modernbert_train.data.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
