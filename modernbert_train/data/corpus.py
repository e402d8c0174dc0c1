"""The embedded default corpus: the topic help texts of the standard library's `pydoc_data.topics`
(about 0.47 MB of English prose and Python code), so the demo runs with no download."""
from __future__ import annotations

import json
import os
from pathlib import Path


def embedded_documents() -> list[str]:
    """One document per pydoc topic, ordered by topic name, stripped, empty ones left out."""
    from pydoc_data.topics import topics

    texts = (topics[name].strip() for name in sorted(topics))
    return [text for text in texts if text]


def write_embedded_corpus(path: Path) -> Path:
    """Write the embedded documents as JSONL (`{"text": ...}` per line) to `path`. An existing file
    with the same content is left untouched (same mtime), so repeated demo runs do not re-shard."""
    path = Path(path)
    content = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n"
                      for text in embedded_documents())
    if path.is_file() and path.read_text(encoding="utf-8") == content:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(content, encoding="utf-8")
    os.replace(partial, path)  # readers never see a half-written corpus
    return path
