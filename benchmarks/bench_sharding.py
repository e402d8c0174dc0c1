"""Sharding throughput per worker: the embedded corpus repeated to ~20 MB, sharded by one
single-threaded worker; prints a table, writes JSON and projects the time for 2T tokens on N cores.

    python benchmarks/bench_sharding.py [--target-mb 20] [--out-json bench_results/sharding.json]
"""
from __future__ import annotations

import os

# One tokenizer thread, set before `tokenizers` starts its pool: the figure is per core, and the
# CLI scales by processes (--workers) and machines (--num-jobs).
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from modernbert_train.data.corpus import embedded_documents  # noqa: E402
from modernbert_train.data.shard import ShardConfig, shard  # noqa: E402
from modernbert_train.data.tokenizer import train_bpe  # noqa: E402

TARGET_TOKENS = 2e12


def build_corpus(path: Path, target_bytes: int) -> int:
    """JSONL of the embedded documents repeated until `target_bytes`; each copy gets a distinct
    prefix so documents stay distinct (distinct ids, a real train/val split)."""
    docs = embedded_documents()
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target_bytes:
            for text in docs:
                line = json.dumps({"text": f"[copy {copy}] {text}"}, ensure_ascii=False) + "\n"
                fh.write(line)
                written += len(line.encode("utf-8"))
            copy += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-mb", type=float, default=20.0)
    parser.add_argument("--vocab-size", type=int, default=32768,
                        help="BPE target (the small corpus may stop short of it)")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--cores", type=int, nargs="+", default=[16, 64, 256, 1024],
                        help="core counts for the 2T-token projection")
    parser.add_argument("--out-json", type=Path, default=Path("bench_results/sharding.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-sharding-") as tmp:
        work = Path(tmp)
        corpus_bytes = build_corpus(work / "corpus.jsonl", int(args.target_mb * 1e6))
        tok = train_bpe(embedded_documents(), args.vocab_size, work / "tok")

        texts = [json.loads(line)["text"] for line in open(work / "corpus.jsonl", encoding="utf-8")]
        start = time.perf_counter()
        tokenize_tokens = sum(len(ids) for i in range(0, len(texts), 256)
                              for ids in tok.encode_batch(texts[i:i + 256]))
        tokenize_s = time.perf_counter() - start
        del texts

        summary = shard(ShardConfig(inputs=[str(work / "corpus.jsonl")], tokenizer=str(tok.path),
                                    out=str(work / "mds"), max_seq_len=args.max_seq_len,
                                    workers=1, progress=False))

    per_core = summary.tokens_per_s
    rows = [
        ("tokenize only (encode_batch)", tokenize_tokens / tokenize_s, corpus_bytes / tokenize_s),
        ("full shard: read+tokenize+pack+write", per_core, summary.bytes_in / summary.elapsed_s),
    ]
    print(f"corpus: {corpus_bytes / 1e6:.1f} MB, {summary.documents:,} documents, "
          f"{summary.content_tokens:,} tokens, vocab {tok.tokenizer_vocab_size}, "
          f"max_seq_len {args.max_seq_len}, 1 worker, 1 thread")
    print(f"{'stage':40s} {'tokens/s':>12s} {'MB/s':>8s}")
    for name, tokens_per_s, bytes_per_s in rows:
        print(f"{name:40s} {tokens_per_s:12,.0f} {bytes_per_s / 1e6:8.2f}")
    print(f"packing efficiency {summary.packing_efficiency:.4f}, {summary.sequences:,} sequences, "
          f"{summary.shards} shards, {summary.elapsed_s:.1f} s")
    print(f"\nprojection for {TARGET_TOKENS / 1e12:.0f}T tokens at {per_core:,.0f} tokens/s per core:")
    print(f"{'cores':>8s} {'hours':>10s}")
    projection = {}
    for cores in args.cores:
        hours = TARGET_TOKENS / (per_core * cores) / 3600
        projection[str(cores)] = hours
        print(f"{cores:8d} {hours:10.1f}")

    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
        "corpus_bytes": corpus_bytes, "documents": summary.documents,
        "content_tokens": summary.content_tokens, "tokenizer_vocab_size": tok.tokenizer_vocab_size,
        "max_seq_len": args.max_seq_len,
        "tokenize_only_tokens_per_s": tokenize_tokens / tokenize_s,
        "shard_tokens_per_s_per_worker": per_core,
        "shard_elapsed_s": summary.elapsed_s, "packing_efficiency": summary.packing_efficiency,
        "sequences": summary.sequences, "shards": summary.shards,
        "projection_hours_for_2T_tokens_by_cores": projection,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out_json}")


if __name__ == "__main__":
    main()
