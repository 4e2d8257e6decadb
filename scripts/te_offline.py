#!/usr/bin/env python3
"""Transformer Engine onto a GPU machine that has no network, in pieces that fit a transfer limit.

The GPU machines lent to this project (see DEVELOPERS.md) cannot reach a package index, and what
travels to them per call is capped (64 MiB). Transformer Engine is two parts:
``transformer-engine-cuXX`` (the core library, a binary wheel of ~276 MB) and
``transformer-engine-torch`` (source only: it compiles against the installed torch with nvcc).

Three steps:

1. ``prepare`` (on a machine with the package index): download the core wheel for the GPU
   machine's CUDA major (default 13, what its torch 2.11+cu130 uses), the meta package and the
   torch sdist, split every file above ``--part-mib`` into numbered parts, and write
   ``manifest.json`` with each file's size and sha256.
2. Carry: one device call per part set (``carry`` the folder), each command appending the parts
   it brings to a directory on the warm machine (``stash`` does that). Files written there stay
   while the machine is held.
3. ``install`` (on the GPU machine): reassemble, check the sha256 of every file, install the
   core wheel and the meta package without dependencies, then build the torch extension with
   ``--no-build-isolation`` against the torch that is there (nvcc, ninja and pybind11 are in
   that image). Builds can outlast one call: ``install --background`` starts it in a new process
   session and ``status`` reads its log.

Pure helpers (``split_file``, ``join_parts``, ``check_manifest``) are unit-tested on CPU
(tests/unit/test_te_offline.py); the GPU half is verified only where a GPU is lent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

TE_VERSION = "2.20.2"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_file(path: Path, part_bytes: int) -> list[Path]:
    """Split ``path`` into ``path.part000``, ``path.part001``, ... of at most ``part_bytes`` each
    and remove the original; a file that fits is left whole."""
    if part_bytes < 1:
        raise ValueError(f"part size {part_bytes} bytes must be >= 1; fix: e.g. --part-mib 60")
    if path.stat().st_size <= part_bytes:
        return [path]
    parts = []
    with open(path, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
            part = path.with_name(f"{path.name}.part{i:03d}")
            part.write_bytes(block)
            parts.append(part)
    path.unlink()
    return parts


def join_parts(directory: Path, name: str) -> Path:
    """Rebuild ``name`` from its parts in ``directory`` (written to a temporary name, renamed)."""
    target = directory / name
    parts = sorted(directory.glob(f"{name}.part[0-9][0-9][0-9]"))
    if not parts:
        if target.exists():
            return target
        raise ValueError(f"{name}: neither the file nor any {name}.partNNN in {directory}; fix: carry all parts first")
    numbers = [int(p.name[-3:]) for p in parts]
    if numbers != list(range(len(parts))):
        raise ValueError(f"{name}: parts {numbers} are not 0..{len(parts) - 1}; fix: carry the missing parts")
    tmp = directory / f".{name}.joining"
    with open(tmp, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    os.replace(tmp, target)
    return target


def check_manifest(directory: Path, manifest: dict) -> list[Path]:
    """Join every file of the manifest and check its size and sha256; the files in manifest order."""
    files = []
    for entry in manifest["files"]:
        path = join_parts(directory, entry["name"])
        size, digest = path.stat().st_size, sha256(path)
        if size != entry["size"] or digest != entry["sha256"]:
            raise ValueError(f"{entry['name']}: size {size} / sha256 {digest[:12]} differ from the manifest's "
                             f"{entry['size']} / {entry['sha256'][:12]}; fix: carry the parts again")
        files.append(path)
    return files


def prepare(out: Path, cuda_major: int, part_mib: int, version: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(out)]
    binary = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
              *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                            "manylinux2014_x86_64") for a in ("--platform", p)]]
    subprocess.run([*pip, *binary, f"transformer-engine-cu{cuda_major}=={version}"], check=True)
    subprocess.run([*pip, *binary, f"transformer-engine=={version}"], check=True)
    subprocess.run([*pip, "--no-binary=:all:", f"transformer-engine-torch=={version}"], check=True)
    files = sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".whl", ".gz"))
    manifest = {"version": version, "cuda_major": cuda_major,
                "files": [{"name": p.name, "size": p.stat().st_size, "sha256": sha256(p)} for p in files]}
    for p in files:
        split_file(p, part_mib << 20)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"prepared {len(files)} files in {out}; parts: {sorted(x.name for x in out.iterdir())}")


def install(directory: Path, background: bool) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    files = check_manifest(directory, manifest)
    wheels = [str(p) for p in files if p.suffix == ".whl"]
    sdists = [str(p) for p in files if p.suffix == ".gz"]
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps"]
    subprocess.run([*pip, *wheels], check=True)
    build = [*pip, "--no-build-isolation", "-v", *sdists]
    if background:
        log = open(directory / "build.log", "w")
        subprocess.Popen(build, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         env=dict(os.environ, MAX_JOBS=str(os.cpu_count() or 8)))
        print(f"building transformer-engine-torch in the background; log: {directory / 'build.log'}")
    else:
        subprocess.run(build, check=True, env=dict(os.environ, MAX_JOBS=str(os.cpu_count() or 8)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="download and split (machine with the package index)")
    p.add_argument("--out", type=Path, default=Path(".whl/te"))
    p.add_argument("--cuda-major", type=int, default=13, choices=(12, 13))
    p.add_argument("--part-mib", type=int, default=60)
    p.add_argument("--version", default=TE_VERSION)
    s = sub.add_parser("stash", help="copy carried parts into a directory that outlives the call")
    s.add_argument("src", type=Path)
    s.add_argument("dst", type=Path)
    i = sub.add_parser("install", help="join, check and install (the GPU machine)")
    i.add_argument("directory", type=Path)
    i.add_argument("--background", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.out, args.cuda_major, args.part_mib, args.version)
    elif args.cmd == "stash":
        args.dst.mkdir(parents=True, exist_ok=True)
        for f in args.src.iterdir():
            if f.is_file():
                (args.dst / f.name).write_bytes(f.read_bytes())
    else:
        install(args.directory, args.background)
    return 0


if __name__ == "__main__":
    sys.exit(main())
