"""Render a policy directory as the Kubernetes ConfigMap that ``deploy/kubernetes`` mounts.

``python -m extauthz.devtools.kube policies/ > deploy/kubernetes/configmap.yaml`` regenerates
the shipped one; ``tests/test_deploy.py`` checks that the two agree.

The ConfigMap is flat on purpose: a ConfigMap key cannot contain ``/``, and mounting keys into
subdirectories (``items[].path: shop/orders.yaml``) makes the kubelet create ``shop`` as a
*symlink* to a directory, which the policy loader does not descend into, so those policies
would silently not load. Here ``shop/orders.yaml`` becomes the key ``shop.orders.yaml``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

__all__ = ["configmap_key", "policy_configmap", "policy_configmap_files"]

DEFAULT_NAME = "extauthz-policies"
# Kubernetes ConfigMap keys: [-._a-zA-Z0-9]+, at most 253 characters.
_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
_SKIPPED_SUFFIXES = (".test.yaml", ".test.yml", ".md")


def configmap_key(relative: Path) -> str:
    """The flat ConfigMap key of a file at ``relative`` (``shop/orders.yaml``)."""
    key = ".".join(relative.parts)
    if not _KEY.fullmatch(key) or key.startswith("."):
        raise ValueError(f"{relative}: not representable as a ConfigMap key ({key!r})")
    return key


def policy_configmap_files(directory: Path) -> dict[str, str]:
    """ConfigMap key -> text of every file extauthz may need from ``directory``.

    That is every non-hidden file except policy tests (``*.test.yaml``) and documentation
    (``*.md``): the policies and the files they name (e.g. a ``jwksUri`` JWKS file).
    """
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    files: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if (
            not path.is_file()
            or any(part.startswith(".") for part in relative.parts)
            or path.name.endswith(_SKIPPED_SUFFIXES)
        ):
            continue
        key = configmap_key(relative)
        if key in files:
            raise ValueError(f"{relative}: ConfigMap key {key!r} is already taken")
        files[key] = path.read_text(encoding="utf-8")
    return files


def policy_configmap(
    files: Mapping[str, str], *, name: str = DEFAULT_NAME, source: str = "policies/"
) -> str:
    """The ConfigMap YAML holding ``files``, every file as a literal block, byte for byte."""
    lines = [
        f"# Generated from {source} by `python -m extauthz.devtools.kube {source}`: edit the",
        "# policies there and regenerate; tests/test_deploy.py checks that the two agree.",
        "# Flat on purpose (see extauthz/devtools/kube.py): shop/orders.yaml is shop.orders.yaml.",
        "# Updating this ConfigMap reloads the policies in every replica without a restart",
        "# (kubelet sync, then --reload-interval); a broken set is refused and the last good",
        "# one stays in force.",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {name}",
        "  labels:",
        "    app.kubernetes.io/name: extauthz",
        "    app.kubernetes.io/component: policies",
        "data:",
    ]
    for key, text in files.items():
        if not text.endswith("\n") or text.endswith("\n\n"):
            raise ValueError(f"{key}: must end with exactly one newline to be kept byte for byte")
        if "\t" in text or "\r" in text or text[0] in " \n":
            raise ValueError(f"{key}: tabs, CRs or a leading blank do not fit a literal block")
        lines.append(f"  {key}: |")
        lines.extend(f"    {line}" if line else "" for line in text[:-1].split("\n"))
    rendered = "\n".join(lines) + "\n"
    # The promise is byte-for-byte content: prove it rather than trust the quoting above.
    if yaml.safe_load(rendered)["data"] != dict(files):
        raise ValueError("rendered ConfigMap does not round-trip its files")
    return rendered


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m extauthz.devtools.kube",
        description="print a policy directory as extauthz's Kubernetes ConfigMap",
    )
    ap.add_argument("directory", type=Path)
    ap.add_argument("--name", default=DEFAULT_NAME)
    args = ap.parse_args(argv)
    source = args.directory.as_posix().rstrip("/") + "/"
    sys.stdout.write(
        policy_configmap(policy_configmap_files(args.directory), name=args.name, source=source)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
