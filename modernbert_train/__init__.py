"""modernbert-train: pretrain ModernBERT encoders from scratch on packed varlen batches."""
__version__ = "0.1.0"
