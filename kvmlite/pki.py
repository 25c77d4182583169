"""Throwaway certificates for trying `--tls-*`: a CA and one certificate per VMM.

    python -m kvmlite.pki DIR [--host 127.0.0.1 --host dest.example ...]

writes DIR/ca.pem, DIR/src.pem + src.key and DIR/dst.pem + dst.key, signed by
the CA and valid for the given hosts (default 127.0.0.1 and localhost), with
the machine's `openssl`.  The tests and `make bench` use it.  For real hosts
use certificates from your own CA; nothing here is meant to be kept.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import ConfigError

CURVE = "ec_paramgen_curve:P-256"


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise ConfigError(f"openssl {args[0]} failed: {r.stderr.strip()[-300:]}")


def _san(hosts: list[str]) -> str:
    names = []
    for h in hosts:
        try:
            ipaddress.ip_address(h)
            names.append(f"IP:{h}")
        except ValueError:
            names.append(f"DNS:{h}")
    return "subjectAltName=" + ",".join(names)


def make_pki(directory, *, hosts=("127.0.0.1", "localhost"), name: str = "kvmlite test",
             days: int = 7) -> dict:
    """Create the CA and the two certificates in `directory`; returns their paths."""
    if not shutil.which("openssl"):
        raise ConfigError("openssl is not installed (apt install openssl)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", CURVE, "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", str(days), "-subj", f"/CN={name} CA", cwd=d)
    (d / "san.ext").write_text(_san(list(hosts)) + "\n")
    out = {"ca": d / "ca.pem"}
    for who in ("src", "dst"):
        _openssl("req", "-newkey", "ec", "-pkeyopt", CURVE, "-nodes", "-keyout", f"{who}.key",
                 "-out", f"{who}.csr", "-subj", f"/CN={name} {who}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{who}.pem", "-days", str(days),
                 "-extfile", "san.ext", cwd=d)
        out[who] = (d / f"{who}.pem", d / f"{who}.key")
    return out


def tls_args(pki: dict, who: str) -> list[str]:
    """The `kvmlite run` options for `who` ("src" or "dst")."""
    cert, key = pki[who]
    return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(pki["ca"])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmlite.pki", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory")
    ap.add_argument("--host", action="append", help="a name or address the certificates are for")
    args = ap.parse_args(argv)
    try:
        pki = make_pki(args.directory, hosts=args.host or ("127.0.0.1", "localhost"))
    except ConfigError as e:
        print(f"kvmlite: error: {e}", file=sys.stderr)
        return 1
    print(f"source:      kvmlite run ... {' '.join(tls_args(pki, 'src'))}")
    print(f"destination: kvmlite run --incoming ... {' '.join(tls_args(pki, 'dst'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
