"""WordNet synonyms from the WordNet database files (WNDB: `index.noun`, `data.noun`, ...).

The data is never downloaded: it is read from, in order, the `wordnet_dir` option, the
environment variable `XM_WORDNET_DIR`, Debian's `wordnet-base` package
(`/usr/share/wordnet`), or an NLTK data folder's `corpora/wordnet` (same files). The
reader is xm's own (a few lines of the WNDB format), so no Python package is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

from xm.errors import XMError

POS = ("noun", "adj")  # class names are nouns; DTD's textures are adjectives
# Debian's wordnet-base, then NLTK data folders' copies (same WNDB files)
DEFAULT_DIRS = ("/usr/share/wordnet", "~/nltk_data/corpora/wordnet", "/usr/share/nltk_data/corpora/wordnet",
                "/usr/local/share/nltk_data/corpora/wordnet", "/usr/lib/nltk_data/corpora/wordnet")
MISSING = ("WordNet data not found: install Debian's wordnet-base (`apt-get install wordnet-base`, files in "
           "/usr/share/wordnet) or point XM_WORDNET_DIR (or the option wordnet_dir) at a folder holding index.noun "
           "and data.noun")


def find_wordnet(folder: str | None = None) -> Path:
    """The folder holding the WNDB files, or one line saying how to get them."""
    if folder:
        p = Path(folder).expanduser()
        if not (p / "index.noun").is_file():
            raise XMError(f"{p}: no WordNet index.noun here (wordnet_dir must hold the WNDB files index.noun, data.noun)")
        return p
    env = os.environ.get("XM_WORDNET_DIR")
    if env:
        p = Path(env).expanduser()
        if not (p / "index.noun").is_file():
            raise XMError(f"XM_WORDNET_DIR={env}: no WordNet index.noun there")
        return p
    for d in DEFAULT_DIRS:
        p = Path(d).expanduser()
        if (p / "index.noun").is_file():
            return p
    raise XMError(MISSING)


class WordNet:
    """Lemma look-ups over one WNDB folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        # read once per part of speech; kept on the instance (a cache on the method would keep every WordNet alive)
        self._indexes: dict[str, dict[str, list[int]]] = {}

    def _index(self, pos: str) -> dict[str, list[int]]:
        """lemma -> synset byte offsets into data.<pos>."""
        if pos not in self._indexes:
            self._indexes[pos] = self._read_index(pos)
        return self._indexes[pos]

    def _read_index(self, pos: str) -> dict[str, list[int]]:
        path = self.folder / f"index.{pos}"
        if not path.is_file():
            return {}
        out: dict[str, list[int]] = {}
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or not line.strip():  # the licence header
                    continue
                parts = line.split()
                try:
                    n_synsets, n_ptrs = int(parts[2]), int(parts[3])
                    offsets = [int(x) for x in parts[4 + n_ptrs + 2: 4 + n_ptrs + 2 + n_synsets]]
                except (IndexError, ValueError) as exc:
                    raise XMError(f"{path}: not a WordNet index file (line {line[:40]!r})") from exc
                out[parts[0]] = offsets
        return out

    def _synset_words(self, pos: str, offset: int) -> list[str]:
        path = self.folder / f"data.{pos}"
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline().decode("utf-8", errors="replace")
        parts = line.split()
        try:
            if int(parts[0]) != offset:
                raise ValueError(parts[0])
            n_words = int(parts[3], 16)
            words = parts[4: 4 + 2 * n_words: 2]
        except (IndexError, ValueError) as exc:
            raise XMError(f"{path}: no synset at byte {offset} (index and data files disagree)") from exc
        # adjective markers such as "(a)" and "(p)" trail some lemmas
        return [w.split("(")[0] for w in words]

    def lemmas(self, name: str) -> list[str]:
        """Lemma names of every synset of `name` (spaces for underscores, `name` itself excluded),
        in WordNet's sense order; a name "A or B" is looked up as A and as B."""
        parts = [p.strip() for p in name.split(" or ")] if " or " in name else [name.strip()]
        seen = {name.strip().lower()} | {p.lower() for p in parts}
        out: list[str] = []
        for part in parts:
            key = "_".join(part.lower().split())
            for pos in POS:
                for off in self._index(pos).get(key, []):
                    for w in self._synset_words(pos, off):
                        lemma = w.replace("_", " ")
                        if lemma.lower() not in seen:
                            seen.add(lemma.lower())
                            out.append(lemma)
        return out


def open_wordnet(folder: str | None = None) -> WordNet:
    return WordNet(find_wordnet(folder))
