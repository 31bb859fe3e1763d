"""Fetch the data items listed in data/manifest.json: from a local mirror first, else the official source.

    python -m scripts.fetch_data                      # everything, into data/
    ETO_DATA_MIRROR=../shared/data python -m scripts.fetch_data
    python -m scripts.fetch_data --only alfworld_data --force

Each item is checked against its sha256, unpacked in a scratch folder and moved
into place only when complete, then stamped (data/.stamps/<name>.json); a
stamped item is skipped on the next run. Exit status 1 when a required item is
missing; every missing item is named with where it was looked for. Standard
library only (fastchat.records is too), so `python -m scripts.fetch_data` runs
before the Python dependencies are installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from fastchat.records import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "data" / "manifest.json"
ARCHIVE_KINDS = {"tar.xz", "tar.gz", "tar", "zip"}


class FetchError(Exception):
    pass


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha(path: Path, expected: str | None, origin: str) -> None:
    if not expected:
        return
    got = sha256_of(path)
    if not got.startswith(expected.lower()):
        raise FetchError(f"sha256 mismatch for {origin}: expected {expected}{'...' if len(expected) < 64 else ''}, "
                         f"got {got}. The file is corrupt or a different version; it was not installed.")


def load_manifest(path: Path = MANIFEST) -> list[dict]:
    try:
        items = json.loads(path.read_text())["items"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise SystemExit(f"{path}: cannot read the data manifest ({e})")  # noqa: B904
    for i, item in enumerate(items):
        for key in ("name", "kind", "dest"):
            if key not in item:
                raise SystemExit(f"{path}: item {i} misses field '{key}'")
        if item["kind"] not in ARCHIVE_KINDS | {"file"}:
            raise SystemExit(f"{path}: item {item['name']}: unknown kind {item['kind']!r}")
    return items


def download(url: str, target: Path, timeout: float) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "eto-setup"})
    with urllib.request.urlopen(req, timeout=timeout) as r, open(target, "wb") as f:
        shutil.copyfileobj(r, f)


def unpack(archive: Path, kind: str, into: Path) -> None:
    if kind == "zip":
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    else:
        with tarfile.open(archive, "r:*") as t:
            t.extractall(into, filter="data")


class Fetcher:
    def __init__(self, data_dir: Path, mirror: Path | None, offline: bool, timeout: float):
        self.data_dir, self.mirror, self.offline, self.timeout = data_dir, mirror, offline, timeout
        self.stamps = data_dir / ".stamps"
        self.scratch = data_dir / ".fetch-tmp"

    def stamp_path(self, item: dict) -> Path:
        return self.stamps / f"{item['name']}.json"

    def installed(self, item: dict) -> bool:
        stamp = self.stamp_path(item)
        if not stamp.exists():
            return False
        try:
            targets = json.loads(stamp.read_text())["targets"]
        except (json.JSONDecodeError, KeyError):
            return False
        return all((self.data_dir / t).exists() for t in targets)

    def fetch(self, item: dict) -> str:
        """Install one item; returns where it came from. Raises FetchError naming every place tried."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=item["name"] + ".", dir=self.scratch))
        tried = []
        try:
            if self.mirror and item.get("mirror"):
                src = self.mirror / item["mirror"]
                if src.exists():
                    local = work / src.name
                    shutil.copyfile(src, local)
                    check_sha(local, item.get("mirror_sha256"), f"mirror file {src}")
                    return self._place(item, local, work, f"mirror {src}")
                tried.append(f"mirror file {src} (not there)")
            elif item.get("mirror"):
                tried.append(f"mirror (ETO_DATA_MIRROR not set; would look for {item['mirror']})")
            if self.offline:
                tried.append("official source (skipped: --offline)")
            elif item.get("url"):
                local = work / item.get("url_filename", Path(item["url"]).name)
                try:
                    download(item["url"], local, self.timeout)
                except OSError as e:
                    tried.append(f"{item['url']} ({e})")
                else:
                    check_sha(local, item.get("url_sha256"), f"download {item['url']}")
                    return self._place(item, local, work, item["url"])
            elif item.get("fetch_command"):
                cmd = item["fetch_command"].format(data_dir=self.data_dir)
                proc = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
                if proc.returncode == 0:
                    self._stamp(item, [item.get("creates", item["dest"])], cmd)
                    return f"command `{cmd}`"
                tried.append(f"command `{cmd}` (exit {proc.returncode}: {proc.stderr.strip()[-300:]})")
            raise FetchError("not found; looked in: " + "; ".join(tried))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _place(self, item: dict, local: Path, work: Path, origin: str) -> str:
        dest = self.data_dir / item["dest"]
        dest.mkdir(parents=True, exist_ok=True)
        if item["kind"] == "file":
            final = dest / local.name
            os.replace(local, final)  # same filesystem: atomic
            targets = [str(final.relative_to(self.data_dir))]
        else:
            staged = work / "unpacked"
            staged.mkdir()
            try:
                unpack(local, item["kind"], staged)
            except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
                raise FetchError(f"cannot unpack {origin}: {e}") from e
            targets = []
            for entry in staged.iterdir():
                final = dest / entry.name
                if final.exists():  # leftovers of an unstamped (interrupted or older) install
                    shutil.rmtree(final) if final.is_dir() else final.unlink()
                os.replace(entry, final)
                targets.append(str(final.relative_to(self.data_dir)))
        self._stamp(item, targets, origin)
        return origin

    def _stamp(self, item: dict, targets: list[str], origin: str) -> None:
        write_json_atomic(self.stamp_path(item), {"name": item["name"], "source": origin, "targets": targets}, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("ETO_DATA_DIR", str(REPO / "data")))
    p.add_argument("--mirror", default=os.environ.get("ETO_DATA_MIRROR"), help="local mirror folder (ETO_DATA_MIRROR)")
    p.add_argument("--manifest", default=str(MANIFEST))
    p.add_argument("--only", nargs="*", help="item names to fetch")
    p.add_argument("--force", action="store_true", help="fetch again even when stamped")
    p.add_argument("--offline", action="store_true", help="never download; mirror only")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per download connection")
    args = p.parse_args(argv)

    items = load_manifest(Path(args.manifest))
    if args.only:
        unknown = set(args.only) - {i["name"] for i in items}
        if unknown:
            raise SystemExit(f"unknown item(s) {sorted(unknown)}; known: {[i['name'] for i in items]}")
        items = [i for i in items if i["name"] in args.only]
    mirror = Path(args.mirror).resolve() if args.mirror else None
    if mirror and not mirror.is_dir():
        raise SystemExit(f"ETO_DATA_MIRROR={args.mirror} is not a folder")
    fetcher = Fetcher(Path(args.data_dir).resolve(), mirror, args.offline, args.timeout)

    missing_required, missing_optional, done, skipped = [], [], 0, 0
    for item in items:
        if not args.force and fetcher.installed(item):
            skipped += 1
            continue
        try:
            origin = fetcher.fetch(item)
            print(f"[data] {item['name']}: installed from {origin}")
            done += 1
        except FetchError as e:
            if item.get("required"):
                missing_required.append(f"{item['name']} ({item.get('note', '')}) -- {e}")
            else:
                missing_optional.append(f"{item['name']} -- {e}")
    shutil.rmtree(fetcher.scratch, ignore_errors=True)
    if skipped:
        print(f"[data] {skipped} item(s) already installed, nothing to do for them")
    for line in missing_optional:
        print(f"[data] optional item not available (fine): {line}")
    if missing_required:
        print(f"[data] {len(missing_required)} required item(s) missing:", file=sys.stderr)
        for line in missing_required:
            print(f"  - {line}", file=sys.stderr)
        print("Supply them by setting ETO_DATA_MIRROR to a folder holding the mirror files named above, "
              "or run setup on a machine with internet access.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
