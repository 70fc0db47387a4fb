"""Generate the Python protobuf/gRPC code into sidecar/_proto, importable inside the package.

protoc writes imports relative to the proto root (``from proviso.v1 import x_pb2``); we rewrite
them to ``sidecar._proto.proviso.v1`` so the generated code lives inside our package without
touching sys.path. The output is never edited by hand and never committed.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "sidecar" / "_proto"
IMPORT_RE = re.compile(r"^from proviso\.v1 import ", re.MULTILINE)


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *sources,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for path in OUT.rglob("*.py*"):
        text = path.read_text()
        path.write_text(IMPORT_RE.sub("from sidecar._proto.proviso.v1 import ", text))
    for directory in [OUT, *[p for p in OUT.rglob("*") if p.is_dir()]]:
        (directory / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
