"""The product catalog.

Two sources give the same product records (WebShop's "loaded" fields):
- the mirror's `documents_1k.jsonl` (`{id, contents, product}`; `product` already holds Title, Description,
  BulletPoints, Price, pricing, options, Attributes, category, query, product_category, ...);
- WebShop's raw release files: `items_shuffle*.json` (raw scraped products, converted here the way WebShop's loader
  does) with `items_ins_v2*.json` (attributes, synthetic instructions) and, optionally, `items_human_ins.json`
  (human instructions with their target options).

Every product gets a purchase price: the single listed price, 100.0 when none is listed, and a uniform draw between
the two ends of a price range. WebShop drew range prices unseeded; here they are drawn from a fixed seed so runs agree.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from webshop.paths import default_data_dir

PRICE_SEED = 0
DEFAULT_PRICE = 100.0


class CatalogError(ValueError):
    pass


@dataclass
class Catalog:
    products: list[dict[str, Any]]
    # text indexed by the search engine, aligned with `products`
    contents: list[str]
    prices: dict[str, float] = field(default_factory=dict)
    source: str = ""
    # True when the raw items_human_ins.json was loaded: only then are human goals complete
    human_loaded: bool = False

    def __post_init__(self):
        self.by_asin = {p["asin"]: p for p in self.products}
        if not self.prices:
            self.prices = purchase_prices(self.products)

    def __len__(self) -> int:
        return len(self.products)

    def __getitem__(self, asin: str) -> dict[str, Any]:
        return self.by_asin[asin]


def purchase_prices(products: list[dict[str, Any]]) -> dict[str, float]:
    rng = random.Random(PRICE_SEED)
    prices = {}
    for p in products:
        pricing = p.get("pricing") or []
        if not pricing:
            prices[p["asin"]] = DEFAULT_PRICE
        elif len(pricing) == 1:
            prices[p["asin"]] = float(pricing[0])
        else:
            prices[p["asin"]] = rng.uniform(*pricing[:2])
    return prices


_REQUIRED_FIELDS = ("asin", "Title", "Description", "BulletPoints", "Price", "pricing", "options", "Attributes",
                    "category", "query", "product_category", "name")


def load_documents(path: str | Path, attributes_path: str | Path | None = None) -> Catalog:
    """Load a `documents*.jsonl` file (one `{id, contents, product}` per line)."""
    path = Path(path)
    instructions = _load_attributes(attributes_path) if attributes_path else {}
    products, contents = [], []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise CatalogError(f"{path}:{line_no}: not valid JSON ({e})") from e
            product = doc.get("product")
            if not isinstance(product, dict):
                raise CatalogError(f"{path}:{line_no}: missing object field 'product'")
            missing = [k for k in _REQUIRED_FIELDS if k not in product]
            if missing:
                raise CatalogError(f"{path}:{line_no}: product lacks field(s) {missing}")
            product = dict(product)
            product["query"] = product["query"].lower().strip()
            product["Attributes"] = product["Attributes"] or ["DUMMY_ATTR"]  # as WebShop's loader
            _attach_instruction(product, instructions.get(product["asin"], {}))
            products.append(product)
            contents.append(doc.get("contents") or product_contents(product))
    return Catalog(products, contents, source=str(path))


def load_raw(items_path: str | Path, attributes_path: str | Path, human_path: str | Path | None = None,
             num_products: int | None = None) -> Catalog:
    """Load WebShop's raw release (`items_shuffle*.json` + `items_ins_v2*.json` [+ `items_human_ins.json`])."""
    items_path = Path(items_path)
    try:
        raw = json.loads(items_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CatalogError(f"{items_path}: not valid JSON ({e})") from e
    if not isinstance(raw, list):
        raise CatalogError(f"{items_path}: expected a JSON list of products")
    if num_products is not None:
        raw = raw[:num_products]  # the raw file is already shuffled
    instructions = _load_attributes(attributes_path)
    human = json.loads(Path(human_path).read_text(encoding="utf-8")) if human_path else {}
    seen, products = set(), []
    for i, item in enumerate(raw):
        asin = str(item.get("asin", "nan"))
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        try:
            product = convert_raw_product(item)
        except (KeyError, TypeError, ValueError) as e:
            raise CatalogError(f"{items_path}: product {i} ({asin}): bad field ({e!r})") from e
        attrs = instructions.get(asin, {})
        product["Attributes"] = attrs.get("attributes") or ["DUMMY_ATTR"]
        _attach_instruction(product, attrs)
        if asin in human:
            product["instructions"] = human[asin]
        products.append(product)
    return Catalog(products, [product_contents(p) for p in products], source=str(items_path),
                   human_loaded=bool(human_path))


def convert_raw_product(item: dict[str, Any]) -> dict[str, Any]:
    """Raw scraped fields -> the fields the site shows and the reward reads (as WebShop's loader)."""
    p = dict(item)
    p["Title"] = p["name"]
    p["Description"] = p.get("full_description") or ""
    small = p.get("small_description") or []
    p["BulletPoints"] = small if isinstance(small, list) else [small]
    p["Reviews"], p["Rating"] = [], "N.A."
    pricing = p.get("pricing")
    if isinstance(pricing, list) and pricing:
        prices = [float(x) for x in pricing]
    elif isinstance(pricing, str) and pricing.strip():
        prices = [float(Decimal(re.sub(r"[^\d.]", "", x))) for x in pricing.split("$")[1:]]
    else:
        prices = []
    if not prices:
        p["pricing"], p["Price"] = [DEFAULT_PRICE], f"${DEFAULT_PRICE}"
    elif len(prices) == 1:
        p["pricing"], p["Price"] = prices, f"${prices[0]}"
    else:
        p["pricing"], p["Price"] = prices[:2], f"${prices[0]} to ${prices[1]}"
    options, option_to_image = {}, {}
    for name, contents in (p.get("customization_options") or {}).items():
        if contents is None:
            continue
        values = []
        for c in contents:
            value = c["value"].strip().replace("/", " | ").lower()
            values.append(value)
            option_to_image[value] = c.get("image")
        options[name.lower()] = values
    p["options"], p["option_to_image"] = options, option_to_image
    p["MainImage"] = (p.get("images") or [None])[0]
    p["query"] = p.get("query", "").lower().strip()
    p.setdefault("category", "")
    p.setdefault("product_category", "")
    return p


def product_contents(product: dict[str, Any]) -> str:
    """Searchable text of one product: title, description, bullet points and option values."""
    options = " ".join(v for values in product.get("options", {}).values() for v in values)
    parts = [product["Title"], product["Description"], " ".join(product["BulletPoints"]), options]
    return " ".join(x for x in parts if x).lower()


def _load_attributes(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CatalogError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected an object mapping ASIN -> attributes")
    return data


def _attach_instruction(product: dict[str, Any], attrs: dict[str, Any]) -> None:
    if attrs.get("instruction"):
        product["instruction_text"] = attrs["instruction"]
        product["instruction_attributes"] = attrs.get("instruction_attributes") or []


def find_data_files(data_dir: Path) -> dict[str, Path]:
    """Which catalog files are present: the full raw release wins over the 1k documents."""
    files = {}
    for name in ("items_shuffle.json", "items_shuffle_1000.json"):
        if (data_dir / name).exists():
            files["items"] = data_dir / name
            break
    for name in ("items_ins_v2.json", "items_ins_v2_1000.json"):
        if (data_dir / name).exists():
            files["attributes"] = data_dir / name
            break
    if (data_dir / "items_human_ins.json").exists():
        files["human"] = data_dir / "items_human_ins.json"
    if (data_dir / "documents_1k.jsonl").exists():
        files["documents"] = data_dir / "documents_1k.jsonl"
    return files


def load_catalog(data_dir: str | Path | None = None) -> Catalog:
    """The catalog in `data_dir`: the raw release when present, else documents_1k.jsonl."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    files = find_data_files(data_dir)
    if "items" in files and "attributes" in files:
        return load_raw(files["items"], files["attributes"], files.get("human"))
    if "documents" in files:
        return load_documents(files["documents"], files.get("attributes"))
    raise CatalogError(f"{data_dir}: no WebShop catalog (need documents_1k.jsonl, or items_shuffle*.json with "
                       "items_ins_v2*.json); run `python -m scripts.fetch_data` or set WEBSHOP_DATA")
