"""A second four-domain corpus, from files every Debian 12 machine with Python 3.11 has.

    python -m jobs.corpora.make_custom --out ~/leviathan/data/custom-byte

None of it overlaps the built-in corpus (the standard library's own text):

- ``licenses``: English legal prose, the license texts of Debian's
  ``base-files`` (``/usr/share/common-licenses/*``).
- ``perl``: Perl modules with their POD, from the Essential ``perl-base``
  (``/usr/lib/<triplet>/perl-base/**/*.pm``) and ``debconf``
  (``/usr/share/perl5/**/*.pm``).
- ``shell``: POSIX shell, the dpkg maintainer scripts of the installed
  packages (``/var/lib/dpkg/info/*.{preinst,postinst,prerm,postrm}``).
- ``cheaders``: C declarations and macros, the Python installation's own
  headers (``sysconfig`` ``include`` path, ``**/*.h``).

Documents are whole files in sorted path order, each domain capped at
`leviathan.data.corpus.DOMAIN_CAP` bytes like the built-in one; then `jobs.prepare`
tokenizes them into a manifest. Sizes on this machine kind (byte tokenizer):
licenses 0.3 MB, perl 1.7 MB, shell 0.36 MB, cheaders 0.9 MB (3.3 MB).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

from jobs.prepare import DomainSource, PrepareError, prepare_sources, run_prepare_cli
from leviathan.data.corpus import capped

MAINTAINER_SCRIPTS = ("preinst", "postinst", "prerm", "postrm")


def _perl_modules() -> list[Path]:
    roots = sorted(Path("/usr/lib").glob("*/perl-base")) + [Path("/usr/share/perl5")]
    return [p for root in roots for p in sorted(root.rglob("*.pm"))]


def _maintainer_scripts() -> list[Path]:
    return sorted(p for p in Path("/var/lib/dpkg/info").iterdir() if p.suffix.lstrip(".") in MAINTAINER_SCRIPTS)


def _python_headers() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["include"]).rglob("*.h"))


def _licenses() -> list[Path]:
    return sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file())


DOMAINS: dict[str, tuple[str, Callable[[], list[Path]]]] = {
    "licenses": ("base-files license texts (/usr/share/common-licenses)", _licenses),
    "perl": ("perl-base and debconf Perl modules (*.pm)", _perl_modules),
    "shell": ("dpkg maintainer scripts (/var/lib/dpkg/info)", _maintainer_scripts),
    "cheaders": ("the Python installation's C headers (*.h)", _python_headers),
}


def custom_sources() -> list[DomainSource]:
    """One prepare source per domain; a domain whose files are missing is a PrepareError."""
    sources = []
    for name, (description, files) in DOMAINS.items():
        try:
            docs = list(capped(p.read_bytes() for p in files() if p.is_file()))
        except OSError as e:
            raise PrepareError(f"domain {name}: cannot read {e.filename} ({e.strerror})") from None
        if not docs:
            raise PrepareError(f"domain {name}: no files found ({description})")
        sources.append(DomainSource(name, description, lambda d=docs: iter(d), lambda d=docs: [len(x) for x in d]))
    return sources


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.corpora.make_custom", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder for the manifest and shards")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    return run_prepare_cli(
        lambda: prepare_sources(custom_sources(), args.out, tokenizer=args.tokenizer, force=args.force)
    )


if __name__ == "__main__":
    sys.exit(main())
