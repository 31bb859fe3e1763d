"""WebShop speed: search latency and env step latency on the 1k catalog, search latency on a large synthetic one.

    python -m bench.bench_webshop [--queries 1000] [--big 100000] [--episodes 200]

The large catalog is made from the 1k one: copy i of product p keeps a random 80% of p's words plus 20 words of
another product, under a new ASIN, so documents differ and posting lists grow as in a real catalog.
Prints a table and writes bench/results/webshop.json.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

from eval_agent.paths import webshop_data_dir
from fastchat.records import write_json_atomic
from webshop.oracle import load_query_map, oracle_plan
from webshop.search import SearchEngine
from webshop.text_env import WebShopTextEnv, shared_shop

RESULTS = Path(__file__).resolve().parent / "results" / "webshop.json"


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in samples_s)
    return {"p50_ms": statistics.median(ms), "p95_ms": ms[int(0.95 * (len(ms) - 1))], "mean_ms": statistics.mean(ms),
            "n": len(ms)}


def bench_queries(shop, n: int) -> list[str]:
    query_map = load_query_map(webshop_data_dir() / "goal_query_map.json")
    queries = [q for qs in query_map.values() for q in qs] + [g["instruction_text"] for g in shop.goals]
    random.Random(0).shuffle(queries)
    return queries[:n]


def time_search(engine: SearchEngine, queries: list[str]) -> dict[str, float]:
    engine.search(queries[0])  # warm up
    samples = []
    for q in queries:
        t = time.perf_counter()
        engine.search(q)
        samples.append(time.perf_counter() - t)
    return percentiles(samples)


def time_env_steps(shop, episodes: int) -> dict[str, dict[str, float]]:
    env = WebShopTextEnv(shop=shop)
    query_map = load_query_map(webshop_data_dir() / "goal_query_map.json")
    by_kind: dict[str, list[float]] = {"search": [], "click": [], "reset": []}
    for idx in range(500, 500 + episodes):
        plan = oracle_plan(shop, shop.goals[idx], query_map)
        t = time.perf_counter()
        env.reset(options={"goal_idx": idx})
        by_kind["reset"].append(time.perf_counter() - t)
        for _, action in plan:
            t = time.perf_counter()
            env.step(action)
            by_kind[action.split("[")[0]].append(time.perf_counter() - t)
    out = {k: percentiles(v) for k, v in by_kind.items()}
    out["all_steps"] = percentiles(by_kind["search"] + by_kind["click"])
    return out


def synthetic_catalog(shop, size: int) -> tuple[list[str], list[str]]:
    rng = random.Random(0)
    base = [c.split() for c in shop.catalog.contents]
    asins, contents = [], []
    for i in range(size):
        words = base[i % len(base)]
        other = base[rng.randrange(len(base))]
        kept = [w for w in words if rng.random() < 0.8] + rng.sample(other, min(20, len(other)))
        asins.append(f"S{i:09d}")
        contents.append(" ".join(kept))
    return asins, contents


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--big", type=int, default=100_000, help="products in the synthetic catalog (0: skip)")
    parser.add_argument("--episodes", type=int, default=200, help="oracle episodes for the step latency")
    args = parser.parse_args(argv)

    shop = shared_shop()
    queries = bench_queries(shop, args.queries)
    report = {"machine": platform.processor() or platform.machine(), "queries": len(queries),
              "search_1k": time_search(shop.search_engine, queries),
              "env_1k": time_env_steps(shop, args.episodes)}
    if args.big:
        asins, contents = synthetic_catalog(shop, args.big)
        t = time.perf_counter()
        big = SearchEngine.build(asins, contents)
        report["index_build_s_big"] = time.perf_counter() - t
        report["big_size"] = args.big
        report["search_big"] = time_search(big, queries)

    rows = [("search, 1k catalog", report["search_1k"])]
    rows += [(f"env {k}, 1k catalog", v) for k, v in report["env_1k"].items()]
    if args.big:
        rows.append((f"search, {args.big:,} products", report["search_big"]))
    print(f"{'what':34s} {'n':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'mean ms':>8s}")
    for name, r in rows:
        print(f"{name:34s} {r['n']:6d} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} {r['mean_ms']:8.2f}")
    if args.big:
        print(f"index build for {args.big:,} products: {report['index_build_s_big']:.1f} s")
    write_json_atomic(RESULTS, report, indent=1)
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
