"""`clusterfs keygen [-o FILE] [--base64]`: make a random 32-byte cluster key (mode 0600).

A missing parent directory of FILE is created with mode 0700.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import sys

KEY_BYTES = 32


def make_key_text(*, b64: bool = False) -> str:
    key = secrets.token_bytes(KEY_BYTES)
    return (base64.b64encode(key).decode() if b64 else key.hex()) + "\n"


def write_key(path: str, *, b64: bool = False, force: bool = False) -> None:
    # A fresh machine has no /etc/clusterfs yet; the directory of a secret is
    # private (0700), like the key itself (0600). An existing one is left as is.
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, make_key_text(b64=b64).encode())
    finally:
        os.close(fd)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the key here (mode 0600; a missing directory is made, mode 0700)")
    p.add_argument("--base64", action="store_true", help="base64 instead of hex")
    p.add_argument("-f", "--force", action="store_true", help="overwrite FILE")


def run(args: argparse.Namespace) -> int:
    if not args.output:
        sys.stdout.write(make_key_text(b64=args.base64))
        return 0
    try:
        write_key(args.output, b64=args.base64, force=args.force)
    except FileExistsError:
        print(f"clusterfs keygen: {args.output} exists (use -f)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"clusterfs keygen: {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0
