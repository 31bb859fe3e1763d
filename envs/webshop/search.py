"""BM25 product search with bm25s.

Parameters follow the Lucene defaults WebShop's pyserini index used: k1=0.9, b=0.4, Porter stemming and an English
stop-word list. A search returns up to 50 ASINs (WebShop's top-k), best first; products that share no term with the
query are not returned.

The index is saved as a folder (bm25s arrays + `asins.json` + `fingerprint.json`); `SearchEngine.for_catalog` loads
it when its fingerprint matches the catalog and otherwise builds it in memory (and saves it when asked).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import bm25s
import Stemmer

from webshop.catalog import Catalog

log = logging.getLogger(__name__)

TOP_K = 50
K1, B = 0.9, 0.4
_stemmer = Stemmer.Stemmer("porter")


def tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer, return_ids=False, show_progress=False)


def catalog_fingerprint(catalog: Catalog) -> str:
    h = hashlib.sha256()
    for asin, text in zip((p["asin"] for p in catalog.products), catalog.contents):
        h.update(asin.encode())
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


class SearchEngine:
    def __init__(self, retriever: bm25s.BM25, asins: list[str]):
        self.retriever = retriever
        self.asins = asins
        self._vocab = retriever.vocab_dict

    @classmethod
    def build(cls, asins: list[str], contents: list[str]) -> "SearchEngine":
        retriever = bm25s.BM25(k1=K1, b=B, method="lucene")
        retriever.index(tokenize(contents), show_progress=False)
        return cls(retriever, list(asins))

    @classmethod
    def load(cls, index_dir: str | Path) -> "SearchEngine":
        index_dir = Path(index_dir)
        retriever = bm25s.BM25.load(index_dir, show_progress=False)
        asins = json.loads((index_dir / "asins.json").read_text())
        return cls(retriever, asins)

    def save(self, index_dir: str | Path, fingerprint: str) -> None:
        """Write atomically: build in a temporary sibling folder, then swap it in."""
        index_dir = Path(index_dir)
        index_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=index_dir.name + ".", dir=index_dir.parent))
        try:
            self.retriever.save(tmp, show_progress=False)
            (tmp / "asins.json").write_text(json.dumps(self.asins))
            (tmp / "fingerprint.json").write_text(json.dumps({"fingerprint": fingerprint, "docs": len(self.asins)}))
            if index_dir.exists():
                shutil.rmtree(index_dir)
            os.replace(tmp, index_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def for_catalog(cls, catalog: Catalog, index_dir: str | Path | None = None, save: bool = False) -> "SearchEngine":
        fingerprint = catalog_fingerprint(catalog)
        if index_dir is not None:
            index_dir = Path(index_dir)
            meta = index_dir / "fingerprint.json"
            if meta.exists() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
                return cls.load(index_dir)
            log.warning("webshop: no up-to-date search index at %s; building it for %d products (%s)",
                        index_dir, len(catalog), "saving it" if save else "in memory")
        engine = cls.build([p["asin"] for p in catalog.products], catalog.contents)
        if save and index_dir is not None:
            engine.save(index_dir, fingerprint)
        return engine

    def search(self, query: str, k: int = TOP_K) -> list[str]:
        tokens = [t for t in tokenize([query])[0] if t in self._vocab]
        if not tokens:
            return []
        k = min(k, len(self.asins))
        docs, scores = self.retriever.retrieve([tokens], k=k, show_progress=False, n_threads=1)
        return [self.asins[d] for d, s in zip(docs[0], scores[0]) if s > 0]


def default_index_dir(data_dir: Path, catalog: Catalog) -> Path:
    """data/webshop/index_1k for the 1k catalog, index_<n> otherwise."""
    n = len(catalog)
    return data_dir / ("index_1k" if n == 1000 else f"index_{n}")
