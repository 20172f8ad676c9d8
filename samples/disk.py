"""Build a sample physical disk: GPT, an EFI-style FAT partition and an ext4 partition
filled with a mix of files (shared libraries, text, random data).

Used by `make demo` (small) and by the benchmarks (4 GiB, ~1.2 GiB of files). Made with
the real tools (sgdisk, mkfs.vfat, mcopy, mkfs.ext4 -d) so the filesystems are genuine.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile

MiB = 1 << 20


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def fill_tree(root: str, libs: int, text: int, rand: int, seed: int = 1) -> int:
    """Write about libs+text+rand bytes of files under root; return bytes written."""
    rng = random.Random(seed)
    total = 0
    libdir = os.path.join(root, "usr", "lib")
    os.makedirs(libdir, exist_ok=True)
    # real shared objects compress like a system partition does
    for base in ("/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/bin"):
        if total >= libs:
            break
        for dirpath, _, files in os.walk(base):
            for name in sorted(files):
                src = os.path.join(dirpath, name)
                if os.path.islink(src) or not os.path.isfile(src):
                    continue
                size = os.path.getsize(src)
                if size < 4096 or total + size > libs:
                    continue
                dst = os.path.join(libdir, f"{total:x}-{name}")
                shutil.copyfile(src, dst)
                total += size
            if total >= libs * 0.98:
                break
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
        for _ in range(5000)
    ]
    docdir = os.path.join(root, "var", "log")
    os.makedirs(docdir, exist_ok=True)
    written = 0
    i = 0
    while written < text:
        line_block = "\n".join(
            " ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)
        ).encode()
        n = min(len(line_block) * 8, text - written)
        with open(os.path.join(docdir, f"app-{i}.log"), "wb") as f:
            f.write((line_block * 8)[:n])
        written += n
        i += 1
    total += written
    datadir = os.path.join(root, "srv", "data")
    os.makedirs(datadir, exist_ok=True)
    left = rand
    j = 0
    while left > 0:
        n = min(64 * MiB, left)
        with open(os.path.join(datadir, f"blob-{j}.bin"), "wb") as f:
            f.write(rng.randbytes(n))
        left -= n
        j += 1
    return total + rand


def build_disk(
    path: str,
    size: int,
    *,
    fat_size: int = 64 * MiB,
    libs: int = 16 * MiB,
    text: int = 16 * MiB,
    rand: int = 8 * MiB,
) -> dict[str, int]:
    """Create `path` (raw, sparse). Returns partition offsets and sizes in bytes."""
    for tool in ("sgdisk", "mkfs.vfat", "mcopy", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `make deps` first")
    with open(path, "wb") as f:
        f.truncate(size)
    fat_start = 1 * MiB
    ext_start = fat_start + fat_size
    ext_size = size - ext_start - 1 * MiB
    _run(
        "sgdisk",
        "-o",
        f"-n1:{fat_start // 512}:{(ext_start // 512) - 1}",
        "-t1:ef00",
        "-c1:EFI",
        f"-n2:{ext_start // 512}:{(ext_start + ext_size) // 512 - 1}",
        "-t2:8300",
        "-c2:root",
        path,
    )
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        fat = os.path.join(tmp, "fat.img")
        with open(fat, "wb") as f:
            f.truncate(fat_size)
        _run("mkfs.vfat", "-F", "32", "-n", "EFI", fat)
        bootdir = os.path.join(tmp, "EFI")
        os.makedirs(os.path.join(bootdir, "BOOT"))
        with open(os.path.join(bootdir, "BOOT", "BOOTX64.EFI"), "wb") as f:
            f.write(random.Random(7).randbytes(2 * MiB))
        _run("mcopy", "-s", "-i", fat, bootdir, "::/")
        tree = os.path.join(tmp, "root")
        fill_tree(tree, libs, text, rand)
        ext = os.path.join(tmp, "ext4.img")
        with open(ext, "wb") as f:
            f.truncate(ext_size)
        _run("mkfs.ext4", "-q", "-F", "-L", "root", "-d", tree, ext)
        for part, offset in ((fat, fat_start), (ext, ext_start)):
            _run(
                "dd",
                f"if={part}",
                f"of={path}",
                "bs=4M",
                f"seek={offset}",
                "oflag=seek_bytes",
                "conv=notrunc,sparse",
                "status=none",
            )
    return {
        "fat_start": fat_start,
        "fat_size": fat_size,
        "ext4_start": ext_start,
        "ext4_size": ext_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("path")
    ap.add_argument("--size", type=int, default=256, help="disk size in MiB")
    ap.add_argument("--fill", type=int, default=40, help="MiB of files on ext4")
    args = ap.parse_args()
    third = args.fill * MiB // 3
    build_disk(args.path, args.size * MiB, libs=third, text=third, rand=third)


if __name__ == "__main__":
    main()
