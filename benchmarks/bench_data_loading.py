"""Data-loading throughput: collate + masking on one core, and the full DataLoader from local shards.

    python benchmarks/bench_data_loading.py [--microbatch-seqs 96 --max-seq-len 1024 --out-json ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from modernbert_train.data.loader import LoaderConfig, StreamConfig, build_chunk_dataloader, collate_chunk
from modernbert_train.data.masking import MaskingConfig, MLMMasker
from modernbert_train.data.synthetic import tokenizer_sequences, write_dataset
from modernbert_train.data.tokenizer import TextTokenizer

VOCAB = 50_368  # ModernBERT's tokenizer size: realistic id range for the random replacements


@dataclass(frozen=True)
class Result:
    name: str
    chunks: int
    seconds: float
    chunk_tokens_per_s: float  # T = microbatch_seqs * max_seq_len per chunk, padding included
    real_tokens_per_s: float


def packed_samples(tokenizer: TextTokenizer, num_samples: int, max_seq_len: int, seed: int) -> list[dict]:
    """The synthetic corpus's packed sequences (data/synthetic.py) as the loader's samples."""
    return [{"input_ids": seq.input_ids, "doc_lens": seq.doc_lens, "doc_ids": seq.doc_ids, "sample_idx": i}
            for i, seq in enumerate(tokenizer_sequences(tokenizer, num_samples, max_seq_len=max_seq_len,
                                                        seed=seed))]


def bench_collate(tokenizer: TextTokenizer, samples, *, microbatch_seqs: int, max_seq_len: int,
                  repeats: int) -> Result:
    pad = tokenizer.special.pad
    masker = MLMMasker(MaskingConfig(), mask_id=tokenizer.special.mask, special_ids=tokenizer.special_ids,
                       vocab_size=tokenizer.tokenizer_vocab_size, pad_id=pad, seed=0)
    groups = [samples[i:i + microbatch_seqs] for i in range(0, len(samples) - microbatch_seqs + 1, microbatch_seqs)]
    collate_chunk(groups[0], max_seq_len=max_seq_len, microbatch_seqs=microbatch_seqs, pad_id=pad,
                  masker=masker, epoch=0)  # warm-up
    real = chunks = 0
    start = time.perf_counter()
    for epoch in range(repeats):
        for group in groups:
            chunk = collate_chunk(group, max_seq_len=max_seq_len, microbatch_seqs=microbatch_seqs,
                                  pad_id=pad, masker=masker, epoch=epoch)
            real += int(chunk["num_tokens"])
            chunks += 1
    seconds = time.perf_counter() - start
    return Result("collate+masking (1 core)", chunks, seconds,
                  chunks * microbatch_seqs * max_seq_len / seconds, real / seconds)


def bench_dataloader(tokenizer: TextTokenizer, local: str, *, num_workers: int, microbatch_seqs: int,
                     max_seq_len: int) -> Result:
    cfg = LoaderConfig(streams=(StreamConfig(local=local),), split="train", max_seq_len=max_seq_len,
                       microbatch_seqs=microbatch_seqs, mask_rate=0.3, seed=0, num_workers=num_workers)
    loader = build_chunk_dataloader(cfg, special=tokenizer.special, special_ids=tokenizer.special_ids,
                                    vocab_size=tokenizer.tokenizer_vocab_size)
    real = chunks = 0
    start = time.perf_counter()  # includes worker start-up and shard decompression: a real epoch start
    for chunk in loader:
        real += int(chunk["num_tokens"])
        chunks += 1
    seconds = time.perf_counter() - start
    return Result(f"DataLoader, {num_workers} workers", chunks, seconds,
                  chunks * microbatch_seqs * max_seq_len / seconds, real / seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--microbatch-seqs", type=int, default=96)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--collate-chunks", type=int, default=8, help="distinct chunks for the collate benchmark")
    parser.add_argument("--collate-repeats", type=int, default=3)
    parser.add_argument("--shard-chunks", type=int, default=16, help="chunks per epoch in the DataLoader benchmark")
    parser.add_argument("--out-json", default="bench_results/data_loading.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_dataset(tmp, num_sequences=args.microbatch_seqs * args.shard_chunks,
                                max_seq_len=args.max_seq_len, vocab_size=VOCAB, seed=0)
        tokenizer = dataset.tokenizer
        samples = packed_samples(tokenizer, args.microbatch_seqs * args.collate_chunks, args.max_seq_len, seed=1)
        results = [bench_collate(tokenizer, samples, microbatch_seqs=args.microbatch_seqs,
                                 max_seq_len=args.max_seq_len, repeats=args.collate_repeats)]
        for num_workers in (0, 2):
            results.append(bench_dataloader(tokenizer, tmp, num_workers=num_workers,
                                            microbatch_seqs=args.microbatch_seqs, max_seq_len=args.max_seq_len))

    print(f"chunk = {args.microbatch_seqs} x {args.max_seq_len} tokens")
    print(f"{'benchmark':<28} {'chunks':>7} {'seconds':>8} {'chunk tok/s':>13} {'real tok/s':>13}")
    for r in results:
        print(f"{r.name:<28} {r.chunks:>7} {r.seconds:>8.2f} {r.chunk_tokens_per_s:>13,.0f} {r.real_tokens_per_s:>13,.0f}")
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"microbatch_seqs": args.microbatch_seqs, "max_seq_len": args.max_seq_len,
                               "machine": platform.processor() or platform.machine(),
                               "cpu_count": os.cpu_count(),
                               "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
