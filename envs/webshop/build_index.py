"""Build and save the BM25 search index for the WebShop catalog.

    python -m webshop.build_index [--data_dir data/webshop] [--index_dir DIR]

Default index folder: <data_dir>/index_1k for the 1k catalog (index_<n> for others). Rebuilds only when the
catalog changed (or with --force).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from webshop.catalog import load_catalog
from webshop.paths import default_data_dir
from webshop.search import SearchEngine, catalog_fingerprint, default_index_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=None, help="WebShop data folder (default: $WEBSHOP_DATA "
                        "or data/webshop)")
    parser.add_argument("--index_dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even when the saved index is up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data_dir = args.data_dir or default_data_dir()
    start = time.perf_counter()
    catalog = load_catalog(data_dir)
    index_dir = args.index_dir or default_index_dir(data_dir, catalog)
    fingerprint = catalog_fingerprint(catalog)
    meta = index_dir / "fingerprint.json"
    if not args.force and meta.exists() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
        print(f"webshop index {index_dir} is up to date ({len(catalog)} products)")
        return
    engine = SearchEngine.build([p["asin"] for p in catalog.products], catalog.contents)
    engine.save(index_dir, fingerprint)
    print(f"webshop index: {len(catalog)} products -> {index_dir} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
