"""setup.sh's data step: mirror first, sha256 checks, atomic unpack, stamps, clear errors."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FETCH = REPO / "scripts" / "fetch_data.py"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run_fetch(tmp_path: Path, items: list[dict], mirror: Path | None, *extra: str):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"items": items}))
    cmd = [sys.executable, str(FETCH), "--manifest", str(manifest), "--data-dir", str(tmp_path / "data"), *extra]
    if mirror is not None:
        cmd += ["--mirror", str(mirror)]
    env = {k: v for k, v in os.environ.items() if k != "ETO_DATA_MIRROR"}  # CI sets it; these tests choose
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_mirror_install_then_second_run_is_a_no_op(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    archive = make_tar_xz({"game/a.txt": b"alpha", "game/deep/b.txt": b"beta"})
    (mirror / "game.tar.xz").write_bytes(archive)
    (mirror / "sub" / "split.json").write_bytes(b"[1, 2, 3]")
    items = [
        {"name": "game", "kind": "tar.xz", "dest": ".", "required": True, "mirror": "game.tar.xz",
         "mirror_sha256": sha(archive)},
        {"name": "split", "kind": "file", "dest": "eto/x", "required": True, "mirror": "sub/split.json",
         "mirror_sha256": sha(b"[1, 2, 3]")},
    ]
    first = run_fetch(tmp_path, items, mirror)
    assert first.returncode == 0, first.stderr
    data = tmp_path / "data"
    assert (data / "game" / "deep" / "b.txt").read_bytes() == b"beta"
    assert json.loads((data / "eto" / "x" / "split.json").read_text()) == [1, 2, 3]
    assert json.loads((data / ".stamps" / "game.json").read_text())["targets"] == ["game"]

    second = run_fetch(tmp_path, items, mirror)
    assert second.returncode == 0
    assert "2 item(s) already installed" in second.stdout
    assert "installed from" not in second.stdout

    # a removed target is noticed and fetched again
    (data / "eto" / "x" / "split.json").unlink()
    third = run_fetch(tmp_path, items, mirror)
    assert "split: installed from mirror" in third.stdout


def test_corrupt_mirror_file_is_refused_and_nothing_is_left(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    good = make_tar_xz({"game/a.txt": b"alpha"})
    (mirror / "game.tar.xz").write_bytes(good[:-7] + b"garbage")
    items = [{"name": "game", "kind": "tar.xz", "dest": ".", "required": True, "mirror": "game.tar.xz",
              "mirror_sha256": sha(good)}]
    proc = run_fetch(tmp_path, items, mirror, "--offline")
    assert proc.returncode == 1
    assert "sha256 mismatch" in proc.stderr and "game.tar.xz" in proc.stderr
    data = tmp_path / "data"
    assert not (data / "game").exists()
    assert not (data / ".stamps" / "game.json").exists()
    assert not (data / ".fetch-tmp").exists()


def test_archive_failing_mid_unpack_leaves_no_partial_folder(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    whole = make_tar_xz({"game/a.txt": b"a" * 5000, "game/b.txt": b"b" * 5000})
    broken = whole[: len(whole) // 2]  # a truncated archive whose sha256 we "trust"
    (mirror / "game.tar.xz").write_bytes(broken)
    items = [{"name": "game", "kind": "tar.xz", "dest": ".", "required": True, "mirror": "game.tar.xz",
              "mirror_sha256": sha(broken)}]
    proc = run_fetch(tmp_path, items, mirror, "--offline")
    assert proc.returncode == 1
    assert "cannot unpack" in proc.stderr
    assert not (tmp_path / "data" / "game").exists()
    assert not (tmp_path / "data" / ".fetch-tmp").exists()


def test_no_mirror_no_network_names_every_missing_item(tmp_path):
    items = [
        {"name": "alpha", "kind": "file", "dest": ".", "required": True, "mirror": "a.json",
         "url": "https://example.invalid/a.json", "note": "first item"},
        {"name": "beta", "kind": "file", "dest": ".", "required": True, "mirror": "b.json",
         "url": "https://example.invalid/b.json", "note": "second item"},
        {"name": "gamma", "kind": "file", "dest": ".", "required": False, "mirror": "c.json"},
    ]
    proc = run_fetch(tmp_path, items, None, "--offline")
    assert proc.returncode == 1
    assert "2 required item(s) missing" in proc.stderr
    for name in ("alpha", "beta"):
        line = next(l for l in proc.stderr.splitlines() if l.strip().startswith(f"- {name}"))
        assert "ETO_DATA_MIRROR not set" in line and "official source" in line
    assert "gamma" in proc.stdout  # optional: reported, not fatal
    assert "ETO_DATA_MIRROR" in proc.stderr


def test_real_manifest_is_well_formed():
    items = json.loads((REPO / "data" / "manifest.json").read_text())["items"]
    names = [i["name"] for i in items]
    assert len(names) == len(set(names))
    for item in items:
        assert item["kind"] in {"file", "tar.xz", "tar.gz", "tar", "zip"}, item["name"]
        assert item.get("url") or item.get("fetch_command"), f"{item['name']} has no official source"
        if item.get("required"):
            assert item.get("mirror") and len(item.get("mirror_sha256", "")) == 64, item["name"]
