"""The bundle that travels with the small GPU check (scripts/gpu_check.sh --small) to the lent GPU machine.

    python -m scripts.gpu_bundle                 # writes .gpu-bundle/ (ignored by git), checks it fits
    python -m scripts.gpu_bundle --check-size    # only the size check of the tree + an existing bundle

The lent machine (one H200; docs/gpus.md) has Python 3.12 with torch, transformers, accelerate, peft and the
packages listed in scripts/gpu_machine_packages.txt, nothing can be downloaded there, and what travels to it (the
working tree: tracked files and untracked files git does not ignore, plus the carried paths) is at most 64 MiB.
This script, run on a machine with the registry and `setup.sh` done, writes into --out:

- wheels/: py3.12 x86-64 wheels of BUNDLE, the packages the check imports (directly or as a requirement) that
  the machine lacks, each at requirements.lock's version. `pip download --no-deps --only-binary=:all:
  --python-version 3.12 --implementation cp` with one `--platform` per manylinux level; DeepSpeed is published as
  a source distribution only, so its (pure-Python: its ops compile at first use) wheel is built here from it.
  Every wheel's own requirements must be in the bundle or on the machine's list, or the script fails naming them.
- model/SmolLM2-135M-Instruct/: the default model's config and tokenizer files (no weights, 3.5 MB; the model is
  Apache-2.0), from which the check builds the architecture with random weights.
- data/webshop_sft.json: the first --sft-records WebShop expert trajectories (SFT and DPO data for the check).
- bundle.json: what is in it and the sizes.

It fails when the tree plus the bundle would exceed 64 MiB. The check installs the wheels into a temporary target
(never into the machine's environment) and puts it first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from scripts.deps import LOCK, normalize, read_lock

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".gpu-bundle"
MACHINE_PACKAGES = Path(__file__).with_name("gpu_machine_packages.txt")
LIMIT_BYTES = 64 * 2**20  # what travels to the lent machine, in all

# The packages the small check needs that the lent machine lacks (tests/test_gpu_check.py resolves every import of
# the check's code paths against this list + scripts/gpu_machine_packages.txt + the standard library).
BUNDLE = (
    "fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "opentelemetry-api",  # fastapi's requirement since 0.13x
    "uvicorn",
    "deepspeed", "hjson",  # ZeRO-2 under torchrun; hjson is DeepSpeed's config reader
)
BUILT_FROM_SOURCE = ("deepspeed",)  # no wheel on the registry: built here into a py3-none-any wheel
PYTHON_VERSION = "3.12"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64",
                                                                       "manylinux1_x86_64", "linux_x86_64"]
# marker environment of the lent machine, to evaluate the wheels' requirements
MARKER_ENV = {"python_version": PYTHON_VERSION, "python_full_version": PYTHON_VERSION + ".3",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "extra": ""}
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt", "eto_template.txt")


class BundleError(Exception):
    pass


def machine_packages(path: Path = MACHINE_PACKAGES) -> set[str]:
    """The lent machine's packages (normalised names), from the committed list (comments after '#')."""
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalize(line))
    return names


# -- sizes ---------------------------------------------------------------------------------------------------------

def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what travels from the working tree: tracked files and untracked files git does not ignore (as the
    device tool sends them), plus a shared/ folder inside the checkout if there is one."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.split(b"\0")
    total = sum((repo / name.decode()).stat().st_size for name in listed
                if name and (repo / name.decode()).is_file() and not (repo / name.decode()).is_symlink())
    shared = repo / "shared"
    return total + (folder_bytes(shared) if shared.is_dir() else 0)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def check_fits(repo: Path, carried: list[Path], limit: int = LIMIT_BYTES) -> dict:
    """Sizes of the tree and the carried folders; BundleError when together they exceed `limit`."""
    tree = tree_bytes(repo)
    carry = {str(c): folder_bytes(c) for c in carried}
    total = tree + sum(carry.values())
    sizes = {"tree_bytes": tree, "carried_bytes": carry, "total_bytes": total, "limit_bytes": limit}
    if total > limit:
        parts = ", ".join(f"{name} {b / 2**20:.1f} MiB" for name, b in carry.items())
        raise BundleError(f"too big to travel: working tree {tree / 2**20:.1f} MiB + {parts} = "
                          f"{total / 2**20:.1f} MiB > {limit / 2**20:.0f} MiB (the device tool's limit); "
                          f"make the bundle smaller (fewer --sft-records) or ignore untracked files")
    return sizes


# -- wheels --------------------------------------------------------------------------------------------------------

def pip_download(name: str, version: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           PYTHON_VERSION, "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(dest),
           "--quiet", f"{name}=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise BundleError(f"pip download {name}=={version} for py{PYTHON_VERSION} manylinux x86_64 failed:\n"
                          f"{r.stderr[-2000:]}")


def build_wheel(name: str, version: str, dest: Path) -> None:
    """A wheel built here from the registry's source distribution (pure Python, or it would not run there)."""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", tmp,
                            "--quiet", f"{name}=={version}"], capture_output=True, text=True)
        if r.returncode:
            raise BundleError(f"pip download of the {name}=={version} source failed:\n{r.stderr[-2000:]}")
        sdist = next(Path(tmp).iterdir())
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(dest), "--quiet", str(sdist)], capture_output=True, text=True)
        if r.returncode:
            raise BundleError(f"building the {name}=={version} wheel failed:\n{r.stderr[-2000:]}")


