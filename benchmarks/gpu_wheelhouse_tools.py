"""benchmarks/gpu_wheelhouse.sh's steps in Python: what the GPU machine lacks, and whether an install from the
wheelhouse resolves there.

    python gpu_wheelhouse_tools.py closure PTLAB_WHEEL IMAGE_LIST PYTHON OUT_LIST
    python gpu_wheelhouse_tools.py check WHEELHOUSE IMAGE_LIST PYTHON

``closure`` follows the wheel's requirements over this Python's installed distributions (markers read for the
target: Linux x86_64, CPython ``PYTHON``), stopping at what the image list holds, and writes ``name==version`` lines;
``check`` exits non-zero naming every requirement of a wheel in WHEELHOUSE that neither another wheel there nor the
image list (at its version, where the list has one) meets.
"""

from __future__ import annotations

import email
import importlib.metadata as md
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version


def norm(name: str) -> str:
    """A distribution name as the packaging specs compare it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image(path: str | Path) -> dict[str, str | None]:
    """{name: version or None} of the image list."""
    found = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[norm(name)] = version.strip() or None
    return found


def environment(python: str) -> dict[str, str]:
    """Marker variables of the target: CPython ``python`` on Linux x86_64, no extras."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def requirements(metadata: email.message.Message, env: dict[str, str]) -> list[Requirement]:
    """The wheel's or distribution's requirements that apply on the target (no extras)."""
    return [r for r in map(Requirement, metadata.get_all("Requires-Dist") or []) if not r.marker or r.marker.evaluate(env)]


def wheel_metadata(path: str | Path) -> email.message.Message:
    """A wheel's METADATA."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


def closure(wheel: str, image_list: str, python: str, out: str) -> None:
    """Write the ``name==version`` lines of what the target lacks (module docstring)."""
    have, env = image(image_list), environment(python)
    installed = {norm(d.metadata["Name"]): d for d in md.distributions()}
    todo = requirements(wheel_metadata(wheel), env)
    need, missing = {}, []
    while todo:
        req = todo.pop()
        name = norm(req.name)
        if name in have or name in need:
            continue
        if name not in installed:
            missing.append(str(req))
            continue
        dist = installed[name]
        need[name] = f"{dist.metadata['Name']}=={dist.version}"
        todo.extend(requirements(dist.metadata, env))
    if missing:
        sys.exit(f"gpu_wheelhouse: not installed in the venv (needed on the target): {', '.join(sorted(missing))}")
    Path(out).write_text("".join(f"{line}\n" for _, line in sorted(need.items())))
    print(f"gpu_wheelhouse: {len(need)} distributions the image lacks: {', '.join(sorted(need))}")


def problems(folder: str | Path, image_list: str | Path, python: str) -> tuple[list[str], int, int, list[str]]:
    """What would not resolve (every requirement of every wheel met by the wheelhouse or the image; each wheel's
    Requires-Python by the target's), the requirements checked, the wheels read, and the version ranges left to the
    machine (on image distributions the list names without a version)."""
    have, env = image(image_list), environment(python)
    wheels = {}
    for path in Path(folder).glob("*.whl"):
        meta = wheel_metadata(path)
        wheels[norm(meta["Name"])] = (meta["Version"], meta, path.name)
    found, checked, unversioned = [], 0, set()
    for name, (_, meta, file) in sorted(wheels.items(), key=lambda item: item[0]):
        spec = meta.get("Requires-Python")
        if spec and Version(python) not in SpecifierSet(spec):
            found.append(f"{file}: Requires-Python {spec} excludes Python {python}")
        for req in requirements(meta, env):
            checked += 1
            dep = norm(req.name)
            if dep in wheels:
                if not req.specifier.contains(wheels[dep][0], prereleases=True):
                    found.append(f"{name} needs {req}, the wheelhouse has {wheels[dep][0]}")
            elif dep in have:
                known = have[dep]
                if known is not None and not req.specifier.contains(known, prereleases=True):
                    found.append(f"{name} needs {req}, the image has {known}")
                elif known is None and str(req.specifier):
                    unversioned.add(f"{dep}{req.specifier}")
            else:
                found.append(f"{name} needs {req}: neither in the wheelhouse nor in the image")
    return found, checked, len(wheels), sorted(unversioned)


def check(folder: str, image_list: str, python: str) -> None:
    """Exit non-zero naming what would not resolve (``problems``), else print one line."""
    found, checked, wheels, unversioned = problems(folder, image_list, python)
    if found:
        sys.exit("gpu_wheelhouse: the install would not resolve:\n  " + "\n  ".join(found))
    print(
        f"gpu_wheelhouse: resolves: {checked} requirements of {wheels} wheels, each met by the wheelhouse or "
        f"the image (versions checked where the image list has them; {len(unversioned)} ranges on image "
        f"distributions listed without a version are left to pip there: {', '.join(unversioned)})"
    )


if __name__ == "__main__":
    {"closure": closure, "check": check}[sys.argv[1]](*sys.argv[2:])
