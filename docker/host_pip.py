"""The host's pip configuration, rewritten for container builds (docker/test-stack.sh).

Reads ``pip config list`` (files and ``PIP_*`` variables) and the host's CA bundle; every local path
it names (CA bundle, constraint files, find-links folders, ``file://`` indexes) is mounted read-only
at a side path under ``/run/host-pip`` and the configuration is rewritten to point there. Writes
``pip.conf`` into OUT_DIR and prints one ``HOST_PATH:CONTAINER_PATH`` mount per line.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

SIDE = Path("/run/host-pip")
PATH_KEYS = {"cert", "client-cert", "constraint", "find-links", "index-url", "extra-index-url"}
# Lowest precedence first: a later scope's value replaces an earlier one's (pip's own order).
SCOPES = ("global", "user", "site", ":env:")


def host_config() -> dict[str, str]:
    """The host pip's effective ``key -> value`` (empty when pip is not there)."""
    done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    found: dict[str, dict[str, str]] = {scope: {} for scope in SCOPES}
    for line in done.stdout.splitlines():
        name, _, value = line.partition("=")
        scope, _, key = name.rpartition(".")
        if scope in found and key:
            found[scope][key] = value.strip().strip("'\"")
    merged: dict[str, str] = {}
    for scope in SCOPES:
        merged.update(found[scope])
    return merged


def ca_bundle() -> Path | None:
    """The CA bundle this host's Python verifies TLS with (OpenSSL's default, else certifi's)."""
    cafile = ssl.get_default_verify_paths().cafile
    if cafile and Path(cafile).is_file():
        return Path(cafile).resolve()
    try:
        import certifi
    except ImportError:
        return None
    return Path(certifi.where())


class Mounts:
    """Host paths and the side paths they are mounted at, one each."""

    def __init__(self) -> None:
        self.pairs: dict[Path, Path] = {}

    def side(self, host: Path) -> Path:
        if host not in self.pairs:
            self.pairs[host] = SIDE / f"{len(self.pairs)}-{host.name}"
        return self.pairs[host]

    def rewrite(self, item: str) -> str:
        """One configuration item with its local path replaced by the side path."""
        if item.startswith("file:"):
            local = Path(urlparse(item).path)
            if not local.exists():
                return item
            # An index's pages link to files beside it (../../files): mount its parent folder.
            return (self.side(local.parent) / local.name).as_uri()
        if item.startswith("/") and Path(item).exists():
            return str(self.side(Path(item)))
        return item


def main(out_dir: str) -> None:
    config, mounts = host_config(), Mounts()
    bundle = ca_bundle()
    if bundle is not None:
        config.setdefault("cert", str(bundle))
    lines = ["[global]"]
    for key, value in sorted(config.items()):
        if key in PATH_KEYS:
            value = " ".join(mounts.rewrite(item) for item in value.split())
        lines.append(f"{key} = {value}")
    (Path(out_dir) / "pip.conf").write_text("\n".join(lines) + "\n")
    for host, side in mounts.pairs.items():
        print(f"{host}:{side}")


if __name__ == "__main__":
    main(sys.argv[1])