def wheel_name(path: Path) -> tuple[str, str, set]:
    from packaging.utils import parse_wheel_filename

    name, version, _, tags = parse_wheel_filename(path.name)
    return normalize(name), str(version), tags


def runs_there(tags) -> bool:
    """A wheel tag that CPython 3.12 on x86-64 Linux (glibc) installs."""
    for t in tags:
        py_ok = t.interpreter in ("py3", "cp312") or (t.interpreter.startswith("cp3") and t.abi == "abi3"
                                                      and int(t.interpreter[3:]) <= 12)
        plat_ok = t.platform == "any" or (t.platform.endswith("_x86_64") and "linux" in t.platform)
        if py_ok and plat_ok:
            return True
    return False


def wheel_requirements(path: Path) -> list[str]:
    """The wheel's requirements that apply on the lent machine (no extras), as normalised names."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8").splitlines()
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(MARKER_ENV):
                out.append(normalize(req.name))
    return out


def check_wheels(wheels: list[Path], machine: set[str]) -> list[dict]:
    """One wheel per bundled package, each installable there, every requirement in the bundle or on the machine."""
    rows, names = [], {}
    for w in wheels:
        name, version, tags = wheel_name(w)
        if name in names:
            raise BundleError(f"two wheels of {name}: {names[name]} and {w.name} (keep one version)")
        names[name] = w.name
        if not runs_there(tags):
            raise BundleError(f"{w.name} does not install on CPython {PYTHON_VERSION} x86-64 Linux")
        rows.append({"file": w.name, "name": name, "version": version, "bytes": w.stat().st_size})
    missing = {normalize(b) for b in BUNDLE} - set(names)
    if missing:
        raise BundleError(f"no wheel for {', '.join(sorted(missing))}")
    for w in wheels:
        lacking = [r for r in wheel_requirements(w) if r not in names and r not in machine]
        if lacking:
            raise BundleError(f"{w.name} requires {', '.join(lacking)}, neither in the bundle nor on the lent "
                              f"machine (scripts/gpu_machine_packages.txt): add it to BUNDLE")
    return rows


# -- the bundle ----------------------------------------------------------------------------------------------------

def copy_model_files(model_dir: Path, dest: Path) -> list[str]:
    if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.json").is_file():
        raise BundleError(f"{model_dir}: no config.json and tokenizer.json (run setup.sh, or give --model-dir)")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, dest / name)
            copied.append(name)
    return copied


def build(out: Path, model_dir: Path, sft_data: Path, sft_records: int, repo: Path = REPO) -> dict:
    lock = read_lock()
    machine = machine_packages()
    if out.exists():
        shutil.rmtree(out)
    wheels_dir = out / "wheels"
    wheels_dir.mkdir(parents=True)
    for name in BUNDLE:
        version = lock.get(normalize(name))
        if version is None:
            raise BundleError(f"{name} is not pinned in {LOCK.name}")
        print(f"[gpu-bundle] {name}=={version}", flush=True)
        (build_wheel if name in BUILT_FROM_SOURCE else pip_download)(name, version, wheels_dir)
    rows = check_wheels(sorted(wheels_dir.glob("*.whl")), machine)
    model_files = copy_model_files(model_dir, out / "model" / model_dir.name)
    if not sft_data.is_file():
        raise BundleError(f"{sft_data}: no WebShop expert trajectories (setup.sh builds them, or give --sft-data)")
    records = json.loads(sft_data.read_text(encoding="utf-8"))[:sft_records]
    (out / "data").mkdir()
    (out / "data" / "webshop_sft.json").write_text(json.dumps(records), encoding="utf-8")
    manifest = {"built": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": PYTHON_VERSION,
                "wheels": rows, "model": {"name": model_dir.name, "files": model_files},
                "data": {"file": "data/webshop_sft.json", "records": len(records), "from": sft_data.name}}
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    manifest["sizes"] = check_fits(repo, [out])
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    from fastchat.constants import default_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the bundle folder (default .gpu-bundle)")
    p.add_argument("--model-dir", type=Path, default=None, help="config and tokenizer files from this model folder "
                   "(default: the embedded default model, models/SmolLM2-135M-Instruct)")
    p.add_argument("--sft-data", type=Path, default=REPO / "data" / "webshop_sft.json")
    p.add_argument("--sft-records", type=int, default=64, help="WebShop expert trajectories taken (default 64)")
    p.add_argument("--check-size", action="store_true", help="only check that the tree and --out fit")
    a = p.parse_args(argv)
    try:
        if a.check_size:
            if not a.out.is_dir():
                raise BundleError(f"{a.out}: no bundle there (run python -m scripts.gpu_bundle first)")
            sizes = check_fits(REPO, [a.out])
        else:
            sizes = build(a.out, a.model_dir or default_model_path(), a.sft_data, a.sft_records)["sizes"]
    except BundleError as e:
        print(f"gpu_bundle: {e}", file=sys.stderr)
        return 1
    mib = {k: v / 2**20 for k, v in (("tree", sizes["tree_bytes"]), ("total", sizes["total_bytes"]))}
    bundle = sum(sizes["carried_bytes"].values()) / 2**20
    print(f"[gpu-bundle] {a.out}: {bundle:.1f} MiB; working tree {mib['tree']:.1f} MiB; together "
          f"{mib['total']:.1f} of {LIMIT_BYTES / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
