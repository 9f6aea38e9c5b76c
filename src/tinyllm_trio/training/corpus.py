"""`tinyllm-trio corpus`: fetch Jane Austen's six novels from Debian and split them by chapter.

No registry ships a children's-story corpus like the one the original TinyLLM was trained on, so
the default model is trained on Jane Austen's novels (public domain text) as packaged by Debian's
`r-cran-janeaustenr` (MIT). The package stores the text in an R lazy-load database, so this module
carries a small reader for R's XDR serialization format (just the types that database uses);
R itself is not needed.

Output (in ``--out``, default ``data/``): ``train.txt`` and ``heldout.txt``, one paragraph per
line, a blank line between chapters; ``corpus.json`` records the package, its exact version and
which chapters were held out. Held-out chapters are chosen deterministically (every
``HOLDOUT_EVERY``-th chapter of each novel, starting at ``HOLDOUT_OFFSET``) and training never
sees them.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = "r-cran-janeaustenr"
PACKAGE_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
HOLDOUT_EVERY = 20  # one chapter in twenty (5 %) ...
HOLDOUT_OFFSET = 7  # ... starting with the 8th chapter of each novel (not the opening)

# R SEXP type codes (R Internals, "Serialization Formats")
NILSXP, SYMSXP, LISTSXP, CHARSXP = 0, 1, 2, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
_SPECIAL_ENVS = {253, 242, 241, 240, 239, 238}  # global/empty/base env etc.: no payload
NA_INTEGER = -(2**31)


class RDataError(ValueError):
    """The bytes are not an R serialization this reader understands."""


@dataclass
class RObject:
    """A decoded R value: ``value`` is a Python list (vectors) or str/None (CHARSXP)."""

    type: int
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str] | None:
        n = self.attributes.get("names")
        return list(n.value) if isinstance(n, RObject) else None


class _Reader:
    """Reads R's XDR ('X\\n') serialization, versions 2 and 3."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError("truncated R serialization")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise RDataError("not an R XDR serialization (expected 'X\\n')")
        version = self.int()
        if version not in (2, 3):
            raise RDataError(f"unsupported R serialization version {version}")
        self.int()  # writer R version
        self.int()  # minimal reader R version
        if version == 3:
            self._take(self.int())  # native encoding name, e.g. b"UTF-8"

    def _length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self) -> Any:
        flags = self.int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == NILVALUE_SXP or t in _SPECIAL_ENVS:
            return None
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if t == LISTSXP:
            # a pairlist: returned as a dict tag -> value (untagged cells get their position)
            out: dict[str, Any] = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out[tag if tag is not None else str(len(out))] = self.item()
                flags = self.int()
                t = flags & 0xFF
                if t == NILVALUE_SXP:
                    return out
                if t != LISTSXP:
                    raise RDataError(f"unsupported pairlist tail type {t}")
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
        if t == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self._take(n)
            latin1 = bool((flags >> 12) & 4)
            return raw.decode("latin-1" if latin1 else "utf-8")
        if t in (LGLSXP, INTSXP):
            n = self._length()
            vals = list(struct.unpack(f">{n}i", self._take(4 * n)))
            obj = RObject(t, [None if v == NA_INTEGER else v for v in vals])
        elif t == REALSXP:
            n = self._length()
            obj = RObject(t, list(struct.unpack(f">{n}d", self._take(8 * n))))
        elif t in (STRSXP, VECSXP):
            n = self._length()
            obj = RObject(t, [self.item() for _ in range(n)])
        else:
            raise RDataError(f"unsupported R type {t}")
        if has_attr:
            attrs = self.item()
            if isinstance(attrs, dict):
                obj.attributes = attrs
        return obj


def unserialize(data: bytes) -> Any:
    """Decode one R object from XDR serialization bytes (the body of an .rds / .rdb entry)."""
    r = _Reader(data)
    r.header()
    return r.item()


def read_lazyload_index(rdx: bytes) -> dict[str, tuple[int, int]]:
    """The ``variables`` part of an R lazy-load index: name -> (offset, length) in the .rdb."""
    index = unserialize(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx))
    if not isinstance(index, RObject) or index.names is None:
        raise RDataError("lazy-load index is not a named list")
    variables = index.value[index.names.index("variables")]
    return {
        name: (int(v.value[0]), int(v.value[1]))
        for name, v in zip(variables.names or [], variables.value, strict=True)
    }


