"""The committed stubs under prefstream/ match proto/: regenerate into a temp dir and compare."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path):
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
        cwd=ROOT / "proto" / "..", check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated
    stale = [str(g) for g in generated if not (ROOT / g).exists() or not filecmp.cmp(tmp_path / g, ROOT / g, shallow=False)]
    assert not stale, f"stale generated stubs (run `make protos`): {stale}"


def test_packages_match_paths():
    for proto in (ROOT / "proto").rglob("*.proto"):
        rel = proto.relative_to(ROOT / "proto").parent
        expected = "package " + ".".join(rel.parts) + ";"
        assert expected in proto.read_text(), f"{proto}: package must be {expected}"