def read_lazyload_entry(rdb: bytes, offset: int, length: int) -> Any:
    """One object from an .rdb: 4-byte big-endian raw length, then zlib data (type 1)."""
    blob = rdb[offset : offset + length]
    if len(blob) < 5:
        raise RDataError("lazy-load entry out of range")
    (raw_len,) = struct.unpack(">I", blob[:4])
    body = zlib.decompress(blob[4:])
    if len(body) != raw_len:
        raise RDataError("lazy-load entry length mismatch")
    return unserialize(body)


def read_package_texts(data_dir: Path) -> dict[str, list[str]]:
    """All character vectors of the package's data: name -> lines."""
    rdx = (data_dir / "Rdata.rdx").read_bytes()
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (off, length) in read_lazyload_index(rdx).items():
        obj = read_lazyload_entry(rdb, off, length)
        if isinstance(obj, RObject) and obj.type == STRSXP:
            out[name] = [s or "" for s in obj.value]
    return out


_CHAPTER = re.compile(r"^(chapter|volume)\b", re.IGNORECASE)


def split_chapters(lines: list[str]) -> list[list[str]]:
    """Lines -> chapters, each a list of paragraphs (wrapped lines joined with spaces).

    A chapter starts at a line beginning with "Chapter"/"CHAPTER"; the title page before the first
    chapter is dropped. A "VOLUME" heading is dropped rather than starting a chapter.
    """
    chapters: list[list[str]] = []
    para: list[str] = []

    def flush() -> None:
        if para and chapters:
            chapters[-1].append(" ".join(para))
        para.clear()

    for raw in lines:
        line = raw.strip()
        if not line:
            flush()
            continue
        m = _CHAPTER.match(line)
        if m and len(line) < 40:
            flush()
            if m.group(1).lower() == "chapter":
                chapters.append([line])
            continue
        para.append(line)
    flush()
    return [c for c in chapters if len(c) > 1]


def package_version(deb: Path) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()


def fetch_package(workdir: Path) -> tuple[Path, str]:
    """`apt-get download` the package into workdir and unpack it; returns (data dir, version)."""
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True, capture_output=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {PACKAGE} produced no .deb")
    root = workdir / "x"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    return root / PACKAGE_DATA_DIR, package_version(debs[-1])


def write_split(texts: dict[str, list[str]], out: Path) -> dict[str, Any]:
    """Split every novel into chapters, hold out every HOLDOUT_EVERY-th; write the two files."""
    train: list[str] = []
    heldout: list[str] = []
    held_names: dict[str, list[str]] = {}
    counts = {}
    for name in sorted(texts):
        chapters = split_chapters(texts[name])
        counts[name] = len(chapters)
        for i, ch in enumerate(chapters):
            block = "\n".join(ch)
            if i % HOLDOUT_EVERY == HOLDOUT_OFFSET:
                heldout.append(block)
                held_names.setdefault(name, []).append(ch[0])
            else:
                train.append(block)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
    (out / "heldout.txt").write_text("\n\n".join(heldout) + "\n", encoding="utf-8")
    return {
        "chapters": counts,
        "train_chapters": len(train),
        "heldout_chapters": len(heldout),
        "heldout": held_names,
        "train_words": sum(len(c.split()) for c in train),
        "heldout_words": sum(len(c.split()) for c in heldout),
    }


def read_documents(path: str | Path) -> list[str]:
    """A corpus file -> its chapters (the blank-line-separated blocks written by write_split)."""
    text = Path(path).read_text(encoding="utf-8")
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def run_cli(args: Any) -> int:
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="tinyllm-corpus-") as tmp:
        try:
            data_dir, version = fetch_package(Path(tmp))
        except (OSError, subprocess.CalledProcessError) as e:
            err = getattr(e, "stderr", b"") or b""
            print(
                f"error: could not fetch {PACKAGE} with apt-get download / dpkg-deb: {e}\n"
                f"{err.decode(errors='replace') if isinstance(err, bytes) else err}",
                file=sys.stderr,
            )
            return 1
        texts = read_package_texts(data_dir)
        licence_src = data_dir.parents[4] / "share/doc" / PACKAGE / "copyright"  # root/usr/...
        info = write_split(texts, out)
        if licence_src.exists():
            shutil.copy(licence_src, out / "COPYRIGHT.janeaustenr")
    info = {"package": PACKAGE, "version": version, "source": "Debian (apt-get download)", **info}
    (out / "corpus.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(
        f"{PACKAGE} {version}: {info['train_chapters']} train chapters "
        f"({info['train_words']:,} words), {info['heldout_chapters']} held out "
        f"({info['heldout_words']:,} words) -> {out}/train.txt, {out}/heldout.txt"
    )
    return 0
